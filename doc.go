// Package gomm emulates the core of Linux memory management in user space.
//
// A Machine has RAM (physmem), CPUs with TLBs (tlb), optionally a swap
// device, an LRU, a same-page merger and, when Config.Check is set, the
// invariant checker. An MM is an address space: VMAs, a 4-level page
// table (pagetable) and the TLB context CPUs load. Its methods mirror the
// system calls and kernel paths they are named after, validate their
// arguments the same way, and return errno values: Mmap, MmapFile,
// Munmap, Mprotect, Madvise, Mremap, Mlock, HandleFault, ReadAt/WriteAt
// (access_process_vm), Fork, MovePages and Exit (exit_mmap). A File is
// an inode with its page cache (rmap.File). Reclaim, KSMScan and Migrate
// act on the whole machine through the reverse maps (rmap). Programs run
// on CPUs: switch a CPU to one of the MM's tasks and load and store
// through it; its TLB misses walk the page table and its faults come back
// to HandleFault.
//
// Kernel counterparts: include/linux/mm_types.h (mm_struct,
// vm_area_struct), mm/mmap.c and mm/vma.c (mmap, munmap, VMA split and
// merge, get_unmapped_area), mm/memory.c (handle_mm_fault,
// do_anonymous_page, do_swap_page, wp_page_copy, copy_page_range,
// exit_mmap), mm/filemap.c and mm/truncate.c, mm/mprotect.c,
// mm/madvise.c, mm/mremap.c, mm/mlock.c, mm/vmscan.c and
// mm/swap_state.c, mm/ksm.c, mm/migrate.c.
//
// # The invariant
//
// Every path that takes a translation away keeps the kernel's order: clear
// the entry, flush every TLB that may cache it (the flush also invalidates
// the secondary TLBs), then free the frame (through an mmu_gather for
// unmaps, ptep_clear_flush for copy-on-write, reclaim, KSM and
// migration). With the checker on, every frame free and the end of every
// downgrade (munmap, MAP_FIXED over a mapping, mprotect removing rights,
// MADV_DONTNEED, mremap moving or shrinking, truncate, mkclean, KSM
// write-protection) is checked against every TLB and every registered
// secondary cache, and any translation that survived is recorded as a
// Violation.
//
// # Locks
//
//	i_rwsem (File)                   file writes and truncation
//	  mmap_lock (MM, RWSem)          the VMA tree; held for write by mmap,
//	                                 munmap, mprotect, mremap, mlock and
//	                                 fork, for read by faults, madvise,
//	                                 ReadAt/WriteAt and MovePages
//	    page lock (physmem)          page cache, swap cache, reclaim,
//	                                 KSM, migration
//	      i_mmap_rwsem, anon_vma     the reverse maps (rmap)
//	        page_table_lock, pmd lock, ptlock (pagetable)
//	          cpu (tlb)              taken by flushes
//
// anonMu (per MM), the swap device's and the LRU's mutexes are leaves,
// but for a CPU's LRU-add batch, whose mutex is taken just before the
// LRU's when the batch joins the lists; the KSM scanner's mutex is taken
// before any mmap_lock and never under one. Allocation that reclaims
// (direct reclaim) happens with at most mmap_lock held; page-table
// allocation never reclaims. A CPU calls HandleFaultOn with no lock
// held.
//
// # Per-CPU state
//
// A fault a CPU takes (HandleFaultOn) shares as little with the other
// CPUs as the kernel's does: its frame comes from the CPU's frame cache
// (physmem.CPUCaches), it joins the LRU in the CPU's batch of 31
// (lru_add), the MM's rss and fault counts are per CPU, and faults in
// different 2 MiB regions take different ptlocks on different cache
// lines. Reclaim and Stats drain the batches first. Faults nobody's CPU
// took (HandleFault: devices, GUP, MAP_POPULATE) use the shared paths.
//
// # Invariants
//
//   - A frame's map count equals the entries that map it; its reverse map
//     reaches every one of them (CheckRmap verifies both).
//   - A swap slot's count equals the entries that name it; a slot is
//     free when that count is zero and no frame caches it.
//   - A VMA is out of the reverse maps before the page tables under it
//     are freed.
package gomm
