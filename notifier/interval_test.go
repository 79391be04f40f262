package notifier_test

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// mirror is the driver side of an interval notifier: a lock, and the
// sequence it records under it.
type mirror struct {
	mu      sync.Mutex
	calls   []uint64 // the curSeq of each invalidate
	refuse  bool
	inside  chan struct{} // if set, closed when an invalidate starts
	release chan struct{} // if set, invalidate waits on it
	events  []notifier.Event
}

func (m *mirror) Invalidate(in *notifier.Interval, r *notifier.Range, cur uint64) bool {
	if m.refuse && !r.Blockable() {
		return false
	}
	m.mu.Lock()
	in.SetSeq(cur)
	m.calls = append(m.calls, cur)
	m.events = append(m.events, r.Event)
	m.mu.Unlock()
	if m.inside != nil {
		close(m.inside)
		m.inside = nil
		<-m.release
	}
	return true
}

func (m *mirror) seqs() []uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]uint64(nil), m.calls...)
}

func invalidate(l *notifier.List, start, end uint64, flags notifier.Flags) error {
	r := notifier.NewRange(fakeMM(1), start, end, notifier.EventClear, flags)
	if err := l.InvalidateRangeStart(r); err != nil {
		return err
	}
	l.InvalidateRangeEnd(r)
	return nil
}

func TestIntervalSeesOnlyIntersectingInvalidations(t *testing.T) {
	l := newList()
	m := &mirror{}
	in, err := l.Insert(0x10000, 0x4000, m)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x14000), in.End())
	seq := in.ReadBegin()
	require.NoError(t, invalidate(l, 0x20000, 0x30000, notifier.Blockable))
	assert.Empty(t, m.seqs())
	assert.False(t, in.ReadRetry(seq))
	require.NoError(t, invalidate(l, 0x13000, 0x20000, notifier.Blockable))
	require.Len(t, m.seqs(), 1)
	assert.Equal(t, uint64(1), m.seqs()[0]%2, "the sequence is odd while the invalidation runs")
	assert.True(t, in.ReadRetry(seq), "a read that began before must retry")
	assert.True(t, in.CheckRetry(seq))
	seq = in.ReadBegin()
	assert.False(t, in.ReadRetry(seq))
	require.NoError(t, in.Remove())
	assert.ErrorIs(t, in.Remove(), errno.ErrInvalid)
	require.NoError(t, invalidate(l, 0, 1<<40, notifier.Blockable))
	assert.Len(t, m.seqs(), 1, "removed")
	_, err = l.Insert(5, 0, m)
	assert.ErrorIs(t, err, errno.ErrInvalid)
}

func TestReadBeginWaitsForARunningInvalidation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newList()
		m := &mirror{inside: make(chan struct{}), release: make(chan struct{})}
		in, _ := l.Insert(0, 0x1000, m)
		inside := m.inside
		go func() { _ = invalidate(l, 0, 0x1000, notifier.Blockable) }()
		<-inside
		var got atomic.Bool
		go func() { in.ReadBegin(); got.Store(true) }()
		synctest.Wait()
		assert.False(t, got.Load(), "ReadBegin waits while an intersecting invalidation runs")

		// Insert and remove during the invalidation are deferred, not refused.
		late := &mirror{}
		lateIn, err := l.Insert(0, 0x1000, late)
		require.NoError(t, err)
		var removed atomic.Bool
		go func() { _ = in.Remove(); removed.Store(true) }()
		synctest.Wait()
		assert.False(t, removed.Load(), "Remove waits for the running invalidation")
		var lateBegun atomic.Bool
		go func() { lateIn.ReadBegin(); lateBegun.Store(true) }()
		synctest.Wait()
		assert.False(t, lateBegun.Load(), "a deferred insert's reader waits too")

		close(m.release)
		synctest.Wait()
		assert.True(t, got.Load())
		assert.True(t, removed.Load())
		assert.True(t, lateBegun.Load())
		assert.Empty(t, late.seqs(), "the deferred interval missed the invalidation it raced")

		require.NoError(t, invalidate(l, 0, 0x1000, notifier.Blockable))
		assert.Len(t, late.seqs(), 1, "and sees the next one")
		assert.Len(t, m.seqs(), 1, "the removed one does not")
	})
}

func TestIntervalNonBlockableRefusal(t *testing.T) {
	l := newList()
	m := &mirror{refuse: true}
	in, _ := l.Insert(0, 0x1000, m)
	assert.ErrorIs(t, invalidate(l, 0, 0x1000, 0), errno.ErrAgain)
	seq := in.ReadBegin() // not stuck: the refused invalidation ended
	require.NoError(t, invalidate(l, 0, 0x1000, notifier.Blockable))
	assert.True(t, in.ReadRetry(seq))
}

