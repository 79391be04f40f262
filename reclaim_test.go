package gomm_test

import (
	"github.com/gomm-dev/gomm/internal/testmain"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func fillPages(t *testing.T, mm *gomm.MM, addr uint64, n int, seed uint64) {
	t.Helper()
	for i := range uint64(n) {
		writeWord(t, mm, addr+i*page, seed+i)
	}
}

func checkPages(t *testing.T, mm *gomm.MM, addr uint64, n int, seed uint64) {
	t.Helper()
	for i := range uint64(n) {
		require.Equal(t, seed+i, readWord(t, mm, addr+i*page), "page %d", i)
	}
}

func TestReclaimSwapsOutAndIn(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 512, SwapSlots: 512})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 200*page, rw, anon)
	require.NoError(t, err)
	fillPages(t, mm, addr, 200, 1000)
	// The first look at each page finds it young and gives it another
	// round on the active list; the second finds it cold.
	st := m.Reclaim(150)
	assert.Equal(t, uint64(150), st.Freed)
	assert.Equal(t, uint64(150), st.SwappedOut)
	assert.Equal(t, int64(50), mm.RSS())
	require.NoError(t, m.CheckRmap(mm))
	checkPages(t, mm, addr, 200, 1000)
	sw := m.Stats().Swap
	assert.Equal(t, uint64(150), sw.Ins)
	assert.Zero(t, sw.Used, "a slot is freed when its last entry goes")
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Exit())
	assert.Zero(t, m.Stats().Swap.Used)
}

// TestDirectReclaimUnderPressure: an MM four times the size of RAM
// works, through swap, and runs out only when swap is full too.
func TestDirectReclaimUnderPressure(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 128, SwapSlots: 512})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 1024*page, rw, anon)
	require.NoError(t, err)
	fillPages(t, mm, addr, 500, 7)
	checkPages(t, mm, addr, 500, 7)
	require.NoError(t, m.CheckRmap(mm))
	assert.Positive(t, m.Stats().Reclaim.SwappedOut)
	var full error
	for i := uint64(500); i < 1024 && full == nil; i++ {
		_, full = mm.WriteAt([]byte{1}, addr+i*page)
	}
	assert.ErrorIs(t, full, gomm.ErrNoMem, "RAM and swap both full")
	require.NoError(t, mm.Exit())
	assert.Zero(t, m.Stats().Swap.Used)
}

func TestNoSwapLeavesAnonymousMemory(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 64})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 128*page, rw, anon)
	require.NoError(t, err)
	var oom error
	for i := uint64(0); i < 128 && oom == nil; i++ {
		_, oom = mm.WriteAt([]byte{1}, addr+i*page)
	}
	assert.ErrorIs(t, oom, gomm.ErrNoMem)
	assert.Zero(t, m.Reclaim(10).Freed)
	require.NoError(t, mm.Exit())
}

func TestSwapSharedAfterFork(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 256, SwapSlots: 256})
	parent := m.NewMM()
	addr, err := parent.Mmap(0, 16*page, rw, anon)
	require.NoError(t, err)
	fillPages(t, parent, addr, 16, 50)
	child, err := parent.Fork()
	require.NoError(t, err)
	for range 3 {
		m.Reclaim(1000)
	}
	assert.Zero(t, parent.RSS())
	assert.Zero(t, child.RSS())
	assert.Equal(t, 16, m.Stats().Swap.Used, "one slot per page, named by both")
	require.NoError(t, m.CheckRmap(parent, child))

	checkPages(t, child, addr, 16, 50) // swapped in: found in the cache by the parent
	writeWord(t, child, addr, 1)
	checkPages(t, parent, addr, 16, 50)
	assert.Equal(t, uint64(1), readWord(t, child, addr))
	require.NoError(t, m.CheckRmap(parent, child))
	require.NoError(t, child.Exit())
	require.NoError(t, parent.Exit())
	assert.Zero(t, m.Stats().Swap.Used)
	assert.Zero(t, m.Stats().Swap.Cached)
}

