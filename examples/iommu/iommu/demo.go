package iommu

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
	Pages  int // pages in each of the two DMA buffers; default 64
	Rounds int // host churn rounds per mode; default 300
}

// ModeReport is what one mode's run measured.
type ModeReport struct {
	Mode       Mode
	Device     Stats
	Checked    uint64 // DMA reads whose value was verified
	HostRounds int
	Violations int
	First      string // the first violation, if any
}

// DemoReport has one ModeReport per mode, the correct one first.
type DemoReport struct{ Modes []ModeReport }

// RunDemo streams DMA through an SVA device while the host munmaps,
// mprotects, migrates and KSM-merges the buffers underneath, once for
// each flush mode: the correct one must end with no checker violation
// and every DMA read verified; the early and late ones are stopped at
// their first violation, which is printed. It writes a table to w and
// fails if the correct mode saw a violation or a wrong value, or a wrong
// mode saw none.
func RunDemo(w io.Writer, cfg DemoConfig) (DemoReport, error) {
	if cfg.Pages == 0 {
		cfg.Pages = 64
	}
	if cfg.Rounds == 0 {
		cfg.Rounds = 300
	}
	var rep DemoReport
	if cfg.Pages < 2 || cfg.Rounds < 1 {
		return rep, fmt.Errorf("iommu demo: %+v: %w", cfg, gomm.ErrInvalid)
	}
	for _, mode := range []Mode{ModeSecondaryTLBs, ModeFlushAtStart, ModeFlushAtEnd} {
		mr, err := runMode(mode, cfg)
		if err != nil {
			return rep, err
		}
		rep.Modes = append(rep.Modes, mr)
	}
	printReport(w, rep)
	for _, mr := range rep.Modes {
		if (mr.Mode == ModeSecondaryTLBs) != (mr.Violations == 0) {
			return rep, fmt.Errorf("iommu demo: %v: %d violations", mr.Mode, mr.Violations)
		}
	}
	return rep, nil
}

func runMode(mode Mode, cfg DemoConfig) (ModeReport, error) {
	mr := ModeReport{Mode: mode}
	m, err := gomm.NewMachine(gomm.Config{Frames: 8 * cfg.Pages, CPUs: 1, SwapSlots: 4 * cfg.Pages, Check: true})
	if err != nil {
		return mr, err
	}
	mm := m.NewMM()
	size := uint64(cfg.Pages) * PageSize
	const rw = gomm.ProtRead | gomm.ProtWrite
	flags := gomm.MapPrivate | gomm.MapAnonymous | gomm.MapFixed
	// Buffer a keeps its contents (migration and KSM only): its DMA
	// reads are verified. Buffer b is unmapped and protected under the
	// device: only the checker judges it.
	a, err := mm.Mmap(0x1000_0000, size, rw, flags)
	if err != nil {
		return mr, err
	}
	b, err := mm.Mmap(0x2000_0000, size, rw, flags)
	if err != nil {
		return mr, err
	}
	if err := mm.Madvise(a, size, gomm.MadvMergeable); err != nil {
		return mr, err
	}
	dev, err := Bind(context.Background(), m, mm, 16, mode)
	if err != nil {
		return mr, err
	}

	var stop atomic.Bool
	var checked atomic.Uint64
	var failed atomic.Bool // the verified stream stopped on an error
	errs := make([]error, 2)
	var wg sync.WaitGroup
	wg.Go(func() { // verified stream over a
		defer func() { failed.Store(errs[0] != nil) }()
		for i := 0; !stop.Load(); i++ {
			p := uint64(i % cfg.Pages)
			v := uint64(i%3) << 32 // a few distinct values: KSM merges the rest
			if err := dev.Write64(a+p*PageSize, v); err != nil {
				errs[0] = err
				return
			}
			got, err := dev.Read64(a + p*PageSize)
			if err != nil {
				errs[0] = err
				return
			}
			if got != v {
				errs[0] = fmt.Errorf("iommu demo: %v: DMA read %#x at page %d, wrote %#x", mode, got, p, v)
				return
			}
			checked.Add(1)
		}
	})
	wg.Go(func() { // unverified stream over b: faults while unmapped are expected
		for i := 0; !stop.Load(); i++ {
			va := b + uint64(i%cfg.Pages)*PageSize
			if i%2 == 0 {
				_ = dev.Write64(va, uint64(i))
			} else {
				_, _ = dev.Read64(va)
			}
		}
	})
	var hostErr error
	rounds := cfg.Rounds
	if mode != ModeSecondaryTLBs {
		rounds *= 10 // until the checker catches it
	}
	for r := 0; r < rounds; r++ {
		mr.HostRounds = r + 1
		// Let the device run between changes, so every change lands on
		// translations in use.
		for seen := dev.Stats().DMA; dev.Stats().DMA < seen+8 && !failed.Load(); {
			runtime.Gosched()
		}
		switch r % 4 {
		case 0:
			if hostErr = mm.Munmap(b, size); hostErr == nil {
				_, hostErr = mm.Mmap(b, size, rw, flags)
			}
		case 1:
			if hostErr = mm.Mprotect(b, size, gomm.ProtRead); hostErr == nil {
				hostErr = mm.Mprotect(b, size, rw)
			}
		case 2:
			_, _ = mm.MovePages([]uint64{a + uint64(r%cfg.Pages)*PageSize}) // busy pages stay
		default:
			m.KSMScan(cfg.Pages)
		}
		if _, n := m.Violations(); hostErr != nil || n > 0 && mode != ModeSecondaryTLBs {
			break
		}
	}
	stop.Store(true)
	wg.Wait()
	mr.Device = dev.Stats()
	mr.Checked = checked.Load()
	viol, n := m.Violations()
	mr.Violations = n
	if n > 0 {
		mr.First = viol[0].String()
	}
	if err := errors.Join(dev.Unbind(), hostErr); err != nil {
		return mr, err
	}
	if err := mm.Exit(); err != nil {
		return mr, err
	}
	if mode == ModeSecondaryTLBs {
		if err := errs[0]; err != nil {
			return mr, err
		}
	}
	return mr, nil
}

func printReport(w io.Writer, rep DemoReport) {
	fmt.Fprintln(w, "SVA device: DMA through the CPU page table while the host munmaps, mprotects, migrates and merges")
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "flush point\tDMA\tverified\tIOTLB hits\tmisses\tpage requests\tflushes\thost rounds\tviolations\t")
	for _, mr := range rep.Modes {
		d := mr.Device
		fmt.Fprintf(tw, "%v\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t\n", mr.Mode, d.DMA, mr.Checked, d.Hits, d.Misses,
			d.PageRequests, d.Flushes, mr.HostRounds, mr.Violations)
	}
	tw.Flush()
	for _, mr := range rep.Modes {
		if mr.First != "" {
			fmt.Fprintf(w, "\n%v, first violation:\n  %s\n", mr.Mode, mr.First)
		}
	}
}
