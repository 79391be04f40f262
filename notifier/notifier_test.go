package notifier_test

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type fakeMM uint64

func (m fakeMM) ID() uint64 { return uint64(m) }

func newList() *notifier.List {
	l := new(notifier.List)
	l.Init(fakeMM(1))
	return l
}

// recorder implements start/end and release and logs every call.
type recorder struct {
	name    string
	mu      sync.Mutex
	log     []string
	refuse  bool // refuse non-blockable starts
	release int
}

func (r *recorder) add(s string) { r.mu.Lock(); r.log = append(r.log, s); r.mu.Unlock() }
func (r *recorder) InvalidateRangeStart(rg *notifier.Range) error {
	if r.refuse && !rg.Blockable() {
		r.add("refuse " + rg.Event.String())
		return errno.ErrAgain
	}
	r.add("start " + rg.Event.String())
	return nil
}
func (r *recorder) InvalidateRangeEnd(rg *notifier.Range) { r.add("end " + rg.Event.String()) }
func (r *recorder) Release(notifier.MM)                   { r.mu.Lock(); r.release++; r.mu.Unlock() }
func (r *recorder) events() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.log...)
}

type tlbDev struct{ calls atomic.Int32 }

func (d *tlbDev) InvalidateSecondaryTLBs(notifier.MM, uint64, uint64) { d.calls.Add(1) }

type both struct{ recorder }

func (*both) InvalidateSecondaryTLBs(notifier.MM, uint64, uint64) {}

type ager struct{ young bool }

func (a ager) ClearFlushYoung(notifier.MM, uint64, uint64) bool { return a.young }
func (a ager) ClearYoung(notifier.MM, uint64, uint64) bool      { return a.young }
func (a ager) TestYoung(notifier.MM, uint64) bool               { return a.young }

func TestRegisterValidates(t *testing.T) {
	l := newList()
	_, err := l.Register(struct{}{})
	assert.ErrorIs(t, err, errno.ErrInvalid, "implements nothing")
	_, err = l.Register(&both{})
	assert.ErrorIs(t, err, errno.ErrInvalid, "start/end with secondary TLBs, refused since 6.6")
	assert.False(t, l.HasSubscribers())
	_, err = l.Register(ager{})
	require.NoError(t, err)
	assert.False(t, l.HasSubscribers(), "aging alone costs invalidations nothing")
	_, err = l.Register(&recorder{})
	require.NoError(t, err)
	assert.True(t, l.HasSubscribers())
}

func TestStartEndPairing(t *testing.T) {
	l := newList()
	a, b := &recorder{name: "a"}, &recorder{name: "b"}
	_, _ = l.Register(a)
	_, _ = l.Register(b)
	r := notifier.NewRange(fakeMM(1), 0, 0x1000, notifier.EventUnmap, notifier.Blockable)
	require.NoError(t, l.InvalidateRangeStart(r))
	late := &recorder{name: "late"}
	_, _ = l.Register(late) // (the MM's locks forbid this; the list copes anyway)
	l.InvalidateRangeEnd(r)
	l.InvalidateRangeEnd(r) // a second end is ignored
	assert.Equal(t, []string{"start unmap", "end unmap"}, a.events())
	assert.Equal(t, []string{"start unmap", "end unmap"}, b.events())
	assert.Empty(t, late.events(), "no end without its start")
}

func TestNonBlockableRefusalEndsTheStarted(t *testing.T) {
	l := newList()
	ok, refusing, after := &recorder{}, &recorder{refuse: true}, &recorder{}
	for _, s := range []*recorder{ok, refusing, after} {
		_, err := l.Register(s)
		require.NoError(t, err)
	}
	r := notifier.NewRange(fakeMM(1), 0, 0x1000, notifier.EventClear, 0)
	err := l.InvalidateRangeStart(r)
	assert.ErrorIs(t, err, errno.ErrAgain)
	assert.Equal(t, []string{"start clear", "end clear"}, ok.events(), "those started are ended")
	assert.Equal(t, []string{"refuse clear"}, refusing.events())
	assert.Empty(t, after.events(), "those after the refusal never start")
	l.InvalidateRangeEnd(r)
	assert.Len(t, ok.events(), 2, "end after a refused start does nothing")

	// Blockable: a refusal is a contract violation; everybody still gets
	// start and end.
	refusing.refuse = false
	failing := &alwaysFail{}
	_, _ = l.Register(failing)
	r = notifier.NewRange(fakeMM(1), 0, 0x1000, notifier.EventClear, notifier.Blockable)
	require.NoError(t, l.InvalidateRangeStart(r))
	l.InvalidateRangeEnd(r)
	assert.Equal(t, 1, failing.ends)
	assert.Equal(t, uint64(1), l.ContractViolations())
}

type alwaysFail struct{ ends int }

func (f *alwaysFail) InvalidateRangeStart(*notifier.Range) error { return errors.New("no") }
func (f *alwaysFail) InvalidateRangeEnd(*notifier.Range)         { f.ends++ }

