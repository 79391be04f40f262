package tlb_test

import (
	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/gomm-dev/gomm/internal/testrig"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/tlb"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// warm loads every page of [start, end) on cpu so its TLB holds them.
func warm(t *testing.T, cpu *tlb.CPU, start, end uint64) {
	t.Helper()
	for va := start; va < end; va += pagetable.PageSize {
		_, err := cpu.Load64(va)
		require.NoError(t, err)
	}
}

func cached(cpu *tlb.CPU, pfn uint64) bool {
	_, ok := cpu.CachedPFN(pfn)
	return ok
}

func TestFlushRangeSendsIPIsOnlyToTheMask(t *testing.T) {
	r := testrig.New(t, 4, tlb.LazyRefcount)
	a, b := r.NewSpace(), r.NewSpace()
	f := a.MapPage(0x1000, testrig.RWU, 0)
	r.Sys.CPU(0).Switch(tlb.NewUserTask("a0", a.Ctx))
	r.Sys.CPU(1).Switch(tlb.NewUserTask("a1", a.Ctx))
	r.Sys.CPU(2).Switch(tlb.NewUserTask("b", b.Ctx))
	warm(t, r.Sys.CPU(0), 0x1000, 0x2000)
	warm(t, r.Sys.CPU(1), 0x1000, 0x2000)
	assert.Equal(t, []int{0, 1}, a.Ctx.CPUs())

	r.Sys.FlushRange(a.Ctx, 0x1000, 0x2000, pagetable.PageShift, false)
	st := r.Sys.Stats()
	assert.Equal(t, uint64(2), st.IPIs, "CPUs 2 and 3 never loaded the mm")
	assert.Equal(t, uint64(2), st.PartialFlushes)
	assert.Equal(t, uint64(2), st.PagesFlushed)
	assert.False(t, cached(r.Sys.CPU(0), uint64(f.PFN())))
	assert.False(t, cached(r.Sys.CPU(1), uint64(f.PFN())))

	// CPU 1 moves to mm b: it leaves a's mask.
	r.Sys.CPU(1).Switch(tlb.NewUserTask("b1", b.Ctx))
	assert.Equal(t, []int{0}, a.Ctx.CPUs())
	assert.ElementsMatch(t, []int{1, 2}, b.Ctx.CPUs())
}

// TestFlushOfHugeStridesDropsSmallEntriesInRangeOnly: a partial flush
// in 2 MiB strides covers more pages than the TLB has sets, so the CPU
// sweeps its TLB once instead of probing page by page; every 4 KiB entry
// inside the range goes, and one just past it stays.
func TestFlushOfHugeStridesDropsSmallEntriesInRangeOnly(t *testing.T) {
	r := testrig.New(t, 1, tlb.LazyRefcount)
	s := r.NewSpace()
	const base = 0x4000_0000
	in1 := s.MapPage(base, testrig.RWU, 1)
	in2 := s.MapPage(base+3*pagetable.HugeSize-pagetable.PageSize, testrig.RWU, 2)
	out := s.MapPage(base+3*pagetable.HugeSize, testrig.RWU, 3)
	cpu := r.Sys.CPU(0)
	cpu.Switch(tlb.NewUserTask("t", s.Ctx))
	for _, va := range []uint64{base, base + 3*pagetable.HugeSize - pagetable.PageSize, base + 3*pagetable.HugeSize} {
		warm(t, cpu, va, va+pagetable.PageSize)
	}
	r.Sys.FlushRange(s.Ctx, base, base+3*pagetable.HugeSize, pagetable.HugeShift, false)
	st := r.Sys.Stats()
	assert.Equal(t, uint64(1), st.PartialFlushes)
	assert.Equal(t, uint64(3), st.PagesFlushed, "three 2 MiB strides")
	assert.False(t, cached(cpu, uint64(in1.PFN())))
	assert.False(t, cached(cpu, uint64(in2.PFN())))
	assert.True(t, cached(cpu, uint64(out.PFN())), "past the range")
}

func TestFlushFullVersusPartial(t *testing.T) {
	tests := []struct {
		name          string
		pages         uint64
		pendingBefore int // flush requests the CPU has not seen yet
		full, partial uint64
	}{
		{"one page", 1, 0, 0, 1},
		{"at the ceiling", tlb.FlushCeiling, 0, 0, 1},
		{"above the ceiling", tlb.FlushCeiling + 1, 0, 1, 0},
		{"two generations behind", 1, 1, 1, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := testrig.New(t, 2, tlb.LazyRefcount)
			a := r.NewSpace()
			cpu := r.Sys.CPU(1)
			cpu.Switch(tlb.NewUserTask("a", a.Ctx))
			// CPU 0 runs the mm too but is lazy, so it skips flushes:
			r.Sys.CPU(0).Switch(tlb.NewUserTask("a0", a.Ctx))
			r.Sys.CPU(0).Switch(tlb.NewKernelThread("k"))
			for range tc.pendingBefore {
				// A concurrent request whose IPI CPU 1 has not handled yet.
				tlb.BumpGen(a.Ctx)
			}
			before := r.Sys.Stats()
			r.Sys.FlushRange(a.Ctx, 0x10000, 0x10000+tc.pages<<pagetable.PageShift, pagetable.PageShift, false)
			st := r.Sys.Stats()
			assert.Equal(t, tc.full, st.FullFlushes-before.FullFlushes)
			assert.Equal(t, tc.partial, st.PartialFlushes-before.PartialFlushes)
			assert.Equal(t, uint64(1), st.LazySkipped-before.LazySkipped, "the lazy CPU is skipped")
		})
	}
}

