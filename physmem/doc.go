// Package physmem is the machine's physical memory: frames (struct page,
// order-0 folios) and the allocator that hands them out from a fixed RAM
// size.
//
// Kernel counterparts: include/linux/mm_types.h (struct page, struct
// folio), include/linux/page-flags.h, include/linux/page_ref.h,
// mm/page_alloc.c, and the page lock and its hashed wait table in
// mm/filemap.c.
//
// # Frames
//
// A Frame carries a reference count, a map count, page flags, an rmap slot
// (Mapping and index), a private word (the swap entry of a swap-cache
// frame), a sleeping page lock, and 4 KiB of data taken on first write
// (zeroed; recycled from freed frames when there are some, else new).
// Without data a Frame is 64 bytes. Its data is held as 64-bit words and
// accessed atomically, as memory is by hardware: simulated CPUs, devices and
// the MM may touch one frame at once without a Go data race, and partial
// word writes merge by compare-and-swap.
//
// # Lifetimes
//
// Alloc returns a frame with one reference. The last Put frees it: the
// free hooks run (the checker verifies there that no TLB still maps the
// frame), the data is poisoned so that a stale reader sees PoisonWord
// (the frame's data is swapped for a shared poisoned page, and its own
// goes to be recycled by a later first write), the generation is bumped
// so that (PFN, Gen) names one lifetime, and the frame returns to the
// free list. PutBatch drops many references at once (release_pages): the
// frames it frees run the hooks and return to the free list a batch at a
// time.
//
// AllocHuge hands out HugeFrames (512) frames with consecutive PFNs from
// an aligned block, for a transparent huge page. They are not a compound
// page: each keeps its own reference and map count and is freed by its
// own last Put, so splitting a huge mapping into 4 KiB ones changes no
// frame's accounting. The allocator tracks how many frames of each block
// are free, so a wholly free block is found without compaction; there is
// no compaction, and a huge allocation that finds no such block fails at
// once, as a THP fault's opportunistic allocation does.
//
// # Per-CPU frame caches
//
// With CPUCaches(n), each of n CPUs has a cache of free frames (struct
// per_cpu_pages): AllocOn(cpu) takes from it and refills it from the
// free list a batch at a time, so CPUs faulting at once do not take the
// free list's lock for every frame. Frees go to the free list. Cached
// frames are free in every sense but where they wait: Stats counts them
// free, and an allocation that finds the free list empty drains every
// cache and tries again, with every cache locked so that no refill takes
// the frames back meanwhile (drain_all_pages): ErrNoMem still means no
// frame is free anywhere. A huge allocation drains them only when they
// would complete a free block.
//
// # Device-private memory
//
// AddDeviceRegion gives a device's private memory frames of its own
// (memremap_pages, MEMORY_DEVICE_PRIVATE), numbered above RAM so that a
// PFN names one frame machine-wide. They are never on the free list: the
// device's driver hands one out with DeviceRegion.Init, and the Put of
// its last reference runs the free hooks (the checker sees device frames
// freed too) and then returns it to the driver through the region's
// release function (dev_pagemap_ops.page_free).
//
// Get or Put on a free frame (use after free,
// double free) is refused with ErrFreed and counted, never absorbed; a free
// of a frame that is still mapped or locked is reported as ErrBadState.
//
// # Lock order and protection
//
// The page lock (Frame.Lock) ranks after mmap_lock and before i_mmap_rwsem
// (locks.ClassPageLock); TryLock may be used under page-table locks.
// Mapping, index and private are protected by the page lock, or by the
// frame not yet being visible to anyone else. Reference count, map count
// and flags are atomic. The allocator's free list has its own mutex, a
// leaf lock; a CPU cache's mutex ranks just before it (a refill or drain
// holds both).
package physmem
