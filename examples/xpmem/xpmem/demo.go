package xpmem

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/gomm-dev/gomm"
)

// DemoConfig sizes the demo. Zero fields take the defaults.
type DemoConfig struct {
	Pages   int           // pages in each half of the segment; default 64
	Rounds  int           // exporter churn rounds; default 300
	Latency time.Duration // one-way interconnect latency; default 20µs
}

// DemoReport is what the demo measured.
type DemoReport struct {
	Segment    Stats
	Verified   uint64 // importer reads checked against the exporter's data
	Swapped    uint64
	Violations int
}

// RunDemo exports a segment whose first half the exporter only reclaims
// and migrates (its contents stay, so every importer read of it is
// checked) and whose second half it keeps unmapping and remapping, while
// an importer on the far side of a slow link reads both. It writes a
// table of figures to w.
func RunDemo(w io.Writer, cfg DemoConfig) (DemoReport, error) {
	if cfg.Pages == 0 {
		cfg.Pages = 64
	}
	if cfg.Rounds == 0 {
		cfg.Rounds = 300
	}
	if cfg.Latency == 0 {
		cfg.Latency = 20 * time.Microsecond
	}
	var rep DemoReport
	if cfg.Pages < 1 || cfg.Rounds < 1 || cfg.Latency < 0 {
		return rep, fmt.Errorf("xpmem demo: %+v: %w", cfg, gomm.ErrInvalid)
	}
	m, err := gomm.NewMachine(gomm.Config{Frames: 4 * cfg.Pages, CPUs: 1, SwapSlots: 4 * cfg.Pages, Check: true})
	if err != nil {
		return rep, err
	}
	mm := m.NewMM()
	half := uint64(cfg.Pages) * PageSize
	const rw = gomm.ProtRead | gomm.ProtWrite
	flags := gomm.MapPrivate | gomm.MapAnonymous | gomm.MapFixed
	base, err := mm.Mmap(0x1000_0000, 2*half, rw, flags)
	if err != nil {
		return rep, err
	}
	for p := range uint64(cfg.Pages) {
		if _, err := mm.WriteAt(le64(pattern(p)), base+p*PageSize); err != nil {
			return rep, err
		}
	}
	seg, err := Export(context.Background(), m, mm, base, 2*half, NewLink(cfg.Latency))
	if err != nil {
		return rep, err
	}
	var stop atomic.Bool
	var verified atomic.Uint64
	var readErr error
	var readerDone atomic.Bool // set when the reader stops, on an error or at the end
	var wg sync.WaitGroup
	wg.Go(func() {
		defer readerDone.Store(true)
		for i := 0; !stop.Load(); i++ {
			p := uint64(i % cfg.Pages)
			v, err := seg.Read64(p * PageSize)
			if err == nil && v != pattern(p) {
				err = fmt.Errorf("xpmem demo: importer read %#x at page %d, exporter wrote %#x", v, p, pattern(p))
			}
			if err != nil {
				readErr = err
				return
			}
			verified.Add(1)
			_, _ = seg.Read64(half + p*PageSize) // may be unmapped: only the checker judges
		}
	})
	var hostErr error
	for r := 0; r < cfg.Rounds && hostErr == nil && !readerDone.Load(); r++ {
		for seen := seg.Stats().Reads; seg.Stats().Reads < seen+4 && !readerDone.Load(); {
			runtime.Gosched()
		}
		switch r % 3 {
		case 0:
			if hostErr = mm.Munmap(base+half, half); hostErr == nil {
				_, hostErr = mm.Mmap(base+half, half, rw, flags)
			}
		case 1:
			m.Reclaim(cfg.Pages / 2)
		default:
			_, _ = mm.MovePages([]uint64{base + uint64(r%cfg.Pages)*PageSize})
		}
	}
	stop.Store(true)
	wg.Wait()
	rep.Segment = seg.Stats()
	rep.Verified = verified.Load()
	rep.Swapped = m.Stats().Reclaim.SwappedOut
	if err := errors.Join(readErr, hostErr, seg.Close(), mm.Exit()); err != nil {
		return rep, err
	}
	viol, n := m.Violations()
	rep.Violations = n
	printReport(w, cfg, rep)
	if n > 0 {
		return rep, fmt.Errorf("xpmem demo: %d checker violations; first: %v", n, viol[0])
	}
	return rep, nil
}

func pattern(p uint64) uint64 { return 0x78706d656d000000 | p }

func le64(v uint64) []byte {
	b := make([]byte, 8)
	for i := range b {
		b[i] = byte(v >> (8 * i))
	}
	return b
}

func printReport(w io.Writer, cfg DemoConfig, rep DemoReport) {
	s := rep.Segment
	fmt.Fprintf(w, "XPMEM: %d-page segment exported across a %v link, %d exporter rounds\n\n", 2*cfg.Pages, cfg.Latency, cfg.Rounds)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	row := func(what string, v any, note string) { fmt.Fprintf(tw, "%s\t%v\t  %s\n", what, v, note) }
	row("importer reads", s.Reads, "")
	row("verified", rep.Verified, "reads of the stable half checked against the exporter's data")
	row("fault requests", s.FaultRequests, "importer misses sent over the link")
	row("retried look-ups", s.Retried, "exporter look-ups an invalidation in progress overlapped")
	row("discarded answers", s.Discarded, "answers an invalidation overtook on the wire")
	row("invalidations", s.Invalidations, "sent by the exporter, each acknowledged before it went on")
	row("pages swapped", rep.Swapped, "exporter pages reclaimed under the importer")
	lat := slices.Sorted(slices.Values(s.Latencies))
	if len(lat) > 0 {
		q := func(f float64) time.Duration { return lat[int(f*float64(len(lat)-1))].Round(time.Microsecond) }
		row("ack latency p50", q(0.5), "start callback to acknowledgement (two link crossings)")
		row("ack latency p99", q(0.99), "")
		row("ack latency max", lat[len(lat)-1].Round(time.Microsecond), "")
	}
	row("violations", rep.Violations, "stale importer mappings the checker found")
	tw.Flush()
}
