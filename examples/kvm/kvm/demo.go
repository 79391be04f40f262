package kvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/gomm-dev/gomm"
)

// DemoConfig sizes the demo. Zero fields take the defaults.
type DemoConfig struct {
	RAMPages   int // host RAM in pages; default 2048 (8 MiB)
	GuestPages int // guest memory in pages; default twice the RAM
	VCPUs      int // default 2
	Rounds     int // passes of the workload over guest memory; default 3
}

// DemoReport is what the demo measured.
type DemoReport struct {
	VM            Stats
	GuestAccesses uint64 // guest loads and stores, all verified
	Swapped       uint64 // guest pages the host swapped out
	Merged        uint64 // guest pages KSM merged into another
	Violations    int    // checker violations: 0
	Elapsed       time.Duration
}

// content is what the workload stores in word 0 of guest page p in round
// r: three pages in four hold the same value in a round, so KSM has
// something to merge; the fourth is unique.
func content(p, r int) uint64 {
	if p%4 != 0 {
		return 0x6b766d00 | uint64(r)
	}
	return uint64(p)<<16 | uint64(r)<<1 | 1
}

// RunDemo runs a guest whose memory is larger than the host's RAM: each
// vCPU checks and rewrites its share of guest memory, round after round,
// while host reclaim swaps guest pages out under it and KSM merges the
// identical ones. Every guest load is checked against what the guest
// stored, and the machine's checker verifies every frame free against
// the shadow table. It writes a table of figures to w.
func RunDemo(w io.Writer, cfg DemoConfig) (DemoReport, error) {
	if cfg.RAMPages == 0 {
		cfg.RAMPages = 2048
	}
	if cfg.GuestPages == 0 {
		cfg.GuestPages = 2 * cfg.RAMPages
	}
	if cfg.VCPUs == 0 {
		cfg.VCPUs = 2
	}
	if cfg.Rounds == 0 {
		cfg.Rounds = 3
	}
	var rep DemoReport
	if cfg.RAMPages < 256 || cfg.GuestPages < cfg.VCPUs || cfg.VCPUs < 1 || cfg.Rounds < 1 {
		return rep, fmt.Errorf("kvm demo: %+v: %w", cfg, gomm.ErrInvalid)
	}
	m, err := gomm.NewMachine(gomm.Config{Frames: cfg.RAMPages, CPUs: 1, SwapSlots: 2 * cfg.GuestPages, Check: true})
	if err != nil {
		return rep, err
	}
	mm := m.NewMM()
	size := uint64(cfg.GuestPages) * PageSize
	hva, err := mm.Mmap(0, size, gomm.ProtRead|gomm.ProtWrite, gomm.MapPrivate|gomm.MapAnonymous)
	if err == nil {
		err = mm.Madvise(hva, size, gomm.MadvMergeable)
	}
	if err != nil {
		return rep, err
	}
	vm, err := New(context.Background(), m, mm)
	if err != nil {
		return rep, err
	}
	if err := vm.SetMemslot(Memslot{GPA: 0, Size: size, HVA: hva}); err != nil {
		return rep, err
	}
	stopKSM := m.StartKSM(200*time.Microsecond, 128)

	start := time.Now()
	per := cfg.GuestPages / cfg.VCPUs
	errs := make([]error, cfg.VCPUs)
	accesses := make([]uint64, cfg.VCPUs)
	var wg sync.WaitGroup
	for c := range cfg.VCPUs {
		first, last := c*per, (c+1)*per
		if c == cfg.VCPUs-1 {
			last = cfg.GuestPages
		}
		wg.Go(func() { accesses[c], errs[c] = runVCPU(vm, first, last, cfg.Rounds) })
	}
	wg.Wait()
	stopKSM()
	rep.Elapsed = time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return rep, err
	}
	for _, n := range accesses {
		rep.GuestAccesses += n
	}
	// The guest's view at the end, read back once more after the
	// workload: every page holds the last round's value.
	for p := range cfg.GuestPages {
		v, err := vm.Load64(uint64(p) * PageSize)
		if err != nil {
			return rep, err
		}
		if want := content(p, cfg.Rounds-1); v != want {
			return rep, fmt.Errorf("kvm demo: guest page %d holds %#x, want %#x", p, v, want)
		}
	}
	rep.VM = vm.Stats()
	st := m.Stats()
	rep.Swapped = st.Reclaim.SwappedOut
	rep.Merged = m.KSMStats().Merges
	viol, n := m.Violations()
	rep.Violations = n
	if err := vm.Close(); err != nil {
		return rep, err
	}
	if err := mm.Exit(); err != nil {
		return rep, err
	}
	printReport(w, cfg, rep)
	if n > 0 {
		return rep, fmt.Errorf("kvm demo: %d checker violations; first: %v", n, viol[0])
	}
	return rep, nil
}

// runVCPU is one vCPU's guest code: each round, check every page of its
// share still holds what it stored last round, then store this round's.
func runVCPU(vm *VM, first, last, rounds int) (uint64, error) {
	var n uint64
	for r := range rounds {
		for p := first; p < last; p++ {
			gpa := uint64(p) * PageSize
			if r > 0 {
				v, err := vm.Load64(gpa)
				if err != nil {
					return n, err
				}
				if want := content(p, r-1); v != want {
					return n, fmt.Errorf("kvm demo: round %d: guest page %d holds %#x, want %#x", r, p, v, want)
				}
				n++
			}
			if err := vm.Store64(gpa, content(p, r)); err != nil {
				return n, err
			}
			n++
		}
	}
	return n, nil
}

func printReport(w io.Writer, cfg DemoConfig, rep DemoReport) {
	fmt.Fprintf(w, "fake KVM: %d vCPUs, %d MiB of guest memory on %d MiB of host RAM, %d rounds, %v\n\n",
		cfg.VCPUs, cfg.GuestPages*PageSize>>20, cfg.RAMPages*PageSize>>20, cfg.Rounds, rep.Elapsed.Round(time.Millisecond))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	row := func(what string, v any, note string) { fmt.Fprintf(tw, "%s\t%v\t  %s\n", what, v, note) }
	row("guest accesses", rep.GuestAccesses, "every load checked against the last store")
	row("guest faults", rep.VM.GuestFaults, "shadow misses resolved by GUP")
	row("retries", rep.VM.Retries, "faults that lost a race with an invalidation")
	row("invalidations", rep.VM.Invalidations, "InvalidateRangeStart calls")
	row("sptes zapped", rep.VM.Zapped, "shadow entries removed before the host changed them")
	row("pages swapped", rep.Swapped, "guest pages written to host swap")
	row("pages merged", rep.Merged, "guest pages KSM merged")
	row("GUP refs held", rep.VM.GUPHeld, "after the run: no page is pinned")
	row("violations", rep.Violations, "stale translations the checker found")
	tw.Flush()
}
