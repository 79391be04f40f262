package tlb

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/gomm-dev/gomm/internal/check"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
)

// Task is what a CPU runs: a user task with an mm, or a kernel thread
// with none, which borrows the previous mm lazily (active_mm).
type Task struct {
	name string
	ctx  *Context
}

// NewUserTask returns a task of the mm ctx. The task does not own a
// reference; whoever created the mm keeps it alive while tasks run it.
func NewUserTask(name string, ctx *Context) *Task { return &Task{name: name, ctx: ctx} }

// NewKernelThread returns a kernel thread: it has no mm of its own.
func NewKernelThread(name string) *Task { return &Task{name: name} }

var idleTask = NewKernelThread("idle")

// Name returns the task's name.
func (t *Task) Name() string { return t.name }

// Context returns the task's mm, nil for a kernel thread.
func (t *Task) Context() *Context { return t.ctx }

// entry is one TLB entry, tagged with its mm (there are no PCIDs: a
// switch to another mm flushes the TLB, so every valid entry belongs to
// the loaded mm).
type entry struct {
	ctx   *Context      // nil: invalid
	vpn   uint64        // va >> 12, or va >> 21 for a huge entry
	pfn   uint64        // the frame of the (first) page
	pte   pagetable.PTE // the leaf as cached: W, U, NX, D
	stamp check.Stamp   // when it was filled, for the checker
	used  uint64        // LRU clock
}

// CPU is one simulated CPU: a TLB, the mm it has loaded, the task it
// runs, and a lazy flag (cpu_tlbstate). Its lock is held for the whole of
// one access (lookup, walk, fill and the data access) and by whoever
// delivers an IPI to it, so an IPI is always handled between two
// accesses, never inside one.
//
// A CPU's methods may be called from any goroutine, one access at a time
// per CPU in the model's sense: the goroutine that calls them is the
// program running on that CPU.
type CPU struct {
	id  int
	sys *System
	// mu is the innermost lock of gomm: nothing is taken under it, so it
	// is a plain mutex, outside the lock-order checker, which would
	// otherwise charge every simulated access a stack capture.
	mu sync.Mutex
	// ipiPending counts IPI senders waiting for mu. An access backs off
	// while it is non-zero, so a CPU looping over accesses cannot starve
	// an IPI: interrupts take priority over the next instruction, as on
	// hardware. (sync.Mutex lets a goroutine that releases and retakes a
	// lock win for up to a millisecond before waiters get their turn.)
	ipiPending atomic.Int32

	// All below protected by mu.
	curr        *Task
	loaded      *Context // loaded_mm; also active_mm while lazy
	lazy        bool
	lazyRef     bool     // holds an mm_count reference on loaded for lazy mode
	pendingDrop *Context // a lazy reference to drop once mu is released
	localGen    uint64   // the loaded mm's TLB generation this TLB reflects
	sets        [][tlbWays]entry
	huge        []entry
	clock       uint64
	barriers    uint64
	hits        uint64
	misses      uint64
	// faults counts the faults passed to the handler, per CPU as the
	// kernel's vm events are: a System-wide atomic would be one more
	// line every faulting CPU writes.
	faults uint64
}

// ID returns the CPU number.
func (c *CPU) ID() int { return c.id }

// tickEvery is how many accesses a CPU makes between two yields: the
// scheduler tick of a simulated machine, which usually has more CPUs and
// mutators than the host has cores. Without it a CPU in a tight loop
// holds a host core for a whole Go time slice (10 ms) while an munmap
// waits for a core to send its IPIs from.
const tickEvery = 1024

// lockForAccess takes mu for one access, after any pending IPI, yielding
// the host core once every tickEvery accesses.
func (c *CPU) lockForAccess() {
	for c.ipiPending.Load() != 0 {
		runtime.Gosched()
	}
	c.mu.Lock()
	if c.clock%tickEvery == tickEvery-1 {
		c.clock++
		c.mu.Unlock()
		runtime.Gosched()
		c.mu.Lock()
	}
}

// lockForIPI takes mu to deliver an IPI, ahead of the CPU's next access.
func (c *CPU) lockForIPI() {
	c.ipiPending.Add(1)
	c.mu.Lock()
	c.ipiPending.Add(-1)
}