func TestUnregisterReleasesOnceAndSilences(t *testing.T) {
	l := newList()
	rec := &recorder{}
	s, err := l.Register(rec)
	require.NoError(t, err)
	r := notifier.NewRange(fakeMM(1), 0, 0x1000, notifier.EventUnmap, notifier.Blockable)
	require.NoError(t, l.InvalidateRangeStart(r))
	require.NoError(t, l.Unregister(s))
	l.InvalidateRangeEnd(r)
	assert.Equal(t, []string{"start unmap"}, rec.events(), "nothing after Unregister returned")
	assert.Equal(t, 1, rec.release)
	assert.ErrorIs(t, l.Unregister(s), errno.ErrInvalid)
	l.Release()
	assert.Equal(t, 1, rec.release, "at most once")
}

func TestUnregisterWaitsForRunningCallbacks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newList()
		b := &blocker{in: make(chan struct{}), out: make(chan struct{})}
		s, _ := l.Register(b)
		go func() {
			r := notifier.NewRange(fakeMM(1), 0, 1, notifier.EventClear, notifier.Blockable)
			_ = l.InvalidateRangeStart(r)
			l.InvalidateRangeEnd(r)
		}()
		<-b.in // the start callback is running
		var done atomic.Bool
		go func() { _ = l.Unregister(s); done.Store(true) }()
		synctest.Wait()
		assert.False(t, done.Load(), "Unregister waits for the running callback")
		close(b.out)
		synctest.Wait()
		assert.True(t, done.Load())
	})
}

type blocker struct{ in, out chan struct{} }

func (b *blocker) InvalidateRangeStart(*notifier.Range) error { close(b.in); <-b.out; return nil }
func (b *blocker) InvalidateRangeEnd(*notifier.Range)         {}

func TestReleaseStopsEverything(t *testing.T) {
	l := newList()
	rec := &recorder{}
	_, _ = l.Register(rec)
	l.Release()
	assert.Equal(t, 1, rec.release)
	r := notifier.NewRange(fakeMM(1), 0, 1, notifier.EventUnmap, notifier.Blockable)
	require.NoError(t, l.InvalidateRangeStart(r))
	l.InvalidateRangeEnd(r)
	assert.Empty(t, rec.events(), "no invalidation after release")
	_, err := l.Register(&recorder{})
	assert.ErrorIs(t, err, errno.ErrClosed)
	_, err = l.Insert(0, 1, nil)
	assert.ErrorIs(t, err, errno.ErrInvalid)
}

type freer struct {
	recorder
	freed atomic.Int32
}

func (f *freer) FreeNotifier() { f.freed.Add(1) }

func TestGetPutShareOneSubscription(t *testing.T) {
	l := newList()
	f := &freer{}
	s1, err := l.Get(f)
	require.NoError(t, err)
	s2, err := l.Get(f)
	require.NoError(t, err)
	assert.Same(t, s1, s2)
	assert.ErrorIs(t, l.Unregister(s1), errno.ErrInvalid, "shared subscriptions go through Put")
	require.NoError(t, l.Put(s1))
	assert.True(t, l.HasSubscribers())
	require.NoError(t, l.Put(s2))
	assert.False(t, l.HasSubscribers())
	assert.Equal(t, int32(1), f.freed.Load())
	assert.Zero(t, f.release, "Put never releases; only teardown does")
	assert.ErrorIs(t, l.Put(s1), errno.ErrInvalid)
}

// uncomparableOps implements a callback but cannot be compared with ==.
type uncomparableOps struct{ _ []int }

func (uncomparableOps) InvalidateRangeEnd(*notifier.Range)         {}
func (uncomparableOps) InvalidateRangeStart(*notifier.Range) error { return nil }

func TestGetIsOneSubscriptionUnderConcurrencyAndRefusesUncomparableOps(t *testing.T) {
	l := newList()
	f := &freer{}
	subs := make([]*notifier.Subscription, 8)
	var wg sync.WaitGroup
	for i := range subs {
		wg.Go(func() {
			s, err := l.Get(f)
			assert.NoError(t, err)
			subs[i] = s
		})
	}
	wg.Wait()
	for _, s := range subs {
		assert.Same(t, subs[0], s, "concurrent Gets share one subscription")
	}
	for _, s := range subs {
		require.NoError(t, l.Put(s))
	}
	assert.False(t, l.HasSubscribers())

	_, err := l.Get(uncomparableOps{})
	assert.ErrorIs(t, err, errno.ErrInvalid, "not a panic")
	_, err = l.Get(nil)
	assert.ErrorIs(t, err, errno.ErrInvalid)
}

func TestSecondaryTLBsAndAging(t *testing.T) {
	l := newList()
	d := &tlbDev{}
	_, _ = l.Register(d)
	l.InvalidateSecondaryTLBs(0, 0x1000)
	assert.Equal(t, int32(1), d.calls.Load())
	assert.False(t, l.ClearFlushYoung(0, 1))
	_, _ = l.Register(ager{young: false})
	_, _ = l.Register(ager{young: true})
	assert.True(t, l.ClearFlushYoung(0, 1))
	assert.True(t, l.ClearYoung(0, 1))
	assert.True(t, l.TestYoung(0))
}

func TestEventAndRangeStrings(t *testing.T) {
	r := notifier.NewRange(fakeMM(1), 0x1000, 0x3000, notifier.EventProtectionVMA, notifier.Blockable)
	assert.Equal(t, "protection-vma [0x1000, 0x3000) blockable=true", r.String())
	assert.Equal(t, "Event(99)", notifier.Event(99).String())
	assert.Equal(t, fmt.Sprint(notifier.EventMigrate), "migrate")
}
