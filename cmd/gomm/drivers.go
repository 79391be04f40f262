package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/examples/gru/gru"
	"github.com/gomm-dev/gomm/examples/hmm/hmm"
	"github.com/gomm-dev/gomm/examples/iommu/iommu"
	"github.com/gomm-dev/gomm/examples/kvm/kvm"
	"github.com/gomm-dev/gomm/examples/xpmem/xpmem"
)

// The example drivers at work. Each driver runs as one device goroutine
// that attaches to a random live process, maps a buffer in it, works on
// the buffer for a while and detaches, over and over: registration and
// unregistration happen under load too. The buffer's first half is the
// device's own data, which it writes and verifies (only content-keeping
// things race it: reclaim, KSM, migration, the host's forks, and
// read-only windows the host opens); the second half is churned by the
// host (unmapped and remapped, zapped, protected) under the device's
// accesses, where only the checker judges.

const devicePages = 64 // buffer pages; the first half is verified

// device is what the loop needs of one example driver, attached.
type device interface {
	read(off uint64) (uint64, error)
	write(off, v uint64) error
	// extra does the driver's own kind of work on the buffer (migration,
	// exclusive access); it may update vals, the verified half's model.
	extra(a *attachment, rng *rand.Rand) error
	detach() error
}

// attachment is one device attached to one process's buffer.
type attachment struct {
	driver string
	host   *proc
	start  uint64   // the buffer
	vals   []uint64 // the verified half's model; owned by the device goroutine
	// roEpoch is odd while the host has made the verified half
	// read-only; a write that fails may have met such a window only if
	// the epoch was odd or moved during it.
	roEpoch atomic.Uint64
	churnMu sync.Mutex // the host holds it while churning; detach waits for it
	gone    bool       // detached; protected by churnMu
}

// driverSet is the run's device goroutines.
type driverSet struct {
	wg    sync.WaitGroup
	stats []*driverStats
	chip  *gru.Chip
	hmm   *hmm.Device
}

// driverStats count one driver's work.
type driverStats struct {
	name                  string
	attaches, ops, checks atomic.Uint64
	noMem, expectedErrs   atomic.Uint64
}

func (w *world) startDrivers() (*driverSet, error) {
	ds := &driverSet{}
	for i, name := range w.cfg.Drivers {
		st := &driverStats{name: name}
		ds.stats = append(ds.stats, st)
		var attach func(p *proc, a *attachment) (device, error)
		switch name {
		case "kvm":
			attach = func(p *proc, a *attachment) (device, error) { return attachKVM(w.ctx, w.m, p, a) }
		case "gru":
			chip, err := gru.New(w.m, 256, gru.ModePerRange)
			if err != nil {
				return nil, err
			}
			ds.chip = chip
			attach = func(p *proc, a *attachment) (device, error) { return attachGRU(w.ctx, chip, p, a) }
		case "iommu":
			attach = func(p *proc, a *attachment) (device, error) { return attachIOMMU(w.ctx, w.m, p, a) }
		case "xpmem":
			attach = func(p *proc, a *attachment) (device, error) { return attachXPMEM(w.ctx, w.m, p, a) }
		case "hmm":
			dev, err := hmm.NewDevice(w.m, 4*devicePages)
			if err != nil {
				return nil, err
			}
			ds.hmm = dev
			attach = func(p *proc, a *attachment) (device, error) { return attachHMM(dev, p, a) }
		}
		rng := rand.New(rand.NewPCG(w.cfg.Seed, 1<<48+uint64(i)))
		ds.wg.Go(func() { w.runDevice(name, st, rng, attach) })
	}
	return ds, nil
}

// stop waits for every device to detach, then retires the shared chips.
func (ds *driverSet) stop() {
	ds.wg.Wait()
	if ds.chip != nil {
		ds.chip.Close()
	}
}

// runDevice is one driver's device: attach, work, detach, until the run
// ends.
func (w *world) runDevice(name string, st *driverStats, rng *rand.Rand, attach func(*proc, *attachment) (device, error)) {
	for !w.done() {
		p := w.pinRandom(rng)
		if p == nil {
			sleep(w.ctx, time.Millisecond)
			continue
		}
		w.attachAndWork(name, st, rng, p, attach)
		w.unpin(p)
	}
}

