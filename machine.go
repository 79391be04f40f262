package gomm

import (
	"fmt"
	"sync/atomic"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/check"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
	"github.com/gomm-dev/gomm/tlb"
)

// Errors returned by gomm: the shared errno values, so errors.Is works
// with these or with the lower packages' names for them.
var (
	ErrInvalid = errno.ErrInvalid // EINVAL
	ErrNoMem   = errno.ErrNoMem   // ENOMEM: out of memory, or no mapping where one is required
	ErrFault   = errno.ErrFault   // EFAULT / SIGSEGV: no mapping, or the access is not allowed
	ErrExist   = errno.ErrExist   // EEXIST: MAP_FIXED_NOREPLACE found a mapping
	ErrClosed  = errno.ErrClosed  // the MM has exited
	ErrPerm    = errno.ErrPerm    // EACCES / EPERM: the mapping does not allow what was asked
)

// Violation is one breach of the invariant found by the checker.
type Violation = check.Violation

// LazyTLBMode is how lazy CPUs keep a borrowed mm alive.
type LazyTLBMode = tlb.LazyMode

// Lazy-TLB modes.
const (
	LazyRefcount  = tlb.LazyRefcount
	LazyShootdown = tlb.LazyShootdown
)

// Config describes a Machine. Zero fields take the defaults.
type Config struct {
	Frames      int         // RAM in 4 KiB frames; default 65536 (256 MiB)
	CPUs        int         // default 2
	TLBEntries  int         // 4 KiB entries per CPU TLB; default 64
	HugeEntries int         // 2 MiB entries per CPU TLB; default 8
	LazyTLB     LazyTLBMode // default LazyRefcount
	// SwapSlots is the size of the swap device in pages; 0 means no
	// swap, so anonymous memory is never reclaimed (file pages still are).
	SwapSlots int
	// THP says when anonymous memory is mapped with 2 MiB leaves; the
	// default, THPMadvise, maps them only where MadvHugePage asked.
	THP THPMode
	// Check turns the invariant checker on: every frame free and every
	// downgrade is verified against every TLB. Off, it costs nothing.
	Check bool
	// Inject makes allocations fail at a rate (fail_page_alloc); see
	// Injection and Machine.SetInjection. Off by default.
	Inject Injection
	// NotifierTracer, if set, sees every mmu-notifier callback of every
	// MM with its duration (notifier.Tracer): call counts and
	// invalidation latencies per driver come from here.
	NotifierTracer notifier.Tracer
}

// Machine is a simulated computer: RAM, CPUs with TLBs, and optionally the
// checker. MMs live in it.
type Machine struct {
	cfg  Config
	ram  *physmem.Allocator
	sys  *tlb.System
	chk  *check.Checker // nil when off
	zero *physmem.Frame // the shared zero page (ZERO_PAGE), never freed

	anonVMAs  rmap.Pool
	rmapEnv   rmap.Env
	swap      *swapDevice // nil without swap
	lru       *lru
	reclaimed reclaimCounters
	ksm       *ksm
	thp       thpCounters
	injector  atomic.Pointer[injector] // nil when injection is off
	injected  injectCounters
}

