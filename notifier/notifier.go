package notifier

import (
	"fmt"
	"reflect"
	"sync"
	"sync/atomic"

	"github.com/gomm-dev/gomm/locks"
)

// The callbacks. A subscriber implements the ones it needs; which ones is
// found out once, at registration, and a callback nobody implements costs
// nothing when its event happens.

// Releaser is told when the mm is torn down (exit), before any of its
// pages is freed, or at Unregister if that comes first. At most once.
type Releaser interface {
	Release(mm MM)
}

// RangeInvalidator is told before and after the translations of a range
// change. InvalidateRangeStart runs before any entry in the range changes,
// with the pages still mapped; it may sleep if the range is blockable, and
// may fail with ErrAgain only if it is not. InvalidateRangeEnd runs after
// the change, once for every start that succeeded, unless the
// subscription is unregistered in between (as in Linux, a subscriber
// that leaves may see a start without its end, never an end without its
// start).
type RangeInvalidator interface {
	InvalidateRangeStart(r *Range) error
	InvalidateRangeEnd(r *Range)
}

// SecondaryTLBInvalidator is for devices that walk the CPU page table
// themselves and cache what they find (the 2014 invalidate_range, today's
// arch_invalidate_secondary_tlbs): called from every CPU TLB flush of the
// mm, after the CPU flush and before the flushed frames are freed, possibly
// under a page-table lock; it must not sleep. It may not be combined with
// RangeInvalidator.
type SecondaryTLBInvalidator interface {
	InvalidateSecondaryTLBs(mm MM, start, end uint64)
}

// Aging callbacks: each returns whether the device accessed the range,
// and the MM ORs the answers with the CPU's accessed bits.
type (
	// ClearFlushYounger clears the device's accessed state for the range
	// and flushes what depends on it (clear_flush_young).
	ClearFlushYounger interface {
		ClearFlushYoung(mm MM, start, end uint64) bool
	}
	// ClearYounger clears it without a flush (clear_young).
	ClearYounger interface {
		ClearYoung(mm MM, start, end uint64) bool
	}
	// TestYounger reports it without clearing (test_young).
	TestYounger interface {
		TestYoung(mm MM, addr uint64) bool
	}
)

// Freer is told, after Put dropped the last reference and a grace period
// passed, that no callback of the subscription will run again
// (free_notifier).
type Freer interface {
	FreeNotifier()
}

// Subscription is one subscriber's registration on one mm (struct
// mmu_notifier).
type Subscription struct {
	ops  any
	list *List

	rel  Releaser
	inv  RangeInvalidator
	tlbs SecondaryTLBInvalidator
	cfy  ClearFlushYounger
	cy   ClearYounger
	ty   TestYounger

	dead     atomic.Bool // unregistered: no callback may start any more
	released atomic.Bool // Release ran
	refs     int         // Get/Put references; protected by list.mu
	shared   bool        // created by Get; protected by list.mu
	gone     bool        // unregistered or put for good; protected by list.mu
}

// Ops returns what was registered.
func (s *Subscription) Ops() any { return s.ops }

// subscriberSet is one published, immutable slice of subscriptions.
type subscriberSet = atomic.Pointer[[]*Subscription]

// List is an mm's subscriptions (struct mmu_notifier_subscriptions). Call
// Init, which names the mm, before using it. Dispatch walks published,
// immutable slices inside an SRCU read section, so callbacks may sleep and
// Unregister can wait them out; each callback kind has its own slice, and
// a nil slice is the whole cost of an event nobody subscribes to.
//
// Callers of InvalidateRangeStart/End, and of Register, must keep the
// kernel's locking: changes bracketed by start and end hold mmap_lock (or
// the rmap locks) across the pair; Register holds mmap_lock for write and
// every rmap lock, so a subscriber never sees an end without its start.
type List struct {
	mm   MM
	srcu locks.SRCU

	mu       sync.Mutex // serialises changes to the sets below
	all      []*Subscription
	released bool // Release ran: no new subscriptions; protected by mu

	invs  subscriberSet
	tlbs  subscriberSet
	agers subscriberSet // any of the aging callbacks
	rels  subscriberSet
	iv    intervals

	contractViolations atomic.Uint64 // blockable starts that failed anyway
	trace              Tracer        // set before sharing, then read-only
}

// ContractViolations returns how many times a subscriber failed the start
// of a blockable invalidation, which the contract forbids.
func (l *List) ContractViolations() uint64 { return l.contractViolations.Load() }

