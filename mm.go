package gomm

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/gomm-dev/gomm/locks"
	"github.com/gomm-dev/gomm/mmugather"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
	"github.com/gomm-dev/gomm/tlb"
)

// Address-space limits (x86-64 with 4-level paging).
const (
	PageSize    = pagetable.PageSize
	TaskSize    = 1<<47 - PageSize // TASK_SIZE_MAX: the top of user space
	MmapMinAddr = 0x10000          // vm.mmap_min_addr: nothing is mapped below
	// userCeiling bounds page-table freeing at the top of user space.
	userCeiling = 1 << 47
)

// MM is an address space (struct mm_struct): VMAs, a page table, the TLB
// context CPUs load, and the references that keep it alive.
//
// Lock order: mmap_lock, then the page-table locks, then CPU locks (taken
// by flushes). Every method is safe for concurrent use.
type MM struct {
	m     *Machine
	table *pagetable.Table
	ctx   *tlb.Context

	mmapLock  locks.RWSem
	vmas      vmaTree // protected by mmapLock
	exited    bool    // protected by mmapLock (set with it held for write)
	notifiers notifier.List

	// anonMu serializes anon_vma_prepare among faults, which hold
	// mmap_lock only for read (the kernel uses the page_table_lock).
	anonMu sync.Mutex

	users atomic.Int64 // mm_users
	// counters are the rss (frames mapped: anonymous, page cache, KSM;
	// MM_ANONPAGES + MM_FILEPAGES) and faults handled, per CPU. The
	// slice is fixed by NewMM; the counters are atomic.
	counters []mmCounters

	// Page tables live in RAM, as in the kernel: each table allocation
	// takes a frame, released when the table is freed and poisoned.
	ptMu     sync.Mutex
	ptFrames []*physmem.Frame // protected by ptMu
}

// NewMM creates an empty address space with one user reference, which
// Exit drops.
func (m *Machine) NewMM() *MM {
	mm := &MM{m: m, vmas: newVMATree(), counters: make([]mmCounters, m.cfg.CPUs+1)}
	mm.table = pagetable.New(pagetable.Options{AllocHook: mm.chargeTable})
	mm.mmapLock.Init(locks.ClassMmapLock)
	mm.ctx = m.sys.NewContext(mm.table, mm, nil)
	mm.notifiers.Init(mm)
	mm.notifiers.SetTracer(m.cfg.NotifierTracer)
	mm.ctx.SetSecondaryTLBs(&mm.notifiers)
	mm.users.Store(1)
	return mm
}

// ID returns the MM's stable identity (also its TLB context's).
func (mm *MM) ID() uint64 { return mm.ctx.ID() }

// Machine returns the machine the MM lives in.
func (mm *MM) Machine() *Machine { return mm.m }

// Context returns the MM's TLB context, which CPUs load.
func (mm *MM) Context() *tlb.Context { return mm.ctx }

// Table returns the MM's page table.
func (mm *MM) Table() *pagetable.Table { return mm.table }

// NewTask returns a user task of this MM for a CPU to run
// (cpu.Switch(task)). Switch CPUs away from an MM's tasks before its last
// user reference is dropped; the checker reports an MM freed while a CPU
// still runs it.
func (mm *MM) NewTask(name string) *tlb.Task { return tlb.NewUserTask(name, mm.ctx) }

// Get takes a user reference (mmget); it fails with ErrClosed once the MM
// has exited.
func (mm *MM) Get() error {
	for {
		n := mm.users.Load()
		if n <= 0 {
			return fmt.Errorf("gomm: mm %d: %w", mm.ID(), ErrClosed)
		}
		if mm.users.CompareAndSwap(n, n+1) {
			return nil
		}
	}
}

