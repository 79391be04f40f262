// Package tlb simulates the CPUs of a machine: their TLBs, the mm each has
// loaded, lazy TLB mode, and the x86 shootdown protocol that keeps TLBs
// coherent with page tables.
//
// Kernel counterparts: arch/x86/mm/tlb.c (flush_tlb_mm_range,
// flush_tlb_func, switch_mm_irqs_off, the tlb_gen scheme),
// arch/x86/include/asm/tlbflush.h, the lazy-TLB parts of
// kernel/sched/core.c and kernel/fork.c (mmgrab/mmdrop, active_mm,
// CONFIG_MMU_LAZY_TLB_SHOOTDOWN), and kernel/sched/membarrier.c.
//
// # Model
//
// A CPU runs one Task at a time: a user task of an mm (a Context) or a
// kernel thread, which keeps the previous mm loaded lazily. Its TLB is
// 4-way set associative for 4 KiB pages with LRU in a set, plus a small
// fully associative TLB for 2 MiB pages; a miss runs the page table's
// lockless walker, which sets Accessed and Dirty. A write through an entry
// cached clean walks again to set Dirty, as x86 does. There are no PCIDs:
// switching to another mm flushes the TLB.
//
// FlushRange follows x86: it bumps the mm's TLB generation and sends an
// IPI to each CPU in the mm's cpumask, skipping lazy CPUs unless page
// tables were freed; a CPU handling the IPI does nothing if it already
// caught up, a partial flush if it is exactly one generation behind, and
// a full flush otherwise; more than FlushCeiling pages is a full flush. A
// lazy CPU that skipped flushes does a full flush when it switches back.
// An IPI is delivered by taking the target CPU's lock, which the CPU holds
// for the whole of each access, so it lands between two accesses.
//
// Lazy mm references come in two schemes (LazyMode): refcount (lazy CPUs
// hold mm_count) and shoot-lazies (the final mmdrop IPIs them away);
// Stats counts both the atomic operations and the IPIs.
//
// # Lock order
//
// A CPU's lock is the innermost lock in gomm: taken after page-table locks
// (a flush may be sent under a ptlock) and never held while taking another
// lock, waiting for another CPU, or calling the fault handler (which gets
// the CPU's number if it implements CPUFaultHandler). Being a
// leaf, it is a plain mutex outside the lock-order checker. The final mmdrop, which may take every CPU's lock, runs
// only after the dropping CPU's lock is released.
//
// # Invariants
//
//   - Every valid TLB entry belongs to the CPU's loaded mm.
//   - A CPU's local generation never exceeds its mm's; when they are equal
//     the TLB holds no translation a flush has asked to remove.
//   - A lazy CPU never makes user accesses, and flushes before it does
//     again if it skipped any flush.
//   - A Context is freed only when no CPU has it loaded; the checker
//     verifies this at every final mmdrop.
package tlb