// Init names the mm the list belongs to. Call it before sharing the list.
func (l *List) Init(mm MM) {
	l.mm = mm
	l.iv.init()
}

// HasSubscribers reports whether anything subscribes to range
// invalidations (including interval notifiers): the single atomic load the
// MM's paths pay when nobody does.
func (l *List) HasSubscribers() bool {
	return l.invs.Load() != nil || l.iv.hasTree.Load()
}

// Register adds a subscriber (mmu_notifier_register). It must implement
// at least one callback interface, and must not combine
// SecondaryTLBInvalidator with RangeInvalidator (ErrInvalid, as Linux
// refuses since 6.6). The caller holds the locks described on List.
func (l *List) Register(ops any) (*Subscription, error) {
	s, err := newSubscription(ops)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.addLocked(s); err != nil {
		return nil, err
	}
	return s, nil
}

// addLocked publishes the new subscription s. Called with mu held.
func (l *List) addLocked(s *Subscription) error {
	if l.released {
		return fmt.Errorf("notifier: register on mm %d after release: %w", l.mm.ID(), ErrClosed)
	}
	s.list = l
	l.all = append(l.all, s)
	l.publishLocked()
	return nil
}

func newSubscription(ops any) (*Subscription, error) {
	s := &Subscription{ops: ops}
	s.rel, _ = ops.(Releaser)
	s.inv, _ = ops.(RangeInvalidator)
	s.tlbs, _ = ops.(SecondaryTLBInvalidator)
	s.cfy, _ = ops.(ClearFlushYounger)
	s.cy, _ = ops.(ClearYounger)
	s.ty, _ = ops.(TestYounger)
	switch {
	case s.rel == nil && s.inv == nil && s.tlbs == nil && s.cfy == nil && s.cy == nil && s.ty == nil:
		return nil, fmt.Errorf("notifier: %T implements no callback: %w", ops, ErrInvalid)
	case s.inv != nil && s.tlbs != nil:
		return nil, fmt.Errorf("notifier: %T implements both range start/end and secondary-TLB invalidation: %w", ops, ErrInvalid)
	}
	return s, nil
}

// publishLocked rebuilds the per-callback sets from l.all. Called with mu
// held.
func (l *List) publishLocked() {
	var invs, tlbs, agers, rels []*Subscription
	for _, s := range l.all {
		if s.inv != nil {
			invs = append(invs, s)
		}
		if s.tlbs != nil {
			tlbs = append(tlbs, s)
		}
		if s.cfy != nil || s.cy != nil || s.ty != nil {
			agers = append(agers, s)
		}
		if s.rel != nil {
			rels = append(rels, s)
		}
	}
	store := func(p *subscriberSet, v []*Subscription) {
		if len(v) == 0 {
			p.Store(nil)
		} else {
			p.Store(&v)
		}
	}
	store(&l.invs, invs)
	store(&l.tlbs, tlbs)
	store(&l.agers, agers)
	store(&l.rels, rels)
}

// removeLocked takes s out of every set. Called with mu held.
func (l *List) removeLocked(s *Subscription) {
	for i, x := range l.all {
		if x == s {
			l.all = append(l.all[:i:i], l.all[i+1:]...)
			l.publishLocked()
			return
		}
	}
}

// Unregister removes a subscription (mmu_notifier_unregister): Release is
// called if it has not run, while the subscription still receives
// invalidations, then it is removed and a grace period is waited for, so
// that when Unregister returns no callback of the subscription is
// running or will run. Release comes first because a driver drops its
// translations there: removed before, it would keep them through an
// invalidation it no longer hears of (an munmap freeing their frames).
// Unregistering twice, or a subscription made by Get, is ErrInvalid.
func (l *List) Unregister(s *Subscription) error {
	l.mu.Lock()
	if s.list != l || s.shared || s.gone {
		l.mu.Unlock()
		return fmt.Errorf("notifier: unregister of a subscription not registered here: %w", ErrInvalid)
	}
	s.gone = true
	l.mu.Unlock()
	if s.rel != nil && !s.released.Swap(true) {
		tok := l.srcu.ReadLock()
		s.rel.Release(l.mm)
		l.srcu.ReadUnlock(tok)
	}
	l.mu.Lock()
	l.removeLocked(s) // already out if the mm went through release
	s.dead.Store(true)
	l.mu.Unlock()
	l.srcu.Synchronize()
	return nil
}

