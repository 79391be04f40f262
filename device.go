package gomm

import (
	"errors"
	"fmt"
	"reflect"
	"time"

	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
)

// DevicePagemapOps is what a driver with device-private memory gives the
// MM (struct dev_pagemap_ops).
type DevicePagemapOps interface {
	// PageFree is told that the device page pfn lost its last reference
	// (page_free): the driver may hand it out again. It runs on the
	// freeing goroutine, possibly under the MM's locks; it must not
	// block or call back into the MM.
	PageFree(pfn uint64)
	// MigrateToRAM is called when a CPU touches a device-private page
	// (migrate_to_ram), with the faulting MM's mmap_lock held for read:
	// the driver copies at least the faulting page back to RAM with
	// f.Migrate. The fault is retried when it returns; an error fails
	// the access (SIGBUS).
	MigrateToRAM(f *DeviceFault) error
}

// DevicePagemap is a device's private memory (struct dev_pagemap of
// MEMORY_DEVICE_PRIVATE): frames the device reads and writes but the CPU
// cannot map. An anonymous page migrated there is mapped by a
// device-private entry; a CPU access faults into the owner's
// MigrateToRAM.
type DevicePagemap struct {
	region *physmem.DeviceRegion
	owner  any // pgmap->owner: what RangeFault and MigrateVMA match
	ops    DevicePagemapOps
}

// AddDevicePagemap gives the machine pages frames of device-private
// memory (memremap_pages). owner names the device (pgmap->owner): a
// comparable value, usually the driver's device pointer, which
// RangeFault's DevicePrivateOwner and MigrateVMA's Owner are matched
// against (a DeviceFault's handler passes it on). Every frame starts free; the driver hands them out with
// InitPage and gets them back through ops.PageFree.
func (m *Machine) AddDevicePagemap(pages int, owner any, ops DevicePagemapOps) (*DevicePagemap, error) {
	if owner == nil || !reflect.TypeOf(owner).Comparable() || ops == nil {
		return nil, fmt.Errorf("gomm: device pagemap: owner %T, ops %T: %w", owner, ops, ErrInvalid)
	}
	p := &DevicePagemap{owner: owner, ops: ops}
	r, err := m.ram.AddDeviceRegion(pages, p, func(f *physmem.Frame) { ops.PageFree(uint64(f.PFN())) })
	if err != nil {
		return nil, err
	}
	p.region = r
	return p, nil
}

// comparable reports whether v can tag an invalidation: nil, or a value
// == works on (a non-comparable one would panic where it is matched).
func comparable(v any) bool { return v == nil || reflect.TypeOf(v).Comparable() }

// pagemapOf returns the device memory pfn belongs to, or nil for RAM.
func (m *Machine) pagemapOf(pfn uint64) *DevicePagemap {
	if r := m.ram.DeviceRegionOf(physmem.PFN(pfn)); r != nil {
		return r.Owner().(*DevicePagemap)
	}
	return nil
}

// Owner returns the owner the pagemap was added with.
func (p *DevicePagemap) Owner() any { return p.owner }

// First returns the PFN of the pagemap's first page.
func (p *DevicePagemap) First() uint64 { return uint64(p.region.First()) }

// Pages returns the pagemap's size in pages.
func (p *DevicePagemap) Pages() int { return p.region.Len() }

// InUse returns how many of its pages are handed out.
func (p *DevicePagemap) InUse() int { return p.region.InUse() }

// InitPage hands out the free device page pfn (zone_device_page_init):
// one reference, zero contents, ready to be a MigrateVMA destination.
// A page of another pagemap is ErrInvalid, one in use ErrBusy.
func (p *DevicePagemap) InitPage(pfn uint64) (*physmem.Frame, error) {
	if !p.region.Contains(physmem.PFN(pfn)) {
		return nil, fmt.Errorf("gomm: init device page %#x: not in pagemap at %#x: %w", pfn, p.First(), ErrInvalid)
	}
	f, _ := p.region.Frame(int(pfn - p.First()))
	if err := p.region.Init(f); err != nil {
		return nil, err
	}
	return f, nil
}

// MigrateSelect says which pages MigrateVMA collects
// (MIGRATE_VMA_SELECT_*).
type MigrateSelect uint8

// Migration sources.
const (
	// MigrateSelectSystem: anonymous pages in RAM.
	MigrateSelectSystem MigrateSelect = 1 << iota
	// MigrateSelectDevicePrivate: device-private pages of the pagemap
	// whose owner is MigrateVMA.PagemapOwner.
	MigrateSelectDevicePrivate
)

