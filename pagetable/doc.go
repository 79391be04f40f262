// Package pagetable is an x86-64-style 4-level radix page table: 512
// entries per level, 48-bit canonical virtual addresses, 4 KiB leaves and
// 2 MiB PMD leaves, split page-table locks, and a lockless walker that
// updates Accessed and Dirty by compare-and-swap the way the hardware does.
// It can be embedded on its own (a VMM's shadow or EPT table keyed by
// guest-physical address) and is the primary MMU's table in gomm.
//
// Kernel counterparts: include/linux/pgtable.h, include/linux/mm.h
// (pte_offset_map_lock, pmd_lock, ptlock), the page-table parts of
// mm/memory.c (__pte_alloc, zap_pte_range, free_pgtables), mm/pgtable-generic.c,
// mm/huge_memory.c (__split_huge_pmd), mm/gup.c (GUP-fast), and
// arch/x86/include/asm/pgtable_types.h for the entry encoding.
//
// # Locks and their order
//
//	page_table_lock (Table)  PGD and PUD slots: installing and freeing PUD and PMD tables
//	  pmd lock (per PMD table)  that table's slots: installing and freeing PTE
//	                            tables, huge leaves, splits
//	    ptlock (per PTE table)  the 512 entries of one PTE table
//
// Faults and updates in different 2 MiB regions take different ptlocks and
// never contend. The ptlock of a PTE table lives in its PMD table, one per
// slot, like the kernel's lives in the table's struct page; after taking
// it, code re-checks that the slot still holds the table it meant (the
// kernel's pmd_same re-check), since the table may have been freed while
// it waited.
//
// # Invariants
//
//   - Every entry is read and written atomically. A PTE is only replaced by
//     Swap, CompareAndSwap, And or Or, so an Accessed or Dirty bit the
//     walker sets concurrently is never lost (the lost-dirty-bit bug that
//     makes ptep_get_and_clear atomic in the kernel).
//   - A PMD slot holds a leaf entry or a PTE table, never both, except for
//     the instant of a split, when the table is published before the leaf
//     is cleared so a walker always finds one of them.
//   - A PTE table is freed only when empty and under its PMD lock and its
//     own ptlock; a PMD or PUD table only when it has no populated slot,
//     under the page_table_lock. A freed table is marked dead under the
//     lock that guarded installs into it, so a racing install retries from
//     the root instead of populating an unlinked table.
//   - A freed table is handed to the caller (FreedTable) and poisoned only
//     when the caller says walkers are done with it. A walk or lookup that
//     reads PoisonPTE reports FaultPoisoned and is counted in
//     Stats.PoisonedReads: proof that somebody freed a table too early.
//
// # Who may run concurrently
//
// Every method is safe for concurrent use. The one rule the caller keeps,
// as the kernel keeps it with mmap_lock: an operation, walk or Range on an
// address inside the bounds given to FreeEmpty must either not overlap in
// time with it, or be a Walk or Lookup inside LocklessBegin/LocklessEnd,
// so that SyncWalkers waits for it before the freed tables are poisoned.
package pagetable
