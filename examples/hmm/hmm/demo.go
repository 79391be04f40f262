package hmm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"text/tabwriter"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/tlb"
)

// DemoConfig sizes the demo. Zero fields take the defaults.
type DemoConfig struct {
	Pages  int // pages of data the device and the CPU share; default 64
	Rounds int // rounds of each side; default 200
}

// DemoReport is what the demo measured.
type DemoReport struct {
	Device        Stats
	DeviceChecked uint64 // words the device read and verified
	CPUChecked    uint64 // words the CPU read and verified
	Forks         int
	CountersExact bool // every CPU increment and device atomic is in the counters
	Violations    int
	First         string // the first violation, if any
}

// RunDemo runs a process and a device over the same memory: the device
// migrates the data into its own memory, reads it there and verifies
// it, while a CPU reads it too (faulting each page it touches back to
// RAM) and the process forks children that read it through copy-on-write;
// meanwhile the CPU and the device increment counters in the same pages,
// the CPU with plain stores and the device with atomics under exclusive
// access, so the page moves back and forth. It writes a table to w and
// fails on a wrong value, a lost increment or a checker violation.
func RunDemo(w io.Writer, cfg DemoConfig) (DemoReport, error) {
	if cfg.Pages == 0 {
		cfg.Pages = 64
	}
	if cfg.Rounds == 0 {
		cfg.Rounds = 200
	}
	var rep DemoReport
	if cfg.Pages < 2 || cfg.Rounds < 1 {
		return rep, fmt.Errorf("hmm demo: %+v: %w", cfg, gomm.ErrInvalid)
	}
	m, err := gomm.NewMachine(gomm.Config{Frames: 16 * cfg.Pages, CPUs: 2, Check: true})
	if err != nil {
		return rep, err
	}
	m.OnViolation(func(v gomm.Violation) {
		if rep.First == "" {
			rep.First = v.String()
		}
	})
	mm := m.NewMM()
	defer func() { _ = mm.Exit() }()
	dev, err := NewDevice(m, cfg.Pages)
	if err != nil {
		return rep, err
	}
	mi, err := dev.Open(mm)
	if err != nil {
		return rep, err
	}
	defer func() { _ = mi.Close() }()

	const rw = gomm.ProtRead | gomm.ProtWrite
	size := uint64(cfg.Pages) * PageSize
	data, err := mm.Mmap(0x1000_0000, size, rw, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
	if err != nil {
		return rep, err
	}
	const counterPages = 4
	counters, err := mm.Mmap(0x2000_0000, counterPages*PageSize, rw, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
	if err != nil {
		return rep, err
	}
	value := func(va uint64) uint64 { return va*0x9e3779b97f4a7c15 ^ 0x5a }
	buf := make([]byte, size)
	for i := range size / 8 {
		binary.LittleEndian.PutUint64(buf[i*8:], value(data+i*8))
	}
	if _, err := mm.WriteAt(buf, data); err != nil {
		return rep, err
	}
	verify := func(who string, addr uint64, p []byte) error {
		for i := range len(p) / 8 {
			va := addr + uint64(i)*8
			if got := binary.LittleEndian.Uint64(p[i*8:]); got != value(va) {
				return fmt.Errorf("hmm demo: %s read %#x at %#x, want %#x", who, got, va, value(va))
			}
		}
		return nil
	}

	var wg sync.WaitGroup
	errs := make([]error, 2)
	var cpuChecked uint64
	wg.Add(1)
	go func() { // the CPU
		defer wg.Done()
		cpu := m.CPU(1)
		cpu.Switch(mm.NewTask("cpu"))
		defer cpu.Switch(tlb.NewKernelThread("idle"))
		for r := range cfg.Rounds {
			va := data + uint64(r*7%cfg.Pages)*PageSize + uint64(r%(PageSize/8))*8
			v, err := cpu.Load64(va)
			if err == nil && v != value(va) {
				err = fmt.Errorf("hmm demo: CPU read %#x at %#x, want %#x", v, va, value(va))
			}
			if err == nil {
				cpuChecked++
				c := counters + uint64(r%counterPages)*PageSize
				if v, err = cpu.Load64(c); err == nil {
					err = cpu.Store64(c, v+1)
				}
			}
			if err != nil {
				errs[0] = err
				return
			}
		}
	}()
	page := make([]byte, PageSize)
	for r := range cfg.Rounds { // the device, and the process forking
		var err error
		switch {
		case r%(cfg.Rounds/10+1) == 0:
			_, err = mi.MigrateToDevice(data, size)
			if errors.Is(err, gomm.ErrBusy) {
				err = nil // a page the CPU was faulting back; next time
			}
		case r%(cfg.Rounds/5+1) == 1:
			err = forkAndRead(mm, data, size, verify)
			rep.Forks++
		}
		if err == nil {
			va := data + uint64(r%cfg.Pages)*PageSize
			if err = mi.Read(va, page); err == nil {
				err = verify("device", va, page)
				rep.DeviceChecked += PageSize / 8
			}
		}
		if err == nil {
			_, err = mi.AtomicAdd(counters+uint64(r%counterPages)*PageSize+8, 1)
		}
		if err != nil {
			errs[1] = err
			break
		}
	}
	wg.Wait()
	rep.CPUChecked = cpuChecked
	if err := errors.Join(errs...); err != nil {
		return rep, err
	}
	rep.CountersExact = true
	cbuf := make([]byte, counterPages*PageSize)
	if _, err := mm.ReadAt(cbuf, counters); err != nil {
		return rep, err
	}
	for p := range counterPages {
		want := uint64(cfg.Rounds / counterPages)
		if p < cfg.Rounds%counterPages {
			want++
		}
		off := p * PageSize
		if binary.LittleEndian.Uint64(cbuf[off:]) != want || binary.LittleEndian.Uint64(cbuf[off+8:]) != want {
			rep.CountersExact = false
		}
	}
	rep.Device = dev.Stats()
	_, rep.Violations = m.Violations()
	printReport(w, rep)
	switch {
	case rep.Violations > 0:
		return rep, fmt.Errorf("hmm demo: %d checker violations, first: %s", rep.Violations, rep.First)
	case !rep.CountersExact:
		return rep, errors.New("hmm demo: an increment was lost")
	}
	return rep, nil
}

// forkAndRead forks the process and has the child read the data through
// copy-on-write, device pages included, then exit.
func forkAndRead(mm *gomm.MM, data, size uint64, verify func(string, uint64, []byte) error) error {
	child, err := mm.Fork()
	if err != nil {
		return err
	}
	defer func() { _ = child.Exit() }()
	buf := make([]byte, size)
	if _, err := child.ReadAt(buf, data); err != nil {
		return err
	}
	return verify("child", data, buf)
}

func printReport(w io.Writer, rep DemoReport) {
	d := rep.Device
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	row := func(name string, v any) { fmt.Fprintf(tw, "%s\t%v\t\n", name, v) }
	row("device reads (words verified)", fmt.Sprintf("%d (%d)", d.Reads, rep.DeviceChecked))
	row("CPU reads verified", rep.CPUChecked)
	row("device faults / retries", fmt.Sprintf("%d / %d", d.Faults, d.Retries))
	row("pages migrated to device", d.ToDevice)
	row("pages back to RAM (CPU faults)", fmt.Sprintf("%d (%d)", d.ToRAM, d.CPUFaults))
	row("invalidations / own skipped", fmt.Sprintf("%d / %d", d.Invalidations, d.OwnSkipped))
	row("exclusive claims / revoked", fmt.Sprintf("%d / %d", d.Exclusive, d.Revoked))
	row("device atomics", d.Atomics)
	row("forks (COW of device pages)", rep.Forks)
	row("counters exact", rep.CountersExact)
	row("checker violations", rep.Violations)
	_ = tw.Flush()
}
