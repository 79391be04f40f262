package gomm_test

import (
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const huge = pagetable.HugeSize

// thpRegion maps 4 MiB of anonymous memory at a 2 MiB boundary with
// MADV_HUGEPAGE and returns its start.
func thpRegion(t *testing.T, mm *gomm.MM, at uint64) uint64 {
	t.Helper()
	addr, err := mm.Mmap(at, 2*huge, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	require.NoError(t, mm.Madvise(addr, 2*huge, gomm.MadvHugePage))
	return addr
}

func levelAt(mm *gomm.MM, va uint64) pagetable.Level {
	_, l := mm.Table().Lookup(va)
	return l
}

func TestTHPFaultFollowsModeAndAdvice(t *testing.T) {
	tests := []struct {
		name   string
		mode   gomm.THPMode
		advice gomm.Advice
		huge   bool
	}{
		{"madvise mode, no advice", gomm.THPMadvise, gomm.MadvNormal, false},
		{"madvise mode, MADV_HUGEPAGE", gomm.THPMadvise, gomm.MadvHugePage, true},
		{"always", gomm.THPAlways, gomm.MadvNormal, true},
		{"always, MADV_NOHUGEPAGE", gomm.THPAlways, gomm.MadvNoHugePage, false},
		{"never, MADV_HUGEPAGE", gomm.THPNever, gomm.MadvHugePage, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := newMachine(t, gomm.Config{CPUs: 1, Frames: 2048, THP: tc.mode})
			mm := m.NewMM()
			addr, err := mm.Mmap(0x4000_0000, 2*huge, rw, anon|gomm.MapFixed)
			require.NoError(t, err)
			require.NoError(t, mm.Madvise(addr, 2*huge, tc.advice))
			writeWord(t, mm, addr+huge+5*page, 42)
			assert.Equal(t, uint64(42), readWord(t, mm, addr+huge+5*page))
			want := pagetable.LevelPTE
			if tc.huge {
				want = pagetable.LevelPMD
			}
			assert.Equal(t, want, levelAt(mm, addr+huge))
			assert.Equal(t, tc.huge, m.Stats().THP.FaultAlloc == 1)
			if tc.huge {
				assert.EqualValues(t, 512, mm.RSS())
				assert.Zero(t, readWord(t, mm, addr+huge+6*page), "a huge page starts zeroed")
			}
			require.NoError(t, m.CheckRmap(mm))
			require.NoError(t, mm.Exit())
			assert.Equal(t, 2047, m.RAM().Stats().Free, "every frame and table is back")
		})
	}
}

func TestTHPNeedsAWholeAlignedRangeInTheVMA(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 2048, THP: gomm.THPAlways})
	mm := m.NewMM()
	// 2 MiB, but not aligned: no aligned 2 MiB lies inside.
	addr, err := mm.Mmap(0x4000_0000+page, huge, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	writeWord(t, mm, addr+huge/2, 1)
	assert.Equal(t, pagetable.LevelPTE, levelAt(mm, addr+huge/2))
	// A private file mapping is never mapped huge.
	f, err := m.NewFile(huge)
	require.NoError(t, err)
	fa, err := mm.MmapFile(0x8000_0000, huge, rw, gomm.MapPrivate|gomm.MapFixed, f, 0)
	require.NoError(t, err)
	writeWord(t, mm, fa, 1)
	assert.Equal(t, pagetable.LevelPTE, levelAt(mm, fa))
	assert.Zero(t, m.Stats().THP.FaultAlloc)
	require.NoError(t, mm.Exit())
}

// Without a free aligned block the fault falls back to 4 KiB pages.
func TestTHPFallsBackWithoutAFreeBlock(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 1100, THP: gomm.THPAlways})
	mm := m.NewMM()
	addr := thpRegion(t, mm, 0x4000_0000)
	writeWord(t, mm, addr, 1) // takes the only aligned block
	writeWord(t, mm, addr+huge, 2)
	assert.Equal(t, pagetable.LevelPMD, levelAt(mm, addr))
	assert.Equal(t, pagetable.LevelPTE, levelAt(mm, addr+huge))
	st := m.Stats().THP
	assert.EqualValues(t, 1, st.FaultAlloc)
	assert.EqualValues(t, 1, st.FaultFallback)
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Exit())
}

