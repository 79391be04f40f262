package locks

import (
	"sync"
	"sync/atomic"
)

// SpinLock is the page-table lock (spinlock_t): short critical sections
// that never sleep, with spin_is_contended for lock-break decisions.
//
// It is built on sync.Mutex, which spins briefly before parking: a
// user-space goroutine holding a lock can be preempted, and pure spinning
// would then burn the other core for a whole time slice. The waiter count
// beside it gives IsContended. The zero value is an unlocked lock of no
// class.
type SpinLock struct {
	mu      sync.Mutex
	waiters atomic.Int32 // goroutines blocked in Lock
	class   *Class       // set once by Init, before the lock is shared
}

// Init sets the lock's class for the lock-order checker. Call it before
// the lock is shared.
func (l *SpinLock) Init(c *Class) { l.class = c }

// Class returns the lock's class (nil when none was set).
func (l *SpinLock) Class() *Class { return l.class }

// Lock takes the lock.
func (l *SpinLock) Lock() {
	if lockdepOn.Load() {
		trackAcquire(l, l.class, 0, false, false, false, 2)
	}
	l.lock()
}

// LockNested takes a second lock of the same class as one already held,
// declaring it subclass sub (spin_lock_nested): the pair is always taken
// in increasing subclass order, so it cannot deadlock.
func (l *SpinLock) LockNested(sub int) {
	if lockdepOn.Load() {
		trackAcquire(l, l.class, sub, false, false, false, 2)
	}
	l.lock()
}

func (l *SpinLock) lock() {
	if l.mu.TryLock() {
		return
	}
	l.waiters.Add(1)
	l.mu.Lock()
	l.waiters.Add(-1)
}

// TryLock takes the lock if it is free and reports whether it did.
func (l *SpinLock) TryLock() bool {
	if !l.mu.TryLock() {
		return false
	}
	if lockdepOn.Load() {
		trackAcquire(l, l.class, 0, false, true, false, 2)
	}
	return true
}

// Unlock releases the lock. Like sync.Mutex, it may be released by a
// goroutine other than the one that took it.
func (l *SpinLock) Unlock() {
	if lockdepOn.Load() {
		trackRelease(l)
	}
	l.mu.Unlock()
}

// IsContended reports whether another goroutine is waiting for the lock
// (spin_is_contended): a long loop under the lock uses it to drop and
// retake the lock so the waiter can make progress.
func (l *SpinLock) IsContended() bool { return l.waiters.Load() > 0 }