// Put drops a user reference (mmput). Dropping the last tears the address
// space down (exit_mmap): every mapping is zapped with one fullmm gather,
// every page table freed, and the MM's mm_count reference dropped. A Put
// without a reference to drop is ErrClosed.
func (mm *MM) Put() error {
	for {
		n := mm.users.Load()
		if n <= 0 {
			return fmt.Errorf("gomm: put of exited mm %d: %w", mm.ID(), ErrClosed)
		}
		if mm.users.CompareAndSwap(n, n-1) {
			if n == 1 {
				return mm.exitMmap()
			}
			return nil
		}
	}
}

// Exit drops the reference NewMM returned: the process exits.
func (mm *MM) Exit() error { return mm.Put() }

// Users returns mm_users.
func (mm *MM) Users() int64 { return mm.users.Load() }

// RSS returns the number of frames mapped (anonymous, page cache and
// KSM pages; not the zero page).
func (mm *MM) RSS() int64 {
	var n int64
	for i := range mm.counters {
		n += mm.counters[i].rss.Load()
	}
	// The sum is not a snapshot: a page mapped on one CPU after its
	// counter was read, and unmapped on another before that one's was,
	// shows only as the unmap. The kernel clamps the same way
	// (get_mm_counter).
	return max(n, 0)
}

// Faults returns the number of faults handled.
func (mm *MM) Faults() uint64 {
	var n uint64
	for i := range mm.counters {
		n += mm.counters[i].faults.Load()
	}
	return n
}

// mmCounters are one CPU's share of an MM's counters (the kernel's
// percpu rss_stat): CPUs faulting at once each count on a cache line of
// their own, and a read sums them. One more is shared by everything that
// is not a CPU's fault.
type mmCounters struct {
	rss    atomic.Int64
	faults atomic.Uint64
	_      [64 - 16]byte
}

// countersOn returns cpu's counters, or the shared ones for noCPU or a
// CPU the machine does not have.
func (mm *MM) countersOn(cpu int) *mmCounters {
	if cpu < 0 || cpu >= len(mm.counters)-1 {
		return &mm.counters[len(mm.counters)-1]
	}
	return &mm.counters[cpu]
}

// addRSS counts n frames mapped (or unmapped, negative) by cpu.
func (mm *MM) addRSS(cpu int, n int64) { mm.countersOn(cpu).rss.Add(n) }

// VMAs returns the mappings, in address order.
func (mm *MM) VMAs() []VMA {
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	var out []VMA
	mm.vmas.all(func(v *vma) bool {
		d := VMA{Start: v.Start, End: v.End, Prot: v.prot, Shared: v.shared(), File: v.file,
			Locked: v.Flags()&rmap.VMLocked != 0, Mergeable: v.Flags()&rmap.VMMergeable != 0,
			HugePage: v.Flags()&rmap.VMHugePage != 0, NoHugePage: v.Flags()&rmap.VMNoHugePage != 0}
		if v.file != nil {
			d.Offset = v.PgOff * PageSize
		}
		out = append(out, d)
		return true
	})
	return out
}

func (mm *MM) exitMmap() error {
	// Closed first, so that nothing (a fault, RangeFault) can hand out a
	// page once the secondary MMUs have been told to let go; then they
	// let go, before any page is freed.
	mm.mmapLock.Lock()
	mm.exited = true
	mm.mmapLock.Unlock()
	mm.m.ksm.exit(mm)
	mm.notifiers.Release()
	mm.mmapLock.Lock()
	var vs []*vma
	for v := range mm.vmas.all {
		vs = append(vs, v)
	}
	mm.vmas.clear()
	err := mm.zapAndFree(vs, 0, userCeiling, true)
	mm.mmapLock.Unlock()
	mm.ctx.Drop()
	return err
}

// chargeTable takes a frame of RAM for a new page table; out of frames,
// the table (and whatever needed it) fails with ErrNoMem.
func (mm *MM) chargeTable(pagetable.Level) error {
	if mm.m.shouldFail(InjectPageTable) {
		return errInjected("page table")
	}
	f, err := mm.m.ram.Alloc()
	if err != nil {
		return err
	}
	mm.ptMu.Lock()
	mm.ptFrames = append(mm.ptFrames, f)
	mm.ptMu.Unlock()
	return nil
}

