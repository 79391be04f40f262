// Package rmap is the reverse map: from a frame back to every page-table
// entry that maps it. This first part is the anonymous side: anon_vmas,
// the chains that link them to VMAs, and the fork, split and exit
// operations that keep the families right.
//
// Kernel counterparts: mm/rmap.c (anon_vma_prepare, anon_vma_clone,
// anon_vma_fork, unlink_anon_vmas, put_anon_vma), include/linux/rmap.h,
// mm/interval_tree.c.
//
// # Lock order
//
// mmap_lock > page lock > i_mmap_rwsem > anon_vma (always the root's
// rwsem, locks.ClassAnonVMA) > page-table locks. The operations here are
// called with the MM's mmap_lock held and take each family's lock for the
// changes to its trees and counts.
//
// # Invariants
//
//   - Every anon_vma of a family shares the root's lock; a non-root
//     member holds a reference on the root, so the root is freed last.
//   - A VMA's chains list every anon_vma one of its pages may belong to:
//     its own and its ancestors' (those it was forked from).
//   - An anon_vma is freed when no chain is left in its tree and nothing
//     holds a reference; a fork reuses an idle member (no VMA, at most one
//     child, never the root), so fork-and-exit chains stay small.
package rmap
