package notifier_test

import (
	"testing"

	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/gomm-dev/gomm/notifier"
)

// BenchmarkIntervalReadBeginRetry: the driver's fast path when nothing
// invalidates: ReadBegin then ReadRetry.
func BenchmarkIntervalReadBeginRetry(b *testing.B) {
	testmain.WithoutLockdep(b)
	l := newList()
	in, err := l.Insert(0, 1<<20, &mirror{})
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if in.ReadRetry(in.ReadBegin()) {
			b.Fatal("retry without an invalidation")
		}
	}
}

// BenchmarkInvalidateNoSubscribers: a start/end pair on an mm nobody
// watches, as the MM pays it (HasSubscribers only).
func BenchmarkInvalidateNoSubscribers(b *testing.B) {
	l := newList()
	for b.Loop() {
		if l.HasSubscribers() {
			b.Fatal("subscribers")
		}
	}
}

// BenchmarkInvalidateOneSubscriber: a start/end pair with one subscriber.
func BenchmarkInvalidateOneSubscriber(b *testing.B) {
	l := newList()
	if _, err := l.Register(&recorderNop{}); err != nil {
		b.Fatal(err)
	}
	r := notifier.NewRange(fakeMM(1), 0, 4096, notifier.EventClear, notifier.Blockable)
	b.ReportAllocs()
	for b.Loop() {
		_ = l.InvalidateRangeStart(r)
		l.InvalidateRangeEnd(r)
	}
}

type recorderNop struct{}

func (recorderNop) InvalidateRangeStart(*notifier.Range) error { return nil }
func (recorderNop) InvalidateRangeEnd(*notifier.Range)         {}
