package locks

import (
	"runtime"
	"sync/atomic"
)

// SeqCount is a sequence counter (seqcount_t): writers, serialised by a
// lock of their own, bump it to odd before changing the data it guards and
// to even after; readers take a snapshot of it, read, and retry if it moved.
//
// Go's memory model makes every field a reader can see mid-write a data
// race unless it is accessed atomically, so data guarded by a SeqCount
// must be read and written with sync/atomic; the counter then gives the
// reader a consistent set of those values. The zero value is ready to use.
type SeqCount struct {
	seq atomic.Uint64
}

// WriteBegin starts a write section. Writers must already exclude each
// other.
func (s *SeqCount) WriteBegin() {
	if s.seq.Add(1)&1 == 0 {
		panic("locks: SeqCount.WriteBegin inside a write section")
	}
}

// WriteEnd ends the write section.
func (s *SeqCount) WriteEnd() {
	if s.seq.Add(1)&1 != 0 {
		panic("locks: SeqCount.WriteEnd without WriteBegin")
	}
}

// ReadBegin waits out a write in progress and returns the sequence to
// pass to ReadRetry.
func (s *SeqCount) ReadBegin() uint64 {
	for {
		v := s.seq.Load()
		if v&1 == 0 {
			return v
		}
		runtime.Gosched()
	}
}

// ReadRetry reports whether a writer ran since ReadBegin returned start,
// in which case everything read must be discarded and read again.
func (s *SeqCount) ReadRetry(start uint64) bool { return s.seq.Load() != start }

// Sequence returns the raw counter, odd while a write is in progress.
func (s *SeqCount) Sequence() uint64 { return s.seq.Load() }
