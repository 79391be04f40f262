// Package kvm is a fake KVM: a virtual machine whose guest-physical
// memory is a host process's anonymous memory, mapped to the guest by a
// shadow (EPT-like) page table that the VM keeps coherent with the host
// through mmu notifiers. It is the secondary MMU mmu notifiers were
// invented for: guest memory is swapped, merged and migrated by the host
// like any other memory, without pinning a page.
//
// Kernel counterparts: virt/kvm/kvm_main.c (kvm_mmu_notifier_*,
// mmu_invalidate_retry_gfn, __kvm_handle_hva_range), arch/x86/kvm/mmu
// (the TDP MMU's page fault and zap paths).
//
// # Structure
//
// A VM has memslots (guest frame ranges backed by ranges of the host
// MM), a shadow page table (a pagetable.Table keyed by guest-physical
// address whose leaves hold host frame numbers), and vCPUs that run guest
// loads and stores through it. A vCPU access walks the shadow table like
// hardware; on a miss it takes a guest fault:
//
//  1. snapshot the invalidation sequence (mmu_invalidate_seq);
//  2. translate the guest frame to a host address by the memslots and
//     GUP the page (a reference, no pin);
//  3. take the mmu lock; if an invalidation is in progress over that
//     host address, or the sequence moved, drop the page and retry;
//  4. install the shadow entry and drop the GUP reference: from now on
//     the notifier, not a reference, keeps the translation honest.
//
// InvalidateRangeStart raises the in-progress count, widens the
// in-progress range and zaps the shadow entries of every guest frame the
// host range backs; InvalidateRangeEnd bumps the sequence and lowers the
// count. ClearFlushYoung, ClearYoung and TestYoung age shadow entries so
// host reclaim sees guest accesses; Release zaps everything.
//
// # Locks and invariants
//
// mmuLock (kvm->mmu_lock, a reader-writer lock as in the TDP MMU) ranks
// below every MM lock: notifier callbacks take it, and nothing is called
// into the MM with it held. vCPU accesses hold it for read, so a zap,
// which holds it for write, waits until no vCPU uses the entries it
// removes: the remote TLB flush of the real thing. The shadow table's
// leaves are only installed or removed under mmuLock held for write;
// the hardware walker sets their Accessed and Dirty bits atomically under
// the read side. Invariant: a shadow entry maps a host frame only while
// the host page table maps that frame at the memslot's address with at
// least the entry's rights, or an invalidation covering it is in
// progress and its start has zapped the entry. The VM registers itself
// with the machine's checker, which verifies at every frame free that no
// shadow entry still maps the frame.
package kvm
