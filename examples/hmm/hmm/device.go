package hmm

import (
	"errors"
	"fmt"
	"sync"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/examples/internal/devtlb"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/physmem"
)

// PageSize is the device's page size, the CPU's.
const PageSize = gomm.PageSize

// faultWindow is the most pages one device fault asks RangeFault for.
const faultWindow = 64

// Device is the device (struct dmirror_device): its private memory and
// the free list of it. Each process it mirrors gets a Mirror.
type Device struct {
	m       *gomm.Machine
	pagemap *gomm.DevicePagemap

	mu   sync.Mutex // a leaf lock: taken by PageFree on freeing goroutines
	free []uint64   // free device pages; protected by mu

	mirrorsMu sync.Mutex           // a leaf lock
	mirrors   map[*gomm.MM]*Mirror // open mirrors; protected by mirrorsMu

	stats counters
}

// NewDevice gives the machine a device with pages pages of private
// memory.
func NewDevice(m *gomm.Machine, pages int) (*Device, error) {
	if m == nil || pages <= 0 {
		return nil, fmt.Errorf("hmm: device of %d pages: %w", pages, gomm.ErrInvalid)
	}
	d := &Device{m: m, mirrors: map[*gomm.MM]*Mirror{}}
	p, err := m.AddDevicePagemap(pages, d, (*devicePagemapOps)(d))
	if err != nil {
		return nil, err
	}
	d.pagemap = p
	d.free = make([]uint64, 0, pages)
	for i := pages - 1; i >= 0; i-- {
		d.free = append(d.free, p.First()+uint64(i))
	}
	return d, nil
}

// Pagemap returns the device's memory.
func (d *Device) Pagemap() *gomm.DevicePagemap { return d.pagemap }

// Local reports whether pfn is a page of this device's memory.
func (d *Device) Local(pfn uint64) bool {
	return pfn >= d.pagemap.First() && pfn < d.pagemap.First()+uint64(d.pagemap.Pages())
}

// allocPage hands out a free device page (dmirror_devmem_alloc_page).
func (d *Device) allocPage() (*physmem.Frame, error) {
	d.mu.Lock()
	if len(d.free) == 0 {
		d.mu.Unlock()
		return nil, fmt.Errorf("hmm: device memory full: %w", gomm.ErrNoMem)
	}
	pfn := d.free[len(d.free)-1]
	d.free = d.free[:len(d.free)-1]
	d.mu.Unlock()
	return d.pagemap.InitPage(pfn)
}

// Evict migrates every page in the device's memory back to RAM
// (dmirror_device_evict_chunk), as a driver does before its memory goes
// away. It returns how many pages moved.
func (d *Device) Evict() (int, error) {
	moved := 0
	var errs []error
	for i := range d.pagemap.Pages() {
		pfn := d.pagemap.First() + uint64(i)
		if f, _ := d.m.RAM().Frame(physmem.PFN(pfn)); f.IsFree() {
			continue
		}
		// No owner: no mirror may skip these invalidations.
		if _, err := d.m.Migrate(pfn, nil); err != nil {
			errs = append(errs, err)
			continue
		}
		moved++
	}
	d.stats.toRAM.Add(uint64(moved))
	return moved, errors.Join(errs...)
}

// devicePagemapOps is the device's dev_pagemap_ops.
type devicePagemapOps Device

// PageFree takes a device page back onto the free list
// (dmirror_devmem_free).
func (o *devicePagemapOps) PageFree(pfn uint64) {
	d := (*Device)(o)
	d.mu.Lock()
	d.free = append(d.free, pfn)
	d.mu.Unlock()
}