// MigrateVMA is one migration of a range of private anonymous memory
// between RAM and device memory (struct migrate_vma).
type MigrateVMA struct {
	Start, End uint64 // page-aligned, inside one VMA
	// Owner is carried by the migration's EventMigrate invalidations,
	// so a driver can tell its own migration from anybody else's and
	// keep its mirror of the range. The kernel uses pgmap_owner for
	// this; a value naming this one migration lets a driver skip exactly
	// its own invalidations even while it runs several at once.
	Owner any
	// PagemapOwner selects the device-private pages
	// MigrateSelectDevicePrivate collects (pgmap_owner).
	PagemapOwner any
	Select       MigrateSelect
	// AllocDst returns the frame, with one reference, that the contents
	// of src (mapped at va) move to: a device page from
	// DevicePagemap.InitPage to migrate to the device. Nil allocates
	// RAM, reclaiming if need be. An error leaves that page where it was
	// and ends the migration.
	AllocDst func(va uint64, src *physmem.Frame) (*physmem.Frame, error)
	// Migrated, if set, is called for each page moved that Addr still
	// maps (a zap racing the migration may have taken its entry), once
	// every mapping points at the new frame and before the old one is
	// freed,
	// both locked: where a driver that skipped Owner's invalidations
	// points its own page table at the new frame
	// (dmirror_migrate_finalize_and_map). It must not call into the MM.
	Migrated func(MigratedPage)
}

// MigratedPage is one page MigrateVMA moved.
type MigratedPage struct {
	Addr     uint64
	Src, Dst *physmem.Frame
	Writable bool // the entry at Addr allows writes
}

// MigrateVMA moves the selected pages of [a.Start, a.End) to new frames
// (migrate_vma_setup, migrate_vma_pages and migrate_vma_finalize, page by
// page): each one's mappings, in every MM that shares it, become
// migration entries under EventMigrate invalidations carrying a.Owner,
// the contents are copied (the device's DMA engine), and the entries
// then point at the new frame, as device-private entries if it is device
// memory. Only private anonymous memory moves; pages that are not
// selected, or busy (a KSM page, a swap-cache page bound for the device,
// one somebody holds a reference to), stay where they are. It returns
// how many pages moved. It takes mmap_lock for read; a driver's
// MigrateToRAM uses DeviceFault.Migrate, which runs under the fault's.
func (mm *MM) MigrateVMA(a *MigrateVMA) (int, error) {
	if err := a.check(); err != nil {
		return 0, err
	}
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	if err := mm.checkOpen(); err != nil {
		return 0, err
	}
	v := mm.vmas.lookup(a.Start)
	if v == nil || a.End > v.End {
		return 0, fmt.Errorf("gomm: migrate [%#x, %#x): not inside one mapping: %w", a.Start, a.End, ErrInvalid)
	}
	return mm.migrateVMA(v, a)
}

func (a *MigrateVMA) check() error {
	if a.Start%PageSize != 0 || a.End%PageSize != 0 || a.End <= a.Start || a.End > TaskSize ||
		a.Select == 0 || a.Select&^(MigrateSelectSystem|MigrateSelectDevicePrivate) != 0 ||
		!comparable(a.Owner) || !comparable(a.PagemapOwner) {
		return fmt.Errorf("gomm: migrate [%#x, %#x) select %#x owner %T: %w", a.Start, a.End, a.Select, a.Owner, ErrInvalid)
	}
	return nil
}

// migrateVMA runs a in v. Called with mmap_lock held.
func (mm *MM) migrateVMA(v *vma, a *MigrateVMA) (int, error) {
	if !v.anonymous() || v.shared() {
		return 0, nil // only private anonymous memory goes to device memory
	}
	moved := 0
	for va := a.Start; va < a.End; va += PageSize {
		src := mm.migrationSource(va, a)
		if src == nil {
			continue
		}
		how := migration{owner: a.Owner, alloc: mm.m.allocFrame, tryLock: true}
		if a.AllocDst != nil {
			how.alloc = func() (*physmem.Frame, error) { return a.AllocDst(va, src) }
		}
		if a.Migrated != nil {
			how.migrated = func(src, dst *physmem.Frame) {
				e, _ := mm.table.Lookup(va)
				if pfn, ok := e.MappedFrame(); !ok || pfn != uint64(dst.PFN()) {
					// A zap took the migration entry meanwhile: va does
					// not map dst, which goes once migrate drops it. The
					// kernel clears MIGRATE_PFN_MIGRATE for such a page.
					return
				}
				a.Migrated(MigratedPage{Addr: va, Src: src, Dst: dst, Writable: e.IsPresent() && e.IsWritable() || e.IsDevicePrivate() && e.IsSwapWritable()})
			}
		}
		_, err := mm.m.migrate(src, how)
		switch {
		case err == nil:
			moved++
		case !errors.Is(err, ErrBusy):
			return moved, err
		}
	}
	return moved, nil
}

