package gomm

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
)

// HandleFault resolves a page fault at va for the access (handle_mm_fault):
// demand-zero for anonymous memory (the shared zero page on a read, a new
// zeroed frame on a write), the page cache for a file mapping (a private
// one copies the page on the first write), swap-in of a swapped-out page,
// a wait for a migration to finish, a device-private page's migration
// back to RAM by its driver, a device-exclusive page taken back from its
// device, write faults on the zero page, on a
// shared page or on a read-only private page (copy-on-write, or reuse
// when nobody else maps it), and spurious faults (the entry is already
// fine: the TLB was stale). It returns nil when the access can be
// retried; an address outside every VMA, an access its protection
// forbids, or a file page past the end of the file is ErrFault (SIGSEGV
// or SIGBUS). Devices and other callers that are not a CPU call it;
// CPUs call HandleFaultOn.
func (mm *MM) HandleFault(va uint64, acc pagetable.Access) error {
	return mm.handleFault(noCPU, va, acc)
}

// HandleFaultOn is HandleFault for a fault taken on the given CPU (the
// machine's CPUs call it on their own faults, as tlb.CPUFaultHandler):
// the new page comes from the CPU's frame cache and joins the LRU in the
// CPU's batch, and the MM's counters are counted per CPU, so CPUs
// faulting at once share as little as the kernel's do. A cpu the
// machine does not have counts as no CPU.
func (mm *MM) HandleFaultOn(cpu int, va uint64, acc pagetable.Access) error {
	return mm.handleFault(cpu, va, acc)
}

// noCPU is the CPU of a fault no CPU took (a device's, GUP's, a
// populate's): it uses the shared allocator and LRU paths.
const noCPU = -1

func (mm *MM) handleFault(cpu int, va uint64, acc pagetable.Access) error {
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	if err := mm.checkOpen(); err != nil {
		return err
	}
	v := mm.vmas.lookup(va)
	if v == nil {
		return fmt.Errorf("gomm: %v at %#x: no mapping: %w", acc, va, ErrFault)
	}
	return mm.faultLocked(v, va, acc, cpu)
}

// faultLocked handles a fault in v, taken on cpu (or noCPU). Called with
// mmap_lock held.
func (mm *MM) faultLocked(v *vma, va uint64, acc pagetable.Access, cpu int) error {
	if !v.prot.allows(acc) {
		return fmt.Errorf("gomm: %v at %#x: mapping is %v: %w", acc, va, v.prot, ErrFault)
	}
	mm.countersOn(cpu).faults.Add(1)
	page := va &^ (PageSize - 1)
	write := acc&pagetable.AccessWrite != 0
	// Eligibility first: it is a few flag tests, and most faults stop
	// there without walking the table.
	if mm.hugeEligible(v, page) && !mm.hasPTETable(page) {
		if handled, err := mm.hugeFault(v, page, write); handled || err != nil {
			return err
		}
	}
	deviceFaults := 0
	for {
		pt, err := mm.allocLockPTE(page)
		if errors.Is(err, pagetable.ErrBusy) {
			// A huge leaf maps the page.
			handled, herr := mm.hugeFault(v, page, write)
			if handled || herr != nil {
				return herr
			}
			continue
		}
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
		var retry bool
		switch {
		case e.IsNone() && v.file != nil:
			pt.Unlock()
			retry, err = mm.fileFault(v, page, write, cpu)
		case e.IsNone() && !write:
			// Read fault: map the zero page read-only (do_anonymous_page).
			pt.Set(i, pagetable.NewPTE(mm.m.ZeroPFN(), v.prot.leafBits()|pagetable.Special))
			pt.Unlock()
			return nil
		case e.IsNone():
			pt.Unlock()
			retry, err = mm.newAnonPage(v, page, e, cpu)
		case e.IsMigration():
			pt.Unlock()
			mm.m.waitMigration(e)
			retry = true
		case e.IsDeviceExclusive():
			pt.Unlock()
			retry, err = mm.restoreExclusive(v, page, e)
		case e.IsDevicePrivate():
			pt.Unlock()
			retry, err = mm.deviceFault(v, page, e, write, &deviceFaults)
		case e.IsSwap():
			pt.Unlock()
			retry, err = mm.swapIn(v, page, e, write, cpu)
		case !e.IsPresent():
			pt.Unlock()
			return fmt.Errorf("gomm: %v at %#x: entry %v cannot be faulted in: %w", acc, va, e, ErrFault)
		case !write || e.IsWritable():
			// Spurious: another CPU resolved it, or the TLB was stale.
			pt.Unlock()
			return nil
		case v.shared():
			// wp_page_shared: the first write to a clean shared page
			// makes it writable and dirty, so writeback will see it.
			if f, ferr := mm.m.ram.Frame(physmem.PFN(e.PFN())); ferr == nil {
				f.SetFlags(physmem.FlagDirty)
			}
			pt.CompareAndSet(i, e, e.With(pagetable.Write|pagetable.Dirty|pagetable.Accessed))
			pt.Unlock()
			return nil
		case e&pagetable.Special == 0 && mm.m.reusable(e):
			// The only mapping of an anonymous page: reuse it (wp_page_reuse).
			// An upgrade needs no flush.
			pt.CompareAndSet(i, e, e.With(pagetable.Write|pagetable.Dirty|pagetable.Accessed))
			pt.Unlock()
			return nil
		default:
			pt.Unlock()
			retry, err = mm.copyOnWrite(v, page, e, true, cpu)
		}
		if err != nil || !retry {
			return err
		}
	}
}

