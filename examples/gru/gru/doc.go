// Package gru is a TLB-only secondary MMU in the shape of SGI's GRU (the
// Global Reference Unit of UV systems): a chip whose contexts, one per
// user thread, load and store process memory through a small device TLB
// shared by every MM that uses the chip. There are no device page
// tables: a miss looks the page up through the CPU page table and drops
// the translation into the TLB.
//
// Kernel counterparts: drivers/misc/sgi-gru/grutlbpurge.c
// (gru_invalidate_range_start/end, ms_range_active, gru_register_mmu_notifier
// with mmu_notifier_get) and grufault.c (gru_try_dropin).
//
// # Structure
//
// A Chip has one TLB tagged by MM. Open attaches a context to an MM,
// sharing the chip's one subscription on that MM (GetNotifier /
// PutNotifier, refcounted, as the kernel driver's mmu_notifier_get).
// InvalidateRangeStart raises the MM's range-active count and flushes
// the range from the TLB once; until the matching End, drop-ins for that
// MM wait (the driver's ms_range_active and wait queue). End lowers the
// count, bumps the MM's sequence and wakes the waiters. A miss snapshots
// the sequence, looks the page up with GetUserPage (dropping the
// reference at once: the flush, not a pin, protects the translation),
// and drops it in only if no range is active and the sequence has not
// moved.
//
// ModePerPTTable is a documented toy for comparison: it flushes once per
// 2 MiB page-table span of every range, as a driver hooked to a
// per-page-table-lock callback would, which is what the one-call-per-range
// design saves (the benchmark and the demo print both).
//
// # Locks and invariants
//
// mu guards the TLB and the per-MM range state and ranks below every MM
// lock; accesses hold it across lookup and data transfer, so a flush
// waits for accesses in flight. Invariant: a TLB entry for an MM maps a
// frame only while the MM's page table does, or before the
// InvalidateRangeStart of the range that clears it returns.
package gru