// unlock releases mu and then drops any lazy mm reference the locked
// section gave up: the drop may be the final mmdrop, which must not run
// under a CPU lock.
func (c *CPU) unlock() {
	drop := c.pendingDrop
	c.pendingDrop = nil
	c.mu.Unlock()
	if drop != nil {
		drop.Drop()
	}
}

// Current returns the running task.
func (c *CPU) Current() *Task {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.curr
}

// ActiveMM returns the loaded mm and whether it is held lazily.
func (c *CPU) ActiveMM() (ctx *Context, lazy bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.loaded, c.lazy
}

// Barriers returns how many membarrier IPIs the CPU has handled.
func (c *CPU) Barriers() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.barriers
}

// Switch makes next the running task (context_switch and switch_mm_irqs_off).
//
// To a kernel thread: the CPU keeps the previous mm loaded and becomes
// lazy (enter_lazy_tlb); in refcount mode it takes an mm_count reference.
// Back to a user task of the same mm: it leaves lazy mode, flushing
// everything if flushes were skipped meanwhile (its TLB generation is
// behind). To a user task of another mm: the TLB is flushed (no PCIDs),
// the CPU leaves the old mm's cpumask and joins the new one's.
func (c *CPU) Switch(next *Task) {
	c.mu.Lock()
	defer c.unlock()
	c.sys.stats.switches.Add(1)
	c.curr = next
	ctx := next.ctx
	switch {
	case ctx == nil:
		if c.loaded != nil && !c.lazy {
			c.lazy = true
			if c.sys.mode == LazyRefcount {
				c.loaded.Grab()
				c.lazyRef = true
			}
		}
	case ctx == c.loaded:
		if c.lazy {
			c.lazy = false
			c.releaseLazyRef()
			if gen := ctx.gen.Load(); c.localGen < gen {
				c.flushAll()
				c.sys.stats.fullFlushes.Add(1)
				c.localGen = gen
			}
		}
	default:
		if c.loaded != nil {
			c.loaded.clearCPU(c.id)
			c.releaseLazyRef()
		}
		c.flushAll()
		// Join the mask before reading the generation: a flusher then
		// either sees us in the mask or bumped the generation first.
		ctx.setCPU(c.id)
		c.loaded, c.lazy = ctx, false
		c.localGen = ctx.gen.Load()
	}
}

func (c *CPU) releaseLazyRef() {
	if c.lazyRef {
		c.lazyRef = false
		c.pendingDrop = c.loaded
	}
}

// switchToInit leaves a lazily held mm for none (switch_mm to init_mm).
func (c *CPU) switchToInit() {
	c.loaded.clearCPU(c.id)
	c.releaseLazyRef()
	c.flushAll()
	c.loaded, c.lazy, c.localGen = nil, false, 0
}

// flushTLBFunc handles one flush IPI (flush_tlb_func).
func (c *CPU) flushTLBFunc(f *flushInfo) {
	if c.lazy {
		// Only sent to a lazy CPU when page tables were freed: stop
		// using the mm's tables at once.
		c.switchToInit()
		return
	}
	mmGen := f.ctx.gen.Load()
	if c.localGen >= mmGen {
		return // an earlier flush already caught up with this one
	}
	if f.end != FlushAll && f.newGen == c.localGen+1 && f.newGen == mmGen {
		c.flushRange(f.ctx, f.start, f.end)
		c.sys.stats.partialFlushes.Add(1)
		c.sys.stats.pagesFlushed.Add(pageCount(f.start, f.end, f.strideShift))
	} else {
		c.flushAll()
		c.sys.stats.fullFlushes.Add(1)
	}
	c.localGen = mmGen
}

func (c *CPU) flushAll() {
	for i := range c.sets {
		for w := range c.sets[i] {
			c.sets[i][w].ctx = nil
		}
	}
	for i := range c.huge {
		c.huge[i].ctx = nil
	}
}

