package gomm

import (
	"fmt"

	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
)

// Fork creates a child address space that is a copy-on-write duplicate of
// mm (dup_mmap with copy_page_range): the same VMAs; every anonymous page
// (a huge page as a whole, copy_huge_pmd) shared by both, write-protected
// in both, each mapping holding its own
// reference and counted in the frame's map count; the zero page shared as
// it is. The parent's TLBs are flushed of the write right before Fork
// returns, and its subscribers see a ProtectionPage invalidation of each
// VMA. The first write on either side copies the page, or takes it back
// writable if by then it is the only mapping (wp_page_reuse).
//
// The child starts with one user reference, which its Exit drops. Out of
// memory for the child's page tables, Fork fails with ErrNoMem and the
// partial child is torn down; the parent is left write-protected, which
// only costs it faults.
func (mm *MM) Fork() (*MM, error) {
	mm.mmapLock.Lock()
	defer mm.mmapLock.Unlock()
	if err := mm.checkOpen(); err != nil {
		return nil, err
	}
	child := mm.m.NewMM()
	since := mm.m.chk.BeginDowngrade()
	var err error
	var ranges []*notifier.Range
	mm.vmas.all(func(v *vma) bool {
		cv := v.dup(child)
		cv.ClearFlags(rmap.VMLocked) // mlock is not inherited
		// anon_vma_fork before the copy: a walk of a page the copy is
		// about to map must find the child's VMA.
		if err = mm.m.anonVMAs.Fork(&cv.VMA, &v.VMA); err != nil {
			return false
		}
		child.insertVMA(cv)
		if !v.shared() {
			ranges = append(ranges, mm.invalidateStart(v.Start, v.End, notifier.EventProtectionPage))
		}
		err = mm.copyRange(child, v, v.Start, v.End)
		return err == nil
	})
	// The parent's write rights are gone from its page table; now from
	// every TLB, before anybody can rely on the copy.
	mm.m.sys.FlushRange(mm.ctx, 0, userCeiling, pagetable.PageShift, false)
	for _, r := range ranges {
		mm.invalidateEnd(r)
	}
	mm.m.chk.EndDowngrade("fork", mm.ID(), 0, userCeiling, since, true)
	if err != nil {
		_ = child.Exit()
		return nil, fmt.Errorf("gomm: fork of mm %d: %w", mm.ID(), err)
	}
	return child, nil
}

