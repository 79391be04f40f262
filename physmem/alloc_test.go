package physmem

import (
	"sync"
	"testing"
	"unsafe"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newAlloc(t testing.TB, frames int) *Allocator {
	t.Helper()
	a, err := New(frames)
	require.NoError(t, err)
	return a
}

func TestFrameIsAtMost64Bytes(t *testing.T) {
	assert.LessOrEqual(t, unsafe.Sizeof(Frame{}), uintptr(64))
}

func TestNewRejectsBadSizes(t *testing.T) {
	for _, n := range []int{0, -1, -1 << 40} {
		_, err := New(n)
		assert.ErrorIs(t, err, errno.ErrInvalid, "New(%d)", n)
	}
}

func TestAllocPutLifecycle(t *testing.T) {
	a := newAlloc(t, 4)
	var freed []*Frame
	var sawMapping []Mapping
	remove := a.OnFree(func(f *Frame) {
		freed = append(freed, f)
		m, _ := f.Mapping()
		sawMapping = append(sawMapping, m)
		assert.Zero(t, f.RefCount(), "hooks run after the last reference is gone")
	})
	defer remove()

	f, err := a.Alloc()
	require.NoError(t, err)
	assert.Equal(t, int32(1), f.RefCount())
	assert.True(t, f.IsZero())
	assert.False(t, f.HasData(), "data is allocated on first write only")
	gen := f.Gen()

	require.NoError(t, f.Store64(8, 0xdeadbeef))
	assert.True(t, f.HasData())
	f.SetFlags(FlagAnon | FlagDirty)
	owner := fakeMapping{anon: true}
	f.SetMapping(owner, 7)

	require.NoError(t, a.Get(f))
	require.NoError(t, a.Put(f))
	assert.Empty(t, freed, "one reference left")
	require.NoError(t, a.Put(f))
	require.Len(t, freed, 1)
	assert.Same(t, f, freed[0])
	assert.Equal(t, Mapping(owner), sawMapping[0], "hooks see the frame before it is cleared")

	assert.True(t, f.IsFree())
	assert.Equal(t, gen+1, f.Gen())
	assert.Equal(t, Flags(0), f.Flags())
	v, err := f.Load64(8)
	require.NoError(t, err)
	assert.Equal(t, uint64(PoisonWord), v, "a stale reader of a freed frame sees poison")
	assert.ErrorIs(t, f.Store64(0, 1), ErrFreed, "a write to a freed frame is refused")

	st := a.Stats()
	assert.Equal(t, Stats{Frames: 4, Free: 4, Allocs: 1, Frees: 1}, st)

	g, err := a.Alloc()
	require.NoError(t, err)
	assert.Same(t, f, g, "LIFO: the hottest frame is reused first")
	assert.True(t, g.IsZero(), "a reallocated frame reads as zeros")
	m, idx := g.Mapping()
	assert.Nil(t, m)
	assert.Zero(t, idx)
}

type fakeMapping struct{ anon bool }

func (m fakeMapping) IsAnon() bool { return m.anon }

func TestAllocOutOfMemory(t *testing.T) {
	a := newAlloc(t, 3)
	var got []*Frame
	for range 3 {
		f, err := a.Alloc()
		require.NoError(t, err)
		got = append(got, f)
	}
	f, err := a.Alloc()
	assert.Nil(t, f)
	assert.ErrorIs(t, err, ErrNoMem)
	assert.ErrorIs(t, err, errno.ErrNoMem)
	assert.Equal(t, uint64(1), a.Stats().Failures)
	require.NoError(t, a.Put(got[1]))
	f, err = a.Alloc()
	require.NoError(t, err)
	assert.Same(t, got[1], f)
}

func TestBadPutsAreRefusedAndChangeNothing(t *testing.T) {
	a := newAlloc(t, 2)
	f, err := a.Alloc()
	require.NoError(t, err)
	require.NoError(t, a.Put(f))
	gen, before := f.Gen(), a.Stats()

	assert.ErrorIs(t, a.Put(f), ErrFreed, "double free")
	assert.ErrorIs(t, a.Get(f), ErrFreed, "get after free")
	assert.False(t, a.TryGet(f))
	assert.Equal(t, gen, f.Gen())
	assert.Zero(t, f.RefCount())
	after := a.Stats()
	assert.Equal(t, before.Free, after.Free, "the free list is untouched")
	assert.Equal(t, before.BadPuts+2, after.BadPuts)
}

func TestFreeWhileMappedIsReported(t *testing.T) {
	a := newAlloc(t, 1)
	f, err := a.Alloc()
	require.NoError(t, err)
	f.IncMapCount()
	err = a.Put(f)
	assert.ErrorIs(t, err, ErrBadState)
	assert.Zero(t, f.RefCount())
	assert.Equal(t, int32(1), f.MapCount(), "left as it was, for the post-mortem")
	assert.Equal(t, uint64(1), a.Stats().BadStates)
	assert.Zero(t, a.Stats().Free, "kept out of circulation")
	_, err = a.Alloc()
	assert.ErrorIs(t, err, ErrNoMem)

	b := newAlloc(t, 1)
	g, _ := b.Alloc()
	require.True(t, g.TryLock())
	assert.ErrorIs(t, b.Put(g), ErrBadState, "freed while locked")
	assert.True(t, g.IsLocked(), "the lock is not cleared under a possible sleeper")
	g.Unlock()
}

func TestFrameLookup(t *testing.T) {
	a := newAlloc(t, 8)
	f, err := a.Frame(5)
	require.NoError(t, err)
	assert.Equal(t, PFN(5), f.PFN())
	assert.True(t, f.IsFree())
	_, err = a.Frame(8)
	assert.ErrorIs(t, err, ErrInvalid)
	assert.Equal(t, 8, a.Frames())
}

func TestOnFreeRemove(t *testing.T) {
	a := newAlloc(t, 2)
	calls := map[string]int{}
	rmA := a.OnFree(func(*Frame) { calls["a"]++ })
	rmB := a.OnFree(func(*Frame) { calls["b"]++ })
	f, _ := a.Alloc()
	require.NoError(t, a.Put(f))
	rmA()
	f, _ = a.Alloc()
	require.NoError(t, a.Put(f))
	rmB()
	rmB()
	f, _ = a.Alloc()
	require.NoError(t, a.Put(f))
	assert.Equal(t, map[string]int{"a": 1, "b": 2}, calls)
}

// TestConcurrentGetPut hammers references from several goroutines: every
// frame must be freed exactly once, when its last reference goes.
func TestConcurrentGetPut(t *testing.T) {
	const frames = 64
	a := newAlloc(t, frames)
	var freeMu sync.Mutex
	freedCount := map[PFN]int{}
	defer a.OnFree(func(f *Frame) { freeMu.Lock(); freedCount[f.PFN()]++; freeMu.Unlock() })()

	rounds := testmain.Iterations(200, 40)
	for range rounds {
		held := make([]*Frame, 0, frames)
		for range frames {
			f, err := a.Alloc()
			require.NoError(t, err)
			held = append(held, f)
		}
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for _, f := range held {
					if a.TryGet(f) {
						assert.NoError(t, a.Put(f))
					}
				}
			})
		}
		for _, f := range held {
			require.NoError(t, a.Put(f))
		}
		wg.Wait()
		require.Equal(t, frames, a.Stats().Free)
	}
	for pfn, n := range freedCount {
		assert.Equal(t, rounds, n, "pfn %d", pfn)
	}
	st := a.Stats()
	assert.Equal(t, st.Allocs, st.Frees)
	assert.Zero(t, st.BadPuts)
}