func (w *world) attachAndWork(name string, st *driverStats, rng *rand.Rand, p *proc, attach func(*proc, *attachment) (device, error)) {
	start, err := p.mm.Mmap(0, devicePages*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, gomm.MapPrivate|gomm.MapAnonymous)
	if err != nil {
		if !errors.Is(err, gomm.ErrNoMem) {
			w.fail("%s: mapping a buffer in process %d: %v", name, p.id, err)
		}
		return
	}
	a := &attachment{driver: name, host: p, start: start, vals: make([]uint64, devicePages/2)}
	dev, err := attach(p, a)
	if err != nil {
		// Registration waits for the MM's locks under the run's context:
		// the run ending cancels it.
		if !errors.Is(err, gomm.ErrNoMem) && !(w.done() && errors.Is(err, w.ctx.Err())) {
			w.fail("%s: attaching to process %d: %v", name, p.id, err)
		}
		_ = p.mm.Munmap(start, devicePages*gomm.PageSize)
		return
	}
	st.attaches.Add(1)
	p.devMu.Lock()
	p.devices = append(p.devices, a)
	p.devMu.Unlock()

	until := time.Now().Add(time.Duration(200+rng.IntN(800)) * time.Millisecond)
	for n := 0; !w.done() && time.Now().Before(until); n++ {
		w.deviceOp(a, dev, st, rng)
		if n%64 == 63 {
			w.verifyAll(a, dev, st)
		}
	}
	if !w.failed.Load() {
		w.verifyAll(a, dev, st)
	}

	a.churnMu.Lock()
	a.gone = true
	a.churnMu.Unlock()
	p.devMu.Lock()
	p.devices = slices.DeleteFunc(p.devices, func(x *attachment) bool { return x == a })
	p.devMu.Unlock()
	if err := dev.detach(); err != nil {
		w.fail("%s: detaching from process %d: %v", name, p.id, err)
	}
	if err := p.mm.Munmap(start, devicePages*gomm.PageSize); err != nil {
		w.fail("%s: unmapping the buffer of process %d: %v", name, p.id, err)
	}
}

// deviceOp is one access of the device: to its verified half (a write,
// or a read checked against the model), to the churned half (anything
// may come back), through the CPU side (the host's view must agree), or
// the driver's own kind of work.
func (w *world) deviceOp(a *attachment, dev device, st *driverStats, rng *rand.Rand) {
	st.ops.Add(1)
	half := uint64(devicePages / 2)
	switch d := rng.IntN(100); {
	case d < 35:
		i := rng.Uint64N(half)
		v := w.value()
		e0 := a.roEpoch.Load()
		err := dev.write(i*gomm.PageSize, v)
		readOnlyMet := e0%2 == 1 || a.roEpoch.Load() != e0
		if w.deviceAllowed(a, st, "write", err, readOnlyMet) {
			a.vals[i] = v
		}
	case d < 70:
		i := rng.Uint64N(half)
		got, err := dev.read(i * gomm.PageSize)
		if w.deviceAllowed(a, st, "read", err, false) {
			w.deviceVerify(a, st, i, got, "device read")
		}
	case d < 85:
		off := (half + rng.Uint64N(half)) * gomm.PageSize
		var err error
		if rng.IntN(2) == 0 {
			_, err = dev.read(off)
		} else {
			err = dev.write(off, w.value())
		}
		w.deviceAllowed(a, st, "churned access", err, true)
	case d < 90:
		// The CPU side: the host reads what the device wrote.
		i := rng.Uint64N(half)
		var b [8]byte
		_, err := a.host.mm.ReadAt(b[:], a.start+i*gomm.PageSize)
		if w.deviceAllowed(a, st, "host read", err, false) {
			w.deviceVerify(a, st, i, word(b[:]), "host read")
		}
	default:
		w.deviceAllowed(a, st, "driver work", dev.extra(a, rng), true)
	}
}

// deviceAllowed reports whether err lets the access count as done, and
// fails the run on an error nothing explains. churn says the access may
// have met a mapping being changed (unmapped, protected, zapped, its
// VMA split): faults and the drivers' give-up errors are expected then.
func (w *world) deviceAllowed(a *attachment, st *driverStats, what string, err error, churn bool) bool {
	switch {
	case err == nil:
		return true
	case errors.Is(err, errUnexpected):
		// Falls through to the failure below.
	case errors.Is(err, gomm.ErrNoMem):
		st.noMem.Add(1)
		return false
	case errors.Is(err, iommu.ErrDMA) && !errors.Is(err, gomm.ErrFault):
		// The page kept going away under the walker: the driver gave up
		// after a bounded number of retries.
		st.expectedErrs.Add(1)
		return false
	case churn && (errors.Is(err, gomm.ErrFault) || errors.Is(err, gomm.ErrPerm) ||
		errors.Is(err, gomm.ErrAgain) || errors.Is(err, gomm.ErrBusy) || errors.Is(err, gomm.ErrInvalid)):
		st.expectedErrs.Add(1)
		return false
	}
	w.fail("%s on process %d (mm %d), buffer [%#x, %#x): %s: unexpected error: %v",
		a.driver, a.host.id, a.host.mm.ID(), a.start, a.start+devicePages*gomm.PageSize, what, err)
	return false
}

