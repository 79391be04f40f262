// Package rmap is the reverse map: from a frame back to every page-table
// entry that maps it, and the operations that need that.
//
//   - Anonymous memory: anon_vmas, the chains that link them to VMAs, and
//     the fork, split, merge and exit operations that keep the families
//     right (anon_vma_prepare, anon_vma_clone, anon_vma_fork,
//     unlink_anon_vmas).
//   - Files: File is an address_space: the page cache, the i_mmap tree of
//     the VMAs that map it, and a backing store.
//   - KSM: StableNode lists the places a merged page is mapped.
//   - Walk visits every mapping of a frame through whichever of these is
//     its mapping (rmap_walk, with a control struct and a try-lock mode),
//     and Env's operations use it: TryToUnmap, Mkclean, Referenced,
//     TryToMigrate and RemoveMigrationEntries. Each changes one entry at a
//     time with the kernel's order: an invalidation start for the page,
//     clear and flush under the page-table lock (the flush reaches the
//     secondary TLBs through the space's hook), the new entry, the end.
//
// Kernel counterparts: mm/rmap.c, include/linux/rmap.h,
// mm/interval_tree.c, the address_space parts of mm/filemap.c, the
// stable-node walk of mm/ksm.c.
//
// # Lock order
//
// mmap_lock > page lock > i_mmap_rwsem (locks.ClassIMmapRWSem) > anon_vma
// (always the root's rwsem, locks.ClassAnonVMA) > page-table locks. Walks
// run with the frame's page lock held and without any mmap_lock: the
// rmap locks keep the VMAs they find, and the page tables under them,
// alive, because an MM takes a VMA out of the trees before it frees the
// tables under it. A File's cache lock is a leaf.
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
//   - A VMA's range and page offset change only with the trees' locks held
//     for write (Adjust, LockRmap), so a walker never sees it half-moved.
//   - A frame's mapping and index change only under its page lock, or
//     before anybody else can see the frame.
package rmap
