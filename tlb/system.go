package tlb

import (
	"fmt"
	"sync/atomic"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/check"
	"github.com/gomm-dev/gomm/physmem"
)

// Errors returned by tlb.
var (
	ErrInvalid = errno.ErrInvalid
	ErrFault   = errno.ErrFault
)

// LazyMode chooses how lazy CPUs keep the mm they borrowed alive, the two
// schemes of the 2022 lazy-TLB thread.
type LazyMode uint8

const (
	// LazyRefcount: a CPU that switches to a kernel thread takes an
	// mm_count reference on the mm it keeps loaded, and drops it when it
	// switches away (mmgrab_lazy_tlb / mmdrop_lazy_tlb). Two atomic
	// operations on a shared cache line per lazy switch.
	LazyRefcount LazyMode = iota
	// LazyShootdown: lazy CPUs take no reference; the final mmdrop sends
	// an IPI to every CPU in the mm's cpumask, and those still using the
	// mm lazily switch away (CONFIG_MMU_LAZY_TLB_SHOOTDOWN).
	LazyShootdown
)

func (m LazyMode) String() string {
	if m == LazyShootdown {
		return "shoot-lazies"
	}
	return "refcount"
}

// FlushCeiling is the number of pages above which a range flush flushes
// the whole mm instead (tlb_single_page_flush_ceiling, 33 on x86).
const FlushCeiling = 33

// FlushAll as the end of a range asks for a flush of the whole mm.
const FlushAll = ^uint64(0)

// Config configures a System.
type Config struct {
	CPUs int // number of CPUs, 1..256
	// TLBEntries is the number of 4 KiB entries per CPU: a power of two,
	// at least 4; 0 means DefaultTLBEntries. The TLB is 4-way set
	// associative with LRU replacement inside a set.
	TLBEntries int
	// HugeEntries is the number of 2 MiB entries per CPU, fully
	// associative with LRU; 0 means DefaultHugeEntries.
	HugeEntries int
	// Lazy chooses the lazy-TLB reference scheme.
	Lazy LazyMode
	// RAM is the memory CPUs load from and store to.
	RAM *physmem.Allocator
	// Checker, if not nil, gets every CPU registered as a cache.
	Checker *check.Checker
}

// Defaults.
const (
	DefaultTLBEntries  = 64
	DefaultHugeEntries = 8
	tlbWays            = 4
)

// MaxCPUs is the most CPUs a System may have.
const MaxCPUs = 256

// Stats are the System's counters.
type Stats struct {
	IPIs            uint64 // flush IPIs sent
	LazySkipped     uint64 // flush IPIs not sent because the CPU was lazy
	FullFlushes     uint64 // whole-mm flushes done by a CPU
	PartialFlushes  uint64 // range flushes done by a CPU
	PagesFlushed    uint64 // pages named by partial flushes, in the flush's stride (4 KiB or 2 MiB)
	FlushRequests   uint64 // FlushRange calls
	Hits, Misses    uint64 // TLB lookups
	Faults          uint64 // accesses that went to the fault handler
	CountOps        uint64 // atomic operations on mm_count (mmgrab/mmdrop, lazy or not)
	ShootdownIPIs   uint64 // IPIs of the final mmdrop in shoot-lazies mode
	MembarrierIPIs  uint64 // IPIs of membarrier
	ContextSwitches uint64
}

type stats struct {
	ipis, lazySkipped, fullFlushes, partialFlushes, pagesFlushed, flushRequests atomic.Uint64
	countOps, shootIPIs, membarrierIPIs, switches                               atomic.Uint64
}

// System is the set of simulated CPUs of a machine and the flush protocol
// between them (arch/x86/mm/tlb.c).
type System struct {
	cpus    []*CPU
	mode    LazyMode
	ram     *physmem.Allocator
	chk     *check.Checker
	nextCtx atomic.Uint64
	stats   stats
}

// NewSystem creates the CPUs, each running the idle kernel thread with no
// mm loaded.
func NewSystem(cfg Config) (*System, error) {
	if cfg.TLBEntries == 0 {
		cfg.TLBEntries = DefaultTLBEntries
	}
	if cfg.HugeEntries == 0 {
		cfg.HugeEntries = DefaultHugeEntries
	}
	switch {
	case cfg.CPUs < 1 || cfg.CPUs > MaxCPUs:
		return nil, fmt.Errorf("tlb: %d CPUs (1..%d): %w", cfg.CPUs, MaxCPUs, ErrInvalid)
	case cfg.TLBEntries < tlbWays || cfg.TLBEntries&(cfg.TLBEntries-1) != 0 || cfg.TLBEntries > 1<<16:
		return nil, fmt.Errorf("tlb: %d TLB entries (a power of two, %d..65536): %w", cfg.TLBEntries, tlbWays, ErrInvalid)
	case cfg.HugeEntries < 1 || cfg.HugeEntries > 1024:
		return nil, fmt.Errorf("tlb: %d huge TLB entries (1..1024): %w", cfg.HugeEntries, ErrInvalid)
	case cfg.Lazy > LazyShootdown:
		return nil, fmt.Errorf("tlb: lazy mode %d: %w", cfg.Lazy, ErrInvalid)
	case cfg.RAM == nil:
		return nil, fmt.Errorf("tlb: no RAM: %w", ErrInvalid)
	}
	s := &System{mode: cfg.Lazy, ram: cfg.RAM, chk: cfg.Checker}
	for i := range cfg.CPUs {
		c := &CPU{id: i, sys: s, curr: idleTask}
		c.sets = make([][tlbWays]entry, cfg.TLBEntries/tlbWays)
		c.huge = make([]entry, cfg.HugeEntries)
		s.cpus = append(s.cpus, c)
		cfg.Checker.Register(c)
	}
	return s, nil
}

