package rmap_test

import (
	"slices"
	"testing"

	"github.com/gomm-dev/gomm/rmap"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newVMA(start, pages uint64) *rmap.VMA {
	return &rmap.VMA{Start: start, End: start + pages*4096, PgOff: start / 4096}
}

// vmasAt lists, under the family lock, the VMAs a page of av at index may
// be mapped in.
func vmasAt(av *rmap.AnonVMA, index uint64) []*rmap.VMA {
	av.RLock()
	defer av.RUnlock()
	return slices.Collect(av.VMAsAt(index))
}

func TestForkFamily(t *testing.T) {
	var pool rmap.Pool
	parent := newVMA(0x10000, 16)
	require.NoError(t, pool.Prepare(parent))
	root := parent.AnonVMA
	require.NotNil(t, root)
	assert.Same(t, root, root.Root())
	idx := parent.PgOff + 3

	child := newVMA(0x10000, 16)
	require.NoError(t, pool.Fork(child, parent))
	require.NotNil(t, child.AnonVMA)
	assert.NotSame(t, root, child.AnonVMA, "the child gets an anon_vma of its own")
	assert.Same(t, root, child.AnonVMA.Root())
	assert.Len(t, child.Chains(), 2, "its own and the root's")

	assert.ElementsMatch(t, []*rmap.VMA{parent, child}, vmasAt(root, idx),
		"a page the parent had at fork is found from both")
	assert.Equal(t, []*rmap.VMA{child}, vmasAt(child.AnonVMA, idx),
		"a page the child copies on write is found only from the child")

	grandchild := newVMA(0x10000, 16)
	require.NoError(t, pool.Fork(grandchild, child))
	assert.ElementsMatch(t, []*rmap.VMA{parent, child, grandchild}, vmasAt(root, idx))
	assert.ElementsMatch(t, []*rmap.VMA{child, grandchild}, vmasAt(child.AnonVMA, idx))
	assert.Equal(t, int64(3), pool.Live())

	va, ok := grandchild.Address(idx)
	assert.True(t, ok)
	assert.Equal(t, uint64(0x13000), va)
	_, ok = grandchild.Address(parent.PgOff + 16)
	assert.False(t, ok)

	var order []uint64
	pool.OnFree = func(av *rmap.AnonVMA) { order = append(order, av.ID()) }
	pool.Unlink(parent)
	pool.Unlink(grandchild)
	pool.Unlink(child)
	assert.Zero(t, pool.Live())
	require.Len(t, order, 3)
	assert.Equal(t, root.ID(), order[2], "the root is freed last")
}

// TestRepeatedForkAndExitStaysSmall: a process that forks and exits a
// thousand times over (each child carrying on) must not leave a chain of
// a thousand anon_vmas behind: idle ones are reused.
func TestRepeatedForkAndExitStaysSmall(t *testing.T) {
	var pool rmap.Pool
	cur := newVMA(0x10000, 4)
	require.NoError(t, pool.Prepare(cur))
	for range 1000 {
		next := newVMA(0x10000, 4)
		require.NoError(t, pool.Fork(next, cur))
		pool.Unlink(cur)
		cur = next
		require.LessOrEqual(t, pool.Live(), int64(3))
		require.LessOrEqual(t, len(cur.Chains()), 3)
	}
	// The root, plus two members the generations take turns to reuse.
	assert.Equal(t, int64(3), pool.Live())
	assert.Equal(t, uint64(3), pool.Allocated(), "nothing allocated after the second fork")
	pool.Unlink(cur)
	assert.Zero(t, pool.Live())
}

func TestWideForkTreeAndCounts(t *testing.T) {
	var pool rmap.Pool
	parent := newVMA(0x40000, 8)
	require.NoError(t, pool.Prepare(parent))
	var kids []*rmap.VMA
	for range 10 {
		k := newVMA(0x40000, 8)
		require.NoError(t, pool.Fork(k, parent))
		kids = append(kids, k)
	}
	children, active, ref := parent.AnonVMA.Counts()
	assert.Equal(t, 11, children, "ten children plus the root's self link")
	assert.Equal(t, 1, active)
	assert.Equal(t, int64(11), ref, "its own plus one per member")
	assert.Len(t, vmasAt(parent.AnonVMA, parent.PgOff), 11)
	for _, k := range kids {
		pool.Unlink(k)
	}
	children, _, ref = parent.AnonVMA.Counts()
	assert.Equal(t, 1, children)
	assert.Equal(t, int64(1), ref)
	pool.Unlink(parent)
	assert.Zero(t, pool.Live())
}

func TestSplitCloneAndAdjust(t *testing.T) {
	var pool rmap.Pool
	v := newVMA(0x100000, 8)
	require.NoError(t, pool.Prepare(v))
	av := v.AnonVMA
	// Split at the fourth page: the tail is a clone, both re-keyed.
	tail := &rmap.VMA{AnonVMA: v.AnonVMA} // vm_area_dup copies the anon_vma
	require.NoError(t, pool.Clone(tail, v))
	assert.Same(t, av, tail.AnonVMA, "a split shares the anon_vma")
	pool.Adjust(tail, 0x104000, 0x108000, v.PgOff+4)
	pool.Adjust(v, 0x100000, 0x104000, v.PgOff)
	assert.Equal(t, []*rmap.VMA{v}, vmasAt(av, v.PgOff+3))
	assert.Equal(t, []*rmap.VMA{tail}, vmasAt(av, v.PgOff+4))
	_, active, _ := av.Counts()
	assert.Equal(t, 2, active)
	assert.ErrorIs(t, pool.Clone(tail, v), rmap.ErrInvalid, "tail is already linked")
	assert.ErrorIs(t, pool.Prepare(&rmap.VMA{Start: 5, End: 5}), rmap.ErrInvalid)
	pool.Unlink(v)
	assert.Equal(t, int64(1), pool.Live())
	pool.Unlink(tail)
	assert.Zero(t, pool.Live())
	assert.Equal(t, uint64(1), pool.Allocated())
}
