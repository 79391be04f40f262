package mmugather

import (
	"errors"
	"fmt"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/tlb"
)

// BatchPages is how many frames a gather queues before it must flush:
// about what the kernel's MAX_GATHER_BATCH_COUNT batches of
// MAX_GATHER_BATCH pages hold, so that a huge unmap neither pins unbounded
// memory nor flushes per page.
const BatchPages = 10000

// Gather batches the teardown of translations in one mm (struct
// mmu_gather): it records the range of entries cleared, queues the frames
// they mapped and the page tables freed, and on Flush does, in this order:
// one CPU TLB flush of the recorded range (which ends with the context's
// secondary-TLB invalidation), the freeing of the frames, and, once
// lockless walkers are synced, the poisoning of the tables.
//
// A Gather is used by one goroutine.
type Gather struct {
	ctx *tlb.Context
	sys *tlb.System
	ram *physmem.Allocator

	fullmm      bool
	start, end  uint64 // range of cleared entries; start >= end when none
	strideShift uint   // smallest page size cleared
	cleared     bool   // some entry was cleared since the last flush
	freedTables bool   // some page table was freed since the last flush
	pages       []*physmem.Frame
	tables      []pagetable.FreedTable
	finished    bool

	nonPresent func(pagetable.PTE) // told of each non-present entry zapped

	flushes   int // TLB flushes this gather issued
	freedPags int // frames it released
}

// OnNonPresent installs fn to be told of every non-present entry Zap
// clears (a swap or migration entry), under the entry's PT lock: the
// owner of swap slots drops the slot's reference there
// (zap_nonpresent_ptes). fn must not sleep on page or rmap locks.
func (g *Gather) OnNonPresent(fn func(pagetable.PTE)) { g.nonPresent = fn }

// Start begins a gather on ctx's mm (tlb_gather_mmu). Finish must be
// called.
func Start(sys *tlb.System, ram *physmem.Allocator, ctx *tlb.Context) *Gather {
	ctx.IncFlushPending()
	g := &Gather{ctx: ctx, sys: sys, ram: ram}
	g.resetRange()
	return g
}

// StartFullMM begins a gather that tears the whole mm down
// (tlb_gather_mmu_fullmm, for exit): every flush is of the whole mm.
func StartFullMM(sys *tlb.System, ram *physmem.Allocator, ctx *tlb.Context) *Gather {
	g := Start(sys, ram, ctx)
	g.fullmm = true
	return g
}

func (g *Gather) resetRange() {
	g.start, g.end = ^uint64(0), 0
	g.strideShift = pagetable.HugeShift
	g.cleared, g.freedTables = false, false
}

// track grows the recorded range to cover [start, end), cleared at the
// given page size.
func (g *Gather) track(start, end uint64, shift uint) {
	g.start, g.end = min(g.start, start), max(g.end, end)
	g.strideShift = min(g.strideShift, shift)
	g.cleared = true
}

// RemovePTE records that the 4 KiB entry at va was cleared
// (tlb_remove_tlb_entry).
func (g *Gather) RemovePTE(va uint64) {
	g.track(va, va+pagetable.PageSize, pagetable.PageShift)
}

// RemovePMD records that the 2 MiB entry at va was cleared.
func (g *Gather) RemovePMD(va uint64) {
	g.track(va, va+pagetable.HugeSize, pagetable.HugeShift)
}

// RemovePage queues a frame whose mapping reference is to be dropped once
// the TLBs are flushed (__tlb_remove_page). It reports whether the batch
// is full: the caller must then Flush, after dropping its page-table lock.
func (g *Gather) RemovePage(f *physmem.Frame) (mustFlush bool) {
	g.pages = append(g.pages, f)
	return len(g.pages) >= BatchPages
}

// RemoveTables queues freed page tables (tlb_remove_table): they are
// poisoned after the flush and after lockless walkers are synced, and
// every CPU that holds the mm lazily is made to leave it.
func (g *Gather) RemoveTables(ts ...pagetable.FreedTable) {
	for _, t := range ts {
		g.tables = append(g.tables, t)
		g.start, g.end = min(g.start, t.VA), max(g.end, t.End())
		g.freedTables = true
	}
}

// Flush makes the recorded teardown take effect (tlb_flush_mmu): flush the
// CPU TLBs of the recorded range, invalidate secondary TLBs, free the
// queued frames, then sync lockless walkers and poison the queued tables.
// With nothing recorded it only frees what is queued.
func (g *Gather) Flush() error {
	if g.cleared || g.freedTables {
		start, end := g.start, g.end
		if g.fullmm {
			start, end = 0, tlb.FlushAll
		}
		// FlushRange also invalidates the secondary TLBs (the context's
		// hook), before the frames below are freed.
		g.sys.FlushRange(g.ctx, start, end, g.strideShift, g.freedTables)
		g.flushes++
		g.resetRange()
	}
	var errs []error
	if err := g.ram.PutBatch(g.pages); err != nil {
		errs = append(errs, err)
	}
	g.freedPags += len(g.pages)
	clear(g.pages)
	g.pages = g.pages[:0]
	if len(g.tables) > 0 {
		g.ctx.Table().SyncWalkers()
		for _, t := range g.tables {
			t.Poison()
		}
		g.tables = g.tables[:0]
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("mmugather: freeing frames: %w", err)
	}
	return nil
}

// testIgnoreNested switches off the fix for concurrent gathers, so that a
// regression test can show the race it closes.
var testIgnoreNested = false

// Finish ends the gather (tlb_finish_mmu). If another gather ran on the
// mm meanwhile (tlb_flush_pending > 1), it may have cleared entries this
// one then found empty and so never recorded, and it may not have flushed
// them yet: Finish then flushes the whole mm, with freed tables, whatever
// it recorded itself, as Linux does since v5.2 (the May 2019 race of two
// overlapping MADV_DONTNEEDs). Finishing twice is a no-op.
func (g *Gather) Finish() error {
	if g.finished {
		return nil
	}
	g.finished = true
	if g.ctx.FlushNested() && !testIgnoreNested {
		g.fullmm = true
		g.cleared, g.freedTables = true, true
	}
	err := g.Flush()
	g.ctx.DecFlushPending()
	return err
}

// Flushes returns how many TLB flushes the gather issued.
func (g *Gather) Flushes() int { return g.flushes }

// Freed returns how many frame references it released.
func (g *Gather) Freed() int { return g.freedPags }
