package gomm_test

import (
	"errors"
	"github.com/gomm-dev/gomm/internal/testmain"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestCPUsRaceUnmapProtectAndMadvise: CPUs load and store over a region
// while other goroutines munmap and remap, mprotect and madvise parts of
// it. Every access must either see what its CPU last wrote, or zero (the
// page was zapped), or fault (unmapped or read-only right now); never a
// freed frame's poison; and the checker must stay silent.
func TestCPUsRaceUnmapProtectAndMadvise(t *testing.T) {
	const pages = 64
	rw := gomm.ProtRead | gomm.ProtWrite
	m := newMachine(t, gomm.Config{CPUs: 2, Frames: 4096})
	mm := m.NewMM()
	base, err := mm.Mmap(0x1000_0000, pages*page, rw, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)

	var stop atomic.Bool
	var poisoned, wrong, accesses atomic.Int64
	var cpus sync.WaitGroup
	for _, cpu := range m.CPUs() {
		cpus.Go(func() {
			cpu.Switch(mm.NewTask("t"))
			defer cpu.Switch(tlbIdle())
			rng := rand.New(rand.NewPCG(uint64(cpu.ID()), 11))
			last := map[uint64]uint64{}
			for i := uint64(1); !stop.Load(); i++ {
				va := base + rng.Uint64N(pages)*page + uint64(cpu.ID())*8
				v, err := cpu.Load64(va)
				accesses.Add(1)
				switch {
				case errors.Is(err, gomm.ErrFault):
					delete(last, va)
					continue
				case err != nil:
					t.Error(err)
					return
				case v == physmem.PoisonWord:
					poisoned.Add(1)
				case v != 0 && v != last[va]:
					wrong.Add(1)
				}
				// A store that faults (the page is read-only right now)
				// leaves the old value in place.
				if err := cpu.Store64(va, i); err == nil {
					last[va] = i
				} else if !errors.Is(err, gomm.ErrFault) {
					t.Error(err)
					return
				}
			}
		})
	}
	var mutators sync.WaitGroup
	for w := range 2 {
		mutators.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 12))
			for range testmain.Iterations(400, 80) {
				lo := rng.Uint64N(pages)
				n := 1 + rng.Uint64N(min(8, pages-lo))
				addr := base + lo*page
				var err error
				switch rng.IntN(4) {
				case 0:
					if err = mm.Munmap(addr, n*page); err == nil {
						_, err = mm.Mmap(addr, n*page, rw, anon|gomm.MapFixed)
					}
				case 1:
					if err = mm.Mprotect(addr, n*page, gomm.ProtRead); err == nil {
						runtime.Gosched()
						err = mm.Mprotect(addr, n*page, rw)
					}
				default:
					err = mm.Madvise(addr, n*page, gomm.MadvDontNeed)
				}
				// The other mutator may have a hole open right now.
				if err != nil && !errors.Is(err, gomm.ErrNoMem) {
					t.Error(err)
				}
				runtime.Gosched()
			}
		})
	}
	mutators.Wait()
	stop.Store(true)
	cpus.Wait()
	assert.Zero(t, poisoned.Load(), "a CPU read a freed frame")
	assert.Zero(t, wrong.Load(), "a CPU read a value nobody wrote there")
	assert.Positive(t, accesses.Load())
	require.NoError(t, mm.Exit())
	assert.Equal(t, 4095, m.RAM().Stats().Free, "every frame but the zero page is back")
}

// TestExitWhileCPUsHoldTheMMLazily: a CPU ran the MM and switched to a
// kernel thread; the MM exits (its page tables are freed). In both lazy
// schemes the CPU must leave the MM before it is freed.
func TestExitWhileCPUsHoldTheMMLazily(t *testing.T) {
	for _, mode := range []gomm.LazyTLBMode{gomm.LazyRefcount, gomm.LazyShootdown} {
		t.Run(mode.String(), func(t *testing.T) {
			m := newMachine(t, gomm.Config{CPUs: 2, LazyTLB: mode})
			mm := m.NewMM()
			addr, err := mm.Mmap(0, 16*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapPopulate)
			require.NoError(t, err)
			for _, c := range m.CPUs() {
				c.Switch(mm.NewTask("t"))
				_, err := c.Load64(addr)
				require.NoError(t, err)
				c.Switch(tlbIdle())
			}
			require.NoError(t, mm.Exit())
			assert.True(t, mm.Context().Freed())
			for _, c := range m.CPUs() {
				ctx, _ := c.ActiveMM()
				assert.Nil(t, ctx)
			}
			st := m.Stats().TLB
			if mode == gomm.LazyRefcount {
				assert.Zero(t, st.ShootdownIPIs)
				assert.Positive(t, st.CountOps)
			} else {
				assert.Zero(t, st.CountOps-1, "only the exit's own mmdrop")
			}
		})
	}
}

// TestLazyCPUSkippedForPTEFlushButNotFreedTables: a lazy CPU is not
// interrupted when pages are zapped, but is when the zap frees tables.
func TestLazyCPUSkippedForPTEFlushButNotFreedTables(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 2})
	mm := m.NewMM()
	addr, err := mm.Mmap(0x4000_0000, 4*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)
	keep, err := mm.Mmap(0x4000_0000+8*page, page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)
	lazy := m.CPU(1)
	lazy.Switch(mm.NewTask("t"))
	_, err = lazy.Load64(addr)
	require.NoError(t, err)
	lazy.Switch(tlbIdle())

	require.NoError(t, mm.Madvise(addr, 4*page, gomm.MadvDontNeed))
	st := m.Stats().TLB
	assert.Equal(t, uint64(1), st.LazySkipped)
	assert.Zero(t, st.IPIs)
	ctx, isLazy := lazy.ActiveMM()
	assert.Same(t, mm.Context(), ctx)
	assert.True(t, isLazy)

	// Unmapping everything frees the tables: the lazy CPU must go.
	require.NoError(t, mm.Munmap(addr, 4*page))
	require.NoError(t, mm.Munmap(keep, page))
	ctx, _ = lazy.ActiveMM()
	assert.Nil(t, ctx, "freed tables send the IPI to lazy CPUs too")
	require.NoError(t, mm.Exit())
}
