package gomm_test

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
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			m := benchMachine(b, gomm.Config{CPUs: 2, Frames: 4096})
			mm := m.NewMM()
			for _, s := range tc.subs {
				if _, err := mm.RegisterNotifier(context.Background(), s); err != nil {
					b.Fatal(err)
				}
			}
			const rounds = 50 // per iteration: a stable figure from few iterations
			for b.Loop() {
				for range rounds {
					b.StopTimer()
					addr, err := mm.Mmap(0x1000_0000, 512*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapFixed|gomm.MapPopulate)
					if err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if err := mm.Munmap(addr, 512*page); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*rounds)/512, "ns/page")
		})
	}
}

func repeat(v any, n int) []any {
	out := make([]any, n)
	for i := range out {
		out[i] = v
	}
	return out
}

// BenchmarkRegisterNotifier: Register on an MM with 1, 100 and 10,000
// VMAs. Registration takes mmap_lock and TakeAll over the MM's rmap locks
// (linear in them, no sort); anonymous memory without fork has none yet,
// so the figure is the cost floor the reverse maps will add to.
func BenchmarkRegisterNotifier(b *testing.B) {
	for _, n := range []int{1, 100, 10000} {
		b.Run(fmt.Sprintf("vmas=%d", n), func(b *testing.B) {
			m := benchMachine(b, gomm.Config{CPUs: 1, Frames: 1024})
			mm := m.NewMM()
			for i := range n {
				prot := gomm.ProtRead
				if i%2 == 1 {
					prot |= gomm.ProtWrite // alternate so VMAs do not merge
				}
				if _, err := mm.Mmap(0x1000_0000+uint64(i)*page, page, prot, anon|gomm.MapFixed); err != nil {
					b.Fatal(err)
				}
			}
			if got := len(mm.VMAs()); got != n {
				b.Fatalf("%d VMAs", got)
			}
			const rounds = 100
			for b.Loop() {
				for range rounds {
					s, err := mm.RegisterNotifier(context.Background(), nopInvalidator{})
					if err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					if err := mm.UnregisterNotifier(s); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*rounds), "ns/register")
		})
	}
}
