package gomm_test

import (
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const page = gomm.PageSize

func newMachine(t testing.TB, cfg gomm.Config) *gomm.Machine {
	t.Helper()
	cfg.Check = true
	if cfg.Frames == 0 {
		cfg.Frames = 8192
	}
	m, err := gomm.NewMachine(cfg)
	require.NoError(t, err)
	t.Cleanup(func() {
		v, n := m.Violations()
		if n > 0 {
			t.Errorf("%d checker violations; first: %v", n, v[0])
		}
	})
	return m
}

const anon = gomm.MapPrivate | gomm.MapAnonymous

func TestMmapTouchMunmap(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 2})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 4*page, gomm.ProtRead|gomm.ProtWrite, anon)
	require.NoError(t, err)
	assert.Zero(t, addr%page)
	assert.Equal(t, []gomm.VMA{{Start: addr, End: addr + 4*page, Prot: gomm.ProtRead | gomm.ProtWrite}}, mm.VMAs())

	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("main"))
	v, err := cpu.Load64(addr)
	require.NoError(t, err)
	assert.Zero(t, v, "a read maps the zero page")
	assert.Zero(t, mm.RSS())
	require.NoError(t, cpu.Store64(addr+8, 0xfeed))
	assert.Equal(t, int64(1), mm.RSS(), "the write copies the zero page into a private frame")
	v, err = cpu.Load64(addr + 8)
	require.NoError(t, err)
	assert.Equal(t, uint64(0xfeed), v)

	buf := make([]byte, 8)
	n, err := mm.ReadAt(buf, addr+8)
	require.NoError(t, err)
	assert.Equal(t, 8, n)
	assert.Equal(t, byte(0xed), buf[0])

	free, tables := m.RAM().Stats().Free, mm.PageTableFrames()
	assert.Equal(t, 3, tables, "a PUD, a PMD and a PTE table, each a frame of RAM")
	require.NoError(t, mm.Munmap(addr, 4*page))
	assert.Zero(t, mm.PageTableFrames(), "nothing else is mapped: every table goes")
	assert.Equal(t, free+1+tables, m.RAM().Stats().Free)
	assert.Zero(t, mm.RSS())
	assert.Empty(t, mm.VMAs())
	_, err = cpu.Load64(addr)
	assert.ErrorIs(t, err, gomm.ErrFault, "unmapped")

	cpu.Switch(tlbIdle())
	require.NoError(t, mm.Exit())
	assert.ErrorIs(t, mm.Exit(), gomm.ErrClosed)
	_, err = mm.Mmap(0, page, gomm.ProtRead, anon)
	assert.ErrorIs(t, err, gomm.ErrClosed)
	assert.Positive(t, m.Stats().Checks)
}

func TestMmapValidation(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	rw := gomm.ProtRead | gomm.ProtWrite
	tests := []struct {
		name  string
		addr  uint64
		len   uint64
		prot  gomm.Prot
		flags gomm.MapFlags
		err   error
	}{
		{"zero length", 0, 0, rw, anon, errno.ErrInvalid},
		{"bad prot", 0, page, 0x8, anon, errno.ErrInvalid},
		{"no type", 0, page, rw, gomm.MapAnonymous, errno.ErrInvalid},
		{"both types", 0, page, rw, anon | gomm.MapShared, errno.ErrInvalid},
		{"file without a file", 0, page, rw, gomm.MapPrivate, errno.ErrInvalid},
		{"unknown flag", 0, page, rw, anon | 0x40000000, errno.ErrInvalid},
		{"fixed unaligned", 0x10001000 + 1, page, rw, anon | gomm.MapFixed, errno.ErrInvalid},
		{"fixed below min", 0x1000, page, rw, anon | gomm.MapFixed, errno.ErrInvalid},
		{"fixed above user space", gomm.TaskSize, page, rw, anon | gomm.MapFixed, errno.ErrInvalid},
		{"too long", 0, 1 << 62, rw, anon, errno.ErrNoMem},
		{"overflowing length", 0, ^uint64(0), rw, anon, errno.ErrNoMem},
	}
	for _, tc := range tests {
		_, err := mm.Mmap(tc.addr, tc.len, tc.prot, tc.flags)
		assert.ErrorIs(t, err, tc.err, tc.name)
	}
	assert.Empty(t, mm.VMAs(), "nothing was mapped")

	a, err := mm.Mmap(0x2000_0000, page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x2000_0000), a)
	_, err = mm.Mmap(0x2000_0000, page, rw, anon|gomm.MapFixedNoReplace)
	assert.ErrorIs(t, err, gomm.ErrExist)
	b, err := mm.Mmap(0x3000_0000, page, rw, anon)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x3000_0000), b, "a free hint is honoured")
	c, err := mm.Mmap(0x3000_0000, page, rw, anon)
	require.NoError(t, err)
	assert.NotEqual(t, b, c, "a taken hint is not")
}

