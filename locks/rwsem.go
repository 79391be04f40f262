package locks

import (
	"context"
	"sync"
	"sync/atomic"
)

// Bits of RWSem.count. The reader count sits above the two flags so that a
// reader's fast path is a single add.
const (
	rwWriter  int64 = 1 << 0 // a writer holds the lock
	rwWaiters int64 = 1 << 1 // the wait queue is non-empty
	rwReader  int64 = 1 << 2 // one reader
)

// RWSem is a fair reader/writer semaphore (struct rw_semaphore), the
// mmap_lock and the rmap locks.
//
// Uncontended, RLock and RUnlock are one atomic add each, Lock and
// Unlock one compare-and-swap each.
// Once anybody waits, the lock is handed over strictly in arrival order: a
// queued writer stops new readers from overtaking it, and readers queued
// behind a writer are let in together when it leaves. So neither side
// starves. Unlike sync.RWMutex it offers DowngradeWrite, IsContended and
// waits that a context can cancel (the _killable variants).
//
// The zero value is an unlocked semaphore of no class.
type RWSem struct {
	// count is the lock word: rwWriter | rwWaiters | readers*rwReader.
	// Readers change it by atomic adds outside waitMu: a reader's fast
	// path adds itself and backs out (under waitMu) if it finds a writer
	// or rwWaiters, so it never overtakes a waiter, and RUnlock
	// subtracts itself and then, if rwWaiters was set, wakes the queue
	// under waitMu. grant, under waitMu, takes the lock by
	// compare-and-swap, so such an add only makes it fail or retry: a
	// reader counted for a moment delays a grant, and its back-out wakes
	// the queue again. IsLocked may see such a reader for that moment.
	count  atomic.Int64
	waitMu sync.Mutex
	queue  []*rwWaiter // FIFO of blocked lockers; protected by waitMu
	class  *Class      // set once by Init, before the lock is shared
	// takeAllMark is set while TakeAll holds this semaphore; protected by
	// the global take-all mutex (Linus's "already locked" bit, 2008).
	takeAllMark bool
}

type rwWaiter struct {
	writer  bool
	granted bool          // protected by RWSem.waitMu
	ready   chan struct{} // closed when the lock has been handed over
}

// Init sets the semaphore's class for the lock-order checker. Call it
// before the semaphore is shared.
func (s *RWSem) Init(c *Class) { s.class = c }

// Class returns the semaphore's class (nil when none was set).
func (s *RWSem) Class() *Class { return s.class }

// RLock takes the semaphore shared (down_read).
func (s *RWSem) RLock() {
	if lockdepOn.Load() {
		trackAcquire(s, s.class, 0, true, false, false, 2)
	}
	if !s.fastRLock() {
		_ = s.wait(context.Background(), false)
	}
}

// RLockContext is RLock that gives up when ctx is done
// (down_read_killable), returning ctx.Err() without holding the lock. If
// the lock was handed over at the same moment, it is kept and nil returned.
func (s *RWSem) RLockContext(ctx context.Context) error {
	return s.lockContext(ctx, false, 0, false)
}

// TryRLock takes the semaphore shared if that needs no waiting.
func (s *RWSem) TryRLock() bool {
	if !s.fastRLock() {
		return false
	}
	if lockdepOn.Load() {
		trackAcquire(s, s.class, 0, true, true, false, 2)
	}
	return true
}

// RUnlock releases a shared hold (up_read).
func (s *RWSem) RUnlock() {
	if lockdepOn.Load() {
		trackRelease(s)
	}
	// One add, as up_read's atomic_long_add_return: a load and a
	// compare-and-swap would take the line from the other readers twice.
	c := s.count.Add(-rwReader)
	if c+rwReader < rwReader {
		s.count.Add(rwReader)
		panic("locks: RUnlock of RWSem not held for read")
	}
	if c&rwWaiters != 0 {
		// A waiter queued before our add saw the flag; one queued
		// after it saw our reader gone when it tried to take the lock.
		s.waitMu.Lock()
		s.wakeLocked()
		s.waitMu.Unlock()
	}
}

// Lock takes the semaphore exclusive (down_write).
func (s *RWSem) Lock() {
	if lockdepOn.Load() {
		trackAcquire(s, s.class, 0, false, false, false, 2)
	}
	if !s.count.CompareAndSwap(0, rwWriter) {
		_ = s.wait(context.Background(), true)
	}
}

// LockContext is Lock that gives up when ctx is done (down_write_killable).
func (s *RWSem) LockContext(ctx context.Context) error {
	return s.lockContext(ctx, true, 0, false)
}

// LockNested takes a second semaphore of a class already held, declaring
// it subclass sub (down_write_nested).
func (s *RWSem) LockNested(sub int) {
	if lockdepOn.Load() {
		trackAcquire(s, s.class, sub, false, false, false, 2)
	}
	if !s.count.CompareAndSwap(0, rwWriter) {
		_ = s.wait(context.Background(), true)
	}
}

// TryLock takes the semaphore exclusive if it is free.
func (s *RWSem) TryLock() bool {
	if !s.count.CompareAndSwap(0, rwWriter) {
		return false
	}
	if lockdepOn.Load() {
		trackAcquire(s, s.class, 0, false, true, false, 2)
	}
	return true
}

