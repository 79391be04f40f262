package locks

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestSeqCountReaderSeesConsistentPairs(t *testing.T) {
	var sc SeqCount
	var writerLock SpinLock
	var a, b atomic.Uint64 // invariant: b == 2*a
	var stop atomic.Bool
	var torn, retries atomic.Int64

	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for !stop.Load() {
				var x, y uint64
				for {
					seq := sc.ReadBegin()
					x, y = a.Load(), b.Load()
					if !sc.ReadRetry(seq) {
						break
					}
					retries.Add(1)
				}
				if y != 2*x {
					torn.Add(1)
				}
			}
		})
	}
	for i := range uint64(20000) {
		writerLock.Lock()
		sc.WriteBegin()
		a.Store(i)
		b.Store(2 * i)
		sc.WriteEnd()
		writerLock.Unlock()
	}
	stop.Store(true)
	wg.Wait()
	assert.Zero(t, torn.Load())
	assert.Equal(t, uint64(40000), sc.Sequence())
	assert.Positive(t, retries.Load(), "no reader ever overlapped a write: the test proved nothing")
}

func TestSeqCountRetryAfterWrite(t *testing.T) {
	var sc SeqCount
	seq := sc.ReadBegin()
	assert.False(t, sc.ReadRetry(seq))
	sc.WriteBegin()
	assert.Equal(t, uint64(1), sc.Sequence()&1, "odd inside a write")
	sc.WriteEnd()
	assert.True(t, sc.ReadRetry(seq))
	assert.Panics(t, sc.WriteEnd, "WriteEnd without WriteBegin")
}
