package benchmarks

import (
	"fmt"
	"sync"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/tlb"
)

// BenchmarkFaultParallel: 1, 2, 4 and 8 CPUs of one MM, each a goroutine,
// take write faults in disjoint 2 MiB regions of one 64 MiB VMA (CPU c
// owns every region i with i mod CPUs = c), as the threads of one process
// do. The work per iteration is the same for every count: pages/s is
// the throughput to compare (this machine has two cores). Each first
// store clears its page, which no second core speeds up here
// (BenchmarkClearPages); BenchmarkFaultHandleParallel is the fault path
// without it.
func BenchmarkFaultParallel(b *testing.B) {
	faultParallel(b, func(cpu *tlb.CPU, _ *gomm.MM, va uint64) error { return cpu.Store64(va, va) })
}

// BenchmarkFaultHandleParallel is BenchmarkFaultParallel with each CPU
// calling the MM's fault handler itself, as its TLB miss would, without
// the store that follows: the frame's contents are never touched, so it
// is never cleared, and what scales or not is the fault path alone
// (mmap_lock, the VMA lookup, the allocator, the LRU, the PT locks).
func BenchmarkFaultHandleParallel(b *testing.B) { faultParallel(b, handleWriteFault) }

// BenchmarkFaultHandleMachines is BenchmarkFaultHandleParallel's
// ceiling on this machine: 1 or 2 goroutines fault the same 64 MiB in
// all, each in a machine of its own, so that gomm shares nothing between
// them (no allocator, no LRU, no MM). What 2 get over 1 here is the most
// any design of the shared state could give FaultHandleParallel.
func BenchmarkFaultHandleMachines(b *testing.B) {
	for _, n := range []int{1, 2} {
		b.Run(fmt.Sprintf("machines=%d", n), func(b *testing.B) {
			workers := make([]faultWorker, n)
			for i := range workers {
				m := newMachine(b, gomm.Config{CPUs: 1, Frames: framesFor(faultSpan / uint64(n))})
				workers[i] = newFaultWorker(m.CPU(0), m.NewMM(), 0, 1)
			}
			timeFaults(b, workers, faultSpan/uint64(n), handleWriteFault)
		})
	}
}

// faultSpan is what every fault-throughput benchmark faults in per
// iteration, in 2 MiB regions.
const (
	faultSpan   = 64 << 20
	faultRegion = 2 << 20
)

func handleWriteFault(cpu *tlb.CPU, mm *gomm.MM, va uint64) error {
	return mm.HandleFaultOn(cpu.ID(), va, pagetable.AccessWrite|pagetable.AccessUser)
}

func faultParallel(b *testing.B, fault faultFunc) {
	for _, n := range []int{1, 2, 4, 8} {
		b.Run(fmt.Sprintf("cpus=%d", n), func(b *testing.B) {
			m := newMachine(b, gomm.Config{CPUs: n, Frames: framesFor(faultSpan)})
			mm := m.NewMM()
			workers := make([]faultWorker, n)
			for c, cpu := range m.CPUs() {
				workers[c] = newFaultWorker(cpu, mm, c, n)
			}
			timeFaults(b, workers, faultSpan, fault)
		})
	}
}

// faultFunc takes the fault at va of a page of mm on cpu.
type faultFunc func(cpu *tlb.CPU, mm *gomm.MM, va uint64) error

// faultWorker is one goroutine of a fault benchmark: a CPU running a
// task of mm, faulting regions first, first+stride, ... of the mapping.
type faultWorker struct {
	cpu           *tlb.CPU
	mm            *gomm.MM
	first, stride int
}

func newFaultWorker(cpu *tlb.CPU, mm *gomm.MM, first, stride int) faultWorker {
	cpu.Switch(mm.NewTask("bench"))
	return faultWorker{cpu: cpu, mm: mm, first: first, stride: stride}
}

// timeFaults maps span bytes in each worker's MM, has every worker fault
// its regions at once, and unmaps, in each iteration; only the faults
// are timed. It reports per page of all the MMs' mappings together.
func timeFaults(b *testing.B, workers []faultWorker, span uint64, fault faultFunc) {
	addrs := map[*gomm.MM]uint64{}
	for _, w := range workers {
		addrs[w.mm] = 0
	}
	b.ReportAllocs()
	for b.Loop() {
		untimed(b, func() {
			for mm := range addrs {
				addr, err := mm.Mmap(0, span, rw, anon)
				must(b, err)
				addrs[mm] = addr
			}
		})
		var wg sync.WaitGroup
		for _, w := range workers {
			addr := addrs[w.mm]
			wg.Go(func() {
				for r := addr + uint64(w.first)*faultRegion; r < addr+span; r += uint64(w.stride) * faultRegion {
					for va := r; va < r+faultRegion; va += page {
						if err := fault(w.cpu, w.mm, va); err != nil {
							b.Error(err)
							return
						}
					}
				}
			})
		}
		wg.Wait()
		untimed(b, func() {
			for mm, addr := range addrs {
				must(b, mm.Munmap(addr, span))
			}
		})
	}
	pages := uint64(len(addrs)) * span / page
	perPage(b, pages)
	b.ReportMetric(float64(b.N*int(pages))/b.Elapsed().Seconds(), "pages/s")
}

