package rmap

import "slices"

// StableNode is the mapping of a KSM page (struct ksm_stable_node): the
// list of the (space, address) places that map it, each with the
// anon_vma the page had there before it was merged, which is how a walk
// finds the VMA. The list is protected by the KSM page's page lock.
type StableNode struct {
	items []KSMItem
	// mayRepeat is set once two items of one anon_vma family share an
	// address: only then can two items reach the same VMA at the same
	// place, and a walk must remember where it has been. Never cleared
	// (Forget leaving one of them behind only makes the check redundant).
	mayRepeat bool
}

// KSMItem is one place a KSM page is mapped (an rmap_item in the stable
// tree).
type KSMItem struct {
	Space   Space
	Addr    uint64
	AnonVMA *AnonVMA
}

// IsAnon reports true: a KSM page is anonymous memory (PageAnon with
// PAGE_MAPPING_KSM).
func (n *StableNode) IsAnon() bool { return true }

// Add records a new place the page is mapped; a place it records
// already is not recorded twice. The caller holds the KSM page's lock.
func (n *StableNode) Add(it KSMItem) {
	for _, have := range n.items {
		if have == it {
			return
		}
		if have.Addr == it.Addr && sameFamily(have.AnonVMA, it.AnonVMA) {
			n.mayRepeat = true
		}
	}
	n.items = append(n.items, it)
}

// sameFamily reports whether a and b share a root anon_vma: the anon_vmas
// one VMA's chain links are always of one family.
func sameFamily(a, b *AnonVMA) bool {
	return a != nil && b != nil && a.root == b.root
}

// Forget drops the items of the place (space, addr), whose page is no
// longer this one, except those through which the page is still mapped
// elsewhere: a walk of an item visits every VMA of its anon_vma family
// at addr, so children forked after the merge map the page through
// their parent's item, and dropping it would leave them unreachable.
// mapped reports whether v maps the page at addr. The caller holds the
// KSM page's lock.
func (n *StableNode) Forget(space Space, addr uint64, mapped func(v *VMA, addr uint64) bool) {
	n.items = slices.DeleteFunc(n.items, func(it KSMItem) bool {
		if it.Space != space || it.Addr != addr {
			return false
		}
		reached := false
		walkAnon(it.AnonVMA, 0, &Control{Visit: func(v *VMA, a uint64) bool {
			reached = mapped(v, a)
			return !reached
		}}, it.Space, it.Addr, nil)
		return !reached
	})
}
