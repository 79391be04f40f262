package notifier

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/gomm-dev/gomm/internal/itree"
)

// IntervalOps is what an interval notifier's owner implements
// (mmu_interval_notifier_ops).
type IntervalOps interface {
	// Invalidate is called when an invalidation intersects the interval,
	// before any entry changes. The driver takes its own lock, calls
	// in.SetSeq(curSeq) under it, and drops whatever it mirrors of the
	// range. For a non-blockable range it must not sleep, and may return
	// false instead to make the whole invalidation fail with ErrAgain.
	Invalidate(in *Interval, r *Range, curSeq uint64) bool
}

// IntervalTwoPass is the optional two-pass form of IntervalOps: a device
// that flushes asynchronously starts its flush in InvalidateStart and
// returns a finish step; the core starts every intersecting device first
// and runs the finish steps in a second pass, so several devices flush in
// parallel instead of one after another. A nil finish means nothing to
// wait for; ok false refuses a non-blockable range, as Invalidate's false
// does. When an IntervalOps also implements this, only this is called.
type IntervalTwoPass interface {
	InvalidateStart(in *Interval, r *Range, curSeq uint64) (finish func(), ok bool)
}

// Interval is an interval notifier (struct mmu_interval_notifier): a
// subscription to invalidations of [start, end) only, with a sequence
// number that lets a driver fault pages in without holding a lock across
// the fault: ReadBegin, fault, take the driver lock, ReadRetry, and only
// then install the translation.
type Interval struct {
	list       *List
	start, end uint64
	ops        IntervalOps
	// seq is the mm's invalidate sequence as of the last invalidation that
	// reached this interval (odd while it runs); written by SetSeq under
	// the driver's lock and read by ReadRetry under it.
	seq     atomic.Uint64
	removed bool                  // protected by intervals.mu
	node    itree.Node[*Interval] // its place in the mm's interval tree; protected by intervals.mu
}

// Start and End return the interval's bounds.
func (in *Interval) Start() uint64 { return in.start }

// End returns the end of the interval (exclusive).
func (in *Interval) End() uint64 { return in.end }

// SetSeq records that an invalidation with sequence curSeq reached the
// interval (mmu_interval_set_seq). Call it from Invalidate, under the
// lock that also guards ReadRetry.
func (in *Interval) SetSeq(curSeq uint64) { in.seq.Store(curSeq) }

// ReadBegin starts a read side (mmu_interval_read_begin): it returns a
// sequence to check later with ReadRetry, waiting first if an
// invalidation of this interval is in flight.
func (in *Interval) ReadBegin() uint64 {
	iv := &in.list.iv
	iv.mu.Lock()
	defer iv.mu.Unlock()
	seq := in.seq.Load()
	for seq == iv.seq {
		// An invalidation that reached us is running: wait for its end.
		iv.cond.Wait()
	}
	return seq
}

// ReadRetry reports whether an invalidation reached the interval since
// ReadBegin returned seq (mmu_interval_read_retry). Call it under the
// driver's lock, just before installing what was read.
func (in *Interval) ReadRetry(seq uint64) bool { return in.seq.Load() != seq }

// CheckRetry is ReadRetry for use without the driver's lock, as an early
// exit from a long read (mmu_interval_check_retry).
func (in *Interval) CheckRetry(seq uint64) bool { return in.seq.Load() != seq }

// intervals is the interval-notifier half of a List.
type intervals struct {
	mu   sync.Mutex
	cond sync.Cond
	// seq is the mm's invalidate sequence: even when no invalidation that
	// reached an interval is running, odd while one is.
	seq      uint64                // protected by mu
	active   int                   // invalidations in flight; protected by mu
	tree     itree.Tree[*Interval] // protected by mu
	deferred []deferredOp
	// hasTree is set, for good, before the first interval is inserted,
	// by EnableIntervals under locks that exclude every invalidation in
	// flight (the MM's mmap_lock for write). From then on every
	// invalidation counts itself in active, which is what lets Insert see
	// one that began before the interval existed.
	hasTree  atomic.Bool
	released bool   // protected by mu
	trace    Tracer // set before sharing, then read-only
}

type deferredOp struct {
	in     *Interval
	insert bool
}

func (iv *intervals) init() { iv.cond.L = &iv.mu }

func (iv *intervals) invalidating() bool { return iv.seq&1 == 1 }

// Insert subscribes ops to invalidations of [start, start+length)
// (mmu_interval_notifier_insert). Inserting while an invalidation runs is
// deferred to its end, not refused: until then ReadBegin on the new
// interval waits.
func (l *List) Insert(start, length uint64, ops IntervalOps) (*Interval, error) {
	if length == 0 || start+length < start || ops == nil {
		return nil, fmt.Errorf("notifier: insert [%#x, +%#x): %w", start, length, ErrInvalid)
	}
	in := &Interval{list: l, start: start, end: start + length, ops: ops}
	in.node = itree.Node[*Interval]{Start: start, Last: start + length - 1, Value: in}
	iv := &l.iv
	iv.mu.Lock()
	defer iv.mu.Unlock()
	if iv.released {
		return nil, fmt.Errorf("notifier: insert on mm %d after release: %w", l.mm.ID(), ErrClosed)
	}
	iv.hasTree.Store(true) // a no-op when EnableIntervals ran, as it must for a live mm
	switch {
	case iv.invalidating():
		// The tree may not change under a running invalidation: the
		// insert waits for its end, and so do readers.
		iv.deferred = append(iv.deferred, deferredOp{in: in, insert: true})
		in.seq.Store(iv.seq)
	case iv.active > 0:
		// Invalidations are in flight that reached no interval, so we
		// cannot know whether they cover this one: assume they do, and
		// make readers wait for them to end.
		iv.seq |= 1
		iv.tree.Insert(&in.node)
		in.seq.Store(iv.seq)
	default:
		in.seq.Store(iv.seq - 1) // odd and not current: readers go ahead
		iv.tree.Insert(&in.node)
	}
	return in, nil
}

