package gomm_test

import (
	"errors"
	"fmt"
	"sync"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/physmem"
)

// device is a complete small secondary-MMU driver: it mirrors part of an
// address space in its own page table, faults pages in through
// RangeFault with the interval-notifier retry loop, and drops mirrored
// pages when the notifier says they change.
type device struct {
	mm *gomm.MM
	in *notifier.Interval

	mu sync.Mutex          // the driver lock: guards pt and pairs with ReadRetry
	pt map[uint64]gomm.PFN // device page table: va -> frame
}

// Invalidate implements notifier.IntervalOps.
func (d *device) Invalidate(in *notifier.Interval, r *notifier.Range, cur uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	in.SetSeq(cur)
	for va := range d.pt {
		if va >= r.Start && va < r.End {
			delete(d.pt, va)
		}
	}
	return true
}

// CacheName and CachedPFN let the checker verify the device (gomm.Cache).
func (d *device) CacheName() string { return "example device" }

func (d *device) CachedPFN(pfn uint64) (string, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for va, p := range d.pt {
		if p.PFN == pfn {
			return fmt.Sprintf("va %#x", va), true
		}
	}
	return "", false
}

// load is a device read ("DMA") of the word at va.
func (d *device) load(va uint64) (uint64, error) {
	page := va &^ (gomm.PageSize - 1)
	for {
		d.mu.Lock()
		if p, ok := d.pt[page]; ok {
			f, _ := d.mm.Machine().RAM().Frame(physmem.PFN(p.PFN))
			v, err := f.Load64(int(va - page))
			d.mu.Unlock()
			return v, err
		}
		d.mu.Unlock()

		seq := d.in.ReadBegin()
		r := &gomm.HMMRange{Interval: d.in, NotifierSeq: seq, Start: page, End: page + gomm.PageSize, Fault: true}
		if err := d.mm.RangeFault(r); errors.Is(err, gomm.ErrBusy) {
			continue // invalidated while faulting: start over
		} else if err != nil {
			return 0, err
		}
		d.mu.Lock()
		if !d.in.ReadRetry(seq) { // nothing changed since ReadBegin
			d.pt[page] = r.PFNs[0]
		}
		d.mu.Unlock()
	}
}

// A device mirrors an address space, sees a CPU's write, and is told to
// let go when the range is unmapped.
func ExampleMM_InsertInterval() {
	m, _ := gomm.NewMachine(gomm.Config{CPUs: 1, Frames: 1024, Check: true})
	mm := m.NewMM()
	addr, _ := mm.Mmap(0, 16*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, gomm.MapPrivate|gomm.MapAnonymous)

	dev := &device{mm: mm, pt: map[uint64]gomm.PFN{}}
	dev.in, _ = mm.InsertInterval(addr, 16*gomm.PageSize, dev)
	defer m.RegisterCache(dev)()

	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("app"))
	_ = cpu.Store64(addr+8, 42)
	v, _ := dev.load(addr + 8)
	fmt.Println("device reads", v, "mapped pages", len(dev.pt))

	_ = mm.Munmap(addr, 16*gomm.PageSize)
	_, err := dev.load(addr)
	fmt.Println("after munmap:", len(dev.pt), "pages mapped,", errors.Is(err, gomm.ErrFault))
	_, violations := m.Violations()
	fmt.Println("violations:", violations)
	// Output:
	// device reads 42 mapped pages 1
	// after munmap: 0 pages mapped, true
	// violations: 0
}
