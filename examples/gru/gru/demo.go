package gru

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"text/tabwriter"

	"github.com/gomm-dev/gomm"
)

// DemoConfig sizes the demo. Zero fields take the defaults.
type DemoConfig struct {
	Pages  int    // pages each context works on; default 64
	Rounds int    // host munmap/mmap rounds; default 200
	Munmap uint64 // bytes of the big munmap; default 1 GiB
}

// MunmapReport is one big munmap with the chip attached.
type MunmapReport struct {
	Mode          Mode
	Invalidations uint64 // InvalidateRangeStart calls it caused
	Flushes       uint64 // device TLB flushes it caused
}

// DemoReport is what the demo measured.
type DemoReport struct {
	Workload   Stats
	Checked    uint64 // loads verified against the context's last store
	Violations int
	Munmaps    []MunmapReport
}

const rw = gomm.ProtRead | gomm.ProtWrite

// RunDemo runs two MMs with two chip contexts each, storing and checking
// values through the chip while the host keeps unmapping and remapping
// part of each MM; then it munmaps a populated region (1 GiB by default)
// once per flush mode and counts the device flushes. It writes a table
// to w.
func RunDemo(w io.Writer, cfg DemoConfig) (DemoReport, error) {
	if cfg.Pages == 0 {
		cfg.Pages = 64
	}
	if cfg.Rounds == 0 {
		cfg.Rounds = 200
	}
	if cfg.Munmap == 0 {
		cfg.Munmap = 1 << 30
	}
	var rep DemoReport
	if cfg.Pages < 1 || cfg.Rounds < 1 || cfg.Munmap%ptSpan != 0 {
		return rep, fmt.Errorf("gru demo: %+v: %w", cfg, gomm.ErrInvalid)
	}
	if err := runWorkload(cfg, &rep); err != nil {
		return rep, err
	}
	for _, mode := range []Mode{ModePerRange, ModePerPTTable} {
		mr, err := bigMunmap(mode, cfg.Munmap)
		if err != nil {
			return rep, err
		}
		rep.Munmaps = append(rep.Munmaps, mr)
	}
	printReport(w, cfg, rep)
	return rep, nil
}

func runWorkload(cfg DemoConfig, rep *DemoReport) error {
	m, err := gomm.NewMachine(gomm.Config{Frames: 16 * cfg.Pages, CPUs: 1, Check: true})
	if err != nil {
		return err
	}
	chip, err := New(m, 32, ModePerRange)
	if err != nil {
		return err
	}
	defer chip.Close()
	size := uint64(cfg.Pages) * PageSize
	flags := gomm.MapPrivate | gomm.MapAnonymous | gomm.MapFixed
	var stop atomic.Bool
	var checked atomic.Uint64
	var wg sync.WaitGroup
	var mms []*gomm.MM
	var ctxs []*Context
	errs := make([]error, 4)
	for i := range 2 {
		mm := m.NewMM()
		mms = append(mms, mm)
		// Each context owns a buffer the host leaves alone (verified)
		// and shares one the host keeps unmapping (checker only).
		if _, err := mm.Mmap(0x1000_0000, 2*size, rw, flags); err != nil {
			return err
		}
		if _, err := mm.Mmap(0x2000_0000, size, rw, flags); err != nil {
			return err
		}
		for j := range 2 {
			x, err := chip.Open(context.Background(), mm)
			if err != nil {
				return err
			}
			ctxs = append(ctxs, x)
			mine := 0x1000_0000 + uint64(j)*size
			slot := 2*i + j
			wg.Go(func() {
				for n := 0; !stop.Load(); n++ {
					va := mine + uint64(n%cfg.Pages)*PageSize
					if err := x.Store64(va, uint64(n)); err != nil {
						errs[slot] = err
						return
					}
					v, err := x.Load64(va)
					if err == nil && v != uint64(n) {
						err = fmt.Errorf("gru demo: context %d read %#x at %#x, stored %#x", slot, v, va, n)
					}
					if err != nil {
						errs[slot] = err
						return
					}
					checked.Add(1)
					_ = x.Store64(0x2000_0000+uint64(n%cfg.Pages)*PageSize, uint64(n)) // may be unmapped
				}
			})
		}
	}
	var hostErr error
	for r := 0; r < cfg.Rounds && hostErr == nil; r++ {
		for seen := chip.Stats().Accesses; chip.Stats().Accesses < seen+16; {
			runtime.Gosched()
		}
		mm := mms[r%2]
		if hostErr = mm.Munmap(0x2000_0000, size); hostErr == nil {
			_, hostErr = mm.Mmap(0x2000_0000, size, rw, flags)
		}
	}
	stop.Store(true)
	wg.Wait()
	for _, x := range ctxs {
		hostErr = errors.Join(hostErr, x.Close())
	}
	for _, mm := range mms {
		hostErr = errors.Join(hostErr, mm.Exit())
	}
	if err := errors.Join(append(errs, hostErr)...); err != nil {
		return err
	}
	rep.Workload = chip.Stats()
	rep.Checked = checked.Load()
	viol, n := m.Violations()
	rep.Violations = n
	if n > 0 {
		return fmt.Errorf("gru demo: %d checker violations; first: %v", n, viol[0])
	}
	return nil
}

