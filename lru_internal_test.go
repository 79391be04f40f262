package gomm

import (
	"sync"
	"testing"

	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/tlb"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A frame's LRU flags change with its list membership, under the list
// lock: isolation clears them before anybody can add the frame back, so
// a later add's flags are never undone and a listed frame is always
// flagged (the free hook relies on the flag to take it off).
func TestLRUFlagsFollowMembership(t *testing.T) {
	ram, err := physmem.New(8)
	require.NoError(t, err)
	l := newLRU(ram, 0)
	f, err := ram.Alloc()
	require.NoError(t, err)
	l.add(f, true)
	assert.True(t, f.Has(physmem.FlagLRU|physmem.FlagActive))
	require.Equal(t, uint32(f.PFN())+1, l.isolateTail())
	assert.False(t, f.Has(physmem.FlagLRU), "cleared by the isolation itself")
	assert.False(t, f.Has(physmem.FlagActive))
	l.add(f, false) // a racing putback or munlock
	assert.True(t, f.Has(physmem.FlagLRU))
	inactive, active := l.lens()
	assert.Equal(t, 1, inactive)
	assert.Zero(t, active)
	l.del(f)
	assert.False(t, f.Has(physmem.FlagLRU))
	inactive, _ = l.lens()
	assert.Zero(t, inactive)
}

// newBatchedLRU is an LRU with batches for cpus CPUs, wired to its
// allocator's free hooks as a machine's is.
func newBatchedLRU(t *testing.T, frames, cpus int) (*lru, *physmem.Allocator) {
	t.Helper()
	ram, err := physmem.New(frames)
	require.NoError(t, err)
	l := newLRU(ram, cpus)
	ram.OnFreeBatch(l.freed, l.delFreed)
	return l, ram
}

// listed returns the frames on a list, head first, checking the links
// both ways.
func (l *lru) listed(t *testing.T, which uint8) []uint32 {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var pfns []uint32
	prev := uint32(0)
	for p := l.head[which]; p != 0; p = l.links[p-1].next {
		require.Equal(t, which, l.links[p-1].on)
		require.Equal(t, prev, l.links[p-1].prev)
		pfns = append(pfns, p-1)
		prev = p
	}
	require.Equal(t, prev, l.tail[which])
	require.Len(t, pfns, l.n[which])
	return pfns
}

func TestLRUBatchJoinsTheListsWhenFull(t *testing.T) {
	l, ram := newBatchedLRU(t, 64, 2)
	var fs []*physmem.Frame
	for i := range lruBatchSize {
		f, err := ram.Alloc()
		require.NoError(t, err)
		fs = append(fs, f)
		l.addOn(1, f, i%2 == 0)
		if i < lruBatchSize-1 {
			assert.True(t, f.Has(physmem.FlagLRUPending))
			assert.Equal(t, i%2 == 0, f.Has(physmem.FlagActive), "PG_active before the list")
			assert.False(t, f.Has(physmem.FlagLRU))
			assert.Empty(t, l.listed(t, lruActive), "queued, not listed")
		}
	}
	assert.Len(t, l.listed(t, lruActive), (lruBatchSize+1)/2)
	assert.Len(t, l.listed(t, lruInactive), lruBatchSize/2)
	for i, f := range fs {
		assert.False(t, f.Has(physmem.FlagLRUPending))
		assert.True(t, f.Has(physmem.FlagLRU))
		assert.Equal(t, i%2 == 0, f.Has(physmem.FlagActive))
	}
	assert.Zero(t, l.batches[1].n)

	// A CPU the LRU has no batch for adds at once.
	f, err := ram.Alloc()
	require.NoError(t, err)
	l.addOn(noCPU, f, true)
	assert.True(t, f.Has(physmem.FlagLRU))
	l.addOn(7, f, true) // already listed: nothing changes
	assert.Len(t, l.listed(t, lruActive), (lruBatchSize+1)/2+1)
}

// TestLRUFreeTakesAQueuedFrameOffItsBatch: a frame freed while it waits
// on a CPU's batch (faulted in, then unmapped before the batch filled)
// must not join a list when the batch drains: the list would hold a free
// frame, which the next owner's add would then find already listed, and
// reclaim would isolate. Freed one at a time and in a batch.
func TestLRUFreeTakesAQueuedFrameOffItsBatch(t *testing.T) {
	for _, tc := range []struct {
		name string
		put  func(ram *physmem.Allocator, fs []*physmem.Frame) error
	}{
		{"Put", func(ram *physmem.Allocator, fs []*physmem.Frame) error {
			for _, f := range fs {
				if err := ram.Put(f); err != nil {
					return err
				}
			}
			return nil
		}},
		{"PutBatch", (*physmem.Allocator).PutBatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, ram := newBatchedLRU(t, 64, 2)
			var kept, freed []*physmem.Frame
			for i := range 6 {
				f, err := ram.Alloc()
				require.NoError(t, err)
				l.addOn(i%2, f, true)
				if i < 4 {
					freed = append(freed, f)
				} else {
					kept = append(kept, f)
				}
			}
			require.NoError(t, tc.put(ram, freed))
			assert.Equal(t, 1, l.batches[0].n)
			assert.Equal(t, 1, l.batches[1].n)
			l.drainAll()
			var want []uint32
			for _, f := range kept {
				want = append(want, uint32(f.PFN()))
			}
			assert.ElementsMatch(t, want, l.listed(t, lruActive), "only the frames still allocated")
		})
	}
}

