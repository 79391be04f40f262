package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/tlb"
)

// stressConfig is what the stress command's flags set.
type stressConfig struct {
	Duration time.Duration
	CPUs     int
	Procs    int    // processes to keep alive
	RAMMiB   int    // RAM; swap is twice as big
	Seed     uint64 // 0: from the clock
	Drivers  []string
	Inject   float64 // allocation failure rate
	JSON     bool
}

var driverNames = []string{"kvm", "gru", "iommu", "xpmem", "hmm"}

func parseStressFlags(args []string, stderr io.Writer) (stressConfig, error) {
	cfg := stressConfig{}
	fs := flag.NewFlagSet("gomm stress", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.DurationVar(&cfg.Duration, "duration", 20*time.Second, "how long to run")
	fs.IntVar(&cfg.CPUs, "cpus", 4, "simulated CPUs (each runs processes on a goroutine of its own)")
	fs.IntVar(&cfg.Procs, "procs", 8, "processes to keep alive (they fork and exit around this)")
	fs.IntVar(&cfg.RAMMiB, "ram", 24, "RAM in MiB; swap is twice as much")
	fs.Uint64Var(&cfg.Seed, "seed", 0, "random seed (0: pick one and print it); a run is reproducible from its seed as far as scheduling allows")
	drivers := fs.String("drivers", strings.Join(driverNames, ","), "example drivers to attach, comma-separated, or 'none'")
	fs.Float64Var(&cfg.Inject, "inject", 0.001, "rate at which frame, swap-slot and page-table allocations fail (0 to 1)")
	fs.BoolVar(&cfg.JSON, "json", false, "print the final report as JSON instead of a table")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: gomm stress [flags]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return cfg, errUsage
		}
		return cfg, errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "gomm stress: unexpected argument %q\n", fs.Arg(0))
		return cfg, errUsage
	}
	bad := func(format string, a ...any) (stressConfig, error) {
		fmt.Fprintf(stderr, "gomm stress: "+format+"\n", a...)
		return cfg, errUsage
	}
	switch {
	case cfg.Duration <= 0:
		return bad("-duration must be positive")
	case cfg.CPUs < 1 || cfg.CPUs > 64:
		return bad("-cpus must be 1 to 64")
	case cfg.Procs < 1 || cfg.Procs > 256:
		return bad("-procs must be 1 to 256")
	case cfg.RAMMiB < 16 || cfg.RAMMiB > 4096:
		return bad("-ram must be 16 to 4096 (MiB)")
	case !(cfg.Inject >= 0 && cfg.Inject <= 0.5):
		return bad("-inject must be 0 to 0.5")
	}
	if *drivers != "none" && *drivers != "" {
		for _, d := range strings.Split(*drivers, ",") {
			d = strings.TrimSpace(d)
			if !slices.Contains(driverNames, d) {
				return bad("unknown driver %q (have %s)", d, strings.Join(driverNames, ", "))
			}
			if !slices.Contains(cfg.Drivers, d) {
				cfg.Drivers = append(cfg.Drivers, d)
			}
		}
	}
	if cfg.Seed == 0 {
		cfg.Seed = uint64(time.Now().UnixNano())
	}
	return cfg, nil
}

func stressCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseStressFlags(args, stderr)
	if err != nil {
		return err
	}
	rep, err := stress(ctx, cfg, newProgress(stderr, cfg.Duration))
	if err != nil {
		return err
	}
	if cfg.JSON {
		err = rep.writeJSON(stdout)
	} else {
		rep.writeTable(stdout)
	}
	if err != nil {
		return err
	}
	if !rep.Passed {
		return errors.New("stress run failed: " + rep.Verdict)
	}
	return nil
}

