// Package gomm emulates the core of Linux memory management in user space.
//
// A Machine has RAM (physmem), CPUs with TLBs (tlb) and, when Config.Check
// is set, the invariant checker. An MM is an address space: VMAs, a
// 4-level page table (pagetable) and the TLB context CPUs load. Its
// methods mirror the system calls and kernel paths they are named after,
// validate their arguments the same way, and return errno values:
// Mmap, Munmap, Mprotect, Madvise, Mremap, HandleFault, ReadAt/WriteAt
// (access_process_vm) and Exit (exit_mmap). Programs run on CPUs: switch
// a CPU to one of the MM's tasks and load and store through it; its TLB
// misses walk the page table and its faults come back to HandleFault.
//
// Kernel counterparts: include/linux/mm_types.h (mm_struct,
// vm_area_struct), mm/mmap.c and mm/vma.c (mmap, munmap, VMA split and
// merge, get_unmapped_area), mm/memory.c (handle_mm_fault,
// do_anonymous_page, wp_page_copy, exit_mmap), mm/mprotect.c,
// mm/madvise.c, mm/mremap.c.
//
// # The invariant
//
// Every path that takes a translation away keeps the kernel's order: clear
// the entry, flush every TLB that may cache it, then free the frame
// (through an mmu_gather for unmaps, ptep_clear_flush for copy-on-write).
// With the checker on, every frame free and the end of every downgrade
// (munmap, MAP_FIXED over a mapping, mprotect removing rights,
// MADV_DONTNEED, mremap moving or shrinking) is checked against every
// CPU's TLB, and any translation that survived is recorded as a Violation.
//
// # Locks
//
//	mmap_lock (MM, RWSem)         the VMA tree; held for write by mmap,
//	                              munmap, mprotect and mremap, for read
//	                              by faults, madvise and ReadAt/WriteAt
//	  page_table_lock, pmd lock, ptlock (pagetable)
//	    cpu (tlb)                 taken by flushes
//
// A CPU calls HandleFault with no lock held. Faults in different 2 MiB
// regions take different ptlocks.
//
// # Not yet
//
// Shared and file-backed mappings, fork, swap, KSM and migration come with
// the reverse maps; the secondary-MMU notifiers hook into the gathers'
// invalidate_secondary_tlbs call site.
package gomm
