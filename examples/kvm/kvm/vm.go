package kvm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/examples/internal/devtlb"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
)

// Errors.
var (
	// ErrNoSlot: a guest-physical address no memslot covers (the guest
	// would take an MMIO exit).
	ErrNoSlot = errors.New("kvm: no memslot for guest address")
	// ErrBadSlot: a memslot that is unaligned, empty, or overlaps another.
	ErrBadSlot = errors.New("kvm: bad memslot")
)

// PageSize is the guest page size.
const PageSize = gomm.PageSize

// maxGPA bounds guest-physical addresses: the shadow table is a 4-level
// table of 48-bit addresses, of which the guest gets the lower half.
const maxGPA = 1 << 47

// Memslot maps guest-physical [GPA, GPA+Size) to host addresses
// [HVA, HVA+Size) of the VM's MM (struct kvm_memory_slot).
type Memslot struct {
	GPA, Size, HVA uint64
}

// Stats are the VM's counters.
type Stats struct {
	GuestFaults   uint64 // shadow misses resolved through the host
	Retries       uint64 // faults that raced an invalidation and started over
	Zapped        uint64 // shadow entries removed by invalidations and release
	Invalidations uint64 // InvalidateRangeStart calls
	AgedYoung     uint64 // aging calls that found a young shadow entry
	GUPHeld       int64  // GUP references held right now: 0 between faults
}

// VM is a virtual machine whose memory is its MM's (struct kvm).
type VM struct {
	m   *gomm.Machine
	mm  *gomm.MM
	sub *notifier.Subscription

	slots   atomic.Pointer[[]Memslot] // copy-on-write; written under slotsMu
	slotsMu sync.Mutex

	// mmuLock is kvm->mmu_lock: held for write to change the shadow
	// table or the invalidation state, for read by vCPU accesses.
	mmuLock sync.RWMutex
	// spt maps guest-physical to host frames, with its reverse index
	// for the checker; changed under mmuLock (write).
	spt *devtlb.Table
	// mmu_invalidate_in_progress and the host range it covers; protected
	// by mmuLock.
	inProgress           int
	rangeStart, rangeEnd uint64
	// mmu_invalidate_seq: bumped under mmuLock (write) by every end, read
	// without it at the start of a fault.
	seq atomic.Uint64
	// released: the MM's release ran; nothing may be installed any more,
	// since exit's zap that follows tells nobody. Protected by mmuLock.
	released bool

	guestFaults, retries, zapped, invalidations, agedYoung atomic.Uint64
	gupHeld                                                atomic.Int64

	unregisterCache func()

	// noRetryCheck switches the mmu_invalidate_retry check off, for the
	// test that shows what it prevents.
	noRetryCheck bool
	// afterGUP, if set (tests only), runs between a fault's page look-up
	// and its install.
	afterGUP func()
}

// New creates a VM backed by mm, subscribing to its notifiers and
// registering the shadow table with the machine's checker. Close it
// before the MM exits, or let the MM's exit release it.
func New(ctx context.Context, m *gomm.Machine, mm *gomm.MM) (*VM, error) {
	vm := &VM{m: m, mm: mm, spt: devtlb.NewTable()}
	vm.slots.Store(&[]Memslot{})
	sub, err := mm.RegisterNotifier(ctx, vm)
	if err != nil {
		return nil, fmt.Errorf("kvm: %w", err)
	}
	vm.sub = sub
	vm.unregisterCache = m.RegisterCache(vm)
	return vm, nil
}

// Close unregisters the VM from its MM and zaps every shadow entry.
func (vm *VM) Close() error {
	err := vm.mm.UnregisterNotifier(vm.sub)
	vm.zapAll()
	vm.unregisterCache()
	return err
}

// SetMemslot adds a memslot. GPA, Size and HVA must be page-aligned,
// Size non-zero, and the guest range must not overlap another slot's.
func (vm *VM) SetMemslot(s Memslot) error {
	if s.Size == 0 || s.GPA%PageSize != 0 || s.Size%PageSize != 0 || s.HVA%PageSize != 0 ||
		s.GPA+s.Size < s.GPA || s.GPA+s.Size > maxGPA || s.HVA+s.Size < s.HVA {
		return fmt.Errorf("kvm: memslot %+v: %w", s, ErrBadSlot)
	}
	vm.slotsMu.Lock()
	defer vm.slotsMu.Unlock()
	cur := *vm.slots.Load()
	for _, o := range cur {
		if s.GPA < o.GPA+o.Size && o.GPA < s.GPA+s.Size {
			return fmt.Errorf("kvm: memslot %+v overlaps %+v: %w", s, o, ErrBadSlot)
		}
	}
	next := append(append([]Memslot(nil), cur...), s)
	vm.slots.Store(&next)
	return nil
}

