package rmap

// StableNode is the mapping of a KSM page (struct ksm_stable_node): the
// list of the (space, address) places that map it, each with the
// anon_vma the page had there before it was merged, which is how a walk
// finds the VMA. The list is protected by the KSM page's page lock.
type StableNode struct {
	items []KSMItem
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

// Add records a new place the page is mapped. The caller holds the KSM
// page's lock.
func (n *StableNode) Add(it KSMItem) { n.items = append(n.items, it) }

// Remove forgets the place (space, addr); it reports whether it was
// there. The caller holds the KSM page's lock.
func (n *StableNode) Remove(space Space, addr uint64) bool {
	for i, it := range n.items {
		if it.Space == space && it.Addr == addr {
			n.items = append(n.items[:i], n.items[i+1:]...)
			return true
		}
	}
	return false
}

// Items returns the places the page is mapped. The caller holds the KSM
// page's lock.
func (n *StableNode) Items() []KSMItem { return n.items }