// migrationSource takes a reference on the page mapped at va if a
// selects it; nil if not. migrate checks again under the page lock.
func (mm *MM) migrationSource(va uint64, a *MigrateVMA) *physmem.Frame {
	e, _ := mm.table.Lookup(va)
	var pfn uint64
	switch {
	case e.IsPresent() && e&pagetable.Special == 0 && a.Select&MigrateSelectSystem != 0:
		pfn = e.PFNAt(va)
	case e.IsDevicePrivate() && a.Select&MigrateSelectDevicePrivate != 0:
		pfn, _ = e.HeldFrame()
		if p := mm.m.pagemapOf(pfn); p == nil || p.owner != a.PagemapOwner {
			return nil
		}
	default:
		return nil
	}
	f, err := mm.m.ram.Frame(physmem.PFN(pfn))
	if err != nil || !mm.m.ram.TryGet(f) {
		return nil
	}
	if !f.Has(physmem.FlagAnon) || f.Has(physmem.FlagKSM) {
		_ = mm.m.ram.Put(f)
		return nil
	}
	return f
}

// DeviceFault is a CPU fault on a device-private page, handed to the
// page's DevicePagemapOps.MigrateToRAM.
type DeviceFault struct {
	mm    *MM
	vma   *vma
	Addr  uint64 // the faulting page
	PFN   uint64 // the device page mapped there
	Write bool
}

// MM returns the faulting MM.
func (f *DeviceFault) MM() *MM { return f.mm }

// Migrate runs a within the faulting mapping, under the fault's
// mmap_lock (a MigrateVMA of its own would take it again).
func (f *DeviceFault) Migrate(a *MigrateVMA) (int, error) {
	if err := a.check(); err != nil {
		return 0, err
	}
	if a.Start < f.vma.Start || a.End > f.vma.End {
		return 0, fmt.Errorf("gomm: migrate [%#x, %#x) outside the faulting mapping %v: %w", a.Start, a.End, f.vma, ErrInvalid)
	}
	return f.mm.migrateVMA(f.vma, a)
}

// maxDeviceFaults bounds how often one fault calls a driver that leaves
// the page in device memory. The kernel retries without a bound; a page
// can be held for a moment by a fork's copy, a racing zap's gather or a
// device access, so the tries back off (about a second in all) and only
// a driver that never migrates ends the fault with EFAULT.
const maxDeviceFaults = 1000

// deviceFault handles a CPU fault on the device-private entry e
// (do_swap_page for a device-private entry): the page's driver migrates
// it back to RAM and the fault is retried. Called with mmap_lock held
// for read and no PT lock.
func (mm *MM) deviceFault(v *vma, page uint64, e pagetable.PTE, write bool, tries *int) (retry bool, err error) {
	if *tries++; *tries > maxDeviceFaults {
		return false, fmt.Errorf("gomm: fault at %#x: device memory's driver does not give the page back: %w", page, ErrFault)
	} else if *tries > 4 {
		time.Sleep(time.Microsecond << min(*tries-4, 10))
	}
	// No reference is held across the call: the migration it asks for
	// freezes the page's references, and the driver finds the page again
	// by address (the kernel passes its own as migrate_vma.fault_page).
	pfn, _ := e.HeldFrame()
	p := mm.m.pagemapOf(pfn)
	if p == nil {
		return false, fmt.Errorf("gomm: fault at %#x: entry %v names no device page: %w", page, e, ErrFault)
	}
	if err := p.ops.MigrateToRAM(&DeviceFault{mm: mm, vma: v, Addr: page, PFN: pfn, Write: write}); err != nil {
		return false, fmt.Errorf("gomm: fault at %#x: device page %#x: %w", page, pfn, errors.Join(ErrFault, err))
	}
	// The driver's migration skips a page somebody has locked: another
	// fault's migration of it (a forked child's, another thread's). Wait
	// for that one rather than count a try.
	if f, _ := mm.m.ram.Frame(physmem.PFN(pfn)); f.IsLocked() {
		f.WaitUnlocked()
		*tries--
	}
	return true, nil
}

