package physmem

import (
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestPutBatch: PutBatch frees exactly the frames whose last reference it
// drops, runs a batch hook once per batch and a plain hook per frame,
// and refuses (and reports) a put of a free frame without stopping.
func TestPutBatch(t *testing.T) {
	const n = 2*putBatch + 5
	a := newAlloc(t, n+1)
	double, err := a.Alloc()
	require.NoError(t, err)
	require.NoError(t, a.Put(double)) // to be put again, after its free, in the batch
	var each int
	var batches [][]PFN
	defer a.OnFree(func(*Frame) { each++ })()
	defer a.OnFreeBatch(func(*Frame) { t.Error("per-frame hook of a batch hook called by PutBatch") },
		func(fs []*Frame) {
			var b []PFN
			for _, f := range fs {
				assert.Zero(t, f.RefCount())
				assert.True(t, f.HasData(), "hooks run before the data is poisoned")
				b = append(b, f.PFN())
			}
			batches = append(batches, b)
		})()

	var fs []*Frame
	for range n {
		f, err := a.Alloc()
		require.NoError(t, err)
		require.NoError(t, f.Store64(0, 1))
		fs = append(fs, f)
	}
	kept := fs[3]
	require.NoError(t, a.Get(kept))                    // survives the batch
	err = a.PutBatch(append(slices.Clone(fs), double)) // its argument is its scratch
	assert.ErrorIs(t, err, ErrFreed)
	assert.Equal(t, n-1, each)
	var freed int
	for _, b := range batches {
		assert.LessOrEqual(t, len(b), putBatch)
		freed += len(b)
	}
	assert.Equal(t, n-1, freed)
	assert.Len(t, batches, 3)
	for _, f := range fs {
		if f == kept {
			assert.Equal(t, int32(1), f.RefCount())
			continue
		}
		assert.True(t, f.IsFree())
		v, _ := f.Load64(0)
		assert.Equal(t, uint64(PoisonWord), v)
	}
	st := a.Stats()
	assert.Equal(t, n, st.Free)
	assert.Equal(t, uint64(n), st.Frees) // double's first free included
	assert.Equal(t, uint64(1), st.BadPuts)
}

// TestRecycledDataIsZero: a frame's data goes back to the pool on free
// and the next first write that takes it finds it zeroed, while the freed
// frame itself reads as poison.
func TestRecycledDataIsZero(t *testing.T) {
	a := newAlloc(t, 2)
	f, err := a.Alloc()
	require.NoError(t, err)
	for off := 0; off < PageSize; off += 8 {
		require.NoError(t, f.Store64(off, ^uint64(0)))
	}
	require.NoError(t, a.Put(f))
	v, _ := f.Load64(64)
	assert.Equal(t, uint64(PoisonWord), v, "a freed frame reads as poison")

	for range 4 { // whichever frame it lands in, in whichever order
		g, err := a.Alloc()
		require.NoError(t, err)
		assert.True(t, g.IsZero())
		require.NoError(t, g.Store64(8, 5))
		for off := 0; off < PageSize; off += 8 {
			want := uint64(0)
			if off == 8 {
				want = 5
			}
			v, err := g.Load64(off)
			require.NoError(t, err)
			require.Equal(t, want, v, "offset %d", off)
		}
		require.NoError(t, a.Put(g))
	}
}
