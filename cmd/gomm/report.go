package main

import (
	"encoding/json"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/notifier"
)

// opKind is a kind of operation the run counts.
type opKind int

const (
	opLoad opKind = iota
	opStore
	opSyscallIO
	opFileWrite
	opMmap
	opMunmap
	opMprotect
	opMadvise
	opMremap
	opMlock
	opFork
	opExit
	opDeviceChurn
	opReclaim
	opKSMScan
	opMigrate
	opValue // values handed out; not an operation
	numOps
)

var opNames = [numOps]string{
	"load", "store", "ReadAt/WriteAt", "file write", "mmap", "munmap", "mprotect", "madvise", "mremap",
	"mlock/munlock", "fork", "exit", "device buffer churn", "reclaim batch", "KSM scan", "move_pages", "",
}

func (k opKind) String() string { return opNames[k] }

// notifyStats is the run's notifier tracer: calls by callback, and the
// latency of each driver's invalidations.
type notifyStats struct {
	calls   [notifier.NumCallbacks]atomic.Uint64
	refused atomic.Uint64
	byType  sync.Map // reflect.Type -> *latencyHistogram
}

// trace is the machine's notifier.Tracer.
func (n *notifyStats) trace(c notifier.Call) {
	n.calls[c.Callback].Add(1)
	if c.Refused {
		n.refused.Add(1)
	}
	switch c.Callback {
	case notifier.CallInvalidateRangeStart, notifier.CallInvalidateSecondaryTLBs, notifier.CallIntervalInvalidate:
	default:
		return
	}
	t := reflect.TypeOf(c.Subscriber)
	h, ok := n.byType.Load(t)
	if !ok {
		h, _ = n.byType.LoadOrStore(t, new(latencyHistogram))
	}
	h.(*latencyHistogram).record(c.Took)
}

// driverOf names the example driver a subscriber type belongs to, from
// its package path (examples/NAME/NAME).
func driverOf(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	path := t.PkgPath()
	for _, d := range driverNames {
		if strings.HasSuffix(path, "/examples/"+d+"/"+d) {
			return d
		}
	}
	return t.String()
}

// report is the run's result.
type report struct {
	Seed     uint64        `json:"seed"`
	Elapsed  time.Duration `json:"elapsed_ns"`
	CPUs     int           `json:"cpus"`
	RAMMiB   int           `json:"ram_mib"`
	Procs    int           `json:"procs_target"`
	Drivers  []string      `json:"drivers"`
	InjectAt float64       `json:"inject_rate"`

	Ops             []opCount         `json:"ops"`
	ProcsCreated    int               `json:"processes_created"`
	Faults          uint64            `json:"cpu_faults"`
	TLB             tlbFigures        `json:"tlb"`
	NotifierCalls   map[string]uint64 `json:"notifier_calls"`
	NotifierRefused uint64            `json:"notifier_refused"`
	Latency         []driverLatency   `json:"invalidation_latency"`
	Devices         []deviceFigures   `json:"devices"`
	Memory          memoryFigures     `json:"memory"`
	Injected        gomm.InjectStats  `json:"injected"`
	NoMem           uint64            `json:"operations_out_of_memory"`
	ContentChecks   uint64            `json:"content_checks"`
	InvariantChecks uint64            `json:"invariant_checks"`
	Violations      int               `json:"violations"`
	Leaks           []string          `json:"leaks,omitempty"`
	Passed          bool              `json:"passed"`
	Verdict         string            `json:"verdict"`
	Failure         string            `json:"first_failure,omitempty"`
}

type opCount struct {
	Kind   string  `json:"kind"`
	Count  uint64  `json:"count"`
	PerSec float64 `json:"per_sec"`
	NoMem  uint64  `json:"out_of_memory"`
}

type tlbFigures struct {
	FlushRequests, IPIs, LazySkipped, FullFlushes, PartialFlushes, Hits, Misses, ContextSwitches uint64
}

type driverLatency struct {
	Driver string         `json:"driver"`
	Lat    latencySummary `json:"latency"`
}

type deviceFigures struct {
	Driver   string `json:"driver"`
	Attaches uint64 `json:"attaches"`
	Ops      uint64 `json:"ops"`
	Checks   uint64 `json:"checks"`
	NoMem    uint64 `json:"out_of_memory"`
	Expected uint64 `json:"expected_errors"`
}

type memoryFigures struct {
	SwappedOut, SwappedIn, KSMMerges, Migrated, DeviceMigrated uint64
	ReclaimFreed, THPFaults, THPSplits                         uint64
}

