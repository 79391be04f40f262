package iommu

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

// PageSize is the device's page size.
const PageSize = gomm.PageSize

// ErrDMA is a DMA access the IOMMU refused: the page request failed
// (no mapping, or the access is not allowed).
var ErrDMA = errors.New("iommu: DMA fault")

// Mode says where the device flushes its IOTLB.
type Mode int

// Modes. Only ModeSecondaryTLBs is correct; the others exist to show,
// with the checker, why.
const (
	// ModeSecondaryTLBs flushes in InvalidateSecondaryTLBs, right after
	// the CPUs flushed and before any frame is freed.
	ModeSecondaryTLBs Mode = iota
	// ModeFlushAtStart flushes in InvalidateRangeStart: too early, the
	// CPU entries are still there and a DMA re-caches them.
	ModeFlushAtStart
	// ModeFlushAtEnd flushes in InvalidateRangeEnd: too late, the frames
	// were freed while the IOTLB still mapped them.
	ModeFlushAtEnd
)

func (m Mode) String() string {
	switch m {
	case ModeSecondaryTLBs:
		return "flush in invalidate_secondary_tlbs"
	case ModeFlushAtStart:
		return "flush in invalidate_range_start (too early)"
	case ModeFlushAtEnd:
		return "flush in invalidate_range_end (too late)"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Stats are the device's counters.
type Stats struct {
	DMA          uint64 // accesses completed
	Hits, Misses uint64 // IOTLB lookups
	PageRequests uint64 // faults served by the MM
	Flushes      uint64 // IOTLB range flushes
	Flushed      uint64 // IOTLB entries those flushes removed
}

// Device is an SVA device bound to one MM (iommu_sva_bind_device).
type Device struct {
	m    *gomm.Machine
	mm   *gomm.MM
	mode Mode
	sub  *notifier.Subscription

	mu    sync.Mutex          // the IOTLB lock; see the package documentation
	iotlb *devtlb.TLB[uint64] // page address -> translation; protected by mu
	// blocked: the MM's address space is going away (Release ran) or the
	// device was unbound, and its PASID entry blocks every DMA, as the
	// kernel's release callback sets it. Without it a DMA could walk an
	// entry exit has yet to zap, which no invalidation would reach.
	// Protected by mu.
	blocked bool

	dma, hits, misses, pageRequests, flushes, flushed atomic.Uint64

	unregisterCache func()
}

// Bind attaches a device with an IOTLB of entries translations to mm,
// flushing as mode says, and registers the IOTLB with the checker.
func Bind(ctx context.Context, m *gomm.Machine, mm *gomm.MM, entries int, mode Mode) (*Device, error) {
	if entries <= 0 || mode < ModeSecondaryTLBs || mode > ModeFlushAtEnd {
		return nil, fmt.Errorf("iommu: bind with %d IOTLB entries, %v: %w", entries, mode, gomm.ErrInvalid)
	}
	d := &Device{m: m, mm: mm, mode: mode, iotlb: devtlb.New[uint64](entries)}
	var ops any
	switch mode {
	case ModeSecondaryTLBs:
		ops = (*svaOps)(d)
	case ModeFlushAtStart:
		ops = (*earlyOps)(d)
	case ModeFlushAtEnd:
		ops = (*lateOps)(d)
	}
	sub, err := mm.RegisterNotifier(ctx, ops)
	if err != nil {
		return nil, fmt.Errorf("iommu: %w", err)
	}
	d.sub = sub
	d.unregisterCache = m.RegisterCache(d)
	return d, nil
}

// Unbind detaches the device (iommu_sva_unbind_device): its IOTLB is
// flushed and it is told nothing more.
func (d *Device) Unbind() error {
	err := d.mm.UnregisterNotifier(d.sub) // runs Release, which blocks the device, unless it ran
	if err != nil {
		d.block()
	}
	d.unregisterCache()
	return err
}

// Read64 is a DMA read of the word at va.
func (d *Device) Read64(va uint64) (uint64, error) {
	var v uint64
	err := d.access(va, false, func(f *physmem.Frame, off int) (err error) {
		v, err = f.Load64(off)
		return err
	})
	return v, err
}

// Write64 is a DMA write of v to the word at va.
func (d *Device) Write64(va, v uint64) error {
	return d.access(va, true, func(f *physmem.Frame, off int) error { return f.Store64(off, v) })
}

// access translates va through the IOTLB, or a walk of the CPU page
// table, or a page request and a walk, and runs op on the frame, all
// under mu but the page request.
func (d *Device) access(va uint64, write bool, op func(f *physmem.Frame, off int) error) error {
	if va%8 != 0 || va >= gomm.TaskSize {
		return fmt.Errorf("iommu: DMA at %#x: %w", va, gomm.ErrInvalid)
	}
	page := va &^ (PageSize - 1)
	acc := pagetable.AccessUser
	if write {
		acc |= pagetable.AccessWrite
	}
	for range 16 {
		d.mu.Lock()
		if d.blocked {
			d.mu.Unlock()
			return fmt.Errorf("iommu: DMA at %#x: the address space is gone: %w: %w", va, ErrDMA, gomm.ErrClosed)
		}
		e, ok := d.iotlb.Lookup(page)
		if ok && (e.Writable || !write) {
			d.hits.Add(1)
		} else {
			d.misses.Add(1)
			t := d.mm.Table()
			tok := t.LocklessBegin()
			tr := t.Walk(page, acc)
			t.LocklessEnd(tok)
			if tr.Fault != pagetable.FaultNone {
				d.mu.Unlock()
				d.pageRequests.Add(1)
				if err := d.mm.HandleFault(page, acc); err != nil {
					return fmt.Errorf("iommu: page request at %#x: %w: %w", page, ErrDMA, err)
				}
				continue
			}
			e = devtlb.Entry{PFN: tr.PFN, Writable: tr.PTE.IsWritable()}
			d.iotlb.Fill(page, e)
		}
		f, err := d.m.RAM().Frame(physmem.PFN(e.PFN))
		if err == nil {
			err = op(f, int(va-page))
		}
		d.mu.Unlock()
		d.dma.Add(1)
		return err
	}
	return fmt.Errorf("iommu: DMA at %#x: the page keeps going away: %w", va, ErrDMA)
}

// flush removes the IOTLB entries of [start, end), waiting for DMA in
// flight (it holds mu).
func (d *Device) flush(start, end uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.flushes.Add(1)
	n := d.iotlb.DropIf(func(page uint64) bool { return page >= start && page < end })
	d.flushed.Add(uint64(n))
}

// block flushes the whole IOTLB and refuses every later DMA.
func (d *Device) block() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.blocked = true
	d.flushes.Add(1)
	d.flushed.Add(uint64(d.iotlb.DropIf(func(uint64) bool { return true })))
}

// CacheName implements gomm.Cache.
func (d *Device) CacheName() string { return fmt.Sprintf("SVA device IOTLB (%v)", d.mode) }

// CachedPFN implements gomm.Cache.
func (d *Device) CachedPFN(pfn uint64) (string, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.iotlb.Index.Cached(pfn)
}

// Stats returns the device's counters.
func (d *Device) Stats() Stats {
	return Stats{DMA: d.dma.Load(), Hits: d.hits.Load(), Misses: d.misses.Load(),
		PageRequests: d.pageRequests.Load(), Flushes: d.flushes.Load(), Flushed: d.flushed.Load()}
}

// The notifier faces of the three modes.
type (
	svaOps   Device
	earlyOps Device
	lateOps  Device
)

// InvalidateSecondaryTLBs is the correct flush point.
func (o *svaOps) InvalidateSecondaryTLBs(_ notifier.MM, start, end uint64) {
	(*Device)(o).flush(start, end)
}

// Release blocks the device: the MM is exiting.
func (o *svaOps) Release(notifier.MM) { (*Device)(o).block() }

// InvalidateRangeStart flushes too early.
func (o *earlyOps) InvalidateRangeStart(r *notifier.Range) error {
	(*Device)(o).flush(r.Start, r.End)
	return nil
}

// InvalidateRangeEnd does nothing in this mode.
func (o *earlyOps) InvalidateRangeEnd(*notifier.Range) {}

// Release blocks the device.
func (o *earlyOps) Release(notifier.MM) { (*Device)(o).block() }

// InvalidateRangeStart does nothing in this mode.
func (o *lateOps) InvalidateRangeStart(*notifier.Range) error { return nil }

// InvalidateRangeEnd flushes too late.
func (o *lateOps) InvalidateRangeEnd(r *notifier.Range) { (*Device)(o).flush(r.Start, r.End) }

// Release blocks the device.
func (o *lateOps) Release(notifier.MM) { (*Device)(o).block() }