// hva translates a guest-physical address by the memslots.
func (vm *VM) hva(gpa uint64) (uint64, error) {
	for _, s := range *vm.slots.Load() {
		if gpa >= s.GPA && gpa < s.GPA+s.Size {
			return s.HVA + gpa - s.GPA, nil
		}
	}
	return 0, fmt.Errorf("kvm: gpa %#x: %w", gpa, ErrNoSlot)
}

// Load64 is a guest load of the word at gpa, as vCPU code runs it.
func (vm *VM) Load64(gpa uint64) (uint64, error) {
	var v uint64
	err := vm.access(gpa, false, func(f *physmem.Frame, off int) error {
		var err error
		v, err = f.Load64(off)
		return err
	})
	return v, err
}

// Store64 is a guest store of v to the word at gpa.
func (vm *VM) Store64(gpa, v uint64) error {
	return vm.access(gpa, true, func(f *physmem.Frame, off int) error { return f.Store64(off, v) })
}

// access runs op on the host frame behind gpa with the mmu lock held for
// read, so no zap can remove the translation while op uses it; a miss
// takes a guest fault and tries again.
func (vm *VM) access(gpa uint64, write bool, op func(f *physmem.Frame, off int) error) error {
	if gpa%8 != 0 {
		return fmt.Errorf("kvm: unaligned guest access at %#x: %w", gpa, gomm.ErrInvalid)
	}
	acc := pagetable.AccessRead
	if write {
		acc = pagetable.AccessWrite
	}
	page := gpa &^ (PageSize - 1)
	for {
		vm.mmuLock.RLock()
		tr := vm.spt.Walk(page, acc)
		if tr.Fault == pagetable.FaultNone {
			f, err := vm.m.RAM().Frame(physmem.PFN(tr.PFN))
			if err == nil {
				err = op(f, int(gpa-page))
			}
			vm.mmuLock.RUnlock()
			return err
		}
		vm.mmuLock.RUnlock()
		if err := vm.fault(page, write); err != nil {
			return err
		}
	}
}

// fault resolves a shadow miss at the guest page gpa (kvm_tdp_page_fault
// with __kvm_faultin_pfn): see the package documentation for the steps.
func (vm *VM) fault(gpa uint64, write bool) error {
	vm.guestFaults.Add(1)
	hva, err := vm.hva(gpa)
	if err != nil {
		return err
	}
	for {
		seq := vm.seq.Load()
		f, err := vm.mm.GetUserPage(hva, write)
		if err != nil {
			return fmt.Errorf("kvm: guest fault at gpa %#x (hva %#x): %w", gpa, hva, err)
		}
		vm.gupHeld.Add(1)
		if vm.afterGUP != nil {
			vm.afterGUP()
		}
		installed, err := vm.install(gpa, hva, f, write, seq)
		// No long-term pin: the notifier keeps the entry honest from here.
		// Dropped outside mmuLock, since it may free the frame and the
		// checker's free hook asks the VM about it.
		vm.gupHeld.Add(-1)
		if perr := vm.m.RAM().Put(f); err == nil {
			err = perr
		}
		if err != nil || installed {
			return err
		}
		vm.retries.Add(1)
	}
}

// install puts the shadow entry for gpa unless an invalidation of hva is
// in progress or completed since seq was read (mmu_invalidate_retry_gfn).
func (vm *VM) install(gpa, hva uint64, f *physmem.Frame, write bool, seq uint64) (bool, error) {
	vm.mmuLock.Lock()
	defer vm.mmuLock.Unlock()
	if vm.released {
		return false, fmt.Errorf("kvm: guest fault at gpa %#x: the address space is gone: %w", gpa, gomm.ErrClosed)
	}
	if !vm.noRetryCheck && (vm.inProgress > 0 && hva >= vm.rangeStart && hva < vm.rangeEnd || vm.seq.Load() != seq) {
		return false, nil
	}
	bits := pagetable.User | pagetable.Accessed
	if write {
		bits |= pagetable.Write | pagetable.Dirty
	}
	old, err := vm.spt.Install(gpa, pagetable.NewPTE(uint64(f.PFN()), bits))
	if err != nil {
		return false, err
	}
	if old.IsPresent() {
		vm.zapped.Add(1)
	}
	return true, nil
}

// eachGFNRange calls fn with every guest-physical range that backs part
// of the host range [start, end) (kvm_handle_hva_range's memslot walk).
func (vm *VM) eachGFNRange(start, end uint64, fn func(gStart, gEnd uint64)) {
	for _, s := range *vm.slots.Load() {
		lo, hi := max(start, s.HVA), min(end, s.HVA+s.Size)
		if lo < hi {
			fn(s.GPA+lo-s.HVA, s.GPA+hi-s.HVA)
		}
	}
}

