package locks

import (
	"context"
	"iter"
)

// takeAllMutex serialises every TakeAll in the process (the kernel's
// mm_all_locks_mutex). It is a channel so that waiting for it can be
// cancelled. Holding it is what makes RWSem.takeAllMark safe to touch.
var takeAllMutex = make(chan struct{}, 1)

// takeAllKey identifies takeAllMutex to the lock-order checker.
var takeAllKey = new(byte)

// Taken is the set of semaphores one TakeAll acquired. Drop releases
// exactly those.
type Taken struct {
	sems    []*RWSem
	dropped bool
}

// TakeAll takes every semaphore yielded by the sequences, in order, for
// write, each exactly once however often it is yielded
// (mm_take_all_locks). Duplicates are recognised by a mark on the
// semaphore itself, so nothing is sorted or collected first: the design
// Linus proposed for mmu-notifier registration in May 2008. One global
// mutex serialises all takers, which is what makes the mark safe and the
// otherwise unordered acquisition deadlock-free.
//
// The caller holds whatever keeps the set from changing (for an mm, its
// mmap_lock for write). If ctx is done before everything is taken, every
// semaphore taken so far is released and ctx.Err() returned.
func TakeAll(ctx context.Context, seqs ...iter.Seq[*RWSem]) (*Taken, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if lockdepOn.Load() {
		trackAcquire(takeAllKey, ClassTakeAllMutex, 0, false, false, false, 2)
	}
	select {
	case takeAllMutex <- struct{}{}:
	case <-ctx.Done():
		if lockdepOn.Load() {
			trackRelease(takeAllKey)
		}
		return nil, ctx.Err()
	}
	t := &Taken{}
	for _, seq := range seqs {
		for s := range seq {
			if err := ctx.Err(); err != nil {
				t.Drop()
				return nil, err
			}
			if s.takeAllMark {
				continue
			}
			if err := s.lockContext(ctx, true, 0, true); err != nil {
				t.Drop()
				return nil, err
			}
			s.takeAllMark = true
			t.sems = append(t.sems, s)
		}
	}
	return t, nil
}

// Len returns how many distinct semaphores are held.
func (t *Taken) Len() int { return len(t.sems) }

// Drop releases every semaphore TakeAll took, clearing each mark before
// the unlock so the next taker starts clean (mm_drop_all_locks). Dropping
// twice is a no-op.
func (t *Taken) Drop() {
	if t == nil || t.dropped {
		return
	}
	t.dropped = true
	for _, s := range t.sems {
		s.takeAllMark = false
		s.Unlock()
	}
	t.sems = nil
	if lockdepOn.Load() {
		trackRelease(takeAllKey)
	}
	<-takeAllMutex
}
