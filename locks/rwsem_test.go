package locks

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRWSemTryLockMatrix(t *testing.T) {
	tests := []struct {
		name       string
		setup      func(s *RWSem)
		tryLock    bool
		tryRLock   bool
		locked     bool
		writeLockd bool
	}{
		{"free", func(*RWSem) {}, true, true, false, false},
		{"read held", func(s *RWSem) { s.RLock() }, false, true, true, false},
		{"two readers", func(s *RWSem) { s.RLock(); s.RLock() }, false, true, true, false},
		{"write held", func(s *RWSem) { s.Lock() }, false, false, true, true},
		{"downgraded", func(s *RWSem) { s.Lock(); s.DowngradeWrite() }, false, true, true, false},
	}
	// The checker would rightly call the recursive read holds above
	// deadlock-prone; this test is about the lock word, so run it unchecked.
	DisableLockdep()
	defer EnableLockdep()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var s RWSem
			tc.setup(&s)
			assert.Equal(t, tc.locked, s.IsLocked())
			assert.Equal(t, tc.writeLockd, s.IsWriteLocked())
			assert.False(t, s.IsContended())
			got := s.TryLock()
			assert.Equal(t, tc.tryLock, got)
			if got {
				s.Unlock()
			}
			got = s.TryRLock()
			assert.Equal(t, tc.tryRLock, got)
			if got {
				s.RUnlock()
			}
		})
	}
}

// waitersOf reports the queue as seen under the wait lock.
func waitersOf(s *RWSem) int {
	s.waitMu.Lock()
	defer s.waitMu.Unlock()
	return len(s.queue)
}

func TestRWSemWriterNotStarvedByReaders(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var s RWSem
		var order []string
		var mu sync.Mutex
		record := func(what string) { mu.Lock(); order = append(order, what); mu.Unlock() }

		s.RLock() // reader 1 holds the lock
		go func() { s.Lock(); record("writer"); s.Unlock() }()
		synctest.Wait()
		require.True(t, s.IsContended(), "a queued writer makes the lock contended")
		assert.False(t, s.TryRLock(), "a new reader must not overtake a queued writer")

		go func() { s.RLock(); record("reader 2"); s.RUnlock() }()
		synctest.Wait()
		assert.Equal(t, 2, waitersOf(&s))
		assert.Empty(t, order)

		s.RUnlock()
		synctest.Wait()
		assert.Equal(t, []string{"writer", "reader 2"}, order)
		assert.False(t, s.IsLocked())
		assert.False(t, s.IsContended())
	})
}

func TestRWSemFIFOBatchesReaders(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var s RWSem
		var inside, maxReaders atomic.Int32
		var order []string
		var mu sync.Mutex
		record := func(what string) { mu.Lock(); order = append(order, what); mu.Unlock() }
		release := make(chan struct{})

		reader := func(name string) {
			s.RLock()
			n := inside.Add(1)
			for m := maxReaders.Load(); n > m && !maxReaders.CompareAndSwap(m, n); m = maxReaders.Load() {
			}
			record(name)
			<-release
			inside.Add(-1)
			s.RUnlock()
		}
		s.Lock()
		go reader("r1")
		synctest.Wait()
		go reader("r2")
		synctest.Wait()
		go func() { s.Lock(); record("w2"); s.Unlock() }()
		synctest.Wait()
		go reader("r3")
		synctest.Wait()
		require.Equal(t, 4, waitersOf(&s))

		s.Unlock()
		synctest.Wait()
		// r1 and r2 get in together; w2 blocks r3 behind it.
		assert.ElementsMatch(t, []string{"r1", "r2"}, order)
		assert.Equal(t, int32(2), maxReaders.Load())
		close(release)
		synctest.Wait()
		assert.Equal(t, []string{"w2", "r3"}, order[2:])
	})
}

func TestRWSemDowngradeLetsQueuedReadersIn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var s RWSem
		var got []string
		var mu sync.Mutex
		record := func(what string) { mu.Lock(); got = append(got, what); mu.Unlock() }
		s.Lock()
		go func() { s.RLock(); record("reader"); s.RUnlock() }()
		synctest.Wait()
		go func() { s.Lock(); record("writer"); s.Unlock() }()
		synctest.Wait()

		s.DowngradeWrite()
		synctest.Wait()
		assert.Equal(t, []string{"reader"}, got, "the reader shares the downgraded lock, the writer waits")
		assert.False(t, s.IsWriteLocked())
		assert.True(t, s.IsLocked())

		s.RUnlock()
		synctest.Wait()
		assert.Equal(t, []string{"reader", "writer"}, got)
	})
}

func TestRWSemLockContextCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var s RWSem
		s.RLock()
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { errc <- s.LockContext(ctx) }()
		synctest.Wait()
		readerIn := make(chan struct{})
		go func() { s.RLock(); close(readerIn); s.RUnlock() }()
		synctest.Wait()
		require.Equal(t, 2, waitersOf(&s))

		cancel()
		synctest.Wait()
		require.ErrorIs(t, <-errc, context.Canceled)
		// With the writer gone, the reader queued behind it shares the lock.
		<-readerIn
		assert.Equal(t, 0, waitersOf(&s))
		assert.False(t, s.IsContended())
		s.RUnlock()
		assert.False(t, s.IsLocked())
		assert.True(t, s.TryLock())
		s.Unlock()
	})
}