// BenchmarkFlushRange: a one-page flush of an MM that 1 to 16 CPUs run,
// each handling its IPI.
func BenchmarkFlushRange(b *testing.B) {
	for _, n := range []int{1, 2, 4, 8, 16} {
		b.Run(fmt.Sprintf("cpus=%d", n), func(b *testing.B) {
			m := newMachine(b, gomm.Config{CPUs: 16, Frames: 1024})
			mm := m.NewMM()
			for _, c := range m.CPUs()[:n] {
				c.Switch(mm.NewTask("bench"))
			}
			before := m.Stats().TLB.IPIs
			b.ReportAllocs()
			for b.Loop() {
				m.TLB().FlushRange(mm.Context(), 0x1000, 0x2000, pagetable.PageShift, false)
			}
			b.ReportMetric(float64(m.Stats().TLB.IPIs-before)/float64(b.N), "IPIs/op")
		})
	}
}

// BenchmarkLazyTLBSchedule: a fork/exit-heavy schedule on 4 CPUs, as a
// shell running short commands makes: each round a parent with one
// written page forks, the child runs on one CPU, which then switches to
// a kernel thread (lazy, still holding the child's mm), and the child
// exits. Reports time, mm_count atomics, shootdown IPIs and flush IPIs
// per round for both lazy-TLB schemes.
func BenchmarkLazyTLBSchedule(b *testing.B) {
	for _, mode := range []gomm.LazyTLBMode{gomm.LazyRefcount, gomm.LazyShootdown} {
		b.Run(mode.String(), func(b *testing.B) {
			m := newMachine(b, gomm.Config{CPUs: 4, Frames: 4096, LazyTLB: mode})
			parent := m.NewMM()
			addr := populated(b, parent, page)
			_, err := parent.WriteAt([]byte{1}, addr)
			must(b, err)
			kthread := tlb.NewKernelThread("kthread")
			before := m.Stats().TLB
			const rounds = 1000 // per iteration: a stable figure from few iterations
			for b.Loop() {
				for i := range rounds {
					child, err := parent.Fork()
					must(b, err)
					cpu := m.CPU(i % 4)
					cpu.Switch(child.NewTask("t"))
					cpu.Switch(kthread)
					must(b, child.Exit())
				}
			}
			st := m.Stats().TLB
			n := float64(b.N * rounds)
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/n, "ns/round")
			b.ReportMetric(float64(st.CountOps-before.CountOps)/n, "mm_count-atomics/round")
			b.ReportMetric(float64(st.ShootdownIPIs-before.ShootdownIPIs)/n, "shootdown-IPIs/round")
			// The child's exit frees page tables, so its flush reaches the
			// lazy CPU too, which leaves the mm there: the shootdown at
			// the last mmdrop then finds no CPU to interrupt.
			b.ReportMetric(float64(st.IPIs-before.IPIs)/n, "flush-IPIs/round")
			_ = parent.Exit()
		})
	}
}

// BenchmarkClearPages is the machine's own limit under FaultParallel, not
// gomm code: 1 or 2 goroutines zeroing 4 KiB pages of a 256 MiB pool
// (colder than the caches), each its own pages, as every first write
// to an anonymous page must (clear_page). pages/s of 2 against 1 is the
// most any write-fault benchmark can scale by here.
func BenchmarkClearPages(b *testing.B) {
	const pages = 1 << 16
	pool := make([][page]byte, pages)
	for _, n := range []int{1, 2} {
		b.Run(fmt.Sprintf("cpus=%d", n), func(b *testing.B) {
			for b.Loop() {
				var wg sync.WaitGroup
				for w := range n {
					wg.Go(func() {
						for i := w; i < pages; i += n {
							clear(pool[i][:])
						}
					})
				}
				wg.Wait()
			}
			perPage(b, pages)
			b.ReportMetric(float64(b.N)*pages/b.Elapsed().Seconds(), "pages/s")
		})
	}
}
