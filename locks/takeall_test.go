//lint:file-ignore SA2001 empty critical sections are the point: these tests exercise lock acquisition itself.

package locks

import (
	"context"
	"iter"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newSems(n int, c *Class) []*RWSem {
	s := make([]*RWSem, n)
	for i := range s {
		s[i] = new(RWSem)
		s[i].Init(c)
	}
	return s
}

func TestTakeAllSkipsDuplicatesWithoutSorting(t *testing.T) {
	mappings := newSems(3, ClassIMmapRWSem)
	anons := newSems(2, ClassAnonVMA)
	// Every VMA yields its lock; shared mappings and anon_vma roots repeat.
	seqMappings := slices.Values([]*RWSem{mappings[2], mappings[0], mappings[2], mappings[1], mappings[0]})
	seqAnons := slices.Values([]*RWSem{anons[1], anons[1], anons[0]})

	taken, err := TakeAll(context.Background(), seqMappings, seqAnons)
	require.NoError(t, err)
	assert.Equal(t, 5, taken.Len())
	for _, s := range append(slices.Clone(mappings), anons...) {
		assert.True(t, s.IsWriteLocked())
		assert.True(t, s.takeAllMark)
	}
	taken.Drop()
	for _, s := range append(slices.Clone(mappings), anons...) {
		assert.False(t, s.IsLocked())
		assert.False(t, s.takeAllMark, "the mark is cleared on drop")
	}
	taken.Drop() // idempotent
	assert.Empty(t, expectViolations(t), "nested same-class acquisitions under TakeAll are declared")
}

func TestTakeAllCancelReleasesEverything(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sems := newSems(4, ClassAnonVMA)
		sems[2].RLock() // somebody else holds the third lock
		ctx, cancel := context.WithCancel(context.Background())
		type result struct {
			taken *Taken
			err   error
		}
		res := make(chan result, 1)
		go func() {
			tk, err := TakeAll(ctx, slices.Values(sems))
			res <- result{tk, err}
		}()
		synctest.Wait()
		require.True(t, sems[0].IsWriteLocked())
		require.True(t, sems[1].IsWriteLocked())

		cancel()
		r := <-res
		require.ErrorIs(t, r.err, context.Canceled)
		assert.Nil(t, r.taken)
		for i, s := range sems {
			if i == 2 {
				continue
			}
			assert.False(t, s.IsLocked(), "lock %d must be released on cancel", i)
			assert.False(t, s.takeAllMark)
		}
		sems[2].RUnlock()

		// The global mutex was released too: a new TakeAll succeeds.
		tk, err := TakeAll(context.Background(), slices.Values(sems))
		require.NoError(t, err)
		assert.Equal(t, 4, tk.Len())
		tk.Drop()
	})
}

// TestTakeAllSerialisesTakers cannot use synctest: the global take-all
// mutex is a channel created outside any bubble.
func TestTakeAllSerialisesTakers(t *testing.T) {
	shared := newSems(2, ClassAnonVMA)
	first, err := TakeAll(context.Background(), slices.Values(shared))
	require.NoError(t, err)
	secondc := make(chan *Taken, 1)
	go func() {
		tk, _ := TakeAll(context.Background(), slices.Values(shared))
		secondc <- tk
	}()
	select {
	case <-secondc:
		t.Fatal("a second taker must wait for the global mutex")
	case <-time.After(20 * time.Millisecond):
	}
	first.Drop()
	second := <-secondc
	require.NotNil(t, second)
	assert.Equal(t, 2, second.Len())
	second.Drop()

	ctx, cancel := context.WithCancel(context.Background())
	held, err := TakeAll(ctx, slices.Values(shared))
	require.NoError(t, err)
	errc := make(chan error, 1)
	go func() {
		_, err := TakeAll(ctx, slices.Values(shared))
		errc <- err
	}()
	cancel()
	assert.ErrorIs(t, <-errc, context.Canceled, "waiting for the global mutex is cancellable")
	held.Drop()
}

func TestTakeAllConcurrentWithLockers(t *testing.T) {
	sems := newSems(8, ClassAnonVMA)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i := range 2 {
		wg.Go(func() {
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				s := sems[(i+j)%len(sems)]
				s.RLock()
				s.RUnlock()
			}
		})
	}
	var all iter.Seq[*RWSem] = slices.Values(sems)
	for range 200 {
		tk, err := TakeAll(context.Background(), all, all)
		require.NoError(t, err)
		require.Equal(t, len(sems), tk.Len())
		tk.Drop()
	}
	close(stop)
	wg.Wait()
	for _, s := range sems {
		assert.False(t, s.IsLocked())
	}
}
