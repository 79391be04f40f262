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
// shared by both, write-protected in both, each mapping holding its own
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
			// Anonymous memory here is never mapped huge; split anything
			// that is, so the copy below sees 4 KiB entries.
			if s.Get().IsHuge() {
				ferr = s.Split()
			}
			return ferr == nil
		},
		PTEs: func(pt pagetable.PTETable, first, last int) bool {
			for i := first; i < last; i++ {
				e := pt.Get(i)
				switch {
				case e.IsNone():
					continue
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
		if c.e.IsPresent() && c.e&pagetable.Special == 0 {
			child.rss.Add(1)
		}
	}
	return err
}

// dropCopied gives back the reference and mapping a copied entry would
// have held.
func (mm *MM) dropCopied(e pagetable.PTE) {
	if !e.IsPresent() {
		mm.m.zapEntry(e)
		return
	}
	if e&pagetable.Special != 0 {
		return
	}
	if f, err := mm.m.ram.Frame(physmem.PFN(e.PFN())); err == nil {
		f.DecMapCount()
		_ = mm.m.ram.Put(f)
	}
}
