package benchmarks

import (
	"context"
	"fmt"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/notifier"
)

type nopInvalidator struct{}

func (nopInvalidator) InvalidateRangeStart(*notifier.Range) error { return nil }
func (nopInvalidator) InvalidateRangeEnd(*notifier.Range)         {}

// agingOnly implements callbacks an munmap never calls.
type agingOnly struct{}

func (agingOnly) ClearYoung(notifier.MM, uint64, uint64) bool { return false }
func (agingOnly) Release(notifier.MM)                         {}

func repeat(v any, n int) []any {
	out := make([]any, n)
	for i := range out {
		out[i] = v
	}
	return out
}

// BenchmarkMunmapNotifiers: munmap of 512 populated pages with 0, 1 and 8
// start/end subscribers, and with 8 that implement nothing munmap calls
// (which must cost what 0 costs).
func BenchmarkMunmapNotifiers(b *testing.B) {
	cases := []struct {
		name string
		subs []any
	}{
		{"none", nil},
		{"1", []any{nopInvalidator{}}},
		{"8", repeat(nopInvalidator{}, 8)},
		{"8-irrelevant", repeat(agingOnly{}, 8)},
	}
	const size = 512 * page
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			m := newMachine(b, gomm.Config{CPUs: 2, Frames: 4096})
			mm := m.NewMM()
			for _, s := range tc.subs {
				_, err := mm.RegisterNotifier(context.Background(), s)
				must(b, err)
			}
			const rounds = 50 // per iteration: a stable figure from few iterations
			for b.Loop() {
				for range rounds {
					var addr uint64
					untimed(b, func() { addr = populated(b, mm, size) })
					must(b, mm.Munmap(addr, size))
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*rounds)/(size/page), "ns/page")
		})
	}
}

type nopInterval struct{}

func (nopInterval) Invalidate(in *notifier.Interval, _ *notifier.Range, seq uint64) bool {
	in.SetSeq(seq)
	return true
}

// BenchmarkIntervalReadBeginRetry: an interval notifier's read side when
// nothing invalidates (a driver's fast path around each fault it
// mirrors): ReadBegin, then ReadRetry.
func BenchmarkIntervalReadBeginRetry(b *testing.B) {
	m := newMachine(b, gomm.Config{CPUs: 1, Frames: 1024})
	mm := m.NewMM()
	in, err := mm.InsertInterval(0x1000_0000, 1<<20, nopInterval{})
	must(b, err)
	b.ReportAllocs()
	for b.Loop() {
		if in.ReadRetry(in.ReadBegin()) {
			b.Fatal("retry without an invalidation")
		}
	}
}

// BenchmarkRegisterNotifier: Register on an MM with 1, 100 and 10,000
// populated VMAs. Registration takes mmap_lock and then every rmap lock
// of the MM (mm_take_all_locks: each VMA's anon_vma root), so it grows
// linearly with the VMAs, without a sort.
func BenchmarkRegisterNotifier(b *testing.B) {
	for _, n := range []int{1, 100, 10000} {
		b.Run(fmt.Sprintf("vmas=%d", n), func(b *testing.B) {
			m := newMachine(b, gomm.Config{CPUs: 1, Frames: framesFor(uint64(n) * page)})
			mm := m.NewMM()
			for i := range n {
				prot := gomm.ProtRead
				if i%2 == 1 {
					prot |= gomm.ProtWrite // alternate, so that VMAs do not merge
				}
				_, err := mm.Mmap(0x1000_0000+uint64(i)*page, page, prot, anon|gomm.MapFixed|gomm.MapPopulate)
				must(b, err)
			}
			if got := len(mm.VMAs()); got != n {
				b.Fatalf("%d VMAs", got)
			}
			// Registered in rounds and unregistered together with the
			// timer stopped, once per iteration: stopping it costs more
			// than a registration.
			const rounds = 100
			subs := make([]*notifier.Subscription, rounds)
			for b.Loop() {
				for i := range subs {
					var err error
					subs[i], err = mm.RegisterNotifier(context.Background(), nopInvalidator{})
					must(b, err)
				}
				untimed(b, func() {
					for _, s := range subs {
						must(b, mm.UnregisterNotifier(s))
					}
				})
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*rounds), "ns/register")
		})
	}
}
