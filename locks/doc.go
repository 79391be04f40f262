// Package locks provides the locking primitives the rest of gomm is built
// from, each named after the kernel object it stands for:
//
//   - RWSem: struct rw_semaphore (kernel/locking/rwsem.c), the mmap_lock,
//     i_mmap_rwsem and anon_vma lock. Fair, with DowngradeWrite,
//     IsContended (rwsem_is_contended) and context-cancellable waits.
//   - SpinLock: spinlock_t, the page_table_lock and split ptlocks, with
//     IsContended (spin_is_contended).
//   - SRCU: struct srcu_struct (kernel/rcu/srcutree.c), sleepable RCU for
//     the mmu-notifier list.
//   - SeqCount: seqcount_t (include/linux/seqlock.h).
//   - TakeAll: mm_take_all_locks/mm_drop_all_locks (mm/mmap.c), one global
//     mutex plus a per-semaphore "already taken" mark.
//   - Class and the lock-order checker: a small lockdep
//     (kernel/locking/lockdep.c).
//
// # Lock order
//
// The gomm order is declared once, by the Class variables in class.go:
//
//	mmap_lock > mm_all_locks_mutex > page lock > i_mmap_rwsem >
//	anon_vma > page_table_lock > pmd lock > ptlock
//
// A goroutine holding a lock of one class may only take locks of later
// classes. Two locks of one class are held together only with a nesting
// subclass (LockNested) or under TakeAll.
//
// # The lock-order checker
//
// Off by default, and then free but for one atomic load per lock
// operation. EnableLockdep turns it on at run time (tests do it in
// TestMain); from then on every acquisition is checked against the locks
// its goroutine holds, before it can block, so a would-be deadlock is
// reported instead of hung on. A report (Violation) names both locks and
// both acquisition sites. Reports are recorded (LockdepViolations) and
// passed to an optional handler (SetLockdepHandler). Goroutines stand in
// for kernel tasks; a lock released by another goroutine than the one that
// took it is found and released wherever it is recorded (see TrackRelease
// for the one case it cannot attribute).
//
// # Invariants
//
//   - RWSem: while anybody waits, the lock passes to waiters strictly in
//     arrival order (one writer, or a run of readers), so a stream of
//     readers cannot starve a writer nor the reverse.
//   - SRCU: Synchronize returns only after every read section that began
//     before it has ended; ReadLock and ReadUnlock never wait.
//   - TakeAll: each semaphore is taken at most once per TakeAll however
//     often it is yielded; on cancellation nothing stays held; Drop clears
//     every mark before releasing its semaphore.
package locks