// Get returns the mm's one subscription for ops, creating it if needed
// (mmu_notifier_get): drivers that attach to an mm many times share it,
// refcounted. ops must be comparable (a pointer, usually; anything else
// is ErrInvalid). The caller holds the locks Register needs.
func (l *List) Get(ops any) (*Subscription, error) {
	if ops == nil || !reflect.TypeOf(ops).Comparable() {
		return nil, fmt.Errorf("notifier: get with %T, which cannot identify a subscription: %w", ops, ErrInvalid)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.all {
		if s.shared && s.ops == ops {
			s.refs++
			return s, nil
		}
	}
	s, err := newSubscription(ops)
	if err != nil {
		return nil, err
	}
	s.shared, s.refs = true, 1
	if err := l.addLocked(s); err != nil {
		return nil, err
	}
	return s, nil
}

// Put drops a reference taken by Get (mmu_notifier_put). The last one
// removes the subscription without calling Release (that happens only at
// teardown), waits a grace period, and then tells a Freer.
func (l *List) Put(s *Subscription) error {
	l.mu.Lock()
	if s.list != l || !s.shared || s.gone {
		l.mu.Unlock()
		return fmt.Errorf("notifier: put of a subscription Get did not return: %w", ErrInvalid)
	}
	s.refs--
	last := s.refs == 0
	if last {
		l.removeLocked(s)
		s.gone = true
		s.dead.Store(true)
	}
	l.mu.Unlock()
	if !last {
		return nil
	}
	l.srcu.Synchronize()
	if f, ok := s.ops.(Freer); ok {
		f.FreeNotifier()
	}
	return nil
}

// Synchronize waits until every callback running now has returned
// (mmu_notifier_synchronize).
func (l *List) Synchronize() { l.srcu.Synchronize() }

// Release runs every subscriber's Release and every interval notifier's
// release-event invalidation, once, at teardown, before any page of the
// mm is freed (__mmu_notifier_release). Afterwards the subscriptions stay
// registered but no invalidation reaches them any more, and Register
// fails.
func (l *List) Release() {
	l.mu.Lock()
	if l.released {
		l.mu.Unlock()
		return
	}
	l.released = true
	all := l.all
	l.mu.Unlock()

	tok := l.srcu.ReadLock()
	for _, s := range all {
		if s.rel != nil && !s.dead.Load() && !s.released.Swap(true) {
			t0 := clock(l.trace)
			s.rel.Release(l.mm)
			if l.trace != nil {
				emit(l.trace, t0, Call{Subscriber: s.ops, Callback: CallRelease, End: ^uint64(0), Event: EventRelease, Blockable: true})
			}
		}
	}
	l.srcu.ReadUnlock(tok)
	l.iv.release(l.mm)

	l.mu.Lock()
	for _, s := range all {
		s.dead.Store(true)
	}
	l.all = nil
	l.publishLocked()
	l.mu.Unlock()
	l.srcu.Synchronize()
}

// StartRange opens a blockable invalidation of [start, end) of the
// list's mm, tagged with ev and owner, and returns it for EndRange; with
// no subscribers it returns nil at the cost of one atomic load. The
// caller holds what keeps the range's translations from changing under
// its subscribers until EndRange (mmap_lock, or the rmap locks).
func (l *List) StartRange(start, end uint64, ev Event, owner any) *Range {
	if !l.HasSubscribers() {
		return nil
	}
	r := NewRange(l.mm, start, end, ev, Blockable)
	r.Owner = owner
	_ = l.InvalidateRangeStart(r) // a blockable start is never refused
	return r
}

// EndRange closes what StartRange opened; nil is a no-op.
func (l *List) EndRange(r *Range) {
	if r != nil {
		l.InvalidateRangeEnd(r)
	}
}

// InvalidateRangeStart tells every subscriber and every intersecting
// interval notifier that the translations of r are about to change
// (mmu_notifier_invalidate_range_start). If a subscriber of a
// non-blockable range fails, those already started are ended and
// ErrAgain is returned: the caller must not change anything. On success
// the caller must call InvalidateRangeEnd with the same Range.
func (l *List) InvalidateRangeStart(r *Range) error {
	r.started, r.active = r.started[:0], true
	if l == nil {
		return nil
	}
	if err := l.iv.invalidateStart(r); err != nil {
		r.active = false
		return err
	}
	subs := l.invs.Load()
	if subs == nil {
		return nil
	}
	tok := l.srcu.ReadLock()
	defer l.srcu.ReadUnlock(tok)
	for _, s := range *subs {
		if s.dead.Load() {
			continue
		}
		t0 := clock(l.trace)
		err := s.inv.InvalidateRangeStart(r)
		if l.trace != nil {
			emit(l.trace, t0, rangeCall(s.ops, CallInvalidateRangeStart, r, err != nil))
		}
		if err != nil {
			if r.Blockable() {
				// A blockable start may not fail. Like the kernel, carry
				// on: the subscriber still gets its end, and the change
				// happens.
				l.contractViolations.Add(1)
				r.started = append(r.started, s)
				continue
			}
			for _, p := range r.started {
				l.end(p, r)
			}
			r.started = r.started[:0]
			l.iv.invalidateEnd(r)
			r.active = false
			return fmt.Errorf("notifier: invalidate start of %v refused by %T: %w", r, s.ops, ErrAgain)
		}
		r.started = append(r.started, s)
	}
	return nil
}

// InvalidateRangeEnd tells the subscribers whose start ran that the change
// of r is done (mmu_notifier_invalidate_range_end), and lets interval
// notifiers' readers go on.
func (l *List) InvalidateRangeEnd(r *Range) {
	if l == nil || !r.active {
		return
	}
	r.active = false
	if len(r.started) > 0 {
		tok := l.srcu.ReadLock()
		for _, s := range r.started {
			if !s.dead.Load() {
				l.end(s, r)
			}
		}
		l.srcu.ReadUnlock(tok)
		r.started = r.started[:0]
	}
	l.iv.invalidateEnd(r)
}

func (l *List) end(s *Subscription, r *Range) {
	t0 := clock(l.trace)
	s.inv.InvalidateRangeEnd(r)
	if l.trace != nil {
		emit(l.trace, t0, rangeCall(s.ops, CallInvalidateRangeEnd, r, false))
	}
}

func rangeCall(ops any, c Callback, r *Range, refused bool) Call {
	return Call{Subscriber: ops, Callback: c, Start: r.Start, End: r.End, Event: r.Event, Blockable: r.Blockable(), Refused: refused}
}

// InvalidateSecondaryTLBs tells devices that walk the page table
// themselves to drop their translations of [start, end)
// (mmu_notifier_arch_invalidate_secondary_tlbs). Called from every CPU
// TLB flush, after the CPUs flushed and before frames are freed; must not
// sleep, nor may its callbacks.
func (l *List) InvalidateSecondaryTLBs(start, end uint64) {
	subs := l.tlbs.Load()
	if subs == nil {
		return
	}
	tok := l.srcu.ReadLock()
	for _, s := range *subs {
		if !s.dead.Load() {
			t0 := clock(l.trace)
			s.tlbs.InvalidateSecondaryTLBs(l.mm, start, end)
			if l.trace != nil {
				emit(l.trace, t0, Call{Subscriber: s.ops, Callback: CallInvalidateSecondaryTLBs, Start: start, End: end})
			}
		}
	}
	l.srcu.ReadUnlock(tok)
}

// ClearFlushYoung asks every aging subscriber to clear and flush its
// accessed state for [start, end); it reports whether any had accessed
// it.
func (l *List) ClearFlushYoung(start, end uint64) bool {
	return l.age(CallClearFlushYoung, start, end, func(s *Subscription) bool {
		return s.cfy != nil && s.cfy.ClearFlushYoung(l.mm, start, end)
	})
}

// ClearYoung is ClearFlushYoung without the flush.
func (l *List) ClearYoung(start, end uint64) bool {
	return l.age(CallClearYoung, start, end, func(s *Subscription) bool {
		return s.cy != nil && s.cy.ClearYoung(l.mm, start, end)
	})
}

// TestYoung reports whether any subscriber accessed addr, clearing
// nothing.
func (l *List) TestYoung(addr uint64) bool {
	return l.age(CallTestYoung, addr, addr+1, func(s *Subscription) bool {
		return s.ty != nil && s.ty.TestYoung(l.mm, addr)
	})
}

func (l *List) age(c Callback, start, end uint64, ask func(*Subscription) bool) bool {
	subs := l.agers.Load()
	if subs == nil {
		return false
	}
	tok := l.srcu.ReadLock()
	defer l.srcu.ReadUnlock(tok)
	young := false
	for _, s := range *subs {
		if s.dead.Load() {
			continue
		}
		t0 := clock(l.trace)
		if ask(s) {
			young = true // every subscriber is asked: each clears its own state
		}
		if l.trace != nil {
			emit(l.trace, t0, Call{Subscriber: s.ops, Callback: c, Start: start, End: end})
		}
	}
	return young
}
