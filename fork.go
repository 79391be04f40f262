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
	child, err := mm.forkLocked()
	mm.mmapLock.Unlock()
	if err != nil && child != nil {
		// The partial child is torn down with the parent's lock dropped:
		// its exit takes its own mmap_lock, of the same class.
		_ = child.Exit()
		child = nil
	}
	return child, err
}

// forkLocked copies mm into a new child. Called with mmap_lock held for
// write; on error it returns the partial child for the caller to tear
// down.
func (mm *MM) forkLocked() (*MM, error) {
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
		// Entries are in flight between the parent's table and the
		// child's: no reverse-map walk may run meanwhile, or
		// remove_migration_ptes restores the parent's entry and misses
		// the migration entry on its way to the child (take_rmap_locks,
		// as mremap does).
		unlock := v.LockRmap()
		err = mm.copyRange(child, v, v.Start, v.End)
		unlock()
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
		return child, fmt.Errorf("gomm: fork of mm %d: %w", mm.ID(), err)
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
// The walk stops after each PTE table: its entries, collected under the
// parent's PTE lock, are installed under the child's afterwards, one lock
// for the table, so two PTE locks are never held at once and the batch
// never outgrows a table. Called with mmap_lock held for write.
func (mm *MM) copyRange(child *MM, v *vma, start, end uint64) error {
	batch := make([]copiedEntry, 0, pagetable.Entries)
	for start < end {
		resume, err := mm.collectCopies(v, start, end, &batch)
		if ierr := child.installCopies(batch); ierr != nil {
			return ierr
		}
		batch = batch[:0]
		if err != nil || resume >= end {
			return err
		}
		start = resume
	}
	return nil
}

// copiedEntry is an entry of the parent's on its way to the child, with
// the references and map counts it needs already taken.
type copiedEntry struct {
	va uint64
	e  pagetable.PTE
}

// collectCopies appends to batch the copies of the entries of [start,
// end) up to the end of the first PTE table it meets (and any huge
// leaves before it), and returns where to go on.
func (mm *MM) collectCopies(v *vma, start, end uint64, batch *[]copiedEntry) (resume uint64, err error) {
	resume = end
	var ferr error
	err = mm.table.Range(start, end, pagetable.RangeFuncs{
		PMD: func(s pagetable.PMDSlot) bool {
			e := s.Get()
			switch {
			case !e.IsHuge():
			case e&pagetable.Special != 0:
				*batch = append(*batch, copiedEntry{va: s.Base(), e: e})
			case v.anonymous() && !v.shared():
				// copy_huge_pmd: both sides share the huge page,
				// write-protected, each frame counting both mappings.
				if ferr = mm.m.dupHuge(e); ferr != nil {
					return false
				}
				e = s.WriteProtect().Without(pagetable.Write)
				*batch = append(*batch, copiedEntry{va: s.Base(), e: e})
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
				*batch = append(*batch, copiedEntry{va: pt.VA(i), e: e})
			}
			resume = pt.VA(last-1) + PageSize
			return false
		},
	})
	if ferr != nil {
		err = ferr
	}
	return resume, err
}

// installCopies maps the collected entries in the child, taking each
// PTE table's lock once. If the child cannot take them (no memory for a
// table), it gives back what the rest would have held.
func (mm *MM) installCopies(batch []copiedEntry) error {
	for k := 0; k < len(batch); {
		c := batch[k]
		var err error
		if c.e.IsHuge() {
			if err = mm.installHuge(c.va, c.e); err == nil {
				k++
			}
		} else {
			k, err = mm.installTable(batch, k)
		}
		if err != nil {
			for _, rest := range batch[k:] {
				mm.dropCopied(rest.e)
			}
			return err
		}
	}
	return nil
}

// installTable installs batch[k:] up to the first entry outside batch[k]'s
// PTE table or a huge leaf, under one lock, and returns where it stopped.
func (mm *MM) installTable(batch []copiedEntry, k int) (int, error) {
	pt, err := mm.table.AllocLockPTE(batch[k].va)
	if err != nil {
		return k, err
	}
	defer pt.Unlock()
	table := batch[k].va &^ (pagetable.HugeSize - 1)
	mapped := int64(0)
	for ; k < len(batch) && !batch[k].e.IsHuge() && batch[k].va&^(pagetable.HugeSize-1) == table; k++ {
		e := batch[k].e
		pt.Set(pt.Index(batch[k].va), e)
		if _, ok := e.MappedFrame(); ok {
			mapped++
		}
	}
	mm.addRSS(noCPU, mapped)
	return k, nil
}

// dropCopied gives back the references and mappings a copied entry
// would have held.
func (mm *MM) dropCopied(e pagetable.PTE) {
	pfn, ok := e.MappedFrame()
	if !ok {
		mm.m.zapEntry(e) // a swap entry's slot reference; nothing for the rest
		return
	}
	n := uint64(1)
	if e.IsHuge() {
		n = pagetable.Entries
	}
	for i := range n {
		if f, err := mm.m.ram.Frame(physmem.PFN(pfn + i)); err == nil {
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
		mm.addRSS(noCPU, pagetable.Entries)
	}
	return nil
}
