package locks

import (
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	testTimeout = 10 * time.Second
	pollEvery   = time.Millisecond
)

func TestSRCUSynchronizeWaitsForEarlierReaders(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var s SRCU
		tok := s.ReadLock()
		var done atomic.Bool
		go func() { s.Synchronize(); done.Store(true) }()
		synctest.Wait()
		assert.False(t, done.Load(), "Synchronize must wait for a reader that began before it")
		s.ReadUnlock(tok)
		synctest.Wait()
		assert.True(t, done.Load())
		assert.Equal(t, uint64(1), s.GracePeriods())
	})
}

func TestSRCUSynchronizeIgnoresLaterReaders(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var s SRCU
		early := s.ReadLock()
		var done atomic.Bool
		go func() { s.Synchronize(); done.Store(true) }()
		synctest.Wait()
		late := s.ReadLock() // begins after Synchronize did
		s.ReadUnlock(early)
		synctest.Wait()
		assert.True(t, done.Load(), "a reader that began after Synchronize must not hold it up")
		s.ReadUnlock(late)
	})
}

func TestSRCUReadersNestAndNeverWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var s SRCU
		outer := s.ReadLock()
		go s.Synchronize()
		synctest.Wait()
		// With a grace period pending, entering and leaving nested
		// sections completes without blocking.
		inner := s.ReadLock()
		s.ReadUnlock(inner)
		s.ReadUnlock(outer)
		synctest.Wait()
		assert.Equal(t, uint64(1), s.GracePeriods())
	})
}

// TestSRCUProtectsRemovedObjects is the use SRCU exists for: an updater
// unpublishes an object, waits a grace period and frees it; a reader that
// found the object inside its section must never see it freed.
func TestSRCUProtectsRemovedObjects(t *testing.T) {
	type object struct{ freed atomic.Bool }
	var s SRCU
	var current atomic.Pointer[object]
	current.Store(&object{})
	var stop atomic.Bool
	var useAfterFree atomic.Int64

	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			for !stop.Load() {
				tok := s.ReadLock()
				o := current.Load()
				for range 10 {
					if o.freed.Load() {
						useAfterFree.Add(1)
					}
				}
				s.ReadUnlock(tok)
			}
		})
	}
	rounds := 500
	if testing.Short() {
		rounds = 100
	}
	for range rounds {
		old := current.Swap(&object{})
		s.Synchronize()
		old.freed.Store(true)
	}
	stop.Store(true)
	wg.Wait()
	require.Zero(t, useAfterFree.Load())
	assert.Equal(t, uint64(rounds), s.GracePeriods())
}

func TestSRCUConcurrentSynchronize(t *testing.T) {
	var s SRCU
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 50 {
				tok := s.ReadLock()
				s.ReadUnlock(tok)
				s.Synchronize()
			}
		})
	}
	wg.Wait()
	assert.Equal(t, uint64(200), s.GracePeriods())
}