// unchargeTables releases the frames of n freed page tables. Called after
// the gather that freed them finished, so the tables are poisoned.
func (mm *MM) unchargeTables(n int) {
	mm.ptMu.Lock()
	k := len(mm.ptFrames) - n
	release := slices.Clone(mm.ptFrames[k:])
	clear(mm.ptFrames[k:])
	mm.ptFrames = mm.ptFrames[:k]
	mm.ptMu.Unlock()
	for _, f := range release {
		_ = mm.m.ram.Put(f)
	}
}

// PageTableFrames returns how many frames the MM's page tables use.
func (mm *MM) PageTableFrames() int {
	mm.ptMu.Lock()
	defer mm.ptMu.Unlock()
	return len(mm.ptFrames)
}

// newGather starts a gather on the MM; swap entries it zaps give their
// slots back.
func newGather(mm *MM) *mmugather.Gather {
	g := mmugather.Start(mm.m.sys, mm.m.ram, mm.ctx)
	g.OnNonPresent(mm.m.zapEntry)
	return g
}

// newFullGather is newGather for tearing down the whole MM
// (tlb_gather_mmu_fullmm).
func newFullGather(mm *MM) *mmugather.Gather {
	g := mmugather.StartFullMM(mm.m.sys, mm.m.ram, mm.ctx)
	g.OnNonPresent(mm.m.zapEntry)
	return g
}

// clearFlush clears entry i of the locked table pt, which maps va, and
// flushes it from every CPU running the MM (ptep_clear_flush): once it
// returns nobody translates va through the old entry. It returns that
// entry.
func (mm *MM) clearFlush(pt pagetable.PTETable, i int, va uint64) pagetable.PTE {
	old := pt.GetAndClear(i)
	if old.IsPresent() {
		mm.m.sys.FlushRange(mm.ctx, va, va+PageSize, pagetable.PageShift, false)
	}
	return old
}

// lockPTESplitting locks the PTE table mapping va, splitting first a
// huge leaf that maps it (split_huge_pmd before a 4 KiB change); ok is
// false when nothing maps va. Called with mmap_lock held.
func (mm *MM) lockPTESplitting(va uint64) (pt pagetable.PTETable, ok bool, err error) {
	pt, ok, err = mm.table.LockPTE(va)
	if errors.Is(err, pagetable.ErrBusy) {
		if err = mm.splitHuge(va); err != nil {
			return pt, false, err
		}
		pt, ok, err = mm.table.LockPTE(va)
	}
	return pt, ok, err
}

// invalidateStart opens a blockable invalidation of [start, end) for the
// MM's subscribers (nil when there are none). The caller holds mmap_lock
// until invalidateEnd.
func (mm *MM) invalidateStart(start, end uint64, ev notifier.Event) *notifier.Range {
	return mm.notifiers.StartRange(start, end, ev, nil)
}

// invalidateEnd closes what invalidateStart opened.
func (mm *MM) invalidateEnd(r *notifier.Range) { mm.notifiers.EndRange(r) }

// checkOpen fails once the MM has exited. Called with mmap_lock held.
func (mm *MM) checkOpen() error {
	if mm.exited {
		return fmt.Errorf("gomm: mm %d has exited: %w", mm.ID(), ErrClosed)
	}
	return nil
}

// checkMapped fails once the MM has exited (ErrClosed) or when [start,
// end) is not mapped without holes (ErrNoMem, as mprotect, madvise and
// mlock report it). Called with mmap_lock held.
func (mm *MM) checkMapped(op string, start, end uint64) error {
	if err := mm.checkOpen(); err != nil {
		return err
	}
	if !mm.vmas.covered(start, end) {
		return fmt.Errorf("gomm: %s [%#x, %#x): not all mapped: %w", op, start, end, ErrNoMem)
	}
	return nil
}

// pageAlign rounds n up to a page; ok is false on overflow.
func pageAlign(n uint64) (uint64, bool) {
	a := (n + PageSize - 1) &^ (PageSize - 1)
	return a, a >= n
}
