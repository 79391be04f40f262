package gomm_test

import (
	"errors"
	"math"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestInjectionRejectsBadSettings(t *testing.T) {
	for _, in := range []gomm.Injection{
		{Rate: -0.1},
		{Rate: 1.5},
		{Rate: math.NaN()},
		{Rate: 0.5, Sites: 1 << 7},
	} {
		_, err := gomm.NewMachine(gomm.Config{Frames: 64, Inject: in})
		assert.ErrorIs(t, err, gomm.ErrInvalid, "%+v", in)
		m := newMachine(t, gomm.Config{Frames: 64})
		assert.ErrorIs(t, m.SetInjection(in), gomm.ErrInvalid, "%+v", in)
	}
}

// TestInjectionSites checks that each site fails where it should and
// nowhere else, and is counted.
func TestInjectionSites(t *testing.T) {
	m := newMachine(t, gomm.Config{Frames: 256, SwapSlots: 64})
	mm := m.NewMM()
	defer func() { require.NoError(t, mm.Exit()) }()
	addr, err := mm.Mmap(0, 4*page, rw, anon)
	require.NoError(t, err)

	// Page tables only: the first touch needs three tables, and fails.
	require.NoError(t, m.SetInjection(gomm.Injection{Rate: 1, Sites: gomm.InjectPageTable}))
	_, err = mm.WriteAt([]byte{1}, addr)
	require.ErrorIs(t, err, gomm.ErrNoMem)
	assert.Equal(t, gomm.InjectStats{PageTables: 1}, m.Stats().Injected, "an injected failure is final: no reclaim and retry")

	// Frames only: the tables come, the page does not.
	require.NoError(t, m.SetInjection(gomm.Injection{Rate: 1, Sites: gomm.InjectFrame}))
	_, err = mm.WriteAt([]byte{1}, addr)
	require.ErrorIs(t, err, gomm.ErrNoMem)
	assert.Equal(t, uint64(1), m.Stats().Injected.Frames)
	assert.Positive(t, mm.PageTableFrames())

	// Swap slots: reclaim keeps the page.
	require.NoError(t, m.SetInjection(gomm.Injection{}))
	_, err = mm.WriteAt([]byte{7}, addr)
	require.NoError(t, err)
	require.NoError(t, m.SetInjection(gomm.Injection{Rate: 1, Sites: gomm.InjectSwapSlot}))
	for range 3 { // the first look only deactivates
		m.Reclaim(64)
	}
	assert.Zero(t, m.Stats().Swap.Outs)
	assert.Positive(t, m.Stats().Injected.SwapSlots)
	require.NoError(t, m.SetInjection(gomm.Injection{}))
	for range 3 {
		m.Reclaim(64)
	}
	assert.Equal(t, uint64(1), m.Stats().Swap.Outs, "without injection the page goes to swap")
	var b [1]byte
	_, err = mm.ReadAt(b[:], addr)
	require.NoError(t, err)
	assert.Equal(t, byte(7), b[0])
	require.NoError(t, m.CheckRmap(mm))
}

// TestInjectionRate checks the rate and the seed's determinism.
func TestInjectionRate(t *testing.T) {
	run := func(seed uint64) (failed []int) {
		m := newMachine(t, gomm.Config{Frames: 4096, Inject: gomm.Injection{Rate: 0.25, Sites: gomm.InjectFrame, Seed: seed}})
		mm := m.NewMM()
		defer func() { require.NoError(t, mm.Exit()) }()
		addr, err := mm.Mmap(0, 1024*page, rw, anon)
		require.NoError(t, err)
		for i := range 1024 {
			if _, err := mm.WriteAt([]byte{1}, addr+uint64(i)*page); err != nil {
				require.ErrorIs(t, err, gomm.ErrNoMem)
				failed = append(failed, i)
			}
		}
		assert.Equal(t, uint64(len(failed)), m.Stats().Injected.Frames)
		require.NoError(t, m.CheckRmap(mm))
		return failed
	}
	a, b, c := run(1), run(1), run(2)
	assert.InDelta(t, 256, len(a), 64, "a quarter of 1024 allocations")
	assert.Equal(t, a, b, "the same seed fails the same allocations")
	assert.NotEqual(t, a, c)
}

// TestFailedMremapFreesItsTables: a move that runs out of page tables
// half way leaves every entry where it was and no table behind.
func TestFailedMremapFreesItsTables(t *testing.T) {
	m := newMachine(t, gomm.Config{Frames: 1024})
	mm := m.NewMM()
	defer func() { require.NoError(t, mm.Exit()) }()
	const pages = 3 * 512 // three PTE tables' worth
	addr, err := mm.Mmap(0x4000_0000, pages*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	for i := uint64(0); i < pages; i += 512 {
		_, err := mm.WriteAt([]byte{byte(i/512 + 1)}, addr+i*page)
		require.NoError(t, err)
	}
	tables := mm.PageTableFrames()
	// Two tables come, the third fails.
	failAfter := 0
	for seed := uint64(0); ; seed++ {
		require.Less(t, seed, uint64(10000), "no seed fails a later table")
		require.NoError(t, m.SetInjection(gomm.Injection{Rate: 0.3, Sites: gomm.InjectPageTable, Seed: seed}))
		before := m.Stats().Injected.PageTables
		_, err = mm.Mremap(addr, pages*page, pages*page, gomm.MremapMayMove|gomm.MremapFixed, 0x8000_0000)
		require.NoError(t, m.SetInjection(gomm.Injection{}))
		if err == nil {
			// Moved whole: move it back and try another seed.
			_, err = mm.Mremap(0x8000_0000, pages*page, pages*page, gomm.MremapMayMove|gomm.MremapFixed, addr)
			require.NoError(t, err)
			continue
		}
		require.ErrorIs(t, err, gomm.ErrNoMem)
		require.Equal(t, before+1, m.Stats().Injected.PageTables)
		if mm.PageTableFrames() == tables && failAfter > 0 {
			break
		}
		failAfter++
		assert.Equal(t, tables, mm.PageTableFrames(), "a failed move leaves no table behind")
	}
	assert.Equal(t, []gomm.VMA{{Start: addr, End: addr + pages*page, Prot: rw}}, mm.VMAs())
	for i := uint64(0); i < pages; i += 512 {
		var b [1]byte
		_, err := mm.ReadAt(b[:], addr+i*page)
		require.NoError(t, err)
		assert.Equal(t, byte(i/512+1), b[0])
	}
	require.NoError(t, m.CheckRmap(mm))
}

// TestMlockOutOfMemory: a page that cannot be faulted in ends mlock with
// EAGAIN; the range stays locked and what was faulted in is locked.
func TestMlockOutOfMemory(t *testing.T) {
	m := newMachine(t, gomm.Config{Frames: 256, SwapSlots: 256})
	mm := m.NewMM()
	defer func() { require.NoError(t, mm.Exit()) }()
	addr, err := mm.Mmap(0, 16*page, rw, anon)
	require.NoError(t, err)
	require.NoError(t, m.SetInjection(gomm.Injection{Rate: 0.5, Sites: gomm.InjectFrame, Seed: 3}))
	err = mm.Mlock(addr, 16*page)
	require.NoError(t, m.SetInjection(gomm.Injection{}))
	require.ErrorIs(t, err, gomm.ErrAgain)
	assert.False(t, errors.Is(err, gomm.ErrNoMem), "the kernel says EAGAIN, not ENOMEM")
	assert.True(t, mm.VMAs()[0].Locked, "the range stays locked")
	require.Positive(t, mm.RSS(), "some pages were faulted in")
	st := m.Stats().LRU
	assert.Zero(t, st.Inactive+st.Active, "the pages faulted in are mlocked: off the LRU")
	require.NoError(t, mm.Mlock(addr, 16*page), "a retry finishes the job")
	m.Reclaim(256)
	m.Reclaim(256)
	assert.Zero(t, m.Stats().Swap.Outs, "locked pages stay")
	require.NoError(t, m.CheckRmap(mm))
}

// TestUnmergeableOutOfMemory: MADV_UNMERGEABLE that cannot copy every
// KSM page fails and leaves the range mergeable, so a retry finishes.
func TestUnmergeableOutOfMemory(t *testing.T) {
	m := newMachine(t, gomm.Config{Frames: 512})
	mm := m.NewMM()
	defer func() { require.NoError(t, mm.Exit()) }()
	addr, err := mm.Mmap(0, 8*page, rw, anon)
	require.NoError(t, err)
	for i := range uint64(8) {
		_, err := mm.WriteAt([]byte{42}, addr+i*page)
		require.NoError(t, err)
	}
	require.NoError(t, mm.Madvise(addr, 8*page, gomm.MadvMergeable))
	var ks gomm.KSMStats
	for range 4 {
		ks = m.KSMScan(64)
	}
	require.Positive(t, ks.PagesSharing, "the pages merged")
	require.NoError(t, m.SetInjection(gomm.Injection{Rate: 1, Sites: gomm.InjectFrame}))
	err = mm.Madvise(addr, 8*page, gomm.MadvUnmergeable)
	require.NoError(t, m.SetInjection(gomm.Injection{}))
	require.ErrorIs(t, err, gomm.ErrNoMem)
	assert.True(t, mm.VMAs()[0].Mergeable, "still mergeable after the failure")
	require.NoError(t, mm.Madvise(addr, 8*page, gomm.MadvUnmergeable))
	assert.False(t, mm.VMAs()[0].Mergeable)
	assert.Zero(t, m.KSMStats().PagesShared+m.KSMStats().PagesSharing)
	require.NoError(t, m.CheckRmap(mm))
}