func TestRWSemContextAlreadyDone(t *testing.T) {
	var s RWSem
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, s.LockContext(ctx), context.Canceled)
	require.ErrorIs(t, s.RLockContext(ctx), context.Canceled)
	assert.False(t, s.IsLocked())
	require.NoError(t, s.RLockContext(context.Background()))
	s.RUnlock()
}

func TestRWSemMisusePanics(t *testing.T) {
	DisableLockdep()
	defer EnableLockdep()
	var s RWSem
	assert.Panics(t, func() { s.Unlock() })
	assert.Panics(t, func() { s.RUnlock() })
	assert.Panics(t, func() { s.DowngradeWrite() })
}

// TestRWSemStress checks mutual exclusion under a random mix of every
// operation: a writer is always alone, readers never overlap a writer.
func TestRWSemStress(t *testing.T) {
	var s RWSem
	var readers, writers atomic.Int32
	var bad atomic.Int32
	iters := 2000
	if testing.Short() {
		iters = 300
	}
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Go(func() {
			ctx := context.Background()
			for i := range iters {
				switch (g + i) % 6 {
				case 0, 1:
					s.RLock()
					readers.Add(1)
					if writers.Load() != 0 {
						bad.Add(1)
					}
					readers.Add(-1)
					s.RUnlock()
				case 2:
					s.Lock()
					if writers.Add(1) != 1 || readers.Load() != 0 {
						bad.Add(1)
					}
					writers.Add(-1)
					s.Unlock()
				case 3:
					s.Lock()
					if writers.Add(1) != 1 {
						bad.Add(1)
					}
					writers.Add(-1)
					s.DowngradeWrite()
					readers.Add(1)
					if writers.Load() != 0 {
						bad.Add(1)
					}
					readers.Add(-1)
					s.RUnlock()
				case 4:
					if s.TryLock() {
						if writers.Add(1) != 1 || readers.Load() != 0 {
							bad.Add(1)
						}
						writers.Add(-1)
						s.Unlock()
					}
				case 5:
					if err := s.RLockContext(ctx); err == nil {
						if writers.Load() != 0 {
							bad.Add(1)
						}
						s.RUnlock()
					}
				}
			}
		})
	}
	wg.Wait()
	assert.Zero(t, bad.Load())
	assert.False(t, s.IsLocked())
	assert.False(t, s.IsContended())
}

// TestRWSemReaderBacksOut: a reader's fast path counts itself first and
// backs out when it finds a writer or a waiter. It must leave the word
// as it found it (else the writer's one-CAS unlock fails, or the lock
// looks held when it is not), and must not overtake a queued writer.
func TestRWSemReaderBacksOut(t *testing.T) {
	var s RWSem
	s.Lock()
	assert.False(t, s.TryRLock(), "a writer holds it")
	assert.Equal(t, rwWriter, s.count.Load(), "the reader's count is taken back")
	s.Unlock()
	assert.False(t, s.IsLocked())

	s.RLock()
	locked := make(chan struct{})
	go func() {
		s.Lock()
		close(locked)
	}()
	require.Eventually(t, s.IsContended, 5*time.Second, time.Millisecond)
	assert.False(t, s.TryRLock(), "a reader must not overtake the queued writer")
	assert.Equal(t, rwReader|rwWaiters, s.count.Load())
	s.RUnlock()
	<-locked
	assert.Equal(t, rwWriter, s.count.Load())
	s.Unlock()
	assert.Zero(t, s.count.Load())
}

// TestRWSemBackOutWakesAWriter: a reader counted for a moment (about to
// back out, having found a writer) makes a writer that queues meanwhile
// fail its grant and sleep; the back-out must wake it. The interleaving:
// W0 holds the lock; R's fast path adds itself and stops before backing
// out; W0 unlocks (by the slow path, R being counted); W1 queues and
// sleeps; R backs out and gives up. Without the back-out's wake, W1
// sleeps forever.
func TestRWSemBackOutWakesAWriter(t *testing.T) {
	var s RWSem
	s.Lock()
	counted, backOut := make(chan struct{}), make(chan struct{})
	testHookBackOut = func() {
		close(counted)
		<-backOut
	}
	defer func() { testHookBackOut = nil }()
	// TryRLock: a reader that waits after backing out (RLock) wakes the
	// queue from wait anyway; one that gives up relies on the back-out.
	readerDone := make(chan struct{})
	go func() {
		if s.TryRLock() {
			t.Error("TryRLock succeeded while a writer held the lock")
		}
		close(readerDone)
	}()
	<-counted
	testHookBackOut = nil // only the first back-out stops
	s.Unlock()
	writerLocked, writerDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(writerDone)
		s.Lock()
		close(writerLocked)
		s.Unlock()
	}()
	require.Eventually(t, s.IsContended, 5*time.Second, time.Millisecond, "the writer queues")
	close(backOut)
	select {
	case <-writerLocked:
	case <-time.After(5 * time.Second):
		t.Fatal("the queued writer was never woken")
	}
	<-writerDone
	<-readerDone
	assert.Zero(t, s.count.Load())
}