// copyRange copies the entries of [start, end) of v into child
// (copy_pte_range): each present page of a private mapping is
// write-protected in the parent and mapped read-only in the child, a
// shared mapping's entries are copied as they are, each with a reference
// and a map count of its own; a swap entry takes another reference on
// its slot, and a writable migration entry becomes a read-only one in
// both, so the page is copied on write once it has moved.
// A table's entries are collected under the parent's PTE lock and
// installed under the child's afterwards, so two PTE locks are never held
// at once. Called with mmap_lock held for write.
func (mm *MM) copyRange(child *MM, v *vma, start, end uint64) error {
	type entry struct {
		va uint64
		e  pagetable.PTE
	}
	var batch []entry
	var ferr error
	err := mm.table.Range(start, end, pagetable.RangeFuncs{
		PMD: func(s pagetable.PMDSlot) bool {
			e := s.Get()
			switch {
			case !e.IsHuge():
			case e&pagetable.Special != 0:
				batch = append(batch, entry{va: s.Base(), e: e})
			case v.anonymous() && !v.shared():
				// copy_huge_pmd: both sides share the huge page,
				// write-protected, each frame counting both mappings.
				if ferr = mm.m.dupHuge(e); ferr != nil {
					return false
				}
				e = s.WriteProtect().Without(pagetable.Write)
				batch = append(batch, entry{va: s.Base(), e: e})
				mm.m.thp.copiedOnFork.Add(1)
			default:
				// Only private anonymous memory is mapped huge by
				// faults; a leaf anywhere else is split, so the copy
				// below sees 4 KiB entries.
				ferr = s.Split()
			}
			return ferr == nil
		},
		PTEs: func(pt pagetable.PTETable, first, last int) bool {
			for i := first; i < last; i++ {
				e := pt.Get(i)
				if e.IsDeviceExclusive() {
					// The device's claim ends with the parent's
					// invalidation, open since copyMM began; the page is
					// copied as the mapping it stands for.
					e = v.RestoreExclusive(e)
					pt.Set(i, e)
				}
				switch {
				case e.IsNone():
					continue
				case e.IsDevicePrivate():
					pfn, _ := e.HeldFrame()
					f, err := mm.m.ram.Frame(physmem.PFN(pfn))
					if err == nil {
						err = mm.m.ram.Get(f)
					}
					if err != nil {
						ferr = err
						return false
					}
					f.IncMapCount()
					if e.IsSwapWritable() && !v.shared() {
						e = pagetable.NewDevicePrivatePTE(pfn, false)
						pt.Set(i, e)
					}
				case e.IsMigration():
					if s, _ := e.Swap(); s.Type == pagetable.SwapMigrationWrite && !v.shared() {
						e = pagetable.NewMigrationPTE(s.Offset, false)
						pt.Set(i, e)
					}
				case e.IsSwap():
					s, _ := e.Swap()
					if err := mm.m.swap.Dup(s.Offset); err != nil {
						ferr = err
						return false
					}
				case !e.IsPresent():
					continue
				case e&pagetable.Special == 0:
					f, err := mm.m.ram.Frame(physmem.PFN(e.PFN()))
					if err != nil {
						ferr = err
						return false
					}
					if err := mm.m.ram.Get(f); err != nil {
						ferr = err
						return false
					}
					f.IncMapCount()
					if !v.shared() {
						e = pt.WriteProtect(i).Without(pagetable.Write)
					}
				}
				batch = append(batch, entry{va: pt.VA(i), e: e})
			}
			return true
		},
	})
	if ferr != nil {
		err = ferr
	}
	for k, c := range batch {
		if c.e.IsHuge() {
			if aerr := child.installHuge(c.va, c.e); aerr != nil {
				for _, rest := range batch[k:] {
					child.dropCopied(rest.e)
				}
				return aerr
			}
			continue
		}
		pt, aerr := child.table.AllocLockPTE(c.va)
		if aerr != nil {
			// The child cannot take the rest: give back what it would
			// have held.
			for _, rest := range batch[k:] {
				child.dropCopied(rest.e)
			}
			return aerr
		}
		pt.Set(pt.Index(c.va), c.e)
		pt.Unlock()
		if _, held := c.e.HeldFrame(); held || c.e.IsPresent() && c.e&pagetable.Special == 0 {
			child.rss.Add(1)
		}
	}
	return err
}

// dropCopied gives back the references and mappings a copied entry
// would have held.
func (mm *MM) dropCopied(e pagetable.PTE) {
	if pfn, held := e.HeldFrame(); held {
		e = pagetable.NewPTE(pfn, 0)
	}
	if !e.IsPresent() {
		mm.m.zapEntry(e)
		return
	}
	if e&pagetable.Special != 0 {
		return
	}
	n := uint64(1)
	if e.IsHuge() {
		n = pagetable.Entries
	}
	for i := range n {
		if f, err := mm.m.ram.Frame(physmem.PFN(e.PFN() + i)); err == nil {
			f.DecMapCount()
			_ = mm.m.ram.Put(f)
		}
	}
}

// dupHuge takes a reference and a map count on every frame of the huge
// leaf e, for a second mapping of it; all or nothing.
func (m *Machine) dupHuge(e pagetable.PTE) error {
	for i := range uint64(pagetable.Entries) {
		f, err := m.ram.Frame(physmem.PFN(e.PFN() + i))
		if err == nil {
			err = m.ram.Get(f)
		}
		if err != nil {
			for j := range i {
				g, _ := m.ram.Frame(physmem.PFN(e.PFN() + j))
				g.DecMapCount()
				_ = m.ram.Put(g)
			}
			return err
		}
		f.IncMapCount()
	}
	return nil
}

// installHuge puts the copied huge leaf e at base, with a deposited table
// for its later split; a Special leaf (a PFN map) needs none.
func (mm *MM) installHuge(base uint64, e pagetable.PTE) error {
	s, _, err := mm.table.LockPMD(base, true)
	if err != nil {
		return err
	}
	defer s.Unlock()
	if e&pagetable.Special == 0 {
		if err := s.Deposit(); err != nil {
			return err
		}
	}
	if _, err := s.Set(e); err != nil {
		return err
	}
	if e&pagetable.Special == 0 {
		mm.rss.Add(pagetable.Entries)
	}
	return nil
}
