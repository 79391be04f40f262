package rmap

import (
	"math"

	"github.com/gomm-dev/gomm/physmem"
)

// Control steers a reverse-map walk (struct rmap_walk_control).
type Control struct {
	// Visit is called for each VMA that may map the frame, with the
	// address the frame would have there; the callback checks the entry
	// itself (page_vma_mapped_walk). Returning false stops the walk.
	Visit func(v *VMA, addr uint64) bool
	// Done, if set, is asked before each VMA; true stops the walk (the
	// kernel's done hook: a frame no longer mapped needs no more work).
	Done func() bool
	// TryLock makes the walk give up rather than sleep on a contended
	// i_mmap_rwsem or anon_vma lock (reclaim's trylock mode); Walk then
	// reports contended.
	TryLock bool
}

// Walk visits every mapping of p (rmap_walk): through its anon_vma's
// tree for anonymous memory, the file's i_mmap tree for page cache, or
// the stable node's list for a KSM page. The caller holds p's page lock,
// which keeps its mapping from changing. It reports whether a TryLock
// walk gave up on a lock; a frame with no mapping is walked trivially.
func Walk(p *physmem.Frame, c *Control) (contended bool) {
	m, index := p.Mapping()
	switch m := m.(type) {
	case *AnonVMA:
		return walkAnon(m, index, c, nil, 0, nil)
	case *File:
		return walkFile(m, index, c)
	case *StableNode:
		// Items of one anon_vma family may reach the same VMA at the
		// same address (a place merged again after its item was kept
		// for its forks): visit each once. Only a node that has had
		// such items pays for remembering.
		var seen map[ksmPlace]bool
		if m.mayRepeat {
			seen = map[ksmPlace]bool{}
		}
		for _, it := range m.items {
			if contended = walkAnon(it.AnonVMA, 0, c, it.Space, it.Addr, seen); contended {
				return true
			}
			if c.Done != nil && c.Done() {
				return false
			}
		}
	}
	return false
}

// ksmPlace is a VMA and address a KSM walk visited.
type ksmPlace struct {
	v    *VMA
	addr uint64
}

// walkAnon visits the VMAs of av's tree that cover index or, for a KSM
// item (space non-nil), the VMAs that cover addr, skipping and then
// recording in seen, if non-nil, the places visited already.
func walkAnon(av *AnonVMA, index uint64, c *Control, space Space, addr uint64, seen map[ksmPlace]bool) bool {
	if av == nil {
		return false
	}
	if !av.lockFamily(c.TryLock) {
		return true
	}
	defer av.root.rwsem.RUnlock()
	first, last := index, index
	if space != nil {
		first, last = 0, math.MaxUint64
	}
	for n := range av.tree.Overlapping(first, last) {
		v := n.Value.VMA
		a := addr
		if space == nil {
			var ok bool
			if a, ok = v.Address(index); !ok {
				continue
			}
		} else if addr < v.Start || addr >= v.End {
			// Not this item's place. Any VMA of the family that covers
			// the address may map the page: its own space's, or a fork
			// child's (rmap_walk_ksm's search_new_forks).
			continue
		}
		if seen != nil {
			if seen[ksmPlace{v, a}] {
				continue
			}
			seen[ksmPlace{v, a}] = true
		}
		if !c.visit(v, a) {
			return false
		}
	}
	return false
}

// visit asks Done, then calls Visit; false stops the walk.
func (c *Control) visit(v *VMA, addr uint64) bool {
	return (c.Done == nil || !c.Done()) && c.Visit(v, addr)
}

func walkFile(f *File, index uint64, c *Control) bool {
	if c.TryLock {
		if !f.immap.TryRLock() {
			return true
		}
	} else {
		f.immap.RLock()
	}
	defer f.immap.RUnlock()
	for n := range f.tree.Overlapping(index, index) {
		v := n.Value
		if a, ok := v.Address(index); ok && !c.visit(v, a) {
			return false
		}
	}
	return false
}
