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
	PFNs              []PFN // filled, one per page; allocated if too short
}

// RangeFault snapshots (and, if asked, faults in) the translations of
// r's range for a mirroring device (hmm_range_fault). It takes mmap_lock
// for read. If an invalidation reached r.Interval since r.NotifierSeq it
// returns ErrBusy and the driver starts over with a new ReadBegin; if a
// page cannot be faulted in it returns ErrFault with that page flagged
// PFNError. Success is only a snapshot: the driver installs it under its
// own lock after Interval.ReadRetry(r.NotifierSeq) says nothing changed.
func (mm *MM) RangeFault(r *HMMRange) error {
	if r.Start%PageSize != 0 || r.End%PageSize != 0 || r.End <= r.Start || r.End > TaskSize || r.Interval == nil {
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
		if v == nil {
			if r.Fault || r.FaultWrite {
				r.PFNs[i].Flags = PFNError
				return fmt.Errorf("gomm: range fault at %#x: no mapping: %w", va, ErrFault)
			}
			continue
		}
		e, level := mm.table.Lookup(va)
		if (r.Fault || r.FaultWrite) && (!e.IsPresent() || (r.FaultWrite && !e.IsWritable())) {
			if err := mm.faultLocked(v, va, acc); err != nil {
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

// Cache is a translation cache the checker can inspect: a driver
// registers its device TLB or shadow page table with RegisterCache so
// that every frame free verifies the device let go of the frame first.
type Cache = check.Cache

// RegisterCache adds a secondary MMU's cache to the checker and returns a
// function that removes it. No-op when the checker is off.
func (m *Machine) RegisterCache(c Cache) (unregister func()) { return m.chk.Register(c) }