// MigrateToRAM moves the page a CPU touched back to RAM
// (dmirror_devmem_fault). The faulting process's mirror, if any, forgets
// the device page first and skips the migration's invalidations, which
// carry its operation as owner.
func (o *devicePagemapOps) MigrateToRAM(f *gomm.DeviceFault) error {
	d := (*Device)(o)
	d.stats.cpuFaults.Add(1)
	a := &gomm.MigrateVMA{Start: f.Addr, End: f.Addr + PageSize, PagemapOwner: d, Select: gomm.MigrateSelectDevicePrivate}
	if mi := d.mirrorOf(f.MM()); mi != nil {
		op := mi.beginOwn(a.Start, a.End)
		defer mi.endOwn(op)
		a.Owner = op
	}
	n, err := f.Migrate(a)
	d.stats.toRAM.Add(uint64(n))
	return err
}

func (d *Device) mirrorOf(mm *gomm.MM) *Mirror {
	d.mirrorsMu.Lock()
	defer d.mirrorsMu.Unlock()
	return d.mirrors[mm]
}

// entry is one translation in a mirror's page table.
type entry struct {
	pfn    uint64
	write  bool
	atomic bool // device-exclusive: the device may do atomics on it
}

// Mirror is a device's mirror of one process (struct dmirror): a page
// table of its own, keyed by virtual page number, filled by RangeFault
// and emptied by an interval notifier over the whole address space.
// It holds no page references; the notifier keeps it right.
type Mirror struct {
	dev *Device
	mm  *gomm.MM
	in  *notifier.Interval

	mu sync.Mutex       // dmirror->mutex: ranks below every MM lock and the page lock
	pt map[uint64]entry // virtual page number -> translation; protected by mu
	// idx counts pt's entries per frame, for the checker; protected by mu.
	idx devtlb.PFNIndex
	// own are the migrations and claims the mirror is making itself;
	// protected by mu.
	own map[*ownOp]struct{}

	unregisterCache func()

	// Test switches: the bugs the notifier protocol exists to prevent.
	skipRetry    bool            // install a RangeFault snapshot without ReadRetry
	afterFault   func()          // if set, runs between RangeFault and the install
	noClaimCheck bool            // map a claim another invalidation overtook
	beforeMap    func(va uint64) // if set, runs in a claim before the mirror maps the page
}

// Open starts mirroring mm on the device (opening /dev/hmm_dmirror): an
// interval notifier over the whole address space, and the mirror
// registered with the machine's checker.
func (d *Device) Open(mm *gomm.MM) (*Mirror, error) {
	mi := &Mirror{dev: d, mm: mm, pt: map[uint64]entry{}, idx: devtlb.PFNIndex{}, own: map[*ownOp]struct{}{}}
	// Claimed before the insert, which takes mmap_lock: a fault holds
	// that while it looks the mirror up.
	d.mirrorsMu.Lock()
	taken := d.mirrors[mm] != nil
	if !taken {
		d.mirrors[mm] = mi
	}
	d.mirrorsMu.Unlock()
	if taken {
		return nil, fmt.Errorf("hmm: mm %d already mirrored on this device: %w", mm.ID(), gomm.ErrExist)
	}
	in, err := mm.InsertInterval(0, gomm.TaskSize, mi)
	if err != nil {
		d.mirrorsMu.Lock()
		delete(d.mirrors, mm)
		d.mirrorsMu.Unlock()
		return nil, err
	}
	mi.in = in
	mi.unregisterCache = d.m.RegisterCache(mi)
	return mi, nil
}

// Close stops mirroring: no invalidation reaches the mirror after the
// interval goes, so it forgets everything it mapped.
func (mi *Mirror) Close() error {
	if err := mi.in.Remove(); err != nil {
		return err
	}
	mi.mu.Lock()
	clear(mi.pt)
	clear(mi.idx)
	mi.mu.Unlock()
	mi.unregisterCache()
	mi.dev.mirrorsMu.Lock()
	delete(mi.dev.mirrors, mi.mm)
	mi.dev.mirrorsMu.Unlock()
	return nil
}

