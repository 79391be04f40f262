package gomm

import (
	"fmt"

	"github.com/gomm-dev/gomm/notifier"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
)

// HandleFault resolves a page fault at va for the access (handle_mm_fault):
// demand-zero for anonymous memory (the shared zero page on a read, a new
// zeroed frame on a write), write faults on the zero page or on a
// read-only exclusive page, and spurious faults (the entry is already
// fine: the TLB was stale). It returns nil when the access can be retried;
// an address outside every VMA, or an access its protection forbids, is
// ErrFault (SIGSEGV). CPUs call it on their own faults.
func (mm *MM) HandleFault(va uint64, acc pagetable.Access) error {
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	if err := mm.checkOpen(); err != nil {
		return err
	}
	v := mm.vmas.lookup(va)
	if v == nil {
		return fmt.Errorf("gomm: %v at %#x: no mapping: %w", acc, va, ErrFault)
	}
	return mm.faultLocked(v, va, acc)
}

// faultLocked handles a fault in v. Called with mmap_lock held.
func (mm *MM) faultLocked(v *vma, va uint64, acc pagetable.Access) error {
	if !v.prot.allows(acc) {
		return fmt.Errorf("gomm: %v at %#x: mapping is %v: %w", acc, va, v.prot, ErrFault)
	}
	mm.faults.Add(1)
	page := va &^ (PageSize - 1)
	write := acc&pagetable.AccessWrite != 0
	for {
		pt, err := mm.table.AllocLockPTE(page)
		if err != nil {
			return err
		}
		i := pt.Index(page)
		e := pt.Get(i)
		if e.IsPresent() {
			// Rights the VMA grants but the entry lacks since a
			// PROT_NONE or non-exec spell: add them (an upgrade).
			if fixed := e.Without(pagetable.User|pagetable.NoExec) | v.prot.leafBits(); fixed != e && pt.CompareAndSet(i, e, fixed) {
				e = fixed
			}
		}
		switch {
		case e.IsNone() && !write:
			// Read fault: map the zero page read-only (do_anonymous_page).
			pt.Set(i, pagetable.NewPTE(mm.m.ZeroPFN(), v.prot.leafBits()|pagetable.Special))
			pt.Unlock()
			return nil
		case e.IsNone():
			pt.Unlock()
			retry, err := mm.newAnonPage(v, page, e)
			if err != nil || !retry {
				return err
			}
		case !e.IsPresent():
			pt.Unlock()
			return fmt.Errorf("gomm: %v at %#x: entry %v cannot be faulted in yet: %w", acc, va, e, ErrFault)
		case !write || e.IsWritable():
			// Spurious: another CPU resolved it, or the TLB was stale.
			pt.Unlock()
			return nil
		case e&pagetable.Special == 0 && mm.exclusive(e):
			// The only mapping of an anonymous page: reuse it (wp_page_reuse).
			// An upgrade needs no flush.
			pt.CompareAndSet(i, e, e.With(pagetable.Write|pagetable.Dirty|pagetable.Accessed))
			pt.Unlock()
			return nil
		default:
			pt.Unlock()
			retry, err := mm.copyOnWrite(v, page, e)
			if err != nil || !retry {
				return err
			}
		}
	}
}

// exclusive reports whether the present entry e maps a frame nobody else
// maps. Called under the entry's PTE lock.
func (mm *MM) exclusive(e pagetable.PTE) bool {
	f, err := mm.m.ram.Frame(physmem.PFN(e.PFN()))
	return err == nil && f.MapCount() == 1
}

// newAnonPage allocates a zeroed frame and installs it at page if the
// entry still holds old; retry is true if it changed meanwhile.
func (mm *MM) newAnonPage(v *vma, page uint64, old pagetable.PTE) (retry bool, err error) {
	f, err := mm.allocAnon(page, nil)
	if err != nil {
		return false, err
	}
	pt, err := mm.table.AllocLockPTE(page)
	if err != nil {
		_ = mm.m.ram.Put(f)
		return false, err
	}
	i := pt.Index(page)
	f.IncMapCount()
	if !pt.CompareAndSet(i, old, anonPTE(v, f)) {
		pt.Unlock()
		f.DecMapCount()
		_ = mm.m.ram.Put(f)
		return true, nil
	}
	pt.Unlock()
	mm.rss.Add(1)
	return false, nil
}

// copyOnWrite gives page a private writable copy of what old maps (the
// zero page, or a frame shared with another mapping) (wp_page_copy): the
// old entry is cleared and flushed from every TLB before the new one is
// installed, and only then is the old frame's reference dropped.
func (mm *MM) copyOnWrite(v *vma, page uint64, old pagetable.PTE) (retry bool, err error) {
	src, err := mm.m.ram.Frame(physmem.PFN(old.PFN()))
	if err != nil {
		return false, err
	}
	f, err := mm.allocAnon(page, src)
	if err != nil {
		return false, err
	}
	// The old page leaves: secondary MMUs must drop it first (wp_page_copy
	// notifies MMU_NOTIFY_CLEAR).
	r := mm.invalidateStart(page, page+PageSize, notifier.EventClear)
	defer mm.invalidateEnd(r)
	pt, err := mm.table.AllocLockPTE(page)
	if err != nil {
		_ = mm.m.ram.Put(f)
		return false, err
	}
	i := pt.Index(page)
	if pt.Get(i) != old {
		pt.Unlock()
		_ = mm.m.ram.Put(f)
		return true, nil
	}
	// ptep_clear_flush: nobody may keep writing through, or reading, the
	// old translation once the new page is in.
	pt.GetAndClear(i)
	mm.m.sys.FlushRange(mm.ctx, page, page+PageSize, pagetable.PageShift, false)
	f.IncMapCount()
	pt.Set(i, anonPTE(v, f))
	pt.Unlock()
	mm.rss.Add(1)
	if old&pagetable.Special == 0 {
		src.DecMapCount()
		mm.rss.Add(-1)
		if err := mm.m.ram.Put(src); err != nil {
			return false, err
		}
	}
	return false, nil
}

// allocAnon allocates a frame for anonymous memory at page, zeroed or a
// copy of src.
func (mm *MM) allocAnon(page uint64, src *physmem.Frame) (*physmem.Frame, error) {
	f, err := mm.m.ram.Alloc()
	if err != nil {
		return nil, fmt.Errorf("gomm: fault at %#x: %w", page, err)
	}
	if src != nil {
		if err := f.CopyFrom(src); err != nil {
			_ = mm.m.ram.Put(f)
			return nil, err
		}
	}
	f.SetFlags(physmem.FlagAnon | physmem.FlagSwapBacked | physmem.FlagUptodate)
	return f, nil
}

// anonPTE is the entry of a private anonymous page of v just written:
// writable, dirty and young.
func anonPTE(v *vma, f *physmem.Frame) pagetable.PTE {
	return pagetable.NewPTE(uint64(f.PFN()), v.prot.leafBits()|pagetable.Write|pagetable.Dirty|pagetable.Accessed)
}