// EnableIntervals prepares the list for interval notifiers
// (mmu_notifier_register with no subscriber, setting has_itree). The
// caller excludes every invalidation in flight while it runs, as
// Register's callers do; afterwards every invalidation counts itself, so
// Insert can make readers wait for one that began before their interval
// existed.
func (l *List) EnableIntervals() { l.iv.hasTree.Store(true) }

// IntervalsEnabled reports whether EnableIntervals (or an Insert) ran.
func (l *List) IntervalsEnabled() bool { return l.iv.hasTree.Load() }

// Remove unsubscribes the interval (mmu_interval_notifier_remove). If an
// invalidation runs, the removal is deferred to its end and Remove waits
// for it: when Remove returns, Invalidate is not running and will not be
// called again.
func (in *Interval) Remove() error {
	iv := &in.list.iv
	iv.mu.Lock()
	defer iv.mu.Unlock()
	if in.removed {
		return fmt.Errorf("notifier: interval [%#x, %#x) removed twice: %w", in.start, in.end, ErrInvalid)
	}
	in.removed = true
	if iv.invalidating() {
		seq := iv.seq
		iv.deferred = append(iv.deferred, deferredOp{in: in})
		for iv.seq == seq {
			iv.cond.Wait()
		}
		return nil
	}
	iv.remove(in)
	return nil
}

func (iv *intervals) remove(in *Interval) {
	if iv.tree.Remove(&in.node) {
		return
	}
	// A deferred insert removed before it happened.
	for i, d := range iv.deferred {
		if d.in == in && d.insert {
			iv.deferred = append(iv.deferred[:i:i], iv.deferred[i+1:]...)
			return
		}
	}
}

// invalidateStart tells the intervals r intersects (mn_itree_invalidate).
// The interval callbacks run with iv.mu released, so they may sleep and
// may call ReadBegin-free driver code; the mm's sequence stays odd until
// the matching invalidateEnd.
func (iv *intervals) invalidateStart(r *Range) error {
	if !iv.hasTree.Load() {
		return nil
	}
	iv.mu.Lock()
	iv.active++
	r.ivCounted = true
	var hit []*Interval
	if r.End > r.Start {
		for n := range iv.tree.Overlapping(r.Start, r.End-1) {
			hit = append(hit, n.Value)
		}
	}
	if len(hit) > 0 && !iv.invalidating() {
		iv.seq++ // odd: an invalidation that reaches intervals runs
	}
	seq := iv.seq
	iv.mu.Unlock()
	var finishes []func()
	for _, in := range hit {
		var ok bool
		t0 := clock(iv.trace)
		if tp, two := in.ops.(IntervalTwoPass); two {
			var finish func()
			finish, ok = tp.InvalidateStart(in, r, seq)
			if finish != nil {
				finishes = append(finishes, finish)
			}
		} else {
			ok = in.ops.Invalidate(in, r, seq)
		}
		if iv.trace != nil {
			emit(iv.trace, t0, rangeCall(in.ops, CallIntervalInvalidate, r, !ok && !r.Blockable()))
		}
		if !ok && !r.Blockable() {
			for _, f := range finishes {
				f() // devices already flushing finish before we give up
			}
			r.ivCounted = false
			iv.end()
			return fmt.Errorf("notifier: interval [%#x, %#x) refused %v: %w", in.start, in.end, r, ErrAgain)
		}
	}
	for _, f := range finishes {
		f()
	}
	return nil
}

func (iv *intervals) invalidateEnd(r *Range) {
	if r.ivCounted {
		r.ivCounted = false
		iv.end()
	}
}

// end finishes one active invalidation (mn_itree_inv_end): the last one
// out makes the sequence even again, applies deferred inserts and
// removes, and wakes readers.
func (iv *intervals) end() {
	iv.mu.Lock()
	defer iv.mu.Unlock()
	iv.active--
	if iv.active > 0 || !iv.invalidating() {
		return
	}
	iv.seq++ // even
	for _, d := range iv.deferred {
		if d.insert {
			iv.tree.Insert(&d.in.node)
		} else {
			iv.remove(d.in)
		}
	}
	iv.deferred = nil
	iv.cond.Broadcast()
}

// release sends every interval one release-event invalidation and stops
// further ones.
func (iv *intervals) release(mm MM) {
	if !iv.hasTree.Load() {
		iv.mu.Lock()
		iv.released = true
		iv.mu.Unlock()
		return
	}
	r := NewRange(mm, 0, ^uint64(0), EventRelease, Blockable)
	_ = iv.invalidateStart(r)
	iv.invalidateEnd(r)
	iv.mu.Lock()
	iv.released = true
	iv.mu.Unlock()
}