func TestMunmapSplitsAndMerges(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	rw := gomm.ProtRead | gomm.ProtWrite
	base, err := mm.Mmap(0x4000_0000, 8*page, rw, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)
	assert.Equal(t, int64(8), mm.RSS())
	require.NoError(t, mm.Munmap(base+2*page, 2*page))
	assert.Equal(t, []gomm.VMA{{Start: base, End: base + 2*page, Prot: rw}, {Start: base + 4*page, End: base + 8*page, Prot: rw}}, mm.VMAs())
	assert.Equal(t, int64(6), mm.RSS())
	_, err = mm.Mmap(base+2*page, 2*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	assert.Equal(t, []gomm.VMA{{Start: base, End: base + 8*page, Prot: rw}}, mm.VMAs(), "equal neighbours merge")

	for _, bad := range [][2]uint64{{base + 1, page}, {base, 0}, {gomm.TaskSize, 2 * page}} {
		assert.ErrorIs(t, mm.Munmap(bad[0], bad[1]), gomm.ErrInvalid)
	}
	require.NoError(t, mm.Munmap(0x7000_0000, page), "unmapping nothing is fine")
}

func TestMprotect(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 2})
	mm := m.NewMM()
	rw := gomm.ProtRead | gomm.ProtWrite
	base, err := mm.Mmap(0, 4*page, rw, anon)
	require.NoError(t, err)
	cpus := m.CPUs()
	for _, c := range cpus {
		c.Switch(mm.NewTask("t"))
		require.NoError(t, c.Store64(base+page, 1))
	}
	require.NoError(t, mm.Mprotect(base+page, page, gomm.ProtRead))
	assert.Equal(t, []gomm.VMA{{Start: base, End: base + page, Prot: rw}, {Start: base + page, End: base + 2*page, Prot: gomm.ProtRead}, {Start: base + 2*page, End: base + 4*page, Prot: rw}}, mm.VMAs())
	for _, c := range cpus {
		assert.ErrorIs(t, c.Store64(base+page, 2), gomm.ErrFault, "the write right is gone from every TLB")
		v, err := c.Load64(base + page)
		require.NoError(t, err)
		assert.Equal(t, uint64(1), v)
	}
	require.NoError(t, mm.Mprotect(base+page, page, gomm.ProtNone))
	_, err = cpus[0].Load64(base + page)
	assert.ErrorIs(t, err, gomm.ErrFault)
	require.NoError(t, mm.Mprotect(base, 4*page, rw))
	assert.Len(t, mm.VMAs(), 1)
	require.NoError(t, cpus[1].Store64(base+page, 3), "the upgrade is granted at the next fault")

	assert.ErrorIs(t, mm.Mprotect(base-4*page, 8*page, gomm.ProtRead), gomm.ErrNoMem, "a hole")
	assert.Equal(t, rw, mm.VMAs()[0].Prot, "and nothing changed")
	assert.ErrorIs(t, mm.Mprotect(base, page, 0x10), gomm.ErrInvalid)
}

