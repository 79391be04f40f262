package gomm_test

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/tlb"
)

func tlbIdle() *tlb.Task { return tlb.NewKernelThread("idle") }

// writeWhile runs a writer on each CPU of m in mm, CPU c owning the
// pages pages from addr+c*pages*page: for rounds rounds it checks that
// every page still holds what it stored last and stores value(r, i)
// into page i. Meanwhile the test's agent (reclaim, ksmd, migration)
// runs as agent(0), agent(1), ... on a goroutine of its own until the
// writers are done and progress reports that the agent did something,
// so the test cannot pass without racing it. A lost or stale value, a
// fault or an agent error fails the test.
func writeWhile(t *testing.T, m *gomm.Machine, mm *gomm.MM, addr uint64, pages, rounds int,
	value func(r, i int) uint64, agent func(r int) error, progress func() bool) {
	t.Helper()
	var wg sync.WaitGroup
	for c, cpu := range m.CPUs() {
		base := addr + uint64(c*pages)*page
		wg.Go(func() {
			cpu.Switch(mm.NewTask("writer"))
			defer cpu.Switch(tlbIdle())
			want := make([]uint64, pages)
			for r := range rounds {
				for i := range pages {
					va := base + uint64(i)*page
					got, err := cpu.Load64(va)
					if err != nil || got != want[i] {
						t.Errorf("cpu %d round %d page %d: %#x, %v; want %#x", c, r, i, got, err, want[i])
						return
					}
					want[i] = value(r, i)
					if err := cpu.Store64(va, want[i]); err != nil {
						t.Errorf("cpu %d store: %v", c, err)
						return
					}
				}
			}
		})
	}
	var done atomic.Bool
	agentDone := make(chan struct{})
	go func() {
		defer close(agentDone)
		for r := 0; !done.Load() || !progress(); r++ {
			if err := agent(r); err != nil {
				t.Errorf("agent round %d: %v", r, err)
				return
			}
		}
	}()
	wg.Wait()
	done.Store(true)
	<-agentDone
}

// nopInvalidator subscribes to start/end and does nothing with them.
type nopInvalidator struct{}

func (nopInvalidator) InvalidateRangeStart(*notifier.Range) error { return nil }
func (nopInvalidator) InvalidateRangeEnd(*notifier.Range)         {}
