//lint:file-ignore SA2001 empty critical sections are the point: these tests exercise lock acquisition itself.

package locks

import (
	"sync"
	"testing"
	"testing/synctest"

	"github.com/stretchr/testify/assert"
)

func TestSpinLockTryLockAndContention(t *testing.T) {
	var l SpinLock
	assert.True(t, l.TryLock())
	assert.False(t, l.TryLock())
	assert.False(t, l.IsContended())

	done := make(chan struct{})
	go func() { l.Lock(); l.Unlock(); close(done) }()
	assert.Eventually(t, l.IsContended, testTimeout, pollEvery, "a blocked Lock shows as contention")
	l.Unlock()
	<-done
	assert.False(t, l.IsContended())
	assert.True(t, l.TryLock())
	l.Unlock()
}

func TestSpinLockMutualExclusion(t *testing.T) {
	var l SpinLock
	counter := 0
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 5000 {
				l.Lock()
				counter++
				l.Unlock()
			}
		})
	}
	wg.Wait()
	assert.Equal(t, 20000, counter)
}

func TestSpinLockReleasedByAnotherGoroutine(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var l SpinLock
		l.Init(ClassPTLock)
		l.Lock()
		done := make(chan struct{})
		go func() { l.Unlock(); close(done) }()
		<-done
		assert.False(t, LockdepHolds(&l), "a release from another goroutine clears the record")
		assert.True(t, l.TryLock())
		l.Unlock()
	})
}