func TestLazyCPUSkipsFlushesAndCatchesUp(t *testing.T) {
	r := testrig.New(t, 1, tlb.LazyRefcount)
	a := r.NewSpace()
	f := a.MapPage(0x1000, testrig.RWU, 3)
	cpu := r.Sys.CPU(0)
	user := tlb.NewUserTask("a", a.Ctx)
	cpu.Switch(user)
	warm(t, cpu, 0x1000, 0x2000)
	cpu.Switch(tlb.NewKernelThread("kworker"))
	ctx, lazy := cpu.ActiveMM()
	assert.Same(t, a.Ctx, ctx)
	assert.True(t, lazy)

	// The page is unmapped and freed while the CPU is lazy: no IPI, and
	// the checker does not count the lazy CPU's entry, which it cannot
	// use before it catches up.
	a.UnmapPage(0x1000, true)
	assert.Equal(t, uint64(1), r.Sys.Stats().LazySkipped)
	assert.Zero(t, r.Sys.Stats().IPIs)
	assert.Empty(t, r.Violations())
	assert.False(t, cached(cpu, uint64(f.PFN())))

	before := r.Sys.Stats().FullFlushes
	cpu.Switch(user)
	assert.Equal(t, before+1, r.Sys.Stats().FullFlushes, "catching up on the switch back is a full flush")
	_, err := cpu.Load64(0x1000) // faults in a fresh page, not the stale frame
	require.NoError(t, err)
}

func TestLazyCPULeavesOnFreedTables(t *testing.T) {
	r := testrig.New(t, 1, tlb.LazyRefcount)
	a := r.NewSpace()
	cpu := r.Sys.CPU(0)
	cpu.Switch(tlb.NewUserTask("a", a.Ctx))
	cpu.Switch(tlb.NewKernelThread("k"))
	count := a.Ctx.Count()
	r.Sys.FlushRange(a.Ctx, 0, tlb.FlushAll, pagetable.PageShift, true)
	ctx, _ := cpu.ActiveMM()
	assert.Nil(t, ctx, "a lazy CPU drops an mm whose page tables are being freed")
	assert.Equal(t, uint64(1), r.Sys.Stats().IPIs)
	assert.Empty(t, a.Ctx.CPUs())
	assert.Equal(t, count-1, a.Ctx.Count(), "and its lazy reference")
}

// exitScenario runs the lazy-TLB life of an mm: a user task runs it, the
// CPU switches to a kernel thread (lazy), the mm exits (its users' mm_count
// reference is dropped), and later the CPU runs another mm.
func exitScenario(t *testing.T, mode tlb.LazyMode) (*testrig.Rig, *testrig.Space) {
	r := testrig.New(t, 2, mode)
	a, b := r.NewSpace(), r.NewSpace()
	for _, cpu := range r.Sys.CPUs() {
		cpu.Switch(tlb.NewUserTask("a", a.Ctx))
		cpu.Switch(tlb.NewKernelThread("k"))
	}
	a.Ctx.Drop() // exit: the last user is gone
	for _, cpu := range r.Sys.CPUs() {
		cpu.Switch(tlb.NewUserTask("b", b.Ctx))
	}
	return r, a
}