// Invalidate drops the mirror's translations of r
// (dmirror_interval_invalidate), except for the invalidations of a
// migration or exclusive claim this mirror is making itself: it dropped
// or replaces those translations on its own, and counting them would
// only make its faults retry.
func (mi *Mirror) Invalidate(in *notifier.Interval, r *notifier.Range, curSeq uint64) bool {
	if r.Blockable() {
		mi.mu.Lock()
	} else if !mi.mu.TryLock() {
		return false
	}
	defer mi.mu.Unlock()
	if op, ok := r.Owner.(*ownOp); ok && op.mi == mi {
		// What counts is what happens to the page after its entry
		// changed for us here: a restore of an earlier claim that was
		// never installed, or a copy-on-write on the way, does not.
		op.invalidated = false
		mi.dev.stats.ownSkipped.Add(1)
		return true
	}
	in.SetSeq(curSeq)
	for op := range mi.own {
		if r.Start < op.end && r.End > op.start {
			op.invalidated = true
		}
	}
	mi.dev.stats.invalidations.Add(1)
	mi.dropLocked(r.Start, r.End)
	return true
}

// dropLocked forgets the translations of [start, end). Called with mu
// held.
func (mi *Mirror) dropLocked(start, end uint64) {
	if uint64(len(mi.pt)) < (end-start)/PageSize {
		for vpn, e := range mi.pt {
			if vpn*PageSize >= start && vpn*PageSize < end {
				mi.removeLocked(vpn, e)
			}
		}
		return
	}
	for va := start; va < end; va += PageSize {
		if e, ok := mi.pt[va/PageSize]; ok {
			mi.removeLocked(va/PageSize, e)
		}
	}
}

func (mi *Mirror) removeLocked(vpn uint64, e entry) {
	if e.atomic {
		mi.dev.stats.revoked.Add(1)
	}
	delete(mi.pt, vpn)
	mi.idx.Remove(e.pfn)
}

func (mi *Mirror) setLocked(vpn uint64, e entry) {
	if old, ok := mi.pt[vpn]; ok {
		mi.idx.Remove(old.pfn)
	}
	mi.pt[vpn] = e
	mi.idx.Add(e.pfn)
}

// ownOp is a migration or exclusive claim the mirror makes itself: the
// owner its invalidations carry, so that it skips exactly those and no
// other device operation's (a per-device owner would also hide from
// this mirror a migration another thread's fault started).
type ownOp struct {
	mi         *Mirror
	start, end uint64
	// invalidated says another invalidation reached the range since the
	// operation's own last one, so what it would install may be stale: a
	// ReadRetry for the operation's pages alone, which a
	// whole-address-space interval bumped by every fault elsewhere could
	// not give a claim racing a busy CPU. Protected by mi.mu.
	invalidated bool
	// seq is the interval's sequence when the operation began (after
	// any invalidation then in flight ended). A migration installs
	// what it moved only if no other invalidation reached the mirror
	// since: one that began before a page's own invalidation and is
	// still to zap the page would free the frame under the mirror, and
	// invalidated, reset by each own invalidation, cannot see it.
	seq uint64
}

// beginOwn starts an operation of the mirror's own on [start, end),
// forgetting what it mirrors there: it is about to move or claim those
// pages, so their invalidations carry no news for it. No lock is held
// until endOwn: the operation calls into the MM, which may fault a
// device page back and start another.
func (mi *Mirror) beginOwn(start, end uint64) *ownOp {
	op := &ownOp{mi: mi, start: start, end: end, seq: mi.in.ReadBegin()}
	mi.mu.Lock()
	defer mi.mu.Unlock()
	mi.dropLocked(start, end)
	mi.own[op] = struct{}{}
	return op
}

func (mi *Mirror) endOwn(op *ownOp) {
	mi.mu.Lock()
	defer mi.mu.Unlock()
	delete(mi.own, op)
}

