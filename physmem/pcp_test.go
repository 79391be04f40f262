package physmem

import (
	"sync"
	"testing"
	"time"

	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newCached(t testing.TB, frames, cpus int) *Allocator {
	t.Helper()
	a, err := New(frames, CPUCaches(cpus))
	require.NoError(t, err)
	return a
}

func TestCPUCachesRejectsBadCounts(t *testing.T) {
	for _, tc := range []struct {
		cpus int
		ok   bool
	}{{-1, false}, {0, true}, {1, true}, {MaxCPUCaches, true}, {MaxCPUCaches + 1, false}} {
		_, err := New(8, CPUCaches(tc.cpus))
		if tc.ok {
			assert.NoError(t, err, "%d caches", tc.cpus)
		} else {
			assert.ErrorIs(t, err, ErrInvalid, "%d caches", tc.cpus)
		}
	}
}

// TestAllocOnRefillsABatch: the first allocation on a CPU moves a batch
// from the free list to its cache; the next ones come from the cache
// alone, and the cached frames still count as free.
func TestAllocOnRefillsABatch(t *testing.T) {
	a := newCached(t, 100, 2)
	f, err := a.AllocOn(0)
	require.NoError(t, err)
	assert.Equal(t, int32(1), f.RefCount())
	assert.Len(t, a.caches[0].pfns, cpuCacheBatch-1)
	assert.Empty(t, a.caches[1].pfns)
	st := a.Stats()
	assert.Equal(t, 99, st.Free, "cached frames are free")
	assert.Equal(t, uint64(1), st.Allocs)

	// The free list gave the cache its first batch: the plain allocator
	// hands out the frame after it.
	g, err := a.Alloc()
	require.NoError(t, err)
	assert.Equal(t, PFN(cpuCacheBatch), g.PFN())

	seen := map[PFN]bool{f.PFN(): true, g.PFN(): true}
	for range cpuCacheBatch - 1 {
		h, err := a.AllocOn(0)
		require.NoError(t, err)
		assert.Less(t, h.PFN(), PFN(cpuCacheBatch), "from the cache")
		assert.False(t, seen[h.PFN()], "pfn %d handed out twice", h.PFN())
		seen[h.PFN()] = true
	}
	assert.Empty(t, a.caches[0].pfns)
	assert.Equal(t, uint64(cpuCacheBatch+1), a.Stats().Allocs)
}

// TestAllocDrainsCPUCachesBeforeFailing: frames cached on one CPU are
// found by an allocation anywhere else before it reports ErrNoMem.
func TestAllocDrainsCPUCachesBeforeFailing(t *testing.T) {
	const frames = 40
	for _, tc := range []struct {
		name  string
		alloc func(a *Allocator) (*Frame, error)
	}{
		{"Alloc", (*Allocator).Alloc},
		{"AllocOn another CPU", func(a *Allocator) (*Frame, error) { return a.AllocOn(1) }},
		{"AllocOn no CPU", func(a *Allocator) (*Frame, error) { return a.AllocOn(-1) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newCached(t, frames, 2)
			_, err := a.AllocOn(0)
			require.NoError(t, err)
			for i := range frames - 1 {
				_, err := tc.alloc(a)
				require.NoError(t, err, "allocation %d of %d free frames", i+1, frames-1)
			}
			_, err = tc.alloc(a)
			assert.ErrorIs(t, err, ErrNoMem)
			_, err = a.AllocOn(0)
			assert.ErrorIs(t, err, ErrNoMem)
			st := a.Stats()
			assert.Zero(t, st.Free)
			assert.Equal(t, uint64(2), st.Failures)
			assert.Equal(t, uint64(frames), st.Allocs)
		})
	}
}

// TestAllocHugeDrainsCPUCaches: a block whose frames sit partly in a CPU
// cache is whole once the caches are drained, which AllocHuge does
// rather than fail.
func TestAllocHugeDrainsCPUCaches(t *testing.T) {
	a := newCached(t, HugeFrames, 1)
	f, err := a.AllocOn(0)
	require.NoError(t, err)
	require.NoError(t, a.Put(f))
	require.NotEmpty(t, a.caches[0].pfns)
	head, err := a.AllocHuge()
	require.NoError(t, err)
	assert.Equal(t, PFN(0), head.PFN())
	assert.Empty(t, a.caches[0].pfns)
	st := a.Stats()
	assert.Zero(t, st.Free)
	assert.Zero(t, st.HugeFailures)
}

func TestAllocOnWithoutACacheUsesTheFreeList(t *testing.T) {
	a := newCached(t, 8, 2)
	for _, cpu := range []int{-1, 2, 1 << 20} {
		f, err := a.AllocOn(cpu)
		require.NoError(t, err, "cpu %d", cpu)
		assert.NotNil(t, f)
	}
	assert.Empty(t, a.caches[0].pfns)
	assert.Empty(t, a.caches[1].pfns)
	assert.Equal(t, 5, a.Stats().Free)
}

// TestConcurrentAllocOn: CPUs allocating and freeing at once, some
// through their caches and one through the free list, never get one
// frame twice, and every frame is free at the end.
func TestConcurrentAllocOn(t *testing.T) {
	const (
		frames = 256
		cpus   = 4
		each   = 48 // more than fits: caches refill and drain
	)
	a := newCached(t, frames, cpus)
	var owners sync.Map // pfn -> goroutine holding it
	rounds := testmain.Iterations(300, 40)
	var wg sync.WaitGroup
	for cpu := -1; cpu < cpus; cpu++ {
		wg.Go(func() {
			held := make([]*Frame, 0, each)
			for range rounds {
				for range each {
					f, err := a.AllocOn(cpu)
					if err != nil {
						continue // the others hold the rest for now
					}
					if prev, dup := owners.LoadOrStore(f.PFN(), cpu); dup {
						t.Errorf("pfn %d handed to cpu %d while cpu %v holds it", f.PFN(), cpu, prev)
						return
					}
					held = append(held, f)
				}
				for _, f := range held {
					owners.Delete(f.PFN())
					if err := a.Put(f); err != nil {
						t.Error(err)
						return
					}
				}
				held = held[:0]
			}
		})
	}
	wg.Wait()
	st := a.Stats()
	assert.Equal(t, frames, st.Free)
	assert.Equal(t, st.Allocs, st.Frees)
	a.DrainCPUCaches()
	for i := range a.caches {
		assert.Empty(t, a.caches[i].pfns)
	}
	assert.Equal(t, frames, a.nfree+a.nframes-a.fresh, "every frame back on the free list or never used")
}

// TestAllocTakesWhatItDrained: an allocation that finds the free list
// empty drains the CPU caches; another CPU's refill between that drain
// and the allocation's take would carry the frames off again, and the
// allocation would fail with frames free. The drain and the take are
// one step under every cache's lock, so the refill waits.
func TestAllocTakesWhatItDrained(t *testing.T) {
	a := newCached(t, 64, 2)
	for range 60 {
		_, err := a.Alloc()
		require.NoError(t, err)
	}
	_, err := a.AllocOn(1) // cache 1 takes the last 4 frames
	require.NoError(t, err)
	require.Len(t, a.caches[1].pfns, 3)

	refilled := make(chan error, 1)
	testHookDrained = func() {
		testHookDrained = nil
		go func() {
			_, err := a.AllocOn(1)
			refilled <- err
		}()
		time.Sleep(20 * time.Millisecond) // time enough for the refill, were it not locked out
	}
	defer func() { testHookDrained = nil }()
	f, err := a.AllocOn(0)
	require.NoError(t, err, "the frames drained from cache 1 were free")
	assert.NotNil(t, f)
	require.NoError(t, <-refilled, "two of the three are left for cache 1")
	assert.Equal(t, 1, a.Stats().Free)
}

// TestAllocOnNeverFailsWithFramesFree: CPUs allocating and freeing in a
// RAM almost wholly held, so that their caches hold the last free
// frames, never get ErrNoMem while some frame is free: a failing
// allocation drains every cache with all of them locked, so no refill
// takes the frames back between its drain and its retry.
func TestAllocOnNeverFailsWithFramesFree(t *testing.T) {
	const frames, held = 64, 60
	a := newCached(t, frames, 2)
	for range held {
		_, err := a.Alloc()
		require.NoError(t, err)
	}
	rounds := testmain.Iterations(50_000, 5_000)
	var wg sync.WaitGroup
	for cpu := range 2 {
		wg.Go(func() {
			for range rounds {
				// At most 2 of the 4 free frames are held by the two
				// CPUs at once, so at least 2 are free at every call.
				f, err := a.AllocOn(cpu)
				if err != nil {
					t.Errorf("cpu %d: %v with frames free", cpu, err)
					return
				}
				if err := a.Put(f); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	assert.Zero(t, a.Stats().Failures)
}
