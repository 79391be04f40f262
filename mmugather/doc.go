// Package mmugather batches the teardown of translations: struct
// mmu_gather and the zap loop that feeds it.
//
// Kernel counterparts: include/asm-generic/tlb.h, mm/mmu_gather.c, and
// zap_pte_range/zap_pmd_range in mm/memory.c.
//
// # The order
//
// A Gather records cleared entries, queues the frames they mapped and the
// page tables freed, and makes them take effect on Flush, always in this
// order:
//
//	PTE cleared (by Zap, under the ptlock)
//	  -> CPU TLBs flushed (one FlushRange for the whole recorded range)
//	  -> secondary TLBs invalidated (invalidate_secondary_tlbs)
//	  -> frames freed (their mapping reference dropped)
//	  -> lockless walkers synced, then freed tables poisoned
//
// so no frame is freed while any TLB, CPU or device, may still translate
// to it, and no table is poisoned while a walker may still read it.
//
// # Concurrent gathers
//
// Every gather counts itself in its mm's tlb_flush_pending. When Finish
// sees another gather in progress on the same mm it flushes the whole mm:
// the other gather may have cleared entries in this one's range, which
// this one then found empty and never recorded, and not flushed them yet
// (the May 2019 race between two MADV_DONTNEEDs, fixed in v5.2).
//
// # Locks
//
// Zap takes each PTE table's lock (and a PMD lock to split a huge leaf it
// only partly covers) and drops it before flushing a full batch. Flush and
// Finish take no page-table lock; FlushRange takes CPU locks one at a
// time. A Gather belongs to one goroutine.
//
// # Invariants
//
//   - A queued frame's mapping reference is dropped only after the flush
//     that covers the entry that mapped it.
//   - A freed table is poisoned only after that flush (which also made
//     lazy CPUs leave the mm) and after SyncWalkers.
package mmugather
