package kvm

import (
	"context"
	"io"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/examples/internal/devtlb"
	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const rw = gomm.ProtRead | gomm.ProtWrite

// newVM builds a checked machine, an MM with pages of anonymous memory
// at hva, and a VM whose guest-physical 0 is hva.
func newVM(t *testing.T, cfg gomm.Config, pages int) (*gomm.Machine, *gomm.MM, *VM, uint64) {
	t.Helper()
	cfg.Check = true
	m, err := gomm.NewMachine(cfg)
	require.NoError(t, err)
	mm := m.NewMM()
	hva, err := mm.Mmap(0x1000_0000, uint64(pages)*PageSize, rw, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
	require.NoError(t, err)
	vm, err := New(context.Background(), m, mm)
	require.NoError(t, err)
	require.NoError(t, vm.SetMemslot(Memslot{GPA: 0, Size: uint64(pages) * PageSize, HVA: hva}))
	return m, mm, vm, hva
}

func noViolations(t *testing.T, m *gomm.Machine) {
	t.Helper()
	if v, n := m.Violations(); n > 0 {
		t.Fatalf("%d checker violations; first: %v", n, v[0])
	}
}

func TestMemslotValidation(t *testing.T) {
	_, mm, vm, hva := newVM(t, gomm.Config{Frames: 256}, 4)
	tests := []struct {
		name string
		s    Memslot
	}{
		{"empty", Memslot{GPA: 1 << 20, Size: 0, HVA: hva}},
		{"unaligned gpa", Memslot{GPA: 1<<20 + 1, Size: PageSize, HVA: hva}},
		{"unaligned size", Memslot{GPA: 1 << 20, Size: 100, HVA: hva}},
		{"overlap", Memslot{GPA: PageSize, Size: PageSize, HVA: hva}},
		{"wraps", Memslot{GPA: 1 << 20, Size: ^uint64(0) &^ (PageSize - 1), HVA: hva}},
	}
	for _, tc := range tests {
		assert.ErrorIs(t, vm.SetMemslot(tc.s), ErrBadSlot, tc.name)
	}
	_, err := vm.Load64(1 << 30)
	assert.ErrorIs(t, err, ErrNoSlot)
	assert.ErrorIs(t, vm.Store64(3, 1), gomm.ErrInvalid, "unaligned guest access")
	require.NoError(t, vm.Close())
	require.NoError(t, mm.Exit())
}

// The guest sees the host's memory, and every host change that could
// leave a shadow entry stale zaps it first: munmap, mprotect, a KSM
// merge, swap-out, migration.
func TestShadowFollowsTheHost(t *testing.T) {
	m, mm, vm, hva := newVM(t, gomm.Config{Frames: 512, SwapSlots: 512}, 8)
	require.NoError(t, vm.Store64(0, 11))
	require.NoError(t, vm.Store64(PageSize, 11))
	var b [8]byte
	_, err := mm.ReadAt(b[:], hva)
	require.NoError(t, err)
	assert.Equal(t, byte(11), b[0], "the host sees the guest's store")
	assert.Equal(t, 2, vm.ShadowEntries())

	// KSM merges the two identical pages: the write-protect zaps the
	// writable shadow entries; the guest reads the merged page, and a
	// guest write breaks COW through a write fault.
	require.NoError(t, mm.Madvise(hva, 8*PageSize, gomm.MadvMergeable))
	m.KSMScan(64)
	m.KSMScan(64)
	require.Positive(t, m.KSMStats().PagesSharing)
	v, err := vm.Load64(PageSize)
	require.NoError(t, err)
	assert.Equal(t, uint64(11), v)
	require.NoError(t, vm.Store64(PageSize, 12))
	v, _ = vm.Load64(0)
	assert.Equal(t, uint64(11), v)

	// Swap-out and migration: zapped, then faulted back with the data.
	for range 3 {
		m.Reclaim(512)
	}
	require.Positive(t, m.Stats().Reclaim.SwappedOut)
	v, _ = vm.Load64(PageSize)
	assert.Equal(t, uint64(12), v)
	_, err = mm.MovePages([]uint64{hva + PageSize})
	require.NoError(t, err)
	v, _ = vm.Load64(PageSize)
	assert.Equal(t, uint64(12), v)

	// mprotect: a guest write faults with the host's verdict.
	require.NoError(t, mm.Mprotect(hva, PageSize, gomm.ProtRead))
	assert.ErrorIs(t, vm.Store64(0, 1), gomm.ErrFault)
	// munmap: gone for the guest too.
	require.NoError(t, mm.Munmap(hva, 8*PageSize))
	_, err = vm.Load64(0)
	assert.ErrorIs(t, err, gomm.ErrFault)
	assert.Zero(t, vm.ShadowEntries())
	assert.Positive(t, vm.Stats().Zapped)
	noViolations(t, m)
	require.NoError(t, vm.Close())
	require.NoError(t, mm.Exit())
}

// Host reclaim asks the VM whether the guest used a page: a young
// shadow entry keeps it on the active list, once.
func TestAgingSeesGuestAccesses(t *testing.T) {
	m, mm, vm, hva := newVM(t, gomm.Config{Frames: 512}, 4)
	require.NoError(t, vm.Store64(0, 1))
	assert.True(t, vm.TestYoung(nil, hva))
	assert.True(t, vm.ClearFlushYoung(nil, hva, hva+PageSize))
	assert.False(t, vm.TestYoung(nil, hva), "cleared")
	_, err := vm.Load64(0)
	require.NoError(t, err)
	assert.True(t, vm.ClearYoung(nil, hva, hva+PageSize), "the guest's load set it again")
	noViolations(t, m)
	require.NoError(t, vm.Close())
	require.NoError(t, mm.Exit())
}

// MM exit releases the VM: every shadow entry goes before any frame is
// freed.
func TestReleaseZapsEverything(t *testing.T) {
	m, mm, vm, _ := newVM(t, gomm.Config{Frames: 512}, 16)
	for p := range uint64(16) {
		require.NoError(t, vm.Store64(p*PageSize, p))
	}
	require.NoError(t, mm.Exit())
	assert.Zero(t, vm.ShadowEntries())
	_, err := vm.Load64(0)
	assert.ErrorIs(t, err, gomm.ErrClosed)
	noViolations(t, m)
	vm.unregisterCache()
}

// churn runs vCPU stores (a read would map the zero page, never freed)
// over pages of guest memory while the host
// unmaps and remaps the backing range, until rounds host rounds are done
// and the vCPUs have retried at least once.
func churn(t *testing.T, noRetryCheck bool, rounds int) *gomm.Machine {
	const pages = 8
	m, mm, vm, hva := newVM(t, gomm.Config{Frames: 1024, CPUs: 1}, pages)
	vm.noRetryCheck = noRetryCheck
	var stop atomic.Bool
	var wg sync.WaitGroup
	for c := range 2 {
		wg.Go(func() {
			for i := c; !stop.Load(); i++ {
				_ = vm.Store64(uint64(i%pages)*PageSize, uint64(i)) // faults while unmapped are fine
			}
		})
	}
	// Past rounds, go on until a vCPU has retried at least once, within
	// bounds: with the retry check removed no retry ever comes, and the
	// test must fail, not hang.
	for r := 0; r < rounds || vm.Stats().Retries == 0 && !noRetryCheck && r < 20*rounds; r++ {
		require.NoError(t, mm.Munmap(hva, pages*PageSize))
		_, err := mm.Mmap(hva, pages*PageSize, rw, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
		require.NoError(t, err)
		if noRetryCheck {
			if _, n := m.Violations(); n > 0 {
				break
			}
		}
	}
	stop.Store(true)
	wg.Wait()
	if !noRetryCheck {
		assert.Positive(t, vm.Stats().Retries, "no vCPU ever retried: the race never ran")
	}
	require.NoError(t, vm.Close())
	require.NoError(t, mm.Exit())
	return m
}

// The fault/invalidate race KVM's sequence count closes: a vCPU GUPs a
// page, the host unmaps it, and the stale page goes into the shadow
// table after the zap. With the retry check, the checker stays quiet
// however often the race is run.
func TestFaultRacesInvalidation(t *testing.T) {
	m := churn(t, false, testmain.Iterations(3000, 500))
	noViolations(t, m)
}

// Without the retry check the same churn leaves a shadow entry to a
// freed frame, and the checker catches it: the test above is not passing
// by luck.
func TestFaultRacesInvalidationWithoutRetryIsCaught(t *testing.T) {
	m := churn(t, true, 20000)
	_, n := m.Violations()
	assert.Positive(t, n, "the checker must catch a shadow entry to a freed frame")
}

func TestDemo(t *testing.T) {
	rep, err := RunDemo(io.Discard, DemoConfig{RAMPages: 512, Rounds: testmain.Iterations(3, 2)})
	require.NoError(t, err)
	assert.Zero(t, rep.Violations)
	assert.Positive(t, rep.Swapped, "the guest is larger than RAM")
	assert.Positive(t, rep.Merged)
	assert.Positive(t, rep.VM.Zapped)
	assert.Zero(t, rep.VM.GUPHeld)
}

// TestNoInstallAfterRelease: a fault that looked its page up before the
// MM's release must not install it after; exit's zap, which follows
// release, reaches no subscriber. Without the released check the shadow
// table keeps the frame exit frees, and the checker catches it.
func TestNoInstallAfterRelease(t *testing.T) {
	m, mm, vm, _ := newVM(t, gomm.Config{Frames: 256}, 4)
	stall := devtlb.NewStallRelease()
	_, err := mm.RegisterNotifier(context.Background(), stall)
	require.NoError(t, err)
	exited := make(chan error, 1)
	vm.afterGUP = func() {
		vm.afterGUP = nil
		go func() { exited <- mm.Exit() }()
		<-stall.Reached // the VM's release ran; exit's zap has not
	}
	err = vm.Store64(0, 1)
	assert.ErrorIs(t, err, gomm.ErrClosed, "the install after release is refused")
	assert.Zero(t, vm.ShadowEntries())
	close(stall.Resume)
	require.NoError(t, <-exited)
	require.NoError(t, vm.Close())
	noViolations(t, m)
}