// world is one stress run: the machine, its processes, its drivers and
// agents, and what they count.
type world struct {
	cfg    stressConfig
	m      *gomm.Machine
	files  []*sharedObj
	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex // protects procs, nextID
	procs  []*proc    // live processes
	nextID int

	runq chan *proc // runnable processes, each owned by whichever CPU takes it

	ops      [numOps]atomic.Uint64
	noMem    [numOps]atomic.Uint64 // operations that failed for want of memory, as allowed
	checks   atomic.Uint64         // values read back and compared
	migrated atomic.Uint64
	notify   notifyStats

	failOnce sync.Once
	failure  string // first failure's full context; set once
	failed   atomic.Bool
}

// fail records the first failure (wrong data, an unexpected error, a
// violation) and stops the run.
func (w *world) fail(format string, a ...any) {
	w.failOnce.Do(func() {
		w.failure = fmt.Sprintf(format, a...)
		w.failed.Store(true)
		w.cancel()
	})
}

func (w *world) done() bool { return w.ctx.Err() != nil }

// stress runs the workload described by cfg and reports.
func stress(parent context.Context, cfg stressConfig, prog progress) (*report, error) {
	w, err := newWorld(parent, cfg)
	if err != nil {
		return nil, err
	}
	return w.run(prog)
}

// newWorld builds the machine, the files and the first processes.
func newWorld(parent context.Context, cfg stressConfig) (*world, error) {
	w := &world{cfg: cfg}
	frames := cfg.RAMMiB << 8
	m, err := gomm.NewMachine(gomm.Config{
		Frames: frames, CPUs: cfg.CPUs, SwapSlots: 2 * frames, Check: true,
		Inject:         gomm.Injection{Rate: cfg.Inject, Seed: cfg.Seed},
		NotifierTracer: w.notify.trace,
	})
	if err != nil {
		return nil, err
	}
	w.m = m
	m.OnViolation(func(v gomm.Violation) { w.fail("checker violation: %v\nfound at:\n%s", v, v.Stack) })
	for range 4 {
		obj, err := newFileObj(m, filePages)
		if err != nil {
			return nil, err
		}
		w.files = append(w.files, obj)
	}
	w.ctx, w.cancel = context.WithTimeout(parent, cfg.Duration)
	w.runq = make(chan *proc, 4*cfg.Procs+cfg.CPUs)
	for range cfg.Procs {
		w.spawn(m.NewMM(), nil)
	}
	return w, nil
}

// run runs the world until its time is up or it fails, and reports.
func (w *world) run(prog progress) (*report, error) {
	defer w.cancel()
	cfg := w.cfg
	start := time.Now()
	var wg sync.WaitGroup
	for i := range cfg.CPUs {
		wg.Go(func() { w.runCPU(i) })
	}
	var agents sync.WaitGroup
	agents.Go(w.kswapd)
	agents.Go(w.ksmd)
	agents.Go(w.migrator)
	drivers, err := w.startDrivers()
	if err != nil {
		w.cancel()
		wg.Wait()
		agents.Wait()
		return nil, err
	}
	ticker := time.NewTicker(250 * time.Millisecond)
	for loop := true; loop; {
		select {
		case <-w.ctx.Done():
			loop = false
		case <-ticker.C:
			prog.update(time.Since(start), w.progressLine(time.Since(start)))
		}
	}
	ticker.Stop()
	elapsed := time.Since(start)
	prog.finish()

	// Wind down: devices detach first (their drivers must not outlive
	// their MMs' mappings), then the CPUs and agents stop, then every
	// process exits and what is left is checked.
	drivers.stop()
	wg.Wait()
	agents.Wait()
	rep := w.finish(elapsed, drivers)
	return rep, nil
}

// spawn adds a process (new, or a fork child with its parent's model).
func (w *world) spawn(mm *gomm.MM, parent *proc) *proc {
	w.mu.Lock()
	w.nextID++
	p := &proc{id: w.nextID, mm: mm, task: mm.NewTask(fmt.Sprintf("p%d", w.nextID)), w: w}
	p.rng = rand.New(rand.NewPCG(w.cfg.Seed, uint64(p.id)))
	if parent != nil {
		p.regions = parent.forkRegions()
	}
	w.procs = append(w.procs, p)
	w.mu.Unlock()
	w.runq <- p
	return p
}

