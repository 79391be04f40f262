package gomm

import (
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
)

// swapIn brings the page named by the swap entry e back at page of v
// (do_swap_page): from the swap cache if it is still there, else into a
// new frame added to the swap cache and read from the slot. The entry
// gives up its slot reference; when it was the last, the page leaves
// the swap cache and a write fault maps it writable at once; else a read
// maps it read-only and a write maps a private copy, in the same fault.
func (mm *MM) swapIn(v *vma, page uint64, e pagetable.PTE, write bool, cpu int) (retry bool, err error) {
	s, _ := e.Swap()
	if s.Type != 0 || mm.m.swap == nil {
		return false, errBadSwap(page, e)
	}
	slot := s.Offset
	f := mm.m.swap.lookup(slot)
	if f == nil {
		nf, err := mm.m.allocFrame()
		if err != nil {
			return false, err
		}
		nf.Lock()
		if !mm.m.swap.insert(slot, nf) {
			nf.Unlock()
			_ = mm.m.ram.Put(nf)
			return true, nil // another swap-in won, or the entry is gone
		}
		if err := mm.m.swap.read(slot, nf); err != nil {
			mm.m.swap.remove(nf)
			nf.Unlock()
			_ = mm.m.ram.Put(nf)
			return false, err
		}
		nf.SetFlags(physmem.FlagAnon | physmem.FlagSwapBacked | physmem.FlagUptodate)
		mm.m.lru.add(nf, true)
		f = nf
	} else {
		f.Lock()
		if !mm.m.swap.cached(f) || f.Private() != slot {
			f.Unlock()
			_ = mm.m.ram.Put(f)
			return true, nil
		}
	}
	defer f.Unlock()
	// A write takes the page over only if this entry is the last to name
	// the slot and nobody maps it; otherwise it must copy.
	exclusive := mm.m.swap.entries(slot) == 1 && f.MapCount() == 0 && !f.Has(physmem.FlagKSM)
	if mm.foreignAnon(v, page, f) || write && !exclusive {
		// A KSM page, one of another anon_vma family (the page was
		// merged while it was mapped here), or one brought back for
		// another address: this VMA's walk could not find it here, so
		// it gets a copy of its own (ksm_might_need_to_copy).
		//
		// A write that cannot take the page over copies it now, in
		// this fault and under the page lock (do_swap_page going on to
		// do_wp_page). Mapped read-only instead, the page could be
		// reclaimed again (by the copy's own direct reclaim, say)
		// before the write's next fault, and the write would fault
		// again and again while each fault reports success.
		cp, err := mm.allocAnon(v, page, f, cpu)
		_ = mm.m.ram.Put(f) // the swap cache still holds it
		if err != nil {
			return false, err
		}
		retry, err := mm.mapNewAnon(v, page, e, cp, write, cpu)
		if err == nil && !retry {
			mm.m.swap.putEntry(slot) // the entry no longer names the slot
		}
		return retry, err
	}
	if m, _ := f.Mapping(); m == nil {
		// A page others may map too goes to the family's root, which
		// every VMA of the family is linked to (__folio_set_anon).
		av := mm.anonVMA(v)
		if mm.m.swap.entries(slot) > 1 {
			av = av.Root()
		}
		f.SetMapping(av, v.Index(page))
	}
	pt, err := mm.table.AllocLockPTE(page)
	if err != nil {
		_ = mm.m.ram.Put(f)
		return false, err
	}
	i := pt.Index(page)
	if pt.Get(i) != e {
		pt.Unlock()
		_ = mm.m.ram.Put(f)
		return true, nil
	}
	ne := pagetable.NewPTE(uint64(f.PFN()), v.prot.leafBits()|pagetable.Accessed)
	mm.m.swap.putEntry(slot)
	if mm.m.swap.entries(slot) == 0 {
		mm.m.swap.remove(f) // nobody will look for it there any more
		if write && f.MapCount() == 0 && !f.Has(physmem.FlagKSM) {
			ne |= pagetable.Write | pagetable.Dirty
		}
	}
	f.IncMapCount() // our reference becomes the entry's
	pt.Set(i, ne)
	pt.Unlock()
	mm.addRSS(cpu, 1)
	return false, nil
}

// waitMigration waits for the migration a migration entry stands for to
// finish (migration_entry_wait): the old frame stays locked until then.
func (m *Machine) waitMigration(e pagetable.PTE) {
	s, _ := e.Swap()
	if f, err := m.ram.Frame(physmem.PFN(s.Offset)); err == nil {
		f.WaitUnlocked()
	}
}

// foreignAnon reports whether the locked swap-cache frame f has a
// mapping v's reverse map cannot reach at page: a KSM stable node, an
// anon_vma of another family, or another index (a swapped-out KSM page
// comes back as a plain anonymous page, which can be mapped at one
// address only).
func (mm *MM) foreignAnon(v *vma, page uint64, f *physmem.Frame) bool {
	switch m, idx := f.Mapping(); m := m.(type) {
	case *rmap.StableNode:
		return true
	case *rmap.AnonVMA:
		return m.Root() != mm.anonVMA(v).Root() || idx != v.Index(page)
	}
	return false
}