// reusable reports whether the present entry e maps an anonymous frame a
// write may take over rather than copy (wp_can_reuse_anon_folio): mapped
// once, not a KSM page, and out of the swap cache, or removable from it
// because no swap entry names its slot. Called under the entry's PT lock,
// so the page lock is only tried.
func (m *Machine) reusable(e pagetable.PTE) bool {
	f, err := m.ram.Frame(physmem.PFN(e.PFN()))
	if err != nil || !f.Has(physmem.FlagAnon) || f.Has(physmem.FlagKSM) || f.MapCount() != 1 {
		return false
	}
	if !f.Has(physmem.FlagSwapCache) {
		return true
	}
	if !f.TryLock() {
		return false
	}
	defer f.Unlock()
	if m.swap.cached(f) && m.swap.entries(f.Private()) == 0 {
		m.swap.remove(f)
	}
	return !f.Has(physmem.FlagSwapCache)
}

// newAnonPage allocates a zeroed frame and installs it at page if the
// entry still holds old; retry is true if it changed meanwhile.
func (mm *MM) newAnonPage(v *vma, page uint64, old pagetable.PTE, cpu int) (retry bool, err error) {
	f, err := mm.allocAnon(v, page, nil, cpu)
	if err != nil {
		return false, err
	}
	return mm.mapNewAnon(v, page, old, f, true, cpu)
}

// mapNewAnon installs the new anonymous frame f at page if the entry
// still holds old, writable or not; if not, f is dropped and retry is
// true. cpu is the faulting CPU's, or noCPU.
func (mm *MM) mapNewAnon(v *vma, page uint64, old pagetable.PTE, f *physmem.Frame, writable bool, cpu int) (retry bool, err error) {
	// On the LRU before the entry can be visible: once it is, a
	// concurrent zap may free the frame, and an add after that free
	// would leave a free frame on the list. Added here (or queued on
	// the CPU's batch), any free takes it off again (the allocator's
	// free hook).
	mm.m.lru.addOn(cpu, f, true)
	pt, err := mm.table.AllocLockPTE(page)
	if err != nil {
		_ = mm.m.ram.Put(f)
		return false, err
	}
	i := pt.Index(page)
	e := anonPTE(v, f)
	if !writable {
		e = e.Without(pagetable.Write | pagetable.Dirty)
	}
	f.IncMapCount()
	if !pt.CompareAndSet(i, old, e) {
		pt.Unlock()
		f.DecMapCount()
		_ = mm.m.ram.Put(f)
		return true, nil
	}
	pt.Unlock()
	mm.addRSS(cpu, 1)
	return false, nil
}

// copyOnWrite gives page a private writable copy of what old maps (the
// zero page, a page-cache page of a private file mapping, a KSM page, or
// a frame shared with another mapping) (wp_page_copy): the old entry is
// cleared and flushed from every TLB before the new one is installed,
// and only then is the old frame's reference dropped.
//
// writable false makes the copy read-only (FAULT_FLAG_UNSHARE: KSM's
// unmerge of a read-only mapping).
func (mm *MM) copyOnWrite(v *vma, page uint64, old pagetable.PTE, writable bool, cpu int) (retry bool, err error) {
	src, err := mm.m.ram.Frame(physmem.PFN(old.PFN()))
	if err != nil {
		return false, err
	}
	if old&pagetable.Special == 0 && !mm.m.ram.TryGet(src) {
		return true, nil // unmapped and freed meanwhile: look again
	}
	f, err := mm.allocAnon(v, page, src, cpu)
	if old&pagetable.Special == 0 {
		_ = mm.m.ram.Put(src) // the entry, if still there, holds its own
	}
	if err != nil {
		return false, err
	}
	mm.m.lru.addOn(cpu, f, true) // before the entry can be visible, as in mapNewAnon
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
	mm.clearFlush(pt, i, page)
	f.IncMapCount()
	ne := anonPTE(v, f)
	if !writable {
		ne = ne.Without(pagetable.Write | pagetable.Dirty)
	}
	pt.Set(i, ne)
	pt.Unlock()
	if old&pagetable.Special != 0 {
		mm.addRSS(cpu, 1) // the zero page was not counted; the copy replacing it is
	} else {
		src.DecMapCount()
		if err := mm.m.ram.Put(src); err != nil {
			return false, err
		}
	}
	return false, nil
}

