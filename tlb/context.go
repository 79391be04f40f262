package tlb

import (
	"fmt"
	"iter"
	"math/bits"
	"slices"
	"sync/atomic"

	"github.com/gomm-dev/gomm/pagetable"
)

// FaultHandler resolves a page fault a CPU took in an address space: the
// MM's handle_mm_fault. It returns nil when the access should be retried.
type FaultHandler interface {
	HandleFault(va uint64, acc pagetable.Access) error
}

// CPUFaultHandler is a FaultHandler that is told which CPU faulted, for
// state it keeps per CPU (frame caches, LRU batches, counters), as the
// kernel's fault path uses the CPU it runs on. A CPU calls HandleFaultOn
// instead of HandleFault when its context's handler implements it.
type CPUFaultHandler interface {
	FaultHandler
	HandleFaultOn(cpu int, va uint64, acc pagetable.Access) error
}

// SecondaryTLBs is told about every TLB flush of a context, after the
// CPUs flushed and before the caller frees what the flush covered: the
// call site of invalidate_secondary_tlbs, for devices that walk the CPU
// page table themselves. It must not sleep.
type SecondaryTLBs interface {
	InvalidateSecondaryTLBs(start, end uint64)
}

// Context is the TLB side of an mm: what arch/x86 keeps in mm->context and
// the scheduler in mm_struct: the page table CPUs walk, the TLB generation,
// the mask of CPUs that may cache the mm, mm_count, and tlb_flush_pending.
type Context struct {
	id    uint64
	sys   *System
	table *pagetable.Table
	fault FaultHandler
	// faultOn is fault as a CPUFaultHandler, nil if it is not one: the
	// type is asserted once, not on every fault.
	faultOn CPUFaultHandler

	// gen is the TLB generation (mm->context.tlb_gen): bumped by every
	// flush request; a CPU whose local generation is behind has stale
	// entries.
	gen atomic.Uint64
	// cpumask has a bit per CPU that has loaded the mm since it last
	// switched away for good (mm_cpumask).
	cpumask []atomic.Uint64
	// count is mm_count: the mm struct's own lifetime, held by each user
	// reference collectively, by lazy CPUs in refcount mode, and by anyone
	// who mmgrab()s it.
	count atomic.Int64
	// flushPending is tlb_flush_pending: gathers in progress on this mm.
	flushPending atomic.Int32
	freed        atomic.Bool
	onFree       func() // __mmdrop's caller-side work; set once before sharing
	secondary    SecondaryTLBs
}

// NewContext creates the TLB context of a new mm whose page table is
// table; fault resolves faults its CPUs take. It starts with mm_count 1,
// the reference its users hold collectively. onFree, if not nil, runs
// when the last mm_count reference is dropped.
func (s *System) NewContext(table *pagetable.Table, fault FaultHandler, onFree func()) *Context {
	c := &Context{
		id:      s.nextCtx.Add(1),
		sys:     s,
		table:   table,
		fault:   fault,
		cpumask: make([]atomic.Uint64, (len(s.cpus)+63)/64),
		onFree:  onFree,
	}
	c.faultOn, _ = fault.(CPUFaultHandler)
	c.gen.Store(1)
	c.count.Store(1)
	return c
}

// SetSecondaryTLBs installs the hook every FlushRange of this context
// calls after the CPU flush. Call it before the context is shared.
func (c *Context) SetSecondaryTLBs(s SecondaryTLBs) { c.secondary = s }

// ID returns the context's identity, stable for its lifetime and never
// reused by the System.
func (c *Context) ID() uint64 { return c.id }

// Table returns the page table CPUs walk for this context.
func (c *Context) Table() *pagetable.Table { return c.table }

// Gen returns the current TLB generation.
func (c *Context) Gen() uint64 { return c.gen.Load() }

// Count returns mm_count.
func (c *Context) Count() int64 { return c.count.Load() }

// Freed reports whether the last mm_count reference was dropped.
func (c *Context) Freed() bool { return c.freed.Load() }

// CPUs returns the ids of the CPUs in the mm's cpumask.
func (c *Context) CPUs() []int { return slices.Collect(c.cpuSet()) }

// cpuSet yields the ids in the cpumask without allocating: flushes walk it
// on every call.
func (c *Context) cpuSet() iter.Seq[int] {
	return func(yield func(int) bool) {
		for w := range c.cpumask {
			m := c.cpumask[w].Load()
			for m != 0 {
				b := bits.TrailingZeros64(m)
				if !yield(w*64 + b) {
					return
				}
				m &^= 1 << b
			}
		}
	}
}

func (c *Context) setCPU(id int)   { c.cpumask[id/64].Or(1 << (id % 64)) }
func (c *Context) clearCPU(id int) { c.cpumask[id/64].And(^uint64(1 << (id % 64))) }

// Grab takes an mm_count reference (mmgrab).
func (c *Context) Grab() {
	c.sys.stats.countOps.Add(1)
	if c.count.Add(1) <= 1 {
		panic(fmt.Sprintf("tlb: mmgrab of freed mm %d", c.id))
	}
}

// Drop releases an mm_count reference (mmdrop). The last one frees the
// context: in shoot-lazies mode every CPU still using it lazily is sent
// an IPI to switch away first; then the checker verifies no CPU uses it,
// and onFree runs.
func (c *Context) Drop() {
	c.sys.stats.countOps.Add(1)
	n := c.count.Add(-1)
	switch {
	case n > 0:
		return
	case n < 0:
		panic(fmt.Sprintf("tlb: mmdrop of freed mm %d", c.id))
	}
	if c.sys.mode == LazyShootdown {
		c.sys.shootLazies(c)
	}
	c.freed.Store(true)
	c.sys.chk.SpaceFreed(c.id)
	if c.onFree != nil {
		c.onFree()
	}
}

// IncFlushPending marks a gather in progress (inc_tlb_flush_pending).
func (c *Context) IncFlushPending() { c.flushPending.Add(1) }

// DecFlushPending ends one (dec_tlb_flush_pending).
func (c *Context) DecFlushPending() { c.flushPending.Add(-1) }

// FlushPending returns how many gathers are in progress.
func (c *Context) FlushPending() int32 { return c.flushPending.Load() }

// FlushNested reports whether another gather runs on the mm besides the
// caller's (mm_tlb_flush_nested).
func (c *Context) FlushNested() bool { return c.flushPending.Load() > 1 }