func (c *CPU) flushRange(ctx *Context, start, end uint64) {
	first, last := start>>pagetable.PageShift, (end-1)>>pagetable.PageShift
	if last-first >= uint64(len(c.sets)) {
		// More pages than sets (a range of 2 MiB strides, say): one pass
		// over the whole TLB costs less than one probe per page.
		for i := range c.sets {
			for w := range c.sets[i] {
				if e := &c.sets[i][w]; e.ctx == ctx && e.vpn >= first && e.vpn <= last {
					e.ctx = nil
				}
			}
		}
	} else {
		for vpn := first; vpn <= last; vpn++ {
			set := &c.sets[vpn&uint64(len(c.sets)-1)]
			for w := range set {
				if set[w].ctx == ctx && set[w].vpn == vpn {
					set[w].ctx = nil
				}
			}
		}
	}
	for i := range c.huge {
		e := &c.huge[i]
		if e.ctx == ctx {
			base := e.vpn << pagetable.HugeShift
			if base < end && base+pagetable.HugeSize > start {
				e.ctx = nil
			}
		}
	}
}

// permits reports whether a cached leaf allows the access without a walk.
// A write through an entry cached clean needs a walk to set Dirty, as on
// x86.
func permits(e pagetable.PTE, acc pagetable.Access) bool {
	if acc&pagetable.AccessWrite != 0 && e&(pagetable.Write|pagetable.Dirty) != pagetable.Write|pagetable.Dirty {
		return false
	}
	if acc&pagetable.AccessUser != 0 && e&pagetable.User == 0 {
		return false
	}
	return acc&pagetable.AccessExec == 0 || e&pagetable.NoExec == 0
}

// PageFault is the error of an access that faulted: what the CPU would
// deliver to the fault handler. It matches ErrFault with errors.Is.
type PageFault struct {
	CPU    int
	VA     uint64
	Access pagetable.Access
	Fault  pagetable.Fault
	Level  pagetable.Level
	PTE    pagetable.PTE
}

func (e *PageFault) Error() string {
	return fmt.Sprintf("tlb: cpu%d: %v at %#x: %v fault at %v level (entry %v)", e.CPU, e.Access, e.VA, e.Fault, e.Level, e.PTE)
}

// Is makes a PageFault match ErrFault.
func (e *PageFault) Is(target error) bool { return target == ErrFault }

// translateLocked looks va up in the TLB, walking and filling on a miss.
// ok is false on a fault, described by tr. Called with mu held.
func (c *CPU) translateLocked(va uint64, acc pagetable.Access) (pfn uint64, tr pagetable.Translation, ok bool) {
	ctx := c.loaded
	if ctx == nil || c.lazy || c.curr.ctx == nil {
		return 0, pagetable.Translation{Level: pagetable.LevelPGD, Fault: pagetable.FaultNotPresent}, false
	}
	c.clock++
	vpn := va >> pagetable.PageShift
	set := &c.sets[vpn&uint64(len(c.sets)-1)]
	for w := range set {
		e := &set[w]
		if e.ctx == ctx && e.vpn == vpn {
			if permits(e.pte, acc) {
				e.used = c.clock
				c.hits++
				return e.pfn, tr, true
			}
			e.ctx = nil // stale rights or clean: walk again, as after a spurious fault
		}
	}
	hvpn := va >> pagetable.HugeShift
	for i := range c.huge {
		e := &c.huge[i]
		if e.ctx == ctx && e.vpn == hvpn {
			if permits(e.pte, acc) {
				e.used = c.clock
				c.hits++
				return e.pfn + vpn&(pagetable.Entries-1), tr, true
			}
			e.ctx = nil
		}
	}
	c.misses++
	tr = ctx.table.Walk(va, acc)
	if tr.Fault != pagetable.FaultNone {
		return 0, tr, false
	}
	stamp := c.sys.chk.Now()
	if tr.Level == pagetable.LevelPMD {
		e := lru(c.huge)
		*e = entry{ctx: ctx, vpn: hvpn, pfn: tr.PTE.PFN(), pte: tr.PTE, stamp: stamp, used: c.clock}
	} else {
		e := lru(set[:])
		*e = entry{ctx: ctx, vpn: vpn, pfn: tr.PFN, pte: tr.PTE, stamp: stamp, used: c.clock}
	}
	return tr.PFN, tr, true
}

// lru picks the entry to replace: an invalid one, else the least recently
// used.
func lru(es []entry) *entry {
	victim := &es[0]
	for i := range es {
		e := &es[i]
		if e.ctx == nil {
			return e
		}
		if e.used < victim.used {
			victim = e
		}
	}
	return victim
}