// zapRange removes the shadow entries backed by host [start, end).
// Called with mmuLock held for write.
func (vm *VM) zapRange(start, end uint64) {
	vm.eachGFNRange(start, end, func(gs, ge uint64) {
		vm.zapped.Add(uint64(vm.spt.Unmap(gs, ge)))
	})
}

func (vm *VM) zapAll() {
	vm.mmuLock.Lock()
	defer vm.mmuLock.Unlock()
	vm.zapped.Add(uint64(vm.spt.Unmap(0, maxGPA)))
}

// InvalidateRangeStart implements notifier.RangeInvalidator
// (kvm_mmu_notifier_invalidate_range_start): it never sleeps, so it
// serves non-blockable ranges too.
func (vm *VM) InvalidateRangeStart(r *notifier.Range) error {
	vm.invalidations.Add(1)
	vm.mmuLock.Lock()
	defer vm.mmuLock.Unlock()
	if vm.inProgress == 0 {
		vm.rangeStart, vm.rangeEnd = r.Start, r.End
	} else {
		vm.rangeStart, vm.rangeEnd = min(vm.rangeStart, r.Start), max(vm.rangeEnd, r.End)
	}
	vm.inProgress++
	vm.zapRange(r.Start, r.End)
	return nil
}

// InvalidateRangeEnd implements notifier.RangeInvalidator: faults that
// read the sequence before now retry.
func (vm *VM) InvalidateRangeEnd(r *notifier.Range) {
	vm.mmuLock.Lock()
	defer vm.mmuLock.Unlock()
	vm.seq.Add(1)
	vm.inProgress--
}

// age visits the shadow entries backed by host [start, end), clearing
// their Accessed bits when clear is set, and reports whether any was
// young.
func (vm *VM) age(start, end uint64, clear bool) bool {
	vm.mmuLock.Lock()
	defer vm.mmuLock.Unlock()
	young := false
	vm.eachGFNRange(start, end, func(gs, ge uint64) {
		for gpa := gs; gpa < ge; gpa += PageSize {
			e := vm.spt.Lookup(gpa)
			if !e.IsPresent() || !e.IsYoung() {
				continue
			}
			young = true
			if clear {
				_, _ = vm.spt.Install(gpa, e.Without(pagetable.Accessed))
			}
		}
	})
	if young {
		vm.agedYoung.Add(1)
	}
	return young
}

// ClearFlushYoung implements notifier.ClearFlushYounger. vCPU accesses
// hold mmuLock for read, so clearing under the write side is the flush.
func (vm *VM) ClearFlushYoung(_ notifier.MM, start, end uint64) bool { return vm.age(start, end, true) }

// ClearYoung implements notifier.ClearYounger.
func (vm *VM) ClearYoung(_ notifier.MM, start, end uint64) bool { return vm.age(start, end, true) }

// TestYoung implements notifier.TestYounger.
func (vm *VM) TestYoung(_ notifier.MM, addr uint64) bool {
	return vm.age(addr&^(PageSize-1), addr&^(PageSize-1)+PageSize, false)
}

// Release implements notifier.Releaser: the MM is going away, so every
// shadow entry goes.
func (vm *VM) Release(notifier.MM) {
	vm.mmuLock.Lock()
	vm.released = true // a fault that looked its page up before must not install it after
	vm.mmuLock.Unlock()
	vm.zapAll()
}

// CacheName implements gomm.Cache.
func (vm *VM) CacheName() string {
	return fmt.Sprintf("kvm vm of mm %d: shadow page table", vm.mm.ID())
}

// CachedPFN implements gomm.Cache: whether a shadow entry maps pfn.
func (vm *VM) CachedPFN(pfn uint64) (string, bool) {
	vm.mmuLock.RLock()
	defer vm.mmuLock.RUnlock()
	return vm.spt.Cached(pfn)
}

// Stats returns the VM's counters.
func (vm *VM) Stats() Stats {
	return Stats{
		GuestFaults:   vm.guestFaults.Load(),
		Retries:       vm.retries.Load(),
		Zapped:        vm.zapped.Load(),
		Invalidations: vm.invalidations.Load(),
		AgedYoung:     vm.agedYoung.Load(),
		GUPHeld:       vm.gupHeld.Load(),
	}
}

// ShadowEntries returns how many guest pages the shadow table maps now.
func (vm *VM) ShadowEntries() int {
	vm.mmuLock.RLock()
	defer vm.mmuLock.RUnlock()
	return vm.spt.Mapped()
}
