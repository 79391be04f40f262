// Package itree is an augmented interval tree: the structure behind the
// kernel's anon_vma_chain tree (mm/interval_tree.c, anon_vma->rb_root),
// the i_mmap tree of an address_space, and the mmu interval-notifier
// tree. Written once, generic over what the intervals carry.
//
// Intervals are closed, [Start, Last], as in the kernel (so the top of
// the address space can be named). The tree is a treap ordered by
// (Start, Last, insertion order), each node augmented with the largest
// Last in its subtree, so a stabbing or overlap query visits only
// subtrees that can contain an answer: O(log n + k) expected.
//
// A Tree is not safe for concurrent use: its owner's lock (the anon_vma
// or i_mmap_rwsem) protects it.
package itree

import "iter"

// Node is one interval and what it carries. Its Start and Last must not
// change while it is in a tree.
type Node[T any] struct {
	Start, Last uint64
	Value       T

	left, right *Node[T]
	prio        uint64
	seq         uint64 // insertion order, the last tie-breaker
	maxLast     uint64 // largest Last in this subtree
	tree        *Tree[T]
}

// Tree is an interval tree. The zero value is empty and ready.
type Tree[T any] struct {
	root *Node[T]
	n    int
	seq  uint64
	rng  uint64
}

// Len returns the number of intervals.
func (t *Tree[T]) Len() int { return t.n }

// nextPrio is xorshift64*: a priority stream per tree, deterministic and
// free of any shared state.
func (t *Tree[T]) nextPrio() uint64 {
	if t.rng == 0 {
		t.rng = 0x9e3779b97f4a7c15
	}
	t.rng ^= t.rng >> 12
	t.rng ^= t.rng << 25
	t.rng ^= t.rng >> 27
	return t.rng * 0x2545f4914f6cdd1d
}

func less[T any](a, b *Node[T]) bool {
	if a.Start != b.Start {
		return a.Start < b.Start
	}
	if a.Last != b.Last {
		return a.Last < b.Last
	}
	return a.seq < b.seq
}

func (n *Node[T]) update() {
	m := n.Last
	if n.left != nil && n.left.maxLast > m {
		m = n.left.maxLast
	}
	if n.right != nil && n.right.maxLast > m {
		m = n.right.maxLast
	}
	n.maxLast = m
}

func rotateRight[T any](n *Node[T]) *Node[T] {
	l := n.left
	n.left = l.right
	l.right = n
	n.update()
	l.update()
	return l
}

func rotateLeft[T any](n *Node[T]) *Node[T] {
	r := n.right
	n.right = r.left
	r.left = n
	n.update()
	r.update()
	return r
}

// Insert adds n, whose Start must not exceed its Last. Inserting a node
// that is already in a tree panics: it would corrupt both.
func (t *Tree[T]) Insert(n *Node[T]) {
	if n.tree != nil {
		panic("itree: node inserted twice")
	}
	if n.Start > n.Last {
		panic("itree: interval with Start > Last")
	}
	t.seq++
	n.seq = t.seq
	n.prio = t.nextPrio()
	n.left, n.right, n.tree = nil, nil, t
	n.maxLast = n.Last
	t.root = insert(t.root, n)
	t.n++
}

func insert[T any](root, n *Node[T]) *Node[T] {
	if root == nil {
		return n
	}
	if less(n, root) {
		root.left = insert(root.left, n)
		if root.left.prio > root.prio {
			return rotateRight(root)
		}
	} else {
		root.right = insert(root.right, n)
		if root.right.prio > root.prio {
			return rotateLeft(root)
		}
	}
	root.update()
	return root
}

// Remove takes n out of the tree. It reports false, changing nothing, if
// n is not in this tree.
func (t *Tree[T]) Remove(n *Node[T]) bool {
	if n.tree != t {
		return false
	}
	t.root = remove(t.root, n)
	n.left, n.right, n.tree = nil, nil, nil
	t.n--
	return true
}

func remove[T any](root, n *Node[T]) *Node[T] {
	if root == n {
		return merge(root.left, root.right)
	}
	if less(n, root) {
		root.left = remove(root.left, n)
	} else {
		root.right = remove(root.right, n)
	}
	root.update()
	return root
}

// merge joins two treaps whose keys are all ordered a < b.
func merge[T any](a, b *Node[T]) *Node[T] {
	switch {
	case a == nil:
		return b
	case b == nil:
		return a
	case a.prio > b.prio:
		a.right = merge(a.right, b)
		a.update()
		return a
	default:
		b.left = merge(a, b.left)
		b.update()
		return b
	}
}

// Overlapping yields, in order of Start, every interval that intersects
// [start, last] (interval_tree_iter_first/next). The tree must not change
// during the iteration.
func (t *Tree[T]) Overlapping(start, last uint64) iter.Seq[*Node[T]] {
	return func(yield func(*Node[T]) bool) {
		overlapping(t.root, start, last, yield)
	}
}

func overlapping[T any](n *Node[T], start, last uint64, yield func(*Node[T]) bool) bool {
	if n == nil || n.maxLast < start {
		return true // nothing here reaches start
	}
	if !overlapping(n.left, start, last, yield) {
		return false
	}
	if n.Start > last {
		return true // n and everything right of it start too late
	}
	if n.Last >= start && !yield(n) {
		return false
	}
	return overlapping(n.right, start, last, yield)
}

// All yields every interval in order of Start.
func (t *Tree[T]) All() iter.Seq[*Node[T]] {
	return t.Overlapping(0, ^uint64(0))
}

// InTree reports whether n is in a tree.
func (n *Node[T]) InTree() bool { return n.tree != nil }