func TestMadvise(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	base, err := mm.Mmap(0, 4*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapPopulate)
	require.NoError(t, err)
	c := m.CPU(0)
	c.Switch(mm.NewTask("t"))
	require.NoError(t, c.Store64(base, 77))
	require.NoError(t, mm.Madvise(base, 4*page, gomm.MadvDontNeed))
	assert.Zero(t, mm.RSS())
	v, err := c.Load64(base)
	require.NoError(t, err)
	assert.Zero(t, v, "DONTNEED: the next read sees zeros")

	require.NoError(t, c.Store64(base, 5))
	require.NoError(t, mm.Madvise(base, page, gomm.MadvFree))
	v, _ = c.Load64(base)
	assert.Equal(t, uint64(5), v, "FREE keeps the data while there is no memory pressure")
	for _, a := range []gomm.Advice{gomm.MadvNormal, gomm.MadvRandom, gomm.MadvSequential, gomm.MadvWillNeed} {
		require.NoError(t, mm.Madvise(base, page, a))
	}
	assert.ErrorIs(t, mm.Madvise(base, page, 99), gomm.ErrInvalid)
	assert.ErrorIs(t, mm.Madvise(base-4*page, 8*page, gomm.MadvDontNeed), gomm.ErrNoMem)
	v, _ = c.Load64(base)
	assert.Equal(t, uint64(5), v, "a refused madvise does nothing")
}

func TestMremap(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 2})
	mm := m.NewMM()
	rw := gomm.ProtRead | gomm.ProtWrite
	base, err := mm.Mmap(0x5000_0000, 2*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	c := m.CPU(0)
	c.Switch(mm.NewTask("t"))
	require.NoError(t, c.Store64(base+page, 42))

	got, err := mm.Mremap(base, 2*page, 4*page, 0, 0)
	require.NoError(t, err)
	assert.Equal(t, base, got, "grows in place")
	_, err = mm.Mmap(base+4*page, page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	_, err = mm.Mremap(base, 4*page, 8*page, 0, 0)
	assert.ErrorIs(t, err, gomm.ErrNoMem, "blocked and may not move")

	moved, err := mm.Mremap(base, 4*page, 8*page, gomm.MremapMayMove, 0)
	require.NoError(t, err)
	assert.NotEqual(t, base, moved)
	v, err := c.Load64(moved + page)
	require.NoError(t, err)
	assert.Equal(t, uint64(42), v, "the data moved with the mapping")
	_, err = c.Load64(base + page)
	assert.ErrorIs(t, err, gomm.ErrFault, "the old range is gone")

	got, err = mm.Mremap(moved, 8*page, page, 0, 0)
	require.NoError(t, err)
	assert.Equal(t, moved, got)
	_, err = c.Load64(moved + page)
	assert.ErrorIs(t, err, gomm.ErrFault, "shrunk")

	fixed, err := mm.Mremap(moved, page, page, gomm.MremapMayMove|gomm.MremapFixed, 0x6000_0000)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x6000_0000), fixed)

	_, err = mm.Mremap(fixed, page, page, gomm.MremapFixed, 0x7000_0000)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = mm.Mremap(0x7100_0000, page, 2*page, gomm.MremapMayMove, 0)
	assert.ErrorIs(t, err, gomm.ErrFault)
	_, err = mm.Mremap(fixed, page, 0, gomm.MremapMayMove, 0)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
}

// TestMremapMoveOutOfMemoryMovesNothing: a move that cannot allocate its
// destination tables must leave every entry where it was (review
// finding: it used to strand some at the destination, outside any VMA,
// and skip the flush).
func TestMremapMoveOutOfMemoryMovesNothing(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 64})
	mm := m.NewMM()
	rw := gomm.ProtRead | gomm.ProtWrite
	addr, err := mm.Mmap(0x1000_0000, 4<<20, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("t"))
	require.NoError(t, cpu.Store64(addr, 11))
	require.NoError(t, cpu.Store64(addr+2<<20, 22))
	for m.RAM().Stats().Free > 2 {
		_, err := m.RAM().Alloc()
		require.NoError(t, err)
	}
	_, err = mm.Mremap(addr, 4<<20, 4<<20, gomm.MremapMayMove|gomm.MremapFixed, 0x4_01ff_f000)
	require.ErrorIs(t, err, gomm.ErrNoMem)
	for off, want := range map[uint64]uint64{0: 11, 2 << 20: 22} {
		v, err := cpu.Load64(addr + off)
		require.NoError(t, err)
		assert.Equal(t, want, v)
		buf := make([]byte, 8)
		_, err = mm.ReadAt(buf, addr+off)
		require.NoError(t, err)
		assert.Equal(t, le64(want), buf)
	}
	e, _ := mm.Table().Lookup(0x4_01ff_f000)
	assert.False(t, e.IsPresent(), "nothing was left at the destination")
	cpu.Switch(tlbIdle())
}