// finish exits every process, checks what must hold of a quiet machine,
// and builds the report. Called when nothing else runs.
func (w *world) finish(elapsed time.Duration, ds *driverSet) *report {
	m := w.m
	rep := &report{Seed: w.cfg.Seed, Elapsed: elapsed, CPUs: w.cfg.CPUs, RAMMiB: w.cfg.RAMMiB, Procs: w.cfg.Procs,
		Drivers: w.cfg.Drivers, InjectAt: w.cfg.Inject}
	_ = m.SetInjection(gomm.Injection{}) // teardown is not under test

	w.mu.Lock()
	procs := slices.Clone(w.procs)
	rep.ProcsCreated = w.nextID
	w.mu.Unlock()
	mms := make([]*gomm.MM, len(procs))
	for i, p := range procs {
		mms[i] = p.mm
	}
	if !w.failed.Load() {
		if err := m.CheckRmap(mms...); err != nil {
			w.fail("reverse maps after the run: %v", err)
		}
	}
	for _, p := range procs {
		if n := p.mm.Notifiers().ContractViolations(); n > 0 {
			w.fail("process %d: %d blockable invalidations failed", p.id, n)
		}
		if err := p.mm.Exit(); err != nil {
			w.fail("exit of process %d: %v", p.id, err)
		}
	}
	st := m.Stats()
	hmmInUse := 0
	if ds.hmm != nil {
		hmmInUse = ds.hmm.Pagemap().InUse()
	}
	for _, f := range w.files {
		_ = f.file.Truncate(0)
	}
	// A swap-cache page whose last entry went while it was locked stays
	// until reclaim finds it, as in Linux: that is not a leak.
	for range 3 {
		m.Reclaim(m.RAM().Frames())
	}
	st = m.Stats()
	if free := st.RAM.Free; free != m.RAM().Frames()-1 {
		rep.Leaks = append(rep.Leaks, fmt.Sprintf("%d frames not free after every exit", m.RAM().Frames()-1-free))
	}
	if st.Swap.Used != 0 {
		rep.Leaks = append(rep.Leaks, fmt.Sprintf("%d swap slots used after every exit", st.Swap.Used))
	}
	if hmmInUse != 0 {
		rep.Leaks = append(rep.Leaks, fmt.Sprintf("%d device pages in use after every exit", hmmInUse))
	}

	secs := elapsed.Seconds()
	for k := range opValue {
		n := w.ops[k].Load()
		rep.Ops = append(rep.Ops, opCount{Kind: k.String(), Count: n, PerSec: float64(n) / secs, NoMem: w.noMem[k].Load()})
		rep.NoMem += w.noMem[k].Load()
	}
	rep.Faults = st.TLB.Faults
	rep.TLB = tlbFigures{st.TLB.FlushRequests, st.TLB.IPIs, st.TLB.LazySkipped, st.TLB.FullFlushes, st.TLB.PartialFlushes,
		st.TLB.Hits, st.TLB.Misses, st.TLB.ContextSwitches}
	rep.NotifierCalls = map[string]uint64{}
	for c := range notifier.NumCallbacks {
		rep.NotifierCalls[notifier.Callback(c).String()] = w.notify.calls[c].Load()
	}
	rep.NotifierRefused = w.notify.refused.Load()
	w.notify.byType.Range(func(k, v any) bool {
		rep.Latency = append(rep.Latency, driverLatency{Driver: driverOf(k.(reflect.Type)), Lat: v.(*latencyHistogram).summary()})
		return true
	})
	slices.SortFunc(rep.Latency, func(a, b driverLatency) int { return strings.Compare(a.Driver, b.Driver) })
	for _, s := range ds.stats {
		rep.Devices = append(rep.Devices, deviceFigures{s.name, s.attaches.Load(), s.ops.Load(), s.checks.Load(), s.noMem.Load(), s.expectedErrs.Load()})
	}
	rep.Memory = memoryFigures{SwappedOut: st.Swap.Outs, SwappedIn: st.Swap.Ins, KSMMerges: m.KSMStats().Merges,
		Migrated: w.migrated.Load(), ReclaimFreed: st.Reclaim.Freed, THPFaults: st.THP.FaultAlloc, THPSplits: st.THP.SplitPMD}
	if ds.hmm != nil {
		hs := ds.hmm.Stats()
		rep.Memory.DeviceMigrated = hs.ToDevice + hs.ToRAM
	}
	rep.Injected = st.Injected
	rep.ContentChecks = w.checks.Load()
	rep.InvariantChecks = st.Checks
	_, rep.Violations = m.Violations()

	rep.Failure = w.failure
	switch {
	case w.failed.Load():
		rep.Verdict = "FAIL: " + firstLine(w.failure)
	case rep.Violations > 0:
		rep.Verdict = fmt.Sprintf("FAIL: %d checker violations", rep.Violations)
	case len(rep.Leaks) > 0:
		rep.Verdict = "FAIL: " + strings.Join(rep.Leaks, "; ")
	default:
		rep.Passed = true
		rep.Verdict = fmt.Sprintf("PASS: %d values checked, %d invariant checks, 0 violations", rep.ContentChecks, rep.InvariantChecks)
	}
	return rep
}