// NewMachine builds a machine.
func NewMachine(cfg Config) (*Machine, error) {
	if cfg.Frames == 0 {
		cfg.Frames = 65536
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 2
	}
	if cfg.Frames < 2 {
		return nil, fmt.Errorf("gomm: %d frames: %w", cfg.Frames, ErrInvalid)
	}
	if cfg.THP < THPMadvise || cfg.THP > THPNever {
		return nil, fmt.Errorf("gomm: %v: %w", cfg.THP, ErrInvalid)
	}
	if cfg.CPUs < 0 || cfg.CPUs > tlb.MaxCPUs {
		// Checked before the per-CPU caches are sized by it.
		return nil, fmt.Errorf("gomm: %d CPUs (1..%d): %w", cfg.CPUs, tlb.MaxCPUs, ErrInvalid)
	}
	ram, err := physmem.New(cfg.Frames, physmem.CPUCaches(cfg.CPUs))
	if err != nil {
		return nil, err
	}
	if cfg.SwapSlots < 0 || cfg.SwapSlots > pagetable.MaxSwapOffset {
		return nil, fmt.Errorf("gomm: %d swap slots: %w", cfg.SwapSlots, ErrInvalid)
	}
	inj, err := newInjector(cfg.Inject)
	if err != nil {
		return nil, err
	}
	m := &Machine{cfg: cfg, ram: ram, lru: newLRU(ram, cfg.CPUs), ksm: newKSM()}
	if cfg.SwapSlots > 0 {
		m.swap = newSwapDevice(ram, cfg.SwapSlots)
	}
	ram.OnFreeBatch(m.lru.freed, m.lru.delFreed)
	if cfg.Check {
		m.chk = check.New()
		ram.OnFree(func(f *physmem.Frame) { m.chk.FrameFreed(uint64(f.PFN())) })
	}
	m.sys, err = tlb.NewSystem(tlb.Config{
		CPUs: cfg.CPUs, TLBEntries: cfg.TLBEntries, HugeEntries: cfg.HugeEntries,
		Lazy: cfg.LazyTLB, RAM: ram, Checker: m.chk,
	})
	if err != nil {
		return nil, err
	}
	m.rmapEnv = rmap.Env{RAM: ram, TLB: m.sys, Check: m.chk, OnSplit: func() { m.thp.splitPMD.Add(1) }}
	if m.swap != nil {
		m.rmapEnv.Swap = m.swap
	}
	if m.zero, err = ram.Alloc(); err != nil {
		return nil, err
	}
	m.injector.Store(inj) // after the zero page: that one may not fail
	return m, nil
}

// CPU returns CPU i (0 <= i < CPUs).
func (m *Machine) CPU(i int) *tlb.CPU { return m.sys.CPU(i) }

// CPUs returns every CPU.
func (m *Machine) CPUs() []*tlb.CPU { return m.sys.CPUs() }

// RAM returns the machine's physical memory.
func (m *Machine) RAM() *physmem.Allocator { return m.ram }

// TLB returns the CPUs' flush machinery, for layers that flush.
func (m *Machine) TLB() *tlb.System { return m.sys }

// ZeroPFN returns the frame of the shared zero page, which read faults on
// anonymous memory map read-only until the first write.
func (m *Machine) ZeroPFN() uint64 { return uint64(m.zero.PFN()) }

// Violations returns the checker's recorded violations and how many were
// found in all (nil, 0 when the checker is off).
func (m *Machine) Violations() ([]Violation, int) { return m.chk.Violations() }

// OnViolation installs fn to be called with each violation as it is found
// (nil removes it); it returns the previous one. No-op when the checker is
// off.
func (m *Machine) OnViolation(fn func(Violation)) (prev func(Violation)) {
	return m.chk.SetHandler(fn)
}

// Stats are a machine's counters.
type Stats struct {
	TLB     tlb.Stats
	RAM     physmem.Stats
	Reclaim ReclaimStats
	Swap    SwapStats
	LRU     struct{ Inactive, Active int }
	THP     THPStats
	// AnonVMAs is how many anon_vmas are live.
	AnonVMAs int64
	Checks   uint64 // invariant checks run
	// Injected counts the allocation failures injected (Config.Inject).
	Injected InjectStats
}

// Stats returns a snapshot of the machine's counters.
func (m *Machine) Stats() Stats {
	st := Stats{TLB: m.sys.Stats(), RAM: m.ram.Stats(), Reclaim: m.reclaimed.snapshot(), Swap: m.swap.stats(),
		AnonVMAs: m.anonVMAs.Live(), Checks: m.chk.Checks(), THP: m.thp.snapshot(),
		Injected: m.injected.snapshot()}
	m.lru.drainAll() // so that the lists count every page faulted in
	st.LRU.Inactive, st.LRU.Active = m.lru.lens()
	return st
}