// TestMprotectOfPartOfAHugeLeafFailsCleanly: the split mprotect (or any
// VMA split inside a huge leaf) needs can run out of memory; it must then
// change nothing, not leave the leaf writable under a read-only VMA
// (review finding) nor spanning two VMAs.
func TestMprotectOfPartOfAHugeLeafFailsCleanly(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 2048})
	mm := m.NewMM()
	rw := gomm.ProtRead | gomm.ProtWrite
	const huge = 2 << 20
	addr, err := mm.Mmap(0x4000_0000, huge, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	var frames []*physmem.Frame
	for len(frames) < 512 {
		f, err := m.RAM().Alloc()
		require.NoError(t, err)
		if len(frames) == 0 && f.PFN()%512 != 0 {
			continue // keep looking for an aligned run; the filler stays allocated
		}
		f.IncMapCount()
		frames = append(frames, f)
	}
	require.NoError(t, mm.Table().MapHuge(addr, pagetable.NewPTE(uint64(frames[0].PFN()), pagetable.Write|pagetable.User|pagetable.Dirty|pagetable.Accessed)))
	var hog []*physmem.Frame
	for m.RAM().Stats().Free > 0 {
		f, err := m.RAM().Alloc()
		require.NoError(t, err)
		hog = append(hog, f)
	}
	before := mm.VMAs()
	assert.ErrorIs(t, mm.Mprotect(addr, page, gomm.ProtRead), gomm.ErrNoMem)
	assert.Equal(t, before, mm.VMAs(), "nothing changed")
	assert.ErrorIs(t, mm.Munmap(addr, page), gomm.ErrNoMem, "munmap of part of the leaf too")
	// And every other VMA split inside the leaf: a leaf cannot span two
	// VMAs, and none of these may split the VMA and leave it so.
	assert.ErrorIs(t, mm.Mlock(addr, page), gomm.ErrNoMem, "mlock")
	assert.ErrorIs(t, mm.Madvise(addr, page, gomm.MadvMergeable), gomm.ErrNoMem, "MADV_MERGEABLE")
	assert.ErrorIs(t, mm.Madvise(addr, page, gomm.MadvHugePage), gomm.ErrNoMem, "MADV_HUGEPAGE")
	assert.Equal(t, before, mm.VMAs())

	for _, f := range hog {
		require.NoError(t, m.RAM().Put(f))
	}
	require.NoError(t, mm.Mprotect(addr, page, gomm.ProtRead))
	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("t"))
	assert.ErrorIs(t, cpu.Store64(addr, 1), gomm.ErrFault, "the split page is read-only")
	require.NoError(t, cpu.Store64(addr+page, 1), "the rest of the leaf is still writable")
	cpu.Switch(tlbIdle())
}

// TestExitLeavesNoGatherPending: exit's teardown runs one gather, and
// finishes it; a second, abandoned one left tlb_flush_pending raised.
func TestExitLeavesNoGatherPending(t *testing.T) {
	m := newMachine(t, gomm.Config{})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 4*page, rw, anon)
	require.NoError(t, err)
	_, err = mm.WriteAt([]byte{1}, addr)
	require.NoError(t, err)
	require.NoError(t, mm.Exit())
	assert.Zero(t, mm.Context().FlushPending())
}