// MakeDeviceExclusive gives a device exclusive use of the private
// anonymous page at va (make_device_exclusive), for atomic operations
// the interconnect cannot do coherently: the page is faulted in
// writable (breaking copy-on-write), and under an EventExclusive
// invalidation carrying owner its entry is cleared, flushed and replaced
// by a device-exclusive entry, which keeps the mapping's reference and
// map count. Any CPU access then faults and takes the page back, under
// an EventClear invalidation that tells the device to let go.
//
// mapped runs with the page locked, so no CPU can take the page back
// before the device has mapped it: the driver installs its translation
// there, after checking its interval notifier's sequence. A page mapped
// more than once (shared after fork, KSM) is made private first, as a
// write fault does; a file, shared, or read-only mapping is ErrPerm.
func (mm *MM) MakeDeviceExclusive(va uint64, owner any, mapped func(pfn uint64) error) error {
	if va%PageSize != 0 || va >= TaskSize || mapped == nil || !comparable(owner) {
		return fmt.Errorf("gomm: make device exclusive at %#x owner %T: %w", va, owner, ErrInvalid)
	}
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	if err := mm.checkOpen(); err != nil {
		return err
	}
	v := mm.vmas.lookup(va)
	if v == nil {
		return fmt.Errorf("gomm: make device exclusive at %#x: no mapping: %w", va, ErrFault)
	}
	if !v.anonymous() || v.shared() || v.prot&ProtWrite == 0 {
		return fmt.Errorf("gomm: make device exclusive at %#x: mapping %v is not private anonymous and writable: %w", va, v, ErrPerm)
	}
	for range 8 {
		f, err := mm.getPage(va, pagetable.AccessWrite)
		if err != nil {
			return err
		}
		done, err := mm.makeExclusive(va, f, owner, mapped)
		_ = mm.m.ram.Put(f)
		if done || err != nil {
			return err
		}
	}
	return fmt.Errorf("gomm: make device exclusive at %#x: page keeps changing: %w", va, ErrAgain)
}

// makeExclusive swaps the writable entry mapping f at va for a
// device-exclusive one and lets the device map it; done is false if the
// entry changed since the fault and the caller should fault again.
func (mm *MM) makeExclusive(va uint64, f *physmem.Frame, owner any, mapped func(uint64) error) (done bool, err error) {
	f.Lock()
	defer f.Unlock()
	if done, err = mm.swapForExclusive(va, f, owner); !done || err != nil {
		return done, err
	}
	return true, mapped(uint64(f.PFN()))
}

// swapForExclusive replaces the writable entry mapping the locked frame
// f at va with a device-exclusive entry, under an invalidation the
// device (owner) knows for its own.
func (mm *MM) swapForExclusive(va uint64, f *physmem.Frame, owner any) (done bool, err error) {
	r := mm.notifiers.StartRange(va, va+PageSize, notifier.EventExclusive, owner)
	defer mm.invalidateEnd(r)
	pt, ok, err := mm.lockPTESplitting(va) // of a huge page the device takes 4 KiB
	if err != nil || !ok {
		return false, err
	}
	defer pt.Unlock()
	i := pt.Index(va)
	e := pt.Get(i)
	if !e.IsPresent() || !e.IsWritable() || e.PFN() != uint64(f.PFN()) {
		return false, nil
	}
	mm.clearFlush(pt, i, va)
	pt.Set(i, pagetable.NewDeviceExclusivePTE(uint64(f.PFN())))
	return true, nil
}

// restoreExclusive takes the page at page back from a device
// (remove_device_exclusive_entry): under the page lock, which the device
// holds while it maps the page, and an EventClear invalidation, which
// makes it let go, the device-exclusive entry e becomes the present entry
// it stands for. Called with mmap_lock held for read and no PT lock.
func (mm *MM) restoreExclusive(v *vma, page uint64, e pagetable.PTE) (retry bool, err error) {
	pfn, _ := e.HeldFrame()
	f, err := mm.m.ram.Frame(physmem.PFN(pfn))
	if err != nil {
		return false, err
	}
	if !mm.m.ram.TryGet(f) {
		return true, nil
	}
	defer func() { _ = mm.m.ram.Put(f) }()
	f.Lock()
	defer f.Unlock()
	r := mm.invalidateStart(page, page+PageSize, notifier.EventClear)
	defer mm.invalidateEnd(r)
	pt, ok, err := mm.table.LockPTE(page)
	if err != nil || !ok {
		return true, nil
	}
	i := pt.Index(page)
	if pt.Get(i) == e {
		pt.Set(i, v.RestoreExclusive(e))
	}
	pt.Unlock()
	return true, nil
}