// liveProcs returns how many processes are alive.
func (w *world) liveProcs() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.procs)
}

// retire takes p off the list of live processes unless a device is
// attached to it; false means it must live on.
func (w *world) retire(p *proc) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if p.pins > 0 || len(w.procs) <= 1 {
		return false
	}
	i := slices.Index(w.procs, p)
	w.procs = slices.Delete(w.procs, i, i+1)
	return true
}

// pinRandom picks a live process for a device to attach to and keeps it
// alive until unpin.
func (w *world) pinRandom(rng *rand.Rand) *proc {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.procs) == 0 {
		return nil
	}
	p := w.procs[rng.IntN(len(w.procs))]
	p.pins++
	return p
}

func (w *world) unpin(p *proc) {
	w.mu.Lock()
	p.pins--
	w.mu.Unlock()
}

// runCPU is one CPU: it takes a runnable process, switches to it, runs a
// slice of its work, and puts it back, as a scheduler would.
func (w *world) runCPU(i int) {
	cpu := w.m.CPU(i)
	idle := tlb.NewKernelThread(fmt.Sprintf("idle/%d", i))
	defer cpu.Switch(idle)
	for !w.done() {
		var p *proc
		select {
		case p = <-w.runq:
		case <-w.ctx.Done():
			return
		}
		if !p.running.CompareAndSwap(false, true) {
			panic(fmt.Sprintf("process %d run twice", p.id))
		}
		cpu.Switch(p.task)
		alive := p.runSlice(cpu, 64)
		// Switch away before anyone else can take p (the kernel clears
		// on_cpu only in finish_task_switch): a CPU waiting on the run
		// queue must not still run p's task while another CPU runs p,
		// or exits it and frees its mm.
		cpu.Switch(idle)
		p.running.Store(false)
		if !alive {
			if err := p.mm.Exit(); err != nil {
				w.fail("exit of process %d: %v", p.id, err)
			}
			continue
		}
		w.runq <- p
	}
}

// kswapd reclaims in the background whenever free memory is below an
// eighth of RAM.
func (w *world) kswapd() {
	frames := w.m.RAM().Frames()
	for !w.done() {
		if w.m.RAM().Stats().Free < frames/8 {
			w.m.Reclaim(256)
			w.ops[opReclaim].Add(1)
			continue
		}
		sleep(w.ctx, time.Millisecond)
	}
}

// ksmd scans mergeable memory.
func (w *world) ksmd() {
	for !w.done() {
		w.m.KSMScan(256)
		w.ops[opKSMScan].Add(1)
		sleep(w.ctx, 2*time.Millisecond)
	}
}

// migrator moves random pages of random processes (as compaction or
// NUMA balancing would).
func (w *world) migrator() {
	rng := rand.New(rand.NewPCG(w.cfg.Seed, 1<<40))
	for !w.done() {
		p := w.pinRandom(rng)
		if p == nil {
			sleep(w.ctx, time.Millisecond)
			continue
		}
		var addrs []uint64
		for _, v := range p.mm.VMAs() {
			for range 4 {
				addrs = append(addrs, v.Start+rng.Uint64N((v.End-v.Start)/gomm.PageSize)*gomm.PageSize)
			}
		}
		n, err := p.mm.MovePages(addrs)
		w.unpin(p)
		w.migrated.Add(uint64(n))
		w.ops[opMigrate].Add(1)
		if err != nil && !errors.Is(err, gomm.ErrFault) && !errors.Is(err, gomm.ErrBusy) && !errors.Is(err, gomm.ErrNoMem) {
			w.fail("move_pages: %v", err)
		}
		sleep(w.ctx, time.Millisecond)
	}
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}