// Translate returns the frame va maps to for the access, from the TLB or
// by a walk that fills it, without taking the fault: a fault is returned
// as a *PageFault. Accesses are user-mode accesses of the running task;
// a kernel thread has no user mm and faults.
func (c *CPU) Translate(va uint64, acc pagetable.Access) (uint64, error) {
	acc |= pagetable.AccessUser
	c.lockForAccess()
	pfn, tr, ok := c.translateLocked(va, acc)
	c.mu.Unlock()
	if !ok {
		return 0, c.pageFault(va, acc, tr)
	}
	return pfn, nil
}

func (c *CPU) pageFault(va uint64, acc pagetable.Access, tr pagetable.Translation) error {
	return &PageFault{CPU: c.id, VA: va, Access: acc, Fault: tr.Fault, Level: tr.Level, PTE: tr.PTE}
}

// maxFaultRetries bounds how often one access may fault and retry before
// it is reported as a fault: a handler that "resolves" a fault without
// making progress would otherwise spin forever.
const maxFaultRetries = 64

// pin translates va for an access, taking faults through the mm's fault
// handler and retrying as the hardware does, and returns the frame with
// mu held. The caller does its data access and unlocks.
func (c *CPU) pin(va uint64, acc pagetable.Access) (*physmem.Frame, error) {
	acc |= pagetable.AccessUser
	for range maxFaultRetries {
		c.lockForAccess()
		pfn, tr, ok := c.translateLocked(va, acc)
		if ok {
			f, err := c.sys.ram.Frame(physmem.PFN(pfn))
			if err != nil {
				c.mu.Unlock()
				return nil, fmt.Errorf("tlb: cpu%d: %#x maps pfn %#x outside RAM: %w", c.id, va, pfn, err)
			}
			return f, nil
		}
		ctx := c.loaded
		user := ctx != nil && !c.lazy && c.curr.ctx != nil
		handled := user && ctx.fault != nil && tr.Fault != pagetable.FaultNonCanonical
		if handled {
			c.faults++
		}
		c.mu.Unlock()
		if !handled {
			return nil, c.pageFault(va, acc, tr)
		}
		if err := c.handleFault(ctx, va, acc); err != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("tlb: cpu%d: %v at %#x still faults after %d retries: %w", c.id, acc, va, maxFaultRetries, ErrFault)
}

func (c *CPU) handleFault(ctx *Context, va uint64, acc pagetable.Access) error {
	if ctx.faultOn != nil {
		return ctx.faultOn.HandleFaultOn(c.id, va, acc)
	}
	return ctx.fault.HandleFault(va, acc)
}

func checkAligned(va uint64, size uint64) error {
	if va%size != 0 {
		return fmt.Errorf("tlb: unaligned %d-byte access at %#x: %w", size, va, ErrInvalid)
	}
	return nil
}

// Load64 loads the aligned 64-bit word at va.
func (c *CPU) Load64(va uint64) (uint64, error) {
	if err := checkAligned(va, 8); err != nil {
		return 0, err
	}
	f, err := c.pin(va, pagetable.AccessRead)
	if err != nil {
		return 0, err
	}
	v, err := f.Load64(int(va & (pagetable.PageSize - 1)))
	c.mu.Unlock()
	return v, err
}

// Store64 stores the aligned 64-bit word at va.
func (c *CPU) Store64(va, v uint64) error {
	if err := checkAligned(va, 8); err != nil {
		return err
	}
	f, err := c.pin(va, pagetable.AccessWrite)
	if err != nil {
		return err
	}
	err = f.Store64(int(va&(pagetable.PageSize-1)), v)
	c.mu.Unlock()
	return err
}

// Load8 loads the byte at va.
func (c *CPU) Load8(va uint64) (byte, error) {
	var b [1]byte
	err := c.Read(va, b[:])
	return b[0], err
}

// Store8 stores the byte at va.
func (c *CPU) Store8(va uint64, v byte) error {
	return c.Write(va, []byte{v})
}

// Read loads len(p) bytes from va, one page at a time; each page is one
// access.
func (c *CPU) Read(va uint64, p []byte) error {
	return c.span(va, p, pagetable.AccessRead)
}

// Write stores p at va, one page at a time.
func (c *CPU) Write(va uint64, p []byte) error {
	return c.span(va, p, pagetable.AccessWrite)
}

func (c *CPU) span(va uint64, p []byte, acc pagetable.Access) error {
	if va+uint64(len(p)) < va {
		return fmt.Errorf("tlb: %d bytes at %#x wrap around: %w", len(p), va, ErrInvalid)
	}
	for len(p) > 0 {
		off := int(va & (pagetable.PageSize - 1))
		n := min(len(p), pagetable.PageSize-off)
		f, err := c.pin(va, acc)
		if err != nil {
			return err
		}
		if acc&pagetable.AccessWrite != 0 {
			_, err = f.WriteAt(p[:n], off)
		} else {
			_, err = f.ReadAt(p[:n], off)
		}
		c.mu.Unlock()
		if err != nil {
			return err
		}
		p, va = p[n:], va+uint64(n)
	}
	return nil
}

// FlushLocal drops every entry of this CPU's TLB (a local full flush, as
// after a spurious fault or for a test).
func (c *CPU) FlushLocal() {
	c.mu.Lock()
	c.flushAll()
	c.mu.Unlock()
}

// Stats returns the CPU's TLB hits and misses.
func (c *CPU) Stats() (hits, misses uint64) {
	hits, misses, _ = c.counts()
	return hits, misses
}

func (c *CPU) counts() (hits, misses, faults uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hits, c.misses, c.faults
}

// The checker's view of the CPU.

// CacheName names the CPU in checker reports.
func (c *CPU) CacheName() string { return fmt.Sprintf("cpu%d TLB", c.id) }

// usableLocked reports whether the CPU would use its entries of the
// loaded mm without flushing first: a lazy CPU that skipped flushes
// catches up before it uses them again.
func (c *CPU) usableLocked() bool {
	return c.loaded != nil && !(c.lazy && c.localGen < c.loaded.gen.Load())
}

func (c *CPU) describe(e *entry, huge bool) string {
	shift := uint(pagetable.PageShift)
	if huge {
		shift = pagetable.HugeShift
	}
	return fmt.Sprintf("va %#x -> pfn %#x [%v] mm %d filled at %d (lazy %v, gen %d/%d)",
		e.vpn<<shift, e.pfn, e.pte, e.ctx.id, e.stamp, c.lazy, c.localGen, e.ctx.gen.Load())
}

// CachedPFN implements check.Cache.
func (c *CPU) CachedPFN(pfn uint64) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.usableLocked() {
		return "", false
	}
	for i := range c.sets {
		for w := range c.sets[i] {
			if e := &c.sets[i][w]; e.ctx != nil && e.pfn == pfn {
				return c.describe(e, false), true
			}
		}
	}
	for i := range c.huge {
		if e := &c.huge[i]; e.ctx != nil && pfn >= e.pfn && pfn < e.pfn+pagetable.Entries {
			return c.describe(e, true), true
		}
	}
	return "", false
}

