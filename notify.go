package gomm

import (
	"context"
	"fmt"
	"iter"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/locks"
	"github.com/gomm-dev/gomm/notifier"
)

// ErrAgain is EAGAIN: a non-blockable operation could not proceed now.
var ErrAgain = errno.ErrAgain

// MmapLocked reports whether anybody holds the MM's mmap_lock, for
// drivers and tests that assert the notifier contract's locking (an
// invalidation start or end runs with it held).
func (mm *MM) MmapLocked() bool { return mm.mmapLock.IsLocked() }

// Notifiers returns the MM's subscription list, for Synchronize and for
// code that dispatches aging callbacks.
func (mm *MM) Notifiers() *notifier.List { return &mm.notifiers }

// rmapLocks yields the locks rmap walkers hold while they change this
// MM's translations without mmap_lock (mm_take_all_locks): the
// i_mmap_rwsem of every mapped file first, then the root anon_vma lock
// of every VMA that has one. A lock met twice is yielded twice; TakeAll
// takes each once. Called with mmap_lock held for write.
func (mm *MM) rmapLocks() iter.Seq[*locks.RWSem] {
	return func(yield func(*locks.RWSem) bool) {
		for v := range mm.vmas.all {
			if v.File != nil && !yield(v.File.Sem()) {
				return
			}
		}
		for v := range mm.vmas.all {
			if v.AnonVMA != nil && !yield(v.AnonVMA.Sem()) {
				return
			}
		}
	}
}

// RegisterNotifier subscribes ops to the MM's invalidations
// (mmu_notifier_register). It takes mmap_lock for write and every rmap
// lock of the MM (TakeAll: each once, no sorting), so no invalidation is
// in flight while the subscriber joins: it never sees an end without its
// start. ctx bounds the wait for those locks. ops must implement at least
// one of the notifier callback interfaces (ErrInvalid otherwise).
func (mm *MM) RegisterNotifier(ctx context.Context, ops any) (*notifier.Subscription, error) {
	return mm.subscribe(ctx, func() (*notifier.Subscription, error) { return mm.notifiers.Register(ops) })
}

// GetNotifier returns the MM's shared subscription for ops, registering
// it the first time (mmu_notifier_get); PutNotifier drops it.
func (mm *MM) GetNotifier(ctx context.Context, ops any) (*notifier.Subscription, error) {
	return mm.subscribe(ctx, func() (*notifier.Subscription, error) { return mm.notifiers.Get(ops) })
}

func (mm *MM) subscribe(ctx context.Context, add func() (*notifier.Subscription, error)) (*notifier.Subscription, error) {
	if err := mm.mmapLock.LockContext(ctx); err != nil {
		return nil, err
	}
	defer mm.mmapLock.Unlock()
	if err := mm.checkOpen(); err != nil {
		return nil, err
	}
	taken, err := locks.TakeAll(ctx, mm.rmapLocks())
	if err != nil {
		return nil, err
	}
	defer taken.Drop()
	return add()
}

// UnregisterNotifier removes a subscription made by RegisterNotifier:
// Release runs if it has not, and when UnregisterNotifier returns no
// callback of it is running or will run.
func (mm *MM) UnregisterNotifier(s *notifier.Subscription) error {
	return mm.notifiers.Unregister(s)
}

// PutNotifier drops a reference GetNotifier returned.
func (mm *MM) PutNotifier(s *notifier.Subscription) error { return mm.notifiers.Put(s) }

// InsertInterval subscribes ops to invalidations of [start, start+length)
// (mmu_interval_notifier_insert). The MM's first interval is inserted the
// way Linux does it, through a registration (mmap_lock for write and
// every rmap lock), so no invalidation is in flight when interval
// tracking starts.
func (mm *MM) InsertInterval(start, length uint64, ops notifier.IntervalOps) (*notifier.Interval, error) {
	if !mm.notifiers.IntervalsEnabled() {
		if _, err := mm.subscribe(context.Background(), func() (*notifier.Subscription, error) {
			mm.notifiers.EnableIntervals()
			return nil, nil
		}); err != nil {
			return nil, err
		}
	}
	return mm.notifiers.Insert(start, length, ops)
}

// ReapStats counts what Reap did.
type ReapStats struct {
	Reaped  int // frames released
	Skipped int // VMAs whose non-blockable invalidation was refused
}

// Reap releases the anonymous memory of an MM without sleeping, as the
// OOM reaper does for a dying process: it only tries mmap_lock, and each
// VMA's invalidation is non-blockable, so a subscriber that would have to
// sleep refuses it with ErrAgain and that VMA is skipped for a later
// attempt. It returns ErrAgain if mmap_lock is taken or any VMA was
// skipped.
func (mm *MM) Reap() (ReapStats, error) {
	var st ReapStats
	if !mm.mmapLock.TryRLock() {
		return st, fmt.Errorf("gomm: reap of mm %d: mmap_lock is busy: %w", mm.ID(), ErrAgain)
	}
	defer mm.mmapLock.RUnlock()
	if err := mm.checkOpen(); err != nil {
		return st, err
	}
	var err error
	mm.vmas.all(func(v *vma) bool {
		r := notifier.NewRange(mm, v.Start, v.End, notifier.EventClear, 0)
		if serr := mm.notifiers.InvalidateRangeStart(r); serr != nil {
			st.Skipped++
			return true
		}
		g := newGather(mm)
		zs, zerr := g.Zap(v.Start, v.End)
		mm.addRSS(noCPU, -int64(zs.Frames))
		st.Reaped += zs.Frames
		if ferr := g.Finish(); zerr == nil {
			zerr = ferr
		}
		mm.notifiers.InvalidateRangeEnd(r)
		if zerr != nil {
			err = zerr
		}
		return err == nil
	})
	if err == nil && st.Skipped > 0 {
		err = fmt.Errorf("gomm: reap of mm %d: %d mappings refused: %w", mm.ID(), st.Skipped, ErrAgain)
	}
	return st, err
}