// Populating (MAP_POPULATE, mlock) takes one fault per huge leaf, not one
// per 4 KiB page of it.
func TestTHPPopulateFaultsOncePerLeaf(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 4096, THP: gomm.THPAlways})
	mm := m.NewMM()
	addr, err := mm.Mmap(0x4000_0000, 2*huge, rw, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)
	assert.Equal(t, pagetable.LevelPMD, levelAt(mm, addr))
	assert.Equal(t, pagetable.LevelPMD, levelAt(mm, addr+huge))
	assert.EqualValues(t, 2, mm.Faults())
	b, err := mm.Mmap(0x4100_0000, 2*huge, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	require.NoError(t, mm.Mlock(b, 2*huge))
	assert.EqualValues(t, 4, mm.Faults())
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Exit())
}

// TestTHPCOWAfterFork is the huge half of the kernel's cow selftest
// (tools/testing/selftests/mm/cow.c, run_with_thp): a THP mapped by a
// PMD, by PTEs after a split, by a single PTE, and partly mremap'ed, is
// shared by fork; a write on either side must not be seen by the other,
// in both directions.
func TestTHPCOWAfterFork(t *testing.T) {
	prepare := map[string]func(t *testing.T, mm *gomm.MM, addr uint64) (start, size uint64){
		"PMD-mapped": func(t *testing.T, mm *gomm.MM, addr uint64) (uint64, uint64) {
			return addr, huge
		},
		"PTE-mapped": func(t *testing.T, mm *gomm.MM, addr uint64) (uint64, uint64) {
			// Toggling one page's protection splits the leaf.
			require.NoError(t, mm.Mprotect(addr+page, page, gomm.ProtRead))
			require.NoError(t, mm.Mprotect(addr+page, page, rw))
			require.Equal(t, pagetable.LevelPTE, levelAt(mm, addr))
			return addr, huge
		},
		"single PTE-mapped": func(t *testing.T, mm *gomm.MM, addr uint64) (uint64, uint64) {
			require.NoError(t, mm.Madvise(addr+page, huge-page, gomm.MadvDontNeed))
			return addr, page
		},
		"partially mremap'ed": func(t *testing.T, mm *gomm.MM, addr uint64) (uint64, uint64) {
			// Move the second half away and back behind the first.
			half := uint64(huge / 2)
			tmp, err := mm.Mremap(addr+half, half, half, gomm.MremapMayMove|gomm.MremapFixed, 0x9000_0000)
			require.NoError(t, err)
			_, err = mm.Mremap(tmp, half, half, gomm.MremapMayMove|gomm.MremapFixed, addr+half)
			require.NoError(t, err)
			return addr, huge
		},
	}
	for name, prep := range prepare {
		for _, writer := range []string{"child", "parent"} {
			t.Run(name+"/"+writer+" writes", func(t *testing.T) {
				m := newMachine(t, gomm.Config{CPUs: 2, Frames: 4096})
				parent := m.NewMM()
				addr := thpRegion(t, parent, 0x4000_0000)
				fillPages(t, parent, addr, 512, 1000)
				require.Equal(t, pagetable.LevelPMD, levelAt(parent, addr))
				start, size := prep(t, parent, addr)
				n := int(size / page)
				checkPages(t, parent, start, n, 1000+(start-addr)/page)

				child, err := parent.Fork()
				require.NoError(t, err)
				require.NoError(t, m.CheckRmap(parent, child))
				if name == "PMD-mapped" {
					assert.Equal(t, pagetable.LevelPMD, levelAt(child, addr), "fork shares the huge leaf")
					e, _ := parent.Table().Lookup(addr)
					assert.False(t, e.IsWritable(), "write-protected in the parent")
					assert.EqualValues(t, 1, m.Stats().THP.CopiedOnFork)
					assert.Equal(t, frameAt(t, m, parent, addr+9*page), frameAt(t, m, child, addr+9*page))
				}

				w, r := child, parent
				if writer == "parent" {
					w, r = parent, child
				}
				cpu := m.CPU(0)
				cpu.Switch(w.NewTask(writer))
				for i := range uint64(n) {
					require.NoError(t, cpu.Store64(start+i*page, ^uint64(0)-i))
				}
				cpu.Switch(tlbIdle())
				checkPages(t, r, start, n, 1000+(start-addr)/page)
				for i := range uint64(n) {
					require.Equal(t, ^uint64(0)-i, readWord(t, w, start+i*page))
				}
				require.NoError(t, m.CheckRmap(parent, child))
				require.NoError(t, child.Exit())
				require.NoError(t, parent.Exit())
				assert.Equal(t, 4095, m.RAM().Stats().Free)
			})
		}
	}
}