// allocAnon allocates a frame for anonymous memory at page of v, zeroed
// or a copy of src, and gives it v's anon_vma as its mapping
// (folio_add_new_anon_rmap).
func (mm *MM) allocAnon(v *vma, page uint64, src *physmem.Frame, cpu int) (*physmem.Frame, error) {
	av := mm.anonVMA(v)
	f, err := mm.m.allocFrameOn(cpu)
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
	// The frame is not mapped yet, but a holder of a stale frame number
	// (Migrate, Mappers) may have taken a speculative reference and be
	// about to read the mapping under the page lock: set it under the
	// lock too. Only such a holder can have it, briefly; tried, because
	// the caller may hold another page's lock.
	for !f.TryLock() {
		runtime.Gosched()
	}
	f.SetMapping(av, v.Index(page))
	f.Unlock()
	return f, nil
}

// anonPTE is the entry of a private anonymous page of v just written:
// writable, dirty and young.
func anonPTE(v *vma, f *physmem.Frame) pagetable.PTE {
	return pagetable.NewPTE(uint64(f.PFN()), v.prot.leafBits()|pagetable.Write|pagetable.Dirty|pagetable.Accessed)
}

// fileFault maps page of the file mapping v (filemap_fault and
// finish_fault): the page-cache page itself for a read or a shared
// write, or a private copy for a write to a private mapping
// (do_cow_fault). The page lock is held while the entry goes in, so a
// truncation either sees the mapping and removes it, or comes first and
// the fault sees the page gone.
func (mm *MM) fileFault(v *vma, page uint64, write bool, cpu int) (retry bool, err error) {
	var cow *physmem.Frame
	if write && !v.shared() {
		if cow, err = mm.allocAnon(v, page, nil, cpu); err != nil {
			return false, err
		}
	}
	p, err := v.file.lockedPage(v.Index(page), false)
	if err != nil {
		if cow != nil {
			_ = mm.m.ram.Put(cow)
		}
		return false, err
	}
	if cow != nil {
		err = cow.CopyFrom(p)
		p.Unlock()
		_ = mm.m.ram.Put(p)
		if err != nil {
			_ = mm.m.ram.Put(cow)
			return false, err
		}
		return mm.mapNewAnon(v, page, 0, cow, true, cpu)
	}
	defer p.Unlock()
	pt, err := mm.table.AllocLockPTE(page)
	if err != nil {
		_ = mm.m.ram.Put(p)
		return false, err
	}
	i := pt.Index(page)
	if !pt.Get(i).IsNone() {
		pt.Unlock()
		_ = mm.m.ram.Put(p)
		return true, nil
	}
	e := pagetable.NewPTE(uint64(p.PFN()), v.prot.leafBits()|pagetable.Accessed)
	if write { // shared: the page is dirty from now on
		e |= pagetable.Write | pagetable.Dirty
		p.SetFlags(physmem.FlagDirty)
	}
	p.IncMapCount() // the lookup's reference becomes the entry's
	pt.Set(i, e)
	pt.Unlock()
	mm.addRSS(cpu, 1)
	return false, nil
}

func errBadSwap(page uint64, e pagetable.PTE) error {
	return fmt.Errorf("gomm: fault at %#x: swap entry %v names no swap device: %w", page, e, ErrFault)
}

// allocLockPTE is AllocLockPTE that reclaims when a page table cannot be
// allocated: the table allocation itself never reclaims (it may run under
// page-table locks), so the fault does it here, holding only mmap_lock,
// and tries again.
func (mm *MM) allocLockPTE(page uint64) (pagetable.PTETable, error) {
	return withReclaim(mm.m, func() (pagetable.PTETable, error) { return mm.table.AllocLockPTE(page) })
}