func TestLazyRefcountKeepsTheMMUntilLazyCPUsLeave(t *testing.T) {
	r, a := exitScenario(t, tlb.LazyRefcount)
	assert.True(t, a.Freed)
	assert.True(t, a.Ctx.Freed())
	assert.Empty(t, r.Violations())
	st := r.Sys.Stats()
	// One grab and one drop per lazy switch, plus the exit's drop.
	assert.Equal(t, uint64(5), st.CountOps)
	assert.Zero(t, st.ShootdownIPIs)
}

func TestShootLaziesIPIsLazyCPUsAtTheFinalDrop(t *testing.T) {
	r, a := exitScenario(t, tlb.LazyShootdown)
	assert.True(t, a.Freed)
	assert.Empty(t, r.Violations())
	st := r.Sys.Stats()
	assert.Equal(t, uint64(1), st.CountOps, "lazy switches take no references")
	assert.Equal(t, uint64(2), st.ShootdownIPIs)
}

// TestMembarrierNeverMissesAUserCPU: a CPU that runs a user task of the
// mm for the whole of a membarrier call must be interrupted, including
// after it went user -> kernel thread -> user of the same mm (the Dec
// 2020 lazy-TLB/membarrier thread); a CPU that only holds the mm lazily
// is not.
func TestMembarrierNeverMissesAUserCPU(t *testing.T) {
	r := testrig.New(t, 2, tlb.LazyRefcount)
	a := r.NewSpace()
	user, kthread := tlb.NewUserTask("a", a.Ctx), tlb.NewKernelThread("k")
	cpu := r.Sys.CPU(1)
	inUser, done := make(chan struct{}), make(chan struct{})
	var missed, spurious atomic.Int64
	var wg sync.WaitGroup
	rounds := 500
	wg.Go(func() {
		for range rounds {
			cpu.Switch(user)
			before := cpu.Barriers()
			inUser <- struct{}{}
			<-done // a membarrier ran entirely while we were in user mode
			if cpu.Barriers() == before {
				missed.Add(1)
			}
			cpu.Switch(kthread)
			lazyBefore := cpu.Barriers()
			inUser <- struct{}{}
			<-done // one ran while we were a kernel thread
			if cpu.Barriers() != lazyBefore {
				spurious.Add(1)
			}
		}
	})
	for range 2 * rounds {
		<-inUser
		r.Sys.Membarrier(a.Ctx)
		done <- struct{}{}
	}
	wg.Wait()
	assert.Zero(t, missed.Load())
	assert.Zero(t, spurious.Load())
	assert.Equal(t, uint64(rounds), r.Sys.Stats().MembarrierIPIs)
	assert.Empty(t, r.Violations())
}

// TestConcurrentAccessUnmapAndFree has two CPUs loading and storing over a
// set of pages while another goroutine keeps unmapping, flushing, freeing
// and remapping them: the checker must stay silent, and a CPU must never
// read a freed frame's poison.
func TestConcurrentAccessUnmapAndFree(t *testing.T) {
	const pages = 16
	r := testrig.New(t, 2, tlb.LazyRefcount)
	a := r.NewSpace()
	for i := range uint64(pages) {
		a.MapPage(0x100000+i<<pagetable.PageShift, testrig.RWU, 0)
	}
	var stop atomic.Bool
	var poisoned atomic.Int64
	var wg sync.WaitGroup
	for _, cpu := range r.Sys.CPUs() {
		wg.Go(func() {
			cpu.Switch(tlb.NewUserTask("t", a.Ctx))
			for i := uint64(0); !stop.Load(); i++ {
				va := 0x100000 + (i%pages)<<pagetable.PageShift + uint64(cpu.ID())*8
				v, err := cpu.Load64(va)
				if err != nil {
					t.Error(err)
					return
				}
				if v == 0x6b6b6b6b6b6b6b6b {
					poisoned.Add(1)
				}
				if err := cpu.Store64(va, i); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	for i := range testmain.Iterations(2000, 300) {
		va := 0x100000 + uint64(i%pages)<<pagetable.PageShift
		a.UnmapPage(va, true)
	}
	stop.Store(true)
	wg.Wait()
	assert.Empty(t, r.Violations())
	assert.Zero(t, poisoned.Load(), "a CPU read a freed frame")
	assert.Positive(t, r.Chk.Checks())
}
