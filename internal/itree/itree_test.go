package itree

import (
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"pgregory.net/rapid"
)

func collect(t *Tree[int], start, last uint64) []int {
	var out []int
	for n := range t.Overlapping(start, last) {
		out = append(out, n.Value)
	}
	return out
}

func TestOverlapBasics(t *testing.T) {
	var tr Tree[int]
	nodes := []*Node[int]{
		{Start: 10, Last: 19, Value: 1},
		{Start: 0, Last: 4, Value: 2},
		{Start: 15, Last: 40, Value: 3},
		{Start: 30, Last: 30, Value: 4},
		{Start: 10, Last: 19, Value: 5}, // a duplicate interval
		{Start: 0, Last: ^uint64(0), Value: 6},
	}
	for _, n := range nodes {
		tr.Insert(n)
	}
	assert.Equal(t, 6, tr.Len())
	assert.Equal(t, []int{2, 6, 1, 5}, collect(&tr, 0, 10), "ordered by start, then last, then insertion")
	assert.Equal(t, []int{6, 3, 4}, collect(&tr, 25, 30))
	assert.Equal(t, []int{6}, collect(&tr, 41, ^uint64(0)))
	assert.True(t, tr.Remove(nodes[5]))
	assert.False(t, tr.Remove(nodes[5]), "not in the tree any more")
	assert.False(t, nodes[5].InTree())
	assert.Empty(t, collect(&tr, 41, 1000))
	assert.Equal(t, []int{2, 1, 5, 3, 4}, collect(&tr, 0, ^uint64(0)))
	var other Tree[int]
	assert.False(t, other.Remove(nodes[0]), "a node of another tree")
	assert.Panics(t, func() { tr.Insert(nodes[0]) })
	assert.Panics(t, func() { tr.Insert(&Node[int]{Start: 2, Last: 1}) })

	stops := 0
	for range tr.All() {
		stops++
		break
	}
	assert.Equal(t, 1, stops, "iteration stops when asked")
}

// TestTreeAgainstModel checks every query against a brute-force scan of
// the intervals inserted and not removed, and the treap's invariants.
func TestTreeAgainstModel(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		var tr Tree[int]
		var live []*Node[int]
		coord := rapid.Uint64Range(0, 200)
		for i := range rapid.IntRange(1, 200).Draw(t, "ops") {
			switch {
			case len(live) > 0 && rapid.IntRange(0, 2).Draw(t, "op") == 0:
				k := rapid.IntRange(0, len(live)-1).Draw(t, "victim")
				if !tr.Remove(live[k]) {
					t.Fatal("remove failed")
				}
				live = slices.Delete(live, k, k+1)
			default:
				a, b := coord.Draw(t, "a"), coord.Draw(t, "b")
				n := &Node[int]{Start: min(a, b), Last: max(a, b), Value: i}
				tr.Insert(n)
				live = append(live, n)
			}
			a, b := coord.Draw(t, "qa"), coord.Draw(t, "qb")
			lo, hi := min(a, b), max(a, b)
			var want []*Node[int]
			for _, n := range live {
				if n.Start <= hi && n.Last >= lo {
					want = append(want, n)
				}
			}
			slices.SortFunc(want, func(x, y *Node[int]) int {
				if less(x, y) {
					return -1
				}
				return 1
			})
			var got []*Node[int]
			for n := range tr.Overlapping(lo, hi) {
				got = append(got, n)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("query [%d, %d]: got %d intervals, want %d", lo, hi, len(got), len(want))
			}
			if tr.Len() != len(live) {
				t.Fatalf("Len %d, want %d", tr.Len(), len(live))
			}
			checkInvariants(t, tr.root)
		}
	})
}

func checkInvariants(t *rapid.T, n *Node[int]) uint64 {
	if n == nil {
		return 0
	}
	m := n.Last
	for _, c := range []*Node[int]{n.left, n.right} {
		if c == nil {
			continue
		}
		if c.prio > n.prio {
			t.Fatal("heap order broken")
		}
		m = max(m, checkInvariants(t, c))
	}
	if n.left != nil && !less(n.left, n) || n.right != nil && less(n.right, n) {
		t.Fatal("search order broken")
	}
	if m != n.maxLast {
		t.Fatalf("maxLast %d, want %d", n.maxLast, m)
	}
	return m
}

func BenchmarkInsertRemove(b *testing.B) {
	var tr Tree[int]
	nodes := make([]*Node[int], 4096)
	for i := range nodes {
		nodes[i] = &Node[int]{Start: uint64(i * 7919 % 4096 * 4096), Last: uint64(i*7919%4096*4096 + 8191)}
		tr.Insert(nodes[i])
	}
	i := 0
	for b.Loop() {
		n := nodes[i%len(nodes)]
		tr.Remove(n)
		tr.Insert(n)
		i++
	}
}

func BenchmarkStab(b *testing.B) {
	var tr Tree[int]
	for i := range 4096 {
		tr.Insert(&Node[int]{Start: uint64(i) * 4096, Last: uint64(i)*4096 + 8191})
	}
	i := uint64(0)
	for b.Loop() {
		for range tr.Overlapping(i%4096*4096, i%4096*4096) {
		}
		i += 7919
	}
}
