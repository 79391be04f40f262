package physmem

import (
	"fmt"
	"slices"
	"sync/atomic"
)

// DeviceRegion is device-private memory given frames of its own
// (memremap_pages of a MEMORY_DEVICE_PRIVATE dev_pagemap): PFNs above
// RAM, which Alloc never hands out and the CPU cannot map. A device
// frame's contents are the device's memory. Its owner hands a free one
// out with Init (zone_device_page_init); the Put of its last reference
// runs the free hooks and poisons it as for RAM, then gives it back to
// the owner through the region's release function (page_free) instead of
// the free list.
type DeviceRegion struct {
	first   PFN
	frames  []Frame
	release func(*Frame)
	owner   any // the caller's, for DeviceRegionOf's callers
	inits   atomic.Uint64
	frees   atomic.Uint64
}

// AddDeviceRegion adds n device-private frames, all free, above RAM and
// every region added before. release is called with each frame as it is
// freed, on the freeing goroutine, after the free hooks; it must not
// take locks the freer may hold. owner is kept for the caller (Owner).
func (a *Allocator) AddDeviceRegion(n int, owner any, release func(*Frame)) (*DeviceRegion, error) {
	if n <= 0 || release == nil {
		return nil, fmt.Errorf("physmem: device region of %d frames: %w", n, ErrInvalid)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var cur []*DeviceRegion
	first := uint64(a.nframes)
	if p := a.regions.Load(); p != nil {
		cur = *p
		last := cur[len(cur)-1]
		first = uint64(last.first) + uint64(len(last.frames))
	}
	first = (first + HugeFrames - 1) &^ (HugeFrames - 1)
	if first+uint64(n) > MaxFrames {
		return nil, fmt.Errorf("physmem: device region of %d frames at pfn %#x: beyond %d frames: %w", n, first, uint64(MaxFrames), ErrNoMem)
	}
	r := &DeviceRegion{first: PFN(first), frames: make([]Frame, n), release: release, owner: owner}
	for i := range r.frames {
		r.frames[i].pfn = uint32(first) + uint32(i)
		r.frames[i].device = 1
		r.frames[i].flags.Store(uint32(flagDeviceFree))
		r.frames[i].data.Store(poisonData)
	}
	next := append(slices.Clone(cur), r)
	a.regions.Store(&next)
	return r, nil
}

// DeviceRegionOf returns the device region holding pfn, or nil for RAM
// and numbers beyond every region.
func (a *Allocator) DeviceRegionOf(pfn PFN) *DeviceRegion {
	if pfn < PFN(a.nframes) {
		return nil
	}
	return a.region(pfn)
}

// Owner returns what the region was added with.
func (r *DeviceRegion) Owner() any { return r.owner }

// region returns the device region holding pfn, or nil.
func (a *Allocator) region(pfn PFN) *DeviceRegion {
	p := a.regions.Load()
	if p == nil {
		return nil
	}
	rs := *p
	i, _ := slices.BinarySearchFunc(rs, pfn, func(r *DeviceRegion, pfn PFN) int {
		switch {
		case r.first+PFN(len(r.frames)) <= pfn:
			return -1
		case r.first > pfn:
			return 1
		}
		return 0
	})
	if i < len(rs) && rs[i].Contains(pfn) {
		return rs[i]
	}
	return nil
}

// First returns the region's first PFN.
func (r *DeviceRegion) First() PFN { return r.first }

// Len returns the number of frames in the region.
func (r *DeviceRegion) Len() int { return len(r.frames) }

// Contains reports whether pfn is one of the region's frames.
func (r *DeviceRegion) Contains(pfn PFN) bool {
	return pfn >= r.first && pfn < r.first+PFN(len(r.frames))
}

// Frame returns the region's i-th frame, free or not.
func (r *DeviceRegion) Frame(i int) (*Frame, error) {
	if i < 0 || i >= len(r.frames) {
		return nil, fmt.Errorf("physmem: device frame %d of %d: %w", i, len(r.frames), ErrInvalid)
	}
	return &r.frames[i], nil
}

// Init hands out a free frame of the region (zone_device_page_init):
// one reference, no flags, zero contents. A frame in use, or still being
// freed, is ErrBusy.
func (r *DeviceRegion) Init(f *Frame) error {
	if !r.Contains(f.PFN()) {
		return fmt.Errorf("physmem: init %v: not in device region at %#x: %w", f, r.first, ErrInvalid)
	}
	for {
		// Other bits (a waiter on the page lock that has not yet woken)
		// may be set alongside: only ownership matters.
		old := f.flags.Load()
		if old&uint32(flagDeviceFree) == 0 {
			return fmt.Errorf("physmem: init %v: in use: %w", f, ErrBusy)
		}
		if f.flags.CompareAndSwap(old, old&^uint32(flagDeviceFree)) {
			break
		}
	}
	f.data.Store(nil)
	f.refcount.Store(1)
	r.inits.Add(1)
	return nil
}

// InUse returns how many of the region's frames are handed out now.
func (r *DeviceRegion) InUse() int { return int(r.inits.Load() - r.frees.Load()) }