// CacheName and CachedPFN make the mirror a checked cache.
func (mi *Mirror) CacheName() string { return fmt.Sprintf("hmm mirror of mm %d", mi.mm.ID()) }

// CachedPFN reports whether the mirror translates to pfn.
func (mi *Mirror) CachedPFN(pfn uint64) (string, bool) {
	mi.mu.Lock()
	defer mi.mu.Unlock()
	return mi.idx.Cached(pfn)
}

// Read copies len(p) bytes from the process's memory at addr into p
// through the mirror (HMM_DMIRROR_READ), faulting pages in as needed.
func (mi *Mirror) Read(addr uint64, p []byte) error { return mi.access(addr, p, false) }

// Write copies p into the process's memory at addr through the mirror
// (HMM_DMIRROR_WRITE).
func (mi *Mirror) Write(addr uint64, p []byte) error { return mi.access(addr, p, true) }

func (mi *Mirror) access(addr uint64, p []byte, write bool) error {
	end := addr + uint64(len(p))
	if end < addr || end > gomm.TaskSize {
		return fmt.Errorf("hmm: access of %d bytes at %#x: %w", len(p), addr, gomm.ErrFault)
	}
	for done := 0; done < len(p); {
		va := addr + uint64(done)
		page := va &^ (PageSize - 1)
		n := min(len(p)-done, int(page+PageSize-va))
		ok, err := mi.copyPage(va, p[done:done+n], write)
		if err != nil {
			return err
		}
		if !ok {
			last := min(end, page+faultWindow*PageSize)
			if err := mi.fault(page, (last+PageSize-1)&^(PageSize-1), write); err != nil {
				return err
			}
			continue
		}
		done += n
	}
	if write {
		mi.dev.stats.writes.Add(1)
	} else {
		mi.dev.stats.reads.Add(1)
	}
	return nil
}

// copyPage moves bytes between p and the page mapped at va if the
// mirror has a translation that allows it. The mirror's lock is held
// throughout, so no invalidation, and hence no free, overtakes the copy.
func (mi *Mirror) copyPage(va uint64, p []byte, write bool) (bool, error) {
	mi.mu.Lock()
	defer mi.mu.Unlock()
	e, ok := mi.pt[va/PageSize]
	if !ok || (write && !e.write) {
		return false, nil
	}
	f, err := mi.dev.m.RAM().Frame(physmem.PFN(e.pfn))
	if err != nil {
		return false, err
	}
	off := int(va % PageSize)
	if write {
		_, err = f.WriteAt(p, off)
	} else {
		_, err = f.ReadAt(p, off)
	}
	return true, err
}

// fault fills the mirror for [start, end) (dmirror_fault): RangeFault
// under a notifier sequence, then the install under the mirror's lock
// only if no invalidation came in between; otherwise again.
func (mi *Mirror) fault(start, end uint64, write bool) error {
	mi.dev.stats.faults.Add(1)
	r := &gomm.HMMRange{Interval: mi.in, Start: start, End: end, Fault: true, FaultWrite: write, DevicePrivateOwner: mi.dev}
	for {
		r.NotifierSeq = mi.in.ReadBegin()
		err := mi.mm.RangeFault(r)
		if errors.Is(err, gomm.ErrBusy) {
			mi.dev.stats.retries.Add(1)
			continue
		}
		if err != nil {
			return err
		}
		if mi.afterFault != nil {
			mi.afterFault()
		}
		mi.mu.Lock()
		if !mi.skipRetry && mi.in.ReadRetry(r.NotifierSeq) {
			mi.mu.Unlock()
			mi.dev.stats.retries.Add(1)
			continue
		}
		for i, p := range r.PFNs {
			if p.Flags&gomm.PFNValid != 0 {
				mi.setLocked(start/PageSize+uint64(i), entry{pfn: p.PFN, write: p.Flags&gomm.PFNWrite != 0})
			}
		}
		mi.mu.Unlock()
		return nil
	}
}
