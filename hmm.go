package gomm

import (
	"fmt"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/check"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
)

// ErrBusy is EBUSY: RangeFault's snapshot was invalidated while it ran.
var ErrBusy = errno.ErrBusy

// PFNFlags describe one page of a RangeFault snapshot (HMM_PFN_*).
type PFNFlags uint8

// PFN flags.
const (
	PFNValid PFNFlags = 1 << iota // the page is mapped; PFN holds its frame
	PFNWrite                      // and may be written through the mirror
	PFNError                      // the page cannot be faulted in as asked
	PFNZero                       // the frame is the shared zero page
	PFNHuge                       // mapped by a 2 MiB leaf
)

// PFN is one entry of a RangeFault snapshot.
type PFN struct {
	PFN   uint64
	Flags PFNFlags
}

// HMMRange is a request to snapshot [Start, End) (struct hmm_range): what
// a mirroring driver wants faulted in, and where the result goes.
type HMMRange struct {
	Interval    *notifier.Interval // the driver's interval notifier covering the range
	NotifierSeq uint64             // from Interval.ReadBegin, just before RangeFault
	Start, End  uint64             // page-aligned
	// Fault and FaultWrite ask RangeFault to fault pages in (for reading,
	// or for writing, which breaks copy-on-write); without them it only
	// reports what is mapped.
	Fault, FaultWrite bool
	// DevicePrivateOwner is the driver's pagemap owner
	// (dev_private_owner): a page migrated to that device's memory is
	// reported as it is, with its device PFN, instead of being faulted
	// back to RAM. Nil matches no device memory.
	DevicePrivateOwner any
	PFNs               []PFN // filled, one per page; allocated if too short
}

// MaxRangeFaultPages is the most pages one RangeFault may span (4 GiB).
const MaxRangeFaultPages = 1 << 20

// RangeFault snapshots (and, if asked, faults in) the translations of
// r's range for a mirroring device (hmm_range_fault). It takes mmap_lock
// for read. If an invalidation reached r.Interval since r.NotifierSeq it
// returns ErrBusy and the driver starts over with a new ReadBegin. A page
// outside every mapping, or in one that cannot be read, is flagged
// PFNError; if it was to be faulted in, RangeFault stops there with
// ErrFault, or ErrPerm for a write to a mapping that forbids it. Pages
// not present and not to be faulted in are reported with no flags: a
// device-exclusive page, and device memory of any device but
// r.DevicePrivateOwner. Success is only a snapshot: the driver installs
// it under its own lock after Interval.ReadRetry(r.NotifierSeq) says
// nothing changed.
//
// The range must lie inside r.Interval (an invalidation outside it would
// not be seen by ReadRetry) and span at most MaxRangeFaultPages pages;
// drivers fault in bounded chunks, as the kernel's do.
func (mm *MM) RangeFault(r *HMMRange) error {
	if r.Start%PageSize != 0 || r.End%PageSize != 0 || r.End <= r.Start || r.End > TaskSize || r.Interval == nil ||
		r.Start < r.Interval.Start() || r.End > r.Interval.End() || (r.End-r.Start)/PageSize > MaxRangeFaultPages {
		return fmt.Errorf("gomm: range fault [%#x, %#x): %w", r.Start, r.End, ErrInvalid)
	}
	n := int((r.End - r.Start) / PageSize)
	if cap(r.PFNs) < n {
		r.PFNs = make([]PFN, n)
	}
	r.PFNs = r.PFNs[:n]
	clear(r.PFNs)
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	if err := mm.checkOpen(); err != nil {
		return err
	}
	acc := pagetable.AccessRead
	if r.FaultWrite {
		acc = pagetable.AccessWrite
	}
	for i := range n {
		if r.Interval.CheckRetry(r.NotifierSeq) {
			return fmt.Errorf("gomm: range fault [%#x, %#x): invalidated: %w", r.Start, r.End, ErrBusy)
		}
		va := r.Start + uint64(i)*PageSize
		v := mm.vmas.lookup(va)
		if v == nil || v.prot&ProtRead == 0 {
			r.PFNs[i].Flags = PFNError
			if r.Fault || r.FaultWrite {
				return fmt.Errorf("gomm: range fault at %#x: no readable mapping: %w", va, ErrFault)
			}
			continue
		}
		if r.FaultWrite && v.prot&ProtWrite == 0 {
			r.PFNs[i].Flags = PFNError
			return fmt.Errorf("gomm: range fault at %#x: mapping %v is read-only: %w", va, v, ErrPerm)
		}
		e, level := mm.table.Lookup(va)
		if pfn, ok := mm.ownDevicePage(e, r.DevicePrivateOwner); ok && (!r.FaultWrite || e.IsSwapWritable()) {
			r.PFNs[i] = PFN{PFN: pfn, Flags: PFNValid}
			if e.IsSwapWritable() {
				r.PFNs[i].Flags |= PFNWrite
			}
			continue
		}
		if (r.Fault || r.FaultWrite) && (!e.IsPresent() || e&pagetable.User == 0 || (r.FaultWrite && !e.IsWritable())) {
			if err := mm.faultLocked(v, va, acc, noCPU); err != nil {
				r.PFNs[i].Flags = PFNError
				return err
			}
			e, level = mm.table.Lookup(va)
		}
		if !e.IsPresent() || e&pagetable.User == 0 {
			continue
		}
		p := PFN{PFN: e.PFN(), Flags: PFNValid}
		if level == pagetable.LevelPMD {
			p.PFN += uint64(va>>pagetable.PageShift) & (pagetable.Entries - 1)
			p.Flags |= PFNHuge
		}
		if e.IsWritable() {
			p.Flags |= PFNWrite
		}
		if p.PFN == mm.m.ZeroPFN() {
			p.Flags |= PFNZero
		}
		r.PFNs[i] = p
	}
	if r.Interval.CheckRetry(r.NotifierSeq) {
		return fmt.Errorf("gomm: range fault [%#x, %#x): invalidated: %w", r.Start, r.End, ErrBusy)
	}
	return nil
}

// ownDevicePage returns the device page e maps if it is device memory
// of owner's.
func (mm *MM) ownDevicePage(e pagetable.PTE, owner any) (uint64, bool) {
	if owner == nil || !e.IsDevicePrivate() {
		return 0, false
	}
	pfn, _ := e.HeldFrame()
	p := mm.m.pagemapOf(pfn)
	return pfn, p != nil && p.owner == owner
}

// Cache is a translation cache the checker can inspect: a driver
// registers its device TLB or shadow page table with RegisterCache so
// that every frame free verifies the device let go of the frame first.
type Cache = check.Cache

// RegisterCache adds a secondary MMU's cache to the checker and returns a
// function that removes it. No-op when the checker is off.
func (m *Machine) RegisterCache(c Cache) (unregister func()) { return m.chk.Register(c) }