// TestLRUDrainLeavesMlockedAndListedFrames: a queued frame mlocked
// meanwhile is unevictable and stays off the lists; a direct add of a
// queued frame (a munlock) leaves it to its batch, so that it is never
// both queued and listed (reclaim could isolate it, and the drain list
// it again while isolated).
func TestLRUDrainLeavesMlockedAndListedFrames(t *testing.T) {
	l, ram := newBatchedLRU(t, 8, 1)
	locked, err := ram.Alloc()
	require.NoError(t, err)
	listed, err := ram.Alloc()
	require.NoError(t, err)
	l.addOn(0, locked, true)
	l.addOn(0, listed, true)
	locked.SetFlags(physmem.FlagMlocked)
	l.add(listed, false)
	assert.Empty(t, l.listed(t, lruInactive), "left to its batch")
	assert.True(t, listed.Has(physmem.FlagLRUPending))
	l.drainAll()
	assert.Equal(t, []uint32{uint32(listed.PFN())}, l.listed(t, lruActive))
	assert.Empty(t, l.listed(t, lruInactive))
	for _, flag := range []physmem.Flags{physmem.FlagLRU, physmem.FlagLRUPending, physmem.FlagActive} {
		assert.False(t, locked.Has(flag), "%v", flag)
	}
	assert.False(t, listed.Has(physmem.FlagLRUPending))
	assert.True(t, listed.Has(physmem.FlagLRU|physmem.FlagActive))
}

// TestLRUBatchesUnderConcurrentFaultsAndFrees: CPUs fault pages in
// (queuing them on their batches) while MADV_DONTNEED frees pages of the
// same region, and Stats and now and then reclaim drain the batches. At the
// end, every listed or queued frame is a live one, and once the MM exits
// both are empty. The checker stays silent throughout.
func TestLRUBatchesUnderConcurrentFaultsAndFrees(t *testing.T) {
	const pages = 256
	m, err := NewMachine(Config{CPUs: 2, Frames: 2048, Check: true})
	require.NoError(t, err)
	mm := m.NewMM()
	base, err := mm.Mmap(0x1000_0000, pages*PageSize, ProtRead|ProtWrite, MapPrivate|MapAnonymous|MapFixed)
	require.NoError(t, err)
	require.NoError(t, mm.Madvise(base, pages*PageSize, MadvNoHugePage))

	rounds := testmain.Iterations(20, 4)
	var wg sync.WaitGroup
	for _, cpu := range m.CPUs() {
		wg.Go(func() {
			cpu.Switch(mm.NewTask("t"))
			defer cpu.Switch(tlb.NewKernelThread("idle"))
			for range rounds {
				for p := uint64(cpu.ID()); p < pages; p += 2 {
					if err := cpu.Store64(base+p*PageSize, p); err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	wg.Go(func() {
		for r := range rounds * 8 {
			start := base + uint64(r*37%pages)*PageSize
			if err := mm.Madvise(start, min(32*PageSize, base+pages*PageSize-start), MadvDontNeed); err != nil {
				t.Error(err)
				return
			}
			if r%16 == 0 {
				m.Reclaim(8)
			} else {
				m.Stats() // drains every batch
			}
		}
	})
	wg.Wait()

	live := func(pfn uint32, what string) {
		f, err := m.ram.Frame(physmem.PFN(pfn))
		require.NoError(t, err)
		assert.Positive(t, f.RefCount(), "%s frame %v is free", what, f)
	}
	for i := range m.lru.batches {
		b := &m.lru.batches[i]
		for _, q := range b.frames[:b.n] {
			live(uint32(q.f.PFN()), "queued")
			assert.True(t, q.f.Has(physmem.FlagLRUPending), "%v", q.f)
		}
	}
	for _, which := range []uint8{lruInactive, lruActive} {
		for _, pfn := range m.lru.listed(t, which) {
			live(pfn, "listed")
		}
	}
	require.NoError(t, mm.Exit())
	m.lru.drainAll()
	assert.Empty(t, m.lru.listed(t, lruActive))
	assert.Empty(t, m.lru.listed(t, lruInactive))
	v, _ := m.Violations()
	assert.Empty(t, v)
}