func TestMlockKeepsPagesResident(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 256, SwapSlots: 256})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 32*page, rw, anon)
	require.NoError(t, err)
	require.NoError(t, mm.Mlock(addr, 16*page))
	assert.Equal(t, int64(16), mm.RSS(), "mlock faults the range in")
	fillPages(t, mm, addr, 32, 0)
	for range 3 {
		m.Reclaim(1000)
	}
	assert.Equal(t, int64(16), mm.RSS(), "only the unlocked half went")
	vs := mm.VMAs()
	require.Len(t, vs, 2)
	assert.True(t, vs[0].Locked)
	require.NoError(t, mm.Munlock(addr, 16*page))
	// The halves got different anon_vmas (one was locked when the other
	// was first faulted), so they stay apart, as in Linux.
	for _, v := range mm.VMAs() {
		assert.False(t, v.Locked)
	}
	for range 3 {
		m.Reclaim(1000)
	}
	assert.Zero(t, mm.RSS())
	checkPages(t, mm, addr, 32, 0)
	assert.ErrorIs(t, mm.Mlock(0x1000_0000, page), gomm.ErrNoMem, "nothing mapped there")
	require.NoError(t, mm.Exit())
}

func TestMadvFreePagesAreDiscarded(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 256})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 8*page, rw, anon)
	require.NoError(t, err)
	fillPages(t, mm, addr, 8, 1)
	require.NoError(t, mm.Madvise(addr, 8*page, gomm.MadvFree))
	writeWord(t, mm, addr, 99) // written again: must survive
	for range 3 {
		m.Reclaim(1000)
	}
	assert.Equal(t, uint64(99), readWord(t, mm, addr))
	assert.Zero(t, readWord(t, mm, addr+page), "a discarded page reads as zeros")
	assert.Equal(t, uint64(7), m.Stats().Reclaim.Discarded)
	require.NoError(t, mm.Exit())
}

// TestCPUsWriteWhileReclaimRuns: two CPUs keep writing and checking
// their pages while reclaim swaps them out under them, with a secondary
// MMU mirroring the range throughout: contents survive, and the
// checker finds no translation of a freed frame anywhere.
func TestCPUsWriteWhileReclaimRuns(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 2, Frames: 512, SwapSlots: 1024, TLBEntries: 16})
	mm := m.NewMM()
	const pages = 64
	addr, err := mm.Mmap(0, 2*pages*page, rw, anon)
	require.NoError(t, err)
	dev := newMirror(t, m, mm, addr, 2*pages*page)
	writeWhile(t, m, mm, addr, pages, testmain.Iterations(300, 60),
		func(r, i int) uint64 { return uint64(r<<16 | i) },
		func(r int) error {
			m.Reclaim(32)
			_, err := dev.access(addr+uint64(r%(2*pages))*page, false, 0)
			return err
		},
		func() bool { return m.Stats().Reclaim.SwappedOut > 0 })
	require.NoError(t, m.CheckRmap(mm))
	assert.Positive(t, m.Stats().Reclaim.SwappedOut)
	require.NoError(t, dev.close())
	require.NoError(t, mm.Exit())
}

// TestPageTablesReclaimToo: with RAM full of anonymous pages, a fault
// that needs a new page table reclaims for it instead of failing.
func TestPageTablesReclaimToo(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 64, SwapSlots: 256})
	mm := m.NewMM()
	a, err := mm.Mmap(0x1000_0000, 128*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	fillPages(t, mm, a, 128, 0) // the rest is in swap
	// Use up what direct reclaim left free, without needing a table.
	for i := uint64(0); m.RAM().Stats().Free > 0; i++ {
		writeWord(t, mm, a+(i%128)*page, i%128)
	}
	require.Zero(t, m.RAM().Stats().Free)
	// A new 1 GiB region: its fault needs page tables before any page.
	b, err := mm.Mmap(0x4000_0000, page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	writeWord(t, mm, b, 1)
	assert.Equal(t, uint64(1), readWord(t, mm, b))
	checkPages(t, mm, a, 128, 0)
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Exit())
}

// A frame reclaim cannot lock goes back on the inactive list after the
// scan, not at once: put back at once, it would be isolated next, again
// and again, and reclaim would spend its whole budget on it.
func TestReclaimIsNotStuckOnABusyFrame(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 512, SwapSlots: 512})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 64*page, rw, anon)
	require.NoError(t, err)
	fillPages(t, mm, addr, 64, 0)
	busy := frameAt(t, m, mm, addr)
	require.True(t, busy.TryLock())
	st := m.Reclaim(16)
	busy.Unlock()
	assert.Equal(t, uint64(16), st.Freed)
	checkPages(t, mm, addr, 64, 0)
	require.NoError(t, mm.Exit())
}
