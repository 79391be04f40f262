// Package notifier is the mmu-notifier API: how secondary MMUs (KVM's
// shadow pages, device TLBs, IOMMUs that walk the CPU page table, HMM
// mirrors) learn that the translations of an mm are about to change, so
// that none of them ever keeps a translation to a freed frame or a
// revoked right.
//
// Kernel counterparts: include/linux/mmu_notifier.h, mm/mmu_notifier.c,
// Documentation/mm/hmm.rst.
//
// # The contract
//
// A subscriber implements only the callbacks it needs (small interfaces
// found by type assertion at registration); a callback nobody implements
// costs nothing, and an mm with no subscriber pays one atomic load per
// operation (List.HasSubscribers).
//
//	callback                  when                                         locks held by the caller       may sleep          may fail
//	Release                   teardown, before any page is freed; or at    none                           yes                no
//	                          Unregister if teardown has not come; once
//	InvalidateRangeStart      before any entry of the range changes;      mmap_lock (or the rmap lock)   if Blockable       ErrAgain, only if
//	                          pages still mapped                                                                             not Blockable
//	InvalidateRangeEnd        after the change, once per successful start  as for its start               if Blockable       no
//	                          (none after the subscriber unregistered)
//	InvalidateSecondaryTLBs   every CPU TLB flush of the mm, after the     may be a page-table lock       no                 no
//	                          CPUs flushed, before the frames are freed
//	ClearFlushYoung,          aging: is the range accessed? (ORed with     the rmap lock                  no                 no
//	ClearYoung, TestYoung     the CPU's accessed bits)
//	IntervalOps.Invalidate    as InvalidateRangeStart, for intersecting    as InvalidateRangeStart        if Blockable       false, only if
//	                          intervals only; sets the interval's seq                                                        not Blockable
//
// A subscriber may not implement both InvalidateRangeStart/End and
// InvalidateSecondaryTLBs (ErrInvalid, as Linux since 6.6). Every end is
// paired with a start: the Range carries the subscribers its start
// reached. When a non-blockable start is refused, the subscribers already
// started are ended and the caller gets ErrAgain and changes nothing.
//
// Registration happens with mmap_lock held for write and every rmap lock
// taken (locks.TakeAll), so no invalidation is in flight while a
// subscriber joins. Unregister calls Release if it has not run and waits
// an SRCU grace period: when it returns, no callback of the subscription
// runs or will run. Get/Put share one refcounted subscription per ops
// value; the last Put frees it after a grace period (Freer) without
// calling Release.
//
// # Interval notifiers
//
// Insert subscribes to one address interval. The mm keeps an invalidate
// sequence, odd while an invalidation that reached an interval runs. A
// driver faults pages in with the retry loop: seq := in.ReadBegin()
// (waits while an invalidation of the interval runs); fault and snapshot
// (MM.RangeFault); take the driver lock; if in.ReadRetry(seq) start over;
// else install. Its Invalidate callback takes the same lock, calls
// SetSeq(curSeq) and drops what it mirrors. Inserts and removes during an
// invalidation are deferred to its end, not refused; Remove returns only
// when no callback can run. Teardown sends each interval one
// EventRelease invalidation. A device whose flush is asynchronous
// implements IntervalTwoPass instead: every intersecting device's
// InvalidateStart runs first, then all their finish steps, so the devices
// flush in parallel.
//
// # Locks
//
// Dispatch walks immutable, atomically published slices inside an SRCU
// read section; List.mu only serialises registration changes. The
// interval state has its own mutex, never held while a callback runs.
package notifier