// Unlock releases an exclusive hold (up_write).
func (s *RWSem) Unlock() {
	if lockdepOn.Load() {
		trackRelease(s)
	}
	if s.count.CompareAndSwap(rwWriter, 0) {
		return
	}
	if s.count.Load()&rwWriter == 0 {
		panic("locks: Unlock of RWSem not held for write")
	}
	s.waitMu.Lock()
	s.count.Add(-rwWriter)
	s.wakeLocked()
	s.waitMu.Unlock()
}

// DowngradeWrite turns an exclusive hold into a shared one without letting
// any writer in between (downgrade_write). Readers queued at the head are
// let in with it.
func (s *RWSem) DowngradeWrite() {
	if lockdepOn.Load() {
		trackDowngrade(s)
	}
	if s.count.CompareAndSwap(rwWriter, rwReader) {
		return
	}
	if s.count.Load()&rwWriter == 0 {
		panic("locks: DowngradeWrite of RWSem not held for write")
	}
	s.waitMu.Lock()
	s.count.Add(rwReader - rwWriter)
	s.wakeLocked()
	s.waitMu.Unlock()
}

// IsContended reports whether anybody is waiting for the semaphore
// (rwsem_is_contended): a long operation under mmap_lock uses it to drop
// the lock and let the waiter in, as mm_take_all_locks' callers were asked
// to in 2008.
func (s *RWSem) IsContended() bool { return s.count.Load()&rwWaiters != 0 }

// IsLocked reports whether the semaphore is held in either mode. A
// reader about to back out of a failed fast path counts for a moment.
func (s *RWSem) IsLocked() bool { return s.count.Load()&^rwWaiters != 0 }

// IsWriteLocked reports whether a writer holds the semaphore.
func (s *RWSem) IsWriteLocked() bool { return s.count.Load()&rwWriter != 0 }

// fastRLock takes the semaphore shared if no writer holds it and nobody
// waits, with one add (down_read's atomic_long_add_return): readers
// that share the lock write its line once each, where a load and a
// compare-and-swap would fetch it twice and fail whenever another
// reader got in between.
func (s *RWSem) fastRLock() bool {
	if s.count.Add(rwReader)&(rwWriter|rwWaiters) == 0 {
		return true
	}
	// A writer holds it or somebody waits: take the reader back. Under
	// waitMu, since the queue may have tried to grant the lock while
	// the reader was counted, and failed because of it: wake it again.
	if testHookBackOut != nil {
		testHookBackOut()
	}
	s.waitMu.Lock()
	s.count.Add(-rwReader)
	s.wakeLocked()
	s.waitMu.Unlock()
	return false
}

// testHookBackOut, if set, runs when a reader's fast path has counted
// itself and is about to back out: tests stop it there.
var testHookBackOut func()

func (s *RWSem) lockContext(ctx context.Context, writer bool, sub int, nested bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if lockdepOn.Load() {
		trackAcquire(s, s.class, sub, !writer, false, nested, 3)
	}
	var ok bool
	if writer {
		ok = s.count.CompareAndSwap(0, rwWriter)
	} else {
		ok = s.fastRLock()
	}
	if ok {
		return nil
	}
	if err := s.wait(ctx, writer); err != nil {
		if lockdepOn.Load() {
			trackRelease(s)
		}
		return err
	}
	return nil
}

// wait queues the caller and blocks until the lock is handed over, or ctx
// is done.
func (s *RWSem) wait(ctx context.Context, writer bool) error {
	s.waitMu.Lock()
	if len(s.queue) == 0 && s.grant(writer) {
		s.waitMu.Unlock()
		return nil
	}
	w := &rwWaiter{writer: writer, ready: make(chan struct{})}
	s.queue = append(s.queue, w)
	s.count.Or(rwWaiters)
	// The holder may have left by a fast path before the flag was set;
	// nobody else would then wake the queue.
	s.wakeLocked()
	s.waitMu.Unlock()

	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
	}
	s.waitMu.Lock()
	defer s.waitMu.Unlock()
	if w.granted {
		return nil
	}
	for i, q := range s.queue {
		if q == w {
			s.queue = append(s.queue[:i], s.queue[i+1:]...)
			break
		}
	}
	// Leaving may unblock whoever queued behind us (readers behind a
	// departed writer), or empty the queue.
	s.wakeLocked()
	return ctx.Err()
}

// grant takes the lock for one waiter if the lock word allows it. Called
// with waitMu held; the CAS still races with readers' adds, and with
// writers' fast paths while rwWaiters is clear.
func (s *RWSem) grant(writer bool) bool {
	for {
		c := s.count.Load()
		var next int64
		if writer {
			if c&^rwWaiters != 0 {
				return false
			}
			next = c | rwWriter
		} else {
			if c&rwWriter != 0 {
				return false
			}
			next = c + rwReader
		}
		if s.count.CompareAndSwap(c, next) {
			return true
		}
	}
}

// wakeLocked hands the lock to as many waiters at the head of the queue as
// can hold it together: one writer, or a run of readers. Called with
// waitMu held.
func (s *RWSem) wakeLocked() {
	for len(s.queue) > 0 {
		w := s.queue[0]
		if !s.grant(w.writer) {
			break
		}
		w.granted = true
		close(w.ready)
		s.queue[0] = nil
		s.queue = s.queue[1:]
		if w.writer {
			break
		}
	}
	if len(s.queue) == 0 {
		s.queue = nil
		s.count.And(^rwWaiters)
	}
}