func (w *world) deviceVerify(a *attachment, st *driverStats, i, got uint64, how string) {
	st.checks.Add(1)
	w.checks.Add(1)
	if want := a.vals[i]; got != want {
		w.fail("%s on process %d (mm %d): %s of buffer page %d (%#x) read %#x, want %#x",
			a.driver, a.host.id, a.host.mm.ID(), how, i, a.start+i*gomm.PageSize, got, want)
	}
}

// verifyAll reads back every page of the verified half through the
// device.
func (w *world) verifyAll(a *attachment, dev device, st *driverStats) {
	for i := range uint64(devicePages / 2) {
		got, err := dev.read(i * gomm.PageSize)
		if w.deviceAllowed(a, st, "read", err, false) {
			w.deviceVerify(a, st, i, got, "device read-back")
		}
	}
}

// deviceChurn is the host changing a device's buffer under it.
func (p *proc) deviceChurn() {
	p.devMu.Lock()
	if len(p.devices) == 0 {
		p.devMu.Unlock()
		return
	}
	a := p.devices[p.rng.IntN(len(p.devices))]
	p.devMu.Unlock()
	a.churnMu.Lock()
	defer a.churnMu.Unlock()
	if a.gone {
		return
	}
	const half = devicePages / 2 * gomm.PageSize
	churn := a.start + half
	rw := gomm.ProtRead | gomm.ProtWrite
	switch p.rng.IntN(5) {
	case 0:
		// A read-only window over the verified half: the device's writes
		// must fail in it, and its reads go on.
		a.roEpoch.Add(1)
		if p.allowed(opDeviceChurn, p.mm.Mprotect(a.start, half, gomm.ProtRead)) {
			runtime.Gosched()
			p.restore(a.start, half, rw)
		}
		a.roEpoch.Add(1)
	case 1:
		p.allowed(opDeviceChurn, p.mm.Madvise(churn, half, gomm.MadvDontNeed))
	case 2:
		// munmap and mmap in one: MAP_FIXED over the churned half.
		_, err := p.mm.Mmap(churn, half, rw, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
		p.allowed(opDeviceChurn, err)
	case 3:
		if p.allowed(opDeviceChurn, p.mm.Mprotect(churn, half, gomm.ProtNone)) {
			runtime.Gosched()
			p.restore(churn, half, rw)
		}
	default:
		p.allowed(opDeviceChurn, p.mm.Madvise(churn, half, gomm.MadvFree))
	}
}

// restore gives a range its rights back; it has to succeed, or the
// device's model of what may fail would be wrong.
func (p *proc) restore(start, length uint64, prot gomm.Prot) {
	for range 100 {
		err := p.mm.Mprotect(start, length, prot)
		if err == nil {
			return
		}
		if !errors.Is(err, gomm.ErrNoMem) {
			p.w.fail("process %d: mprotect back to %v: %v", p.id, prot, err)
			return
		}
	}
	p.w.fail("process %d: mprotect back to %v keeps failing", p.id, prot)
}

// The drivers.

type kvmDevice struct{ vm *kvm.VM }

func attachKVM(ctx context.Context, m *gomm.Machine, p *proc, a *attachment) (device, error) {
	vm, err := kvm.New(ctx, m, p.mm)
	if err != nil {
		return nil, err
	}
	if err := vm.SetMemslot(kvm.Memslot{GPA: 0, Size: devicePages * gomm.PageSize, HVA: a.start}); err != nil {
		_ = vm.Close()
		return nil, err
	}
	return kvmDevice{vm}, nil
}

func (d kvmDevice) read(off uint64) (uint64, error) { return d.vm.Load64(off) }
func (d kvmDevice) write(off, v uint64) error       { return d.vm.Store64(off, v) }
func (d kvmDevice) extra(*attachment, *rand.Rand) error {
	return nil // the host's aging asks the guest through the notifier
}
func (d kvmDevice) detach() error { return d.vm.Close() }

type gruDevice struct {
	ctx   *gru.Context
	start uint64
}

func attachGRU(ctx context.Context, chip *gru.Chip, p *proc, a *attachment) (device, error) {
	x, err := chip.Open(ctx, p.mm)
	if err != nil {
		return nil, err
	}
	return gruDevice{x, a.start}, nil
}

func (d gruDevice) read(off uint64) (uint64, error)     { return d.ctx.Load64(d.start + off) }
func (d gruDevice) write(off, v uint64) error           { return d.ctx.Store64(d.start+off, v) }
func (d gruDevice) extra(*attachment, *rand.Rand) error { return nil }
func (d gruDevice) detach() error                       { return d.ctx.Close() }

type iommuDevice struct {
	dev   *iommu.Device
	start uint64
}

func attachIOMMU(ctx context.Context, m *gomm.Machine, p *proc, a *attachment) (device, error) {
	d, err := iommu.Bind(ctx, m, p.mm, 32, iommu.ModeSecondaryTLBs)
	if err != nil {
		return nil, err
	}
	return iommuDevice{d, a.start}, nil
}

func (d iommuDevice) read(off uint64) (uint64, error)     { return d.dev.Read64(d.start + off) }
func (d iommuDevice) write(off, v uint64) error           { return d.dev.Write64(d.start+off, v) }
func (d iommuDevice) extra(*attachment, *rand.Rand) error { return nil }
func (d iommuDevice) detach() error                       { return d.dev.Unbind() }

// xpmemDevice imports the buffer into a remote partition: the remote
// side reads; the exporting process writes through its own MM.
type xpmemDevice struct {
	seg *xpmem.Segment
	mm  *gomm.MM
	a   *attachment
}

func attachXPMEM(ctx context.Context, m *gomm.Machine, p *proc, a *attachment) (device, error) {
	seg, err := xpmem.Export(ctx, m, p.mm, a.start, devicePages*gomm.PageSize, xpmem.NewLink(5*time.Microsecond))
	if err != nil {
		return nil, err
	}
	return xpmemDevice{seg, p.mm, a}, nil
}

func (d xpmemDevice) read(off uint64) (uint64, error) { return d.seg.Read64(off) }
func (d xpmemDevice) write(off, v uint64) error {
	var b [8]byte
	putWord(b[:], v)
	_, err := d.mm.WriteAt(b[:], d.a.start+off)
	return err
}
func (d xpmemDevice) extra(*attachment, *rand.Rand) error { return nil }
func (d xpmemDevice) detach() error                       { return d.seg.Close() }

// hmmDevice mirrors the buffer and moves it to device memory and back.
type hmmDevice struct {
	mi    *hmm.Mirror
	start uint64
}

func attachHMM(dev *hmm.Device, p *proc, a *attachment) (device, error) {
	mi, err := dev.Open(p.mm)
	if err != nil {
		return nil, err
	}
	return hmmDevice{mi, a.start}, nil
}

func (d hmmDevice) read(off uint64) (uint64, error) {
	var b [8]byte
	err := d.mi.Read(d.start+off, b[:])
	return word(b[:]), err
}

func (d hmmDevice) write(off, v uint64) error {
	var b [8]byte
	putWord(b[:], v)
	return d.mi.Write(d.start+off, b[:])
}

func (d hmmDevice) extra(a *attachment, rng *rand.Rand) error {
	half := uint64(devicePages / 2 * gomm.PageSize)
	switch rng.IntN(4) {
	case 0:
		_, err := d.mi.MigrateToDevice(d.start, 2*half)
		return err
	case 1:
		_, err := d.mi.MigrateToSystem(d.start, 2*half)
		return err
	case 2:
		// A device atomic on the verified half; the write-side rules
		// apply (a read-only window refuses it).
		i := rng.Uint64N(devicePages / 2)
		e0 := a.roEpoch.Load()
		got, err := d.mi.AtomicAdd(d.start+i*gomm.PageSize, 1)
		if err != nil {
			if (e0%2 == 1 || a.roEpoch.Load() != e0) && errors.Is(err, gomm.ErrPerm) {
				return fmt.Errorf("atomic in a read-only window: %w", err)
			}
			if errors.Is(err, gomm.ErrAgain) || errors.Is(err, gomm.ErrNoMem) {
				return err
			}
			return fmt.Errorf("atomic add: %w (unexpected)", errors.Join(err, errUnexpected))
		}
		a.vals[i]++
		if got != a.vals[i] {
			return fmt.Errorf("atomic add at buffer page %d returned %#x, want %#x: %w", i, got, a.vals[i], errUnexpected)
		}
		return nil
	default:
		_, err := d.mi.MigrateToDevice(d.start+half, half)
		return err
	}
}

func (d hmmDevice) detach() error { return d.mi.Close() }

// errUnexpected marks a driver-work error no race explains.
var errUnexpected = errors.New("unexpected")
