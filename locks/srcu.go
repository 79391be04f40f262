package locks

import (
	"sync"
	"sync/atomic"
)

// SRCU is sleepable read-copy-update (struct srcu_struct): readers may
// block inside their critical section, never wait for anything on entry or
// exit, and Synchronize waits only for the readers that entered before it
// began. The notifier list is walked under it so that callbacks may sleep
// while Unregister still gets a grace period.
//
// Readers count themselves on one of two slots; Synchronize flips which
// slot new readers use and waits for the old one to drain, after first
// draining the other slot of readers that read the slot index before the
// previous flip but counted themselves after it. Go's atomics are
// sequentially consistent, which is what makes a reader that counts itself
// on the old slot after the drain check harmless: it necessarily observes
// everything the updater did before calling Synchronize.
//
// The zero value is ready to use.
type SRCU struct {
	idx     atomic.Uint32   // slot new readers count on
	readers [2]atomic.Int64 // readers inside, per slot
	waiting atomic.Bool     // a Synchronize is draining a slot
	wake    chan struct{}   // buffered(1): the last reader of a slot rings it; set by initWake
	once    sync.Once       // creates wake
	syncMu  sync.Mutex      // serialises Synchronize calls
	gps     atomic.Uint64   // completed grace periods
}

// SRCUToken is what ReadLock returns and ReadUnlock must be given back:
// the slot the reader counted itself on.
type SRCUToken struct{ idx uint32 }

// ReadLock enters a read-side critical section. Sections may nest and may
// block; ReadLock itself never waits.
func (s *SRCU) ReadLock() SRCUToken {
	i := s.idx.Load() & 1
	s.readers[i].Add(1)
	return SRCUToken{idx: i}
}

// ReadUnlock leaves the critical section entered by the ReadLock that
// returned t.
func (s *SRCU) ReadUnlock(t SRCUToken) {
	if s.readers[t.idx&1].Add(-1) == 0 && s.waiting.Load() {
		s.ring()
	}
}

// Synchronize waits until every read-side critical section that began
// before the call has ended (synchronize_srcu). Calling it from inside a
// read-side section of the same SRCU deadlocks, as in the kernel.
func (s *SRCU) Synchronize() {
	s.once.Do(s.initWake)
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	s.waiting.Store(true)
	cur := s.idx.Load() & 1
	s.drain(cur ^ 1)
	s.idx.Store(cur ^ 1)
	s.drain(cur)
	s.waiting.Store(false)
	s.gps.Add(1)
}

// GracePeriods returns how many Synchronize calls have completed.
func (s *SRCU) GracePeriods() uint64 { return s.gps.Load() }

func (s *SRCU) initWake() { s.wake = make(chan struct{}, 1) }

func (s *SRCU) ring() {
	s.once.Do(s.initWake)
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// drain blocks until slot i has no readers. A wake-up left over from an
// earlier drain only costs one more check.
func (s *SRCU) drain(i uint32) {
	for s.readers[i].Load() != 0 {
		<-s.wake
	}
}