// CPUs returns the CPUs.
func (s *System) CPUs() []*CPU { return s.cpus }

// CPU returns CPU i.
func (s *System) CPU(i int) *CPU { return s.cpus[i] }

// LazyMode returns the lazy-TLB scheme in use.
func (s *System) LazyMode() LazyMode { return s.mode }

// Stats returns a snapshot of the counters.
func (s *System) Stats() Stats {
	st := Stats{
		IPIs:            s.stats.ipis.Load(),
		LazySkipped:     s.stats.lazySkipped.Load(),
		FullFlushes:     s.stats.fullFlushes.Load(),
		PartialFlushes:  s.stats.partialFlushes.Load(),
		PagesFlushed:    s.stats.pagesFlushed.Load(),
		FlushRequests:   s.stats.flushRequests.Load(),
		CountOps:        s.stats.countOps.Load(),
		ShootdownIPIs:   s.stats.shootIPIs.Load(),
		MembarrierIPIs:  s.stats.membarrierIPIs.Load(),
		ContextSwitches: s.stats.switches.Load(),
	}
	for _, c := range s.cpus {
		h, m, f := c.counts()
		st.Hits += h
		st.Misses += m
		st.Faults += f
	}
	return st
}

// flushInfo is struct flush_tlb_info: one flush request.
type flushInfo struct {
	ctx         *Context
	start, end  uint64 // end is FlushAll for a whole-mm flush
	strideShift uint
	newGen      uint64
}

// FlushRange makes every CPU drop its translations of [start, end) in ctx
// (flush_tlb_mm_range): the TLB generation is bumped, then each CPU in the
// mm's cpumask gets an IPI, except lazy ones when no page table was freed
// (they catch up by generation when they switch back). A range of more
// than FlushCeiling strides, or end == FlushAll, flushes the whole mm.
// strideShift is the page size of the entries cleared (12 or 21).
// freedTables says page tables were freed: lazy CPUs must then leave the
// mm at once, since even a speculative walk could read a freed table.
//
// The caller is not one of the CPUs, so every CPU that flushes does so in
// an IPI, handled between two of its accesses. When every IPI has been
// handled, the context's SecondaryTLBs hook (if any) is told about the
// same range (the whole address space for a full flush), and then
// FlushRange returns.
func (s *System) FlushRange(ctx *Context, start, end uint64, strideShift uint, freedTables bool) {
	s.stats.flushRequests.Add(1)
	info := flushInfo{ctx: ctx, start: start, end: end, strideShift: strideShift}
	if end != FlushAll && (end-start)>>strideShift > FlushCeiling {
		info.start, info.end = 0, FlushAll
	}
	info.newGen = ctx.gen.Add(1)
	for id := range ctx.cpuSet() {
		c := s.cpus[id]
		c.lockForIPI()
		switch {
		case c.loaded != ctx:
			// A stale mask bit: the CPU has switched away since.
		case c.lazy && !freedTables:
			s.stats.lazySkipped.Add(1)
		default:
			s.stats.ipis.Add(1)
			c.flushTLBFunc(&info)
		}
		c.unlock()
	}
	if ctx.secondary != nil {
		ctx.secondary.InvalidateSecondaryTLBs(info.start, info.end)
	}
}

// shootLazies is the shoot-lazies final mmdrop: every CPU in the mask
// still using ctx as its lazy active mm switches away.
func (s *System) shootLazies(ctx *Context) {
	for id := range ctx.cpuSet() {
		c := s.cpus[id]
		s.stats.shootIPIs.Add(1)
		c.lockForIPI()
		if c.loaded == ctx {
			if !c.lazy {
				// Not lazy: a task of the mm still runs here, which only a
				// caller bug allows. Report it and stop using the mm.
				s.chk.Report(check.Violation{Kind: check.FreedSpaceInUse, Op: "mmdrop", Cache: c.CacheName(),
					Space: ctx.id, Detail: "a user task of the mm is running: " + c.curr.name})
			}
			c.switchToInit()
		}
		c.unlock()
	}
}

// Membarrier is membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED): it sends an
// IPI, which implies a full memory barrier, to every CPU currently running
// a user task of ctx, and returns when all have run it. CPUs that only
// hold ctx lazily are not running its user code and are not interrupted.
// It returns how many CPUs were interrupted.
func (s *System) Membarrier(ctx *Context) int {
	n := 0
	for _, c := range s.cpus {
		c.lockForIPI()
		if c.curr.ctx == ctx && !c.lazy {
			s.stats.membarrierIPIs.Add(1)
			c.barriers++
			n++
		}
		c.mu.Unlock()
	}
	return n
}

// pageCount is the number of pages of size 1<<shift in [start, end).
func pageCount(start, end uint64, shift uint) uint64 {
	return (end - start + 1<<shift - 1) >> shift
}