// After fork a write copies only the page written: the writer's leaf is
// split, the other side keeps its huge leaf, and once the child is gone
// the parent takes its huge page back whole.
func TestTHPCOWCopiesOnePageAndReuses(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 4096})
	parent := m.NewMM()
	addr := thpRegion(t, parent, 0x4000_0000)
	writeWord(t, parent, addr, 1)
	child, err := parent.Fork()
	require.NoError(t, err)
	before := m.RAM().Stats().Free
	writeWord(t, child, addr+3*page, 2)
	assert.Equal(t, before-1, m.RAM().Stats().Free, "one page copied, not 512")
	assert.Equal(t, pagetable.LevelPTE, levelAt(child, addr))
	assert.Equal(t, pagetable.LevelPMD, levelAt(parent, addr))
	assert.EqualValues(t, 1, m.Stats().THP.SplitPMD)
	assert.Zero(t, readWord(t, parent, addr+3*page))
	require.NoError(t, m.CheckRmap(parent, child))

	require.NoError(t, child.Exit())
	writeWord(t, parent, addr+4*page, 3)
	assert.Equal(t, pagetable.LevelPMD, levelAt(parent, addr), "reused whole")
	e, _ := parent.Table().Lookup(addr)
	assert.True(t, e.IsWritable())
	assert.EqualValues(t, 1, m.Stats().THP.Reused)
	require.NoError(t, m.CheckRmap(parent))
	require.NoError(t, parent.Exit())
}

// Splitting a huge leaf needs a page table; the one deposited at fault
// time makes reclaim, munmap and mprotect of part of a huge page work
// even with RAM full.
func TestTHPSplitWithRAMFull(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 1024, SwapSlots: 2048})
	mm := m.NewMM()
	addr := thpRegion(t, mm, 0x4000_0000)
	fillPages(t, mm, addr, 512, 7)
	require.Equal(t, pagetable.LevelPMD, levelAt(mm, addr))
	other, err := mm.Mmap(0x8000_0000, 1024*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	for i := uint64(0); m.RAM().Stats().Free > 0; i++ {
		writeWord(t, mm, other+i*page, i)
	}
	require.NoError(t, mm.Mprotect(addr+page, page, gomm.ProtRead))
	require.NoError(t, mm.Munmap(addr+2*page, page))
	checkPages(t, mm, addr+3*page, 509, 10)
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Exit())
}

// Reclaim, migration and KSM reach the pages of a huge page through the
// reverse map; each splits the leaf and acts on the one page.
func TestTHPReclaimMigrateAndKSM(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 4096, SwapSlots: 4096})
	mm := m.NewMM()
	addr := thpRegion(t, mm, 0x4000_0000)
	fillPages(t, mm, addr, 512, 100)

	moved, err := mm.MovePages([]uint64{addr + 5*page})
	require.NoError(t, err)
	assert.Equal(t, 1, moved)
	assert.Equal(t, pagetable.LevelPTE, levelAt(mm, addr), "migration split the leaf")
	checkPages(t, mm, addr, 512, 100)
	require.NoError(t, m.CheckRmap(mm))

	b := thpRegion(t, mm, 0x8000_0000)
	fillPages(t, mm, b, 512, 100) // the same contents as the first
	require.Equal(t, pagetable.LevelPMD, levelAt(mm, b))
	require.NoError(t, mm.Madvise(b, huge, gomm.MadvMergeable))
	require.NoError(t, mm.Madvise(addr, huge, gomm.MadvMergeable))
	for range 3 {
		m.KSMScan(2048)
	}
	assert.Positive(t, m.KSMStats().PagesSharing, "identical pages of two huge pages merged")
	assert.Equal(t, pagetable.LevelPTE, levelAt(mm, b))
	checkPages(t, mm, b, 512, 100)
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Madvise(b, huge, gomm.MadvUnmergeable))
	require.NoError(t, mm.Madvise(addr, huge, gomm.MadvUnmergeable))

	c := thpRegion(t, mm, 0xc000_0000)
	fillPages(t, mm, c, 512, 5000)
	require.Equal(t, pagetable.LevelPMD, levelAt(mm, c))
	for range 4 {
		m.Reclaim(4096)
	}
	assert.Positive(t, m.Stats().Reclaim.SwappedOut)
	checkPages(t, mm, c, 512, 5000)
	checkPages(t, mm, addr, 512, 100)
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Exit())
}

