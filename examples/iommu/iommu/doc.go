// Package iommu is a shared-virtual-addressing (SVA) device: a DMA engine
// behind an IOMMU that walks the process's own CPU page table, caches
// translations in an IOTLB, and raises page requests for what is not
// present. It keeps no page table of its own, so the only thing it must
// be told is when CPU translations are flushed.
//
// Kernel counterparts: drivers/iommu/iommu-sva.c (iommu_sva_bind_device,
// the page-request handler iommu_sva_handle_mm), the SMMUv3 and VT-d SVA
// notifiers (arch_invalidate_secondary_tlbs), and the 2014 discussion
// that moved their flush from invalidate_range_start to a callback run
// with the CPU flush (../shared/threads).
//
// # Structure
//
// A DMA access first looks in the IOTLB. On a miss the device walks the
// CPU page table with the lockless hardware walker (pagetable.Table.Walk
// inside LocklessBegin/End, which sets Accessed and Dirty like a CPU
// would) and caches the leaf. A walk that finds no usable entry raises a
// page request, which the host serves through the MM's fault path
// (HandleFault), and the access walks again.
//
// The device implements only InvalidateSecondaryTLBs and Release: the MM
// calls the first after clearing the CPU entries and flushing the CPU
// TLBs, before any frame they mapped is freed, so the IOTLB flush lands
// exactly where it must: a walk after it sees the cleared entry, and
// nothing is freed while the IOTLB could still use it. Two documented
// wrong modes show why: ModeFlushAtStart flushes in
// InvalidateRangeStart, before the CPU entries are cleared, so a DMA
// running meanwhile walks and caches them again; ModeFlushAtEnd flushes
// in InvalidateRangeEnd, after the frames were freed. The machine's
// checker catches both.
//
// # Locks and invariants
//
// mu is the IOTLB's lock and ranks below every MM lock: a DMA access
// holds it across lookup, walk and the data transfer, and a flush takes
// it, so a flush waits for DMA in flight and no walk straddles a flush
// (the ordering the hardware's invalidation-completion gives). Page
// requests are served with mu released. Invariant (correct mode): an
// IOTLB entry maps a frame only while the CPU page table maps it at that
// address with at least the entry's rights, or before the
// InvalidateSecondaryTLBs call that follows its clearing.
package iommu
