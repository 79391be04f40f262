//lint:file-ignore SA2001 the benchmarks measure the lock operations themselves.

package locks

import "testing"

// withoutLockdep runs a benchmark with the checker off, the state every
// production user has; the checker's own cost is BenchmarkLockdepOn.
func withoutLockdep(b *testing.B) {
	if LockdepEnabled() {
		DisableLockdep()
		b.Cleanup(EnableLockdep)
	}
}

func BenchmarkSpinLock(b *testing.B) {
	withoutLockdep(b)
	var l SpinLock
	l.Init(ClassPTLock)
	for b.Loop() {
		l.Lock()
		l.Unlock()
	}
}

func BenchmarkRWSemRead(b *testing.B) {
	withoutLockdep(b)
	var s RWSem
	s.Init(ClassMmapLock)
	for b.Loop() {
		s.RLock()
		s.RUnlock()
	}
}

func BenchmarkRWSemWrite(b *testing.B) {
	withoutLockdep(b)
	var s RWSem
	for b.Loop() {
		s.Lock()
		s.Unlock()
	}
}

// BenchmarkRWSemReadParallel: readers on every core share one lock word.
func BenchmarkRWSemReadParallel(b *testing.B) {
	withoutLockdep(b)
	var s RWSem
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			s.RLock()
			s.RUnlock()
		}
	})
}

func BenchmarkSRCURead(b *testing.B) {
	var s SRCU
	for b.Loop() {
		s.ReadUnlock(s.ReadLock())
	}
}

func BenchmarkSRCUSynchronize(b *testing.B) {
	var s SRCU
	for b.Loop() {
		s.Synchronize()
	}
}

func BenchmarkSeqCountRead(b *testing.B) {
	var s SeqCount
	for b.Loop() {
		if s.ReadRetry(s.ReadBegin()) {
			b.Fatal("retry without a writer")
		}
	}
}

// BenchmarkLockdepOn is the checker's price per lock/unlock pair.
func BenchmarkLockdepOn(b *testing.B) {
	if !LockdepEnabled() {
		EnableLockdep()
		b.Cleanup(DisableLockdep)
	}
	var l SpinLock
	l.Init(ClassPTLock)
	for b.Loop() {
		l.Lock()
		l.Unlock()
	}
}