// Two CPUs write through a huge page while an agent forks and exits
// children (write-protecting the leaf each time), migrates its pages
// and reclaims: every value survives, and with a mirror attached the
// checker finds no stale translation anywhere.
func TestTHPCPUsWriteWhileForkMigrateReclaim(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 2, Frames: 4096, SwapSlots: 4096, TLBEntries: 16})
	mm := m.NewMM()
	addr := thpRegion(t, mm, 0x4000_0000)
	_, err := mm.ReadAt(make([]byte, 8), addr) // a read fault maps the huge page
	require.NoError(t, err)
	require.Equal(t, pagetable.LevelPMD, levelAt(mm, addr))
	dev := newMirror(t, m, mm, addr, huge)
	const pages = 256
	writeWhile(t, m, mm, addr, pages, testmain.Iterations(100, 20),
		func(r, i int) uint64 { return uint64(r<<16 | i) },
		func(r int) error {
			switch r % 3 {
			case 0:
				child, err := mm.Fork()
				if err != nil {
					return err
				}
				if _, err := child.ReadAt(make([]byte, 8), addr+uint64(r%512)*page); err != nil {
					return err
				}
				return child.Exit()
			case 1:
				_, _ = mm.MovePages([]uint64{addr + uint64(r*37%512)*page})
			default:
				m.Reclaim(16)
			}
			_, err := dev.access(addr+uint64(r%512)*page, false, 0)
			return err
		},
		func() bool { st := m.Stats(); return st.THP.SplitPMD > 0 && st.Reclaim.SwappedOut > 0 })
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, dev.close())
	require.NoError(t, mm.Exit())
}

// A read fault in read-only memory maps the huge page read-only.
func TestTHPReadOnlyIsNotWritable(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 4096, THP: gomm.THPAlways})
	mm := m.NewMM()
	addr, err := mm.Mmap(0x4000_0000, huge, gomm.ProtRead, anon|gomm.MapFixed)
	require.NoError(t, err)
	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("t"))
	_, err = cpu.Load64(addr)
	require.NoError(t, err)
	require.Equal(t, pagetable.LevelPMD, levelAt(mm, addr))
	e, _ := mm.Table().Lookup(addr)
	assert.False(t, e.IsWritable())
	assert.ErrorIs(t, cpu.Store64(addr+8*page, 0xdead), gomm.ErrFault)
	cpu.Switch(tlbIdle())
	require.NoError(t, mm.Exit())
}

// One accessed bit ages all 512 pages of a huge page: reclaim looking
// at them one by one must give every one of them its second chance, as
// it does for 4 KiB pages.
func TestTHPHotHugePageSurvivesOneReclaim(t *testing.T) {
	for _, mode := range []gomm.THPMode{gomm.THPNever, gomm.THPAlways} {
		t.Run(mode.String(), func(t *testing.T) {
			m := newMachine(t, gomm.Config{CPUs: 1, Frames: 4096, SwapSlots: 4096, THP: mode})
			mm := m.NewMM()
			addr, err := mm.Mmap(0x4000_0000, huge, rw, anon|gomm.MapFixed)
			require.NoError(t, err)
			fillPages(t, mm, addr, 512, 1)
			st := m.Reclaim(1)
			assert.GreaterOrEqual(t, st.Activated, uint64(512))
			require.NoError(t, mm.Exit())
		})
	}
}

// An munmapped huge page gives its deposited table back, even while the
// rest of its PMD table stays in use.
func TestTHPMunmapFreesTheDeposit(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 4096, THP: gomm.THPAlways})
	mm := m.NewMM()
	nb, err := mm.Mmap(0x4000_0000, page, rw, anon|gomm.MapFixed) // keeps the PMD table alive
	require.NoError(t, err)
	writeWord(t, mm, nb, 1)
	before := mm.PageTableFrames()
	for i := uint64(0); i < 20; i++ {
		addr, err := mm.Mmap(0x4000_0000+(i+1)*huge, huge, rw, anon|gomm.MapFixed)
		require.NoError(t, err)
		writeWord(t, mm, addr, 1)
		require.Equal(t, pagetable.LevelPMD, levelAt(mm, addr))
		require.NoError(t, mm.Munmap(addr, huge))
	}
	assert.Equal(t, before, mm.PageTableFrames())
	require.NoError(t, mm.Exit())
}
