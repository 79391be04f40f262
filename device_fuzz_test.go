package gomm_test

import (
	"errors"
	"slices"
	"sync"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/internal/mmtest"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/physmem"
)

// fuzzDevice is the smallest honest device-memory driver: a free list of
// device pages, migration to RAM on a CPU fault.
type fuzzDevice struct {
	pm    *gomm.DevicePagemap
	mu    sync.Mutex
	free  []uint64 // protected by mu
	owner *int
}

func (d *fuzzDevice) PageFree(pfn uint64) {
	d.mu.Lock()
	d.free = append(d.free, pfn)
	d.mu.Unlock()
}

func (d *fuzzDevice) MigrateToRAM(f *gomm.DeviceFault) error {
	_, err := f.Migrate(&gomm.MigrateVMA{Start: f.Addr, End: f.Addr + gomm.PageSize,
		Select: gomm.MigrateSelectDevicePrivate, PagemapOwner: d.owner})
	return err
}

func (d *fuzzDevice) alloc(uint64, *physmem.Frame) (*physmem.Frame, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.free) == 0 {
		return nil, gomm.ErrNoMem
	}
	pfn := d.free[len(d.free)-1]
	d.free = d.free[:len(d.free)-1]
	return d.pm.InitPage(pfn)
}

type fuzzInterval struct{}

func (fuzzInterval) Invalidate(in *notifier.Interval, _ *notifier.Range, seq uint64) bool {
	in.SetSeq(seq)
	return true
}

// FuzzDeviceMemory drives the device-memory and mirroring entry points
// (MigrateVMA both ways, MakeDeviceExclusive, RangeFault, the CPU faults
// that bring device pages back) and fork, with arbitrary ranges and
// flags, and fault injection at an arbitrary rate: no panic, only errno
// errors, no change to the address space from a call that fails,
// consistent reverse maps, a silent checker, and every frame and device
// page back once the MMs exit.
func FuzzDeviceMemory(f *testing.F) {
	const base = 0x1000_0000
	f.Add(slices.Concat(fuzzStep(1, base, 4, 0), fuzzStep(2, base, base+4*gomm.PageSize, 1), fuzzStep(6, base, 0, 0)))
	f.Add(slices.Concat(fuzzStep(1, base, 4, 0), fuzzStep(3, base+8, 0, 0), fuzzStep(4, base, base+2*gomm.PageSize, 3)))
	f.Add(slices.Concat(fuzzStep(1, base, 4, 0), fuzzStep(2, base, base+4*gomm.PageSize, 1), fuzzStep(5, 0, 0, 0),
		fuzzStep(2, base, base+4*gomm.PageSize, 2)))
	f.Add(slices.Concat(fuzzStep(0, 0x4000, 7, 0), fuzzStep(1, base, 8, 0), fuzzStep(2, base+gomm.PageSize, base+1, 1)))
	f.Add(slices.Concat(fuzzStep(1, base, 4, 0), fuzzStep(7, base, 2*gomm.PageSize, 0), fuzzStep(2, base, base+4*gomm.PageSize, 1)))
	f.Fuzz(deviceFuzzBody)
}

func deviceFuzzBody(t *testing.T, prog []byte) {
	m, err := gomm.NewMachine(gomm.Config{CPUs: 1, Frames: 256, SwapSlots: 64, Check: true})
	if err != nil {
		t.Fatal(err)
	}
	dev := &fuzzDevice{owner: new(int)}
	if dev.pm, err = m.AddDevicePagemap(8, dev.owner, dev); err != nil {
		t.Fatal(err)
	}
	for i := range uint64(8) {
		dev.free = append(dev.free, dev.pm.First()+i)
	}
	mm := m.NewMM()
	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("fuzz"))
	var in *notifier.Interval
	for len(prog) >= fuzzStepSize {
		var op byte
		var a, b, c uint64
		op, a, b, c, prog = nextFuzzStep(prog)
		op %= 8
		before, rss := mm.VMAs(), mm.RSS()
		var err error
		mutates := false
		switch op {
		case 0:
			// Injection at rate b/256 of the sites in a; stays on.
			err = m.SetInjection(gomm.Injection{Rate: float64(b%256) / 256, Sites: gomm.InjectSite(a), Seed: c})
		case 1:
			// Map b%16+1 writable private anonymous pages at a and
			// write each (the writes may fail under injection).
			mutates = true
			var addr uint64
			addr, err = mm.Mmap(a, (b%16+1)*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
			if err == nil {
				mutates = false
				for i := range b%16 + 1 {
					_ = cpu.Store64(addr+i*gomm.PageSize, addr+i)
				}
			}
		case 2:
			sel := gomm.MigrateSelect(c & 0xff)
			mv := &gomm.MigrateVMA{Start: a, End: b, Select: sel, PagemapOwner: dev.owner, Owner: c & 1}
			if sel&gomm.MigrateSelectSystem != 0 {
				mv.AllocDst = dev.alloc
			}
			_, err = mm.MigrateVMA(mv)
			if errors.Is(err, gomm.ErrBusy) {
				err = nil // some pages stayed: busy, shared, not there
			}
		case 3:
			err = mm.MakeDeviceExclusive(a, dev.owner, func(uint64) error { return nil })
		case 4:
			if in == nil {
				in, err = mm.InsertInterval(0, gomm.TaskSize, fuzzInterval{})
				if err != nil {
					break
				}
			}
			r := &gomm.HMMRange{Interval: in, NotifierSeq: in.ReadBegin(), Start: a, End: b,
				Fault: c&1 != 0, FaultWrite: c&2 != 0}
			if c&4 != 0 {
				r.DevicePrivateOwner = dev.owner
			}
			err = mm.RangeFault(r)
		case 5:
			var child *gomm.MM
			child, err = mm.Fork()
			if err == nil {
				if cerr := m.CheckRmap(mm, child); cerr != nil {
					t.Fatal(cerr)
				}
				if err := child.Exit(); err != nil {
					t.Fatal(err)
				}
			}
		case 6:
			// The CPU touches a page: device pages come back.
			if c&1 == 0 {
				_, err = cpu.Load64(a &^ 7)
			} else {
				err = cpu.Store64(a&^7, c)
			}
		case 7:
			mutates = true
			err = mm.Munmap(a, b)
		}
		if err == nil {
			continue
		}
		if !typed(err) && !errors.Is(err, gomm.ErrPerm) && !errors.Is(err, gomm.ErrAgain) {
			t.Fatalf("op %d(%#x, %#x, %#x): untyped error %v", op, a, b, c, err)
		}
		if mutates && (!slices.Equal(before, mm.VMAs()) || rss != mm.RSS()) {
			t.Fatalf("op %d(%#x, %#x, %#x) failed (%v) but changed the address space", op, a, b, c, err)
		}
	}
	_ = m.SetInjection(gomm.Injection{})
	if err := m.CheckRmap(mm); err != nil {
		t.Fatal(err)
	}
	cpu.Switch(tlbIdle())
	if in != nil {
		if err := in.Remove(); err != nil {
			t.Fatal(err)
		}
	}
	mmtest.ExitAndCheck(t, m, mm)
	if n := dev.pm.InUse(); n != 0 {
		t.Fatalf("%d device pages in use after exit", n)
	}
}