func firstLine(s string) string {
	first, _, _ := strings.Cut(s, "\n")
	return first
}

func (r *report) writeJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func (r *report) writeTable(out io.Writer) {
	p := func(format string, a ...any) { fmt.Fprintf(out, format, a...) }
	p("gomm stress: %v on %d CPUs, %d MiB RAM, %d processes (%d created), drivers %s, injection %g, seed %d\n\n",
		r.Elapsed.Round(time.Millisecond), r.CPUs, r.RAMMiB, r.Procs, r.ProcsCreated, orNone(r.Drivers), r.InjectAt, r.Seed)

	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "operation\tcount\tper second\tout of memory\t")
	var total uint64
	for _, o := range r.Ops {
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%d\t\n", o.Kind, o.Count, o.PerSec, o.NoMem)
		total += o.Count
	}
	fmt.Fprintf(tw, "all\t%d\t%.0f\t%d\t\n", total, float64(total)/r.Elapsed.Seconds(), r.NoMem)
	tw.Flush()

	p("\nCPUs: %d faults, %d TLB hits, %d misses, %d context switches\n", r.Faults, r.TLB.Hits, r.TLB.Misses, r.TLB.ContextSwitches)
	p("TLB shootdowns: %d flush requests, %d IPIs (%d lazy CPUs skipped), %d full and %d partial flushes\n",
		r.TLB.FlushRequests, r.TLB.IPIs, r.TLB.LazySkipped, r.TLB.FullFlushes, r.TLB.PartialFlushes)

	p("\nmmu notifier calls by callback (%d non-blockable starts refused):\n", r.NotifierRefused)
	tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	for c := range notifier.NumCallbacks {
		name := notifier.Callback(c).String()
		fmt.Fprintf(tw, "  %s\t%d\t\n", name, r.NotifierCalls[name])
	}
	tw.Flush()

	if len(r.Latency) > 0 {
		p("\ninvalidation latency per driver (time inside the driver's callback):\n")
		tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "  driver\tcalls\tmean\tp50\tp90\tp99\tmax\t")
		for _, l := range r.Latency {
			s := l.Lat
			fmt.Fprintf(tw, "  %s\t%d\t%v\t%v\t%v\t%v\t%v\t\n", l.Driver, s.Count, short(s.Mean), short(s.P50), short(s.P90), short(s.P99), short(s.Max))
		}
		tw.Flush()
	}
	if len(r.Devices) > 0 {
		p("\ndevices:\n")
		tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "  driver\tattaches\taccesses\tvalues checked\tout of memory\texpected errors\t")
		for _, d := range r.Devices {
			fmt.Fprintf(tw, "  %s\t%d\t%d\t%d\t%d\t%d\t\n", d.Driver, d.Attaches, d.Ops, d.Checks, d.NoMem, d.Expected)
		}
		tw.Flush()
	}
	mem := r.Memory
	p("\nmemory: %d pages swapped out, %d in; %d merged by KSM; %d migrated by move_pages, %d to and from device memory;\n",
		mem.SwappedOut, mem.SwappedIn, mem.KSMMerges, mem.Migrated, mem.DeviceMigrated)
	p("        %d frames reclaimed; %d huge pages faulted, %d split\n", mem.ReclaimFreed, mem.THPFaults, mem.THPSplits)
	p("fault injection: %d allocation failures injected (%d frames, %d swap slots, %d page tables); %d operations ended out of memory, as allowed\n",
		r.Injected.Total(), r.Injected.Frames, r.Injected.SwapSlots, r.Injected.PageTables, r.NoMem)
	p("checks: %d values read back and compared, %d invariant checks, %d violations\n", r.ContentChecks, r.InvariantChecks, r.Violations)
	for _, l := range r.Leaks {
		p("leak: %s\n", l)
	}
	p("\n%s\n", r.Verdict)
	if r.Failure != "" {
		p("\nfirst failure, in full:\n%s\n", r.Failure)
	}
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ",")
}

// short rounds a duration for a table.
func short(d time.Duration) time.Duration {
	switch {
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	case d >= time.Microsecond:
		return d.Round(10 * time.Nanosecond)
	}
	return d
}

// progressLine is the one-line state of the run.
func (w *world) progressLine(elapsed time.Duration) string {
	var total uint64
	for k := range opValue {
		total += w.ops[k].Load()
	}
	_, viol := w.m.Violations()
	st := w.m.Stats()
	return fmt.Sprintf("%d procs, %d ops (%.0f/s), %d MiB free, %d swapped, %d checked, %d injected, %d violations",
		w.liveProcs(), total, float64(total)/elapsed.Seconds(), st.RAM.Free>>8, st.Swap.Outs, w.checks.Load(), st.Injected.Total(), viol)
}