func TestIntervalReleaseEvent(t *testing.T) {
	l := newList()
	m := &mirror{}
	_, _ = l.Insert(0x1000, 0x1000, m)
	l.Release()
	assert.Equal(t, []notifier.Event{notifier.EventRelease}, m.events, "one release invalidation per interval")
	_, err := l.Insert(0, 1, m)
	assert.ErrorIs(t, err, errno.ErrClosed)
}

// TestIntervalSequenceStress: readers loop ReadBegin/ReadRetry while
// invalidations run; a reader whose retry says "no change" must never
// have overlapped an invalidation of its interval. Each invalidation
// stays open for a while, and the test runs until readers have
// overlapped one many times, so it cannot pass without the race.
func TestIntervalSequenceStress(t *testing.T) {
	l := newList()
	m := &mirror{}
	in, _ := l.Insert(0, 0x1000, m)
	var running, bad, overlaps atomic.Int32
	var stop atomic.Bool
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for !stop.Load() {
				seq := in.ReadBegin()
				sawRunning := running.Load() != 0
				m.mu.Lock()
				if sawRunning {
					overlaps.Add(1)
					if !in.ReadRetry(seq) {
						bad.Add(1)
					}
				}
				m.mu.Unlock()
			}
		})
	}
	for i := 0; i < 2000 || overlaps.Load() < 100; i++ {
		r := notifier.NewRange(fakeMM(1), 0, 0x1000, notifier.EventClear, notifier.Blockable)
		require.NoError(t, l.InvalidateRangeStart(r))
		running.Store(1)
		for range 20 {
			runtime.Gosched() // the invalidation is in progress: let readers run into it
		}
		running.Store(0)
		l.InvalidateRangeEnd(r)
	}
	stop.Store(true)
	wg.Wait()
	assert.Zero(t, bad.Load())
}

// twoPass is a device whose flush is asynchronous: start kicks it off,
// finish waits for it.
type twoPass struct {
	name string
	log  *[]string
	mu   *sync.Mutex
}

func (d *twoPass) Invalidate(*notifier.Interval, *notifier.Range, uint64) bool {
	panic("the two-pass form replaces Invalidate")
}

func (d *twoPass) InvalidateStart(in *notifier.Interval, r *notifier.Range, cur uint64) (func(), bool) {
	in.SetSeq(cur)
	d.mu.Lock()
	*d.log = append(*d.log, "start "+d.name)
	d.mu.Unlock()
	return func() {
		d.mu.Lock()
		*d.log = append(*d.log, "finish "+d.name)
		d.mu.Unlock()
	}, true
}

func TestTwoPassStartsEveryDeviceBeforeWaiting(t *testing.T) {
	l := newList()
	var log []string
	var mu sync.Mutex
	for _, name := range []string{"a", "b", "c"} {
		_, err := l.Insert(0, 0x1000, &twoPass{name: name, log: &log, mu: &mu})
		require.NoError(t, err)
	}
	require.NoError(t, invalidate(l, 0, 0x1000, notifier.Blockable))
	assert.Equal(t, []string{"start a", "start b", "start c", "finish a", "finish b", "finish c"}, log)
}

// TestInsertDuringAnInvalidationThatMissedEverything: an invalidation is
// in flight that reached no interval (the sequence is even); an interval
// inserted now may be covered by it, so its readers must wait for it to
// end (the review finding behind Linux's "seq |= 1" on insert).
func TestInsertDuringAnInvalidationThatMissedEverything(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newList()
		l.EnableIntervals()
		assert.True(t, l.IntervalsEnabled())
		assert.True(t, l.HasSubscribers())
		r := notifier.NewRange(fakeMM(1), 0, 0x1000, notifier.EventClear, notifier.Blockable)
		require.NoError(t, l.InvalidateRangeStart(r)) // reaches nothing: no interval yet

		in, err := l.Insert(0, 0x1000, &mirror{})
		require.NoError(t, err)
		var begun atomic.Bool
		var seq uint64
		go func() { seq = in.ReadBegin(); begun.Store(true) }()
		synctest.Wait()
		assert.False(t, begun.Load(), "the reader waits for the invalidation that may cover it")

		l.InvalidateRangeEnd(r)
		synctest.Wait()
		assert.True(t, begun.Load())
		assert.False(t, in.ReadRetry(seq))
	})
}