// TestHugeRAMCostsOnlyWhatIsUsed: the memmap is created a chunk at a time,
// so a 16 TiB machine is as cheap to make as a small one.
func TestHugeRAMCostsOnlyWhatIsUsed(t *testing.T) {
	a := newAlloc(t, MaxFrames)
	f, err := a.Alloc()
	require.NoError(t, err)
	assert.Equal(t, PFN(0), f.PFN())
	last, err := a.Frame(MaxFrames - 1)
	require.NoError(t, err)
	assert.Equal(t, PFN(MaxFrames-1), last.PFN())
	assert.True(t, last.IsFree())
	assert.Equal(t, MaxFrames-1, a.Stats().Free)
	_, err = New(MaxFrames + 1)
	assert.ErrorIs(t, err, ErrInvalid)
	created := 0
	for i := range a.chunks {
		if a.chunks[i].Load() != nil {
			created++
		}
	}
	assert.Equal(t, 2, created)
}

// Blocks taken by AllocHuge leave stale entries on the free stack; a
// cycle of huge allocations and frees must not let them pile up.
func TestAllocHugeKeepsFreeStackBounded(t *testing.T) {
	a, err := New(4 * HugeFrames)
	require.NoError(t, err)
	for range 200 {
		head, err := a.AllocHuge()
		require.NoError(t, err)
		for p := head.PFN(); p < head.PFN()+HugeFrames; p++ {
			f, _ := a.Frame(p)
			require.NoError(t, a.Put(f))
		}
		require.LessOrEqual(t, len(a.free), 2*a.nfree+HugeFrames+1)
	}
	require.Equal(t, 4*HugeFrames, a.Stats().Free)
	// Every frame is still handed out exactly once.
	seen := map[PFN]bool{}
	for range 4 * HugeFrames {
		f, err := a.Alloc()
		require.NoError(t, err)
		require.False(t, seen[f.PFN()], "pfn %d twice", f.PFN())
		seen[f.PFN()] = true
	}
	_, err = a.Alloc()
	require.ErrorIs(t, err, ErrNoMem)
	_, err = a.AllocHuge()
	require.ErrorIs(t, err, ErrNoMem)
}