// StaleTranslations implements check.RangeCache. An entry cached clean
// does not allow a write by itself: the write walks the table again to set
// Dirty and sees the current rights.
func (c *CPU) StaleTranslations(space, start, end uint64, before check.Stamp, writeOnly bool) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.usableLocked() || c.loaded.id != space {
		return nil
	}
	var out []string
	stale := func(e *entry, lo, hi uint64) bool {
		return e.ctx != nil && lo < end && hi > start && e.stamp < before &&
			(!writeOnly || permits(e.pte, pagetable.AccessWrite))
	}
	for i := range c.sets {
		for w := range c.sets[i] {
			e := &c.sets[i][w]
			va := e.vpn << pagetable.PageShift
			if stale(e, va, va+pagetable.PageSize) {
				out = append(out, c.describe(e, false))
			}
		}
	}
	for i := range c.huge {
		e := &c.huge[i]
		va := e.vpn << pagetable.HugeShift
		if stale(e, va, va+pagetable.HugeSize) {
			out = append(out, c.describe(e, true))
		}
	}
	return out
}

// UsesSpace implements check.SpaceUser.
func (c *CPU) UsesSpace(space uint64) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.loaded != nil && c.loaded.id == space {
		return fmt.Sprintf("active mm (lazy %v, running %s)", c.lazy, c.curr.name), true
	}
	return "", false
}

var _ interface {
	check.RangeCache
	check.SpaceUser
} = (*CPU)(nil)