// bigMunmap populates size bytes (read faults: the zero page, so no
// frame data), lets a context cache some of it, and unmaps it all in one
// call.
func bigMunmap(mode Mode, size uint64) (MunmapReport, error) {
	mr := MunmapReport{Mode: mode}
	m, err := gomm.NewMachine(gomm.Config{Frames: int(size/ptSpan) + 1024, CPUs: 1, Check: true})
	if err != nil {
		return mr, err
	}
	chip, err := New(m, 32, mode)
	if err != nil {
		return mr, err
	}
	defer chip.Close()
	mm := m.NewMM()
	// Read-only, so MAP_POPULATE maps the zero page everywhere.
	addr, err := mm.Mmap(0x40_0000_0000, size, gomm.ProtRead, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed|gomm.MapPopulate)
	if err != nil {
		return mr, err
	}
	x, err := chip.Open(context.Background(), mm)
	if err != nil {
		return mr, err
	}
	for p := range uint64(16) {
		if _, err := x.Load64(addr + p*ptSpan); err != nil {
			return mr, err
		}
	}
	before := chip.Stats()
	if err := mm.Munmap(addr, size); err != nil {
		return mr, err
	}
	after := chip.Stats()
	mr.Invalidations = after.Invalidations - before.Invalidations
	mr.Flushes = after.Flushes - before.Flushes
	if err := errors.Join(x.Close(), mm.Exit()); err != nil {
		return mr, err
	}
	if _, n := m.Violations(); n > 0 {
		return mr, fmt.Errorf("gru demo: munmap in %v: %d checker violations", mode, n)
	}
	return mr, nil
}

func printReport(w io.Writer, cfg DemoConfig, rep DemoReport) {
	s := rep.Workload
	fmt.Fprintf(w, "GRU chip: 2 MMs x 2 contexts sharing one TLB and one subscription per MM, %d host munmap rounds\n\n", cfg.Rounds)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	row := func(what string, v any, note string) { fmt.Fprintf(tw, "%s\t%v\t  %s\n", what, v, note) }
	row("accesses", s.Accesses, "loads and stores through the chip")
	row("verified", rep.Checked, "loads compared with the context's last store")
	row("TLB hits", s.Hits, "")
	row("drop-ins", s.DropIns, "misses resolved through the CPU page table")
	row("waits", s.Waits, "misses held off while a range was active")
	row("retries", s.Retries, "drop-ins that lost a race with an invalidation")
	row("invalidations", s.Invalidations, "InvalidateRangeStart calls")
	row("violations", rep.Violations, "stale translations the checker found")
	tw.Flush()
	fmt.Fprintf(w, "\nmunmap of %d MiB populated:\n", cfg.Munmap>>20)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "flush mode\tinvalidations\tdevice flushes\t")
	for _, mr := range rep.Munmaps {
		fmt.Fprintf(tw, "%v\t%d\t%d\t\n", mr.Mode, mr.Invalidations, mr.Flushes)
	}
	tw.Flush()
}
