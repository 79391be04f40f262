// Package hmm is a device that mirrors a process's address space the HMM
// way, like the kernel's test driver (lib/test_hmm.c, dmirror): a page
// table of its own, kept right by an interval notifier, filled by
// RangeFault; device-private memory that anonymous pages migrate to and
// fault back from; and exclusive access for device atomics, which any
// CPU access revokes.
//
// Kernel counterparts: lib/test_hmm.c and its selftest
// tools/testing/selftests/mm/hmm-tests.c, mm/hmm.c (hmm_range_fault),
// mm/migrate_device.c (migrate_vma_*), include/linux/memremap.h
// (dev_pagemap_ops), make_device_exclusive in mm/rmap.c.
//
// # Structure
//
// A Device owns a gomm.DevicePagemap (its memory) and a free list of its
// pages; Open gives a process a Mirror. A Mirror's page table maps
// virtual page numbers to frames, RAM or device, and holds no page
// references: the interval notifier, over the whole address space, drops
// translations before the MM changes them. A device access that misses
// faults through gomm.MM.RangeFault under a notifier sequence and
// installs the snapshot only if ReadRetry says no invalidation came in
// between.
//
// Migration to device memory (MigrateToDevice) runs gomm.MM.MigrateVMA
// as an operation of the mirror's own: a token that is the Owner of the
// migration's invalidations. The mirror drops its translations of the
// range first and skips exactly those invalidations (the Migrate owner
// skip; the kernel's dmirror matches the device instead, which would also
// hide another thread's migration of the same range); it maps each page
// where it lands from the Migrated callback, before the RAM page is
// freed, unless another invalidation reached the range meanwhile. A CPU
// touching a device page faults into the device's MigrateToRAM, which
// migrates it back the same way. RangeFault reports the device's own
// pages as they are (DevicePrivateOwner), so the device reads its memory
// without faulting; another device's pages are faulted back to RAM.
//
// MakeExclusive claims pages with gomm.MM.MakeDeviceExclusive and maps
// them as atomic while each page is still locked; AtomicAdd needs such a
// mapping. A CPU access takes the page back: it waits for the page lock,
// so for the mapping, and its invalidation revokes it. mprotect and fork
// revoke claims too.
//
// # Locks and invariants
//
// Mirror.mu (dmirror->mutex) ranks below every MM lock and below the page
// lock: Invalidate takes it inside the MM's invalidations, and the
// Migrated and exclusive callbacks with pages locked. No driver lock is
// held across a call into the MM: a claim can fault a device page back
// to RAM through MigrateToRAM, which starts an operation of its own. Device accesses
// hold it across the lookup and the copy, so no invalidation, and hence
// no free, overtakes a copy. Device.mu (the free list) and
// Device.mirrorsMu are leaf locks. Invariant: a mirror translates a frame
// only while the CPU page table maps it at that address, or during the
// invalidation that is removing it; the machine's checker verifies it at
// every free, device pages' included.
package hmm
