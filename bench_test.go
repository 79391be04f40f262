package gomm_test

import (
	"fmt"
	"sync"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/internal/testmain"
)

func benchMachine(b *testing.B, cfg gomm.Config) *gomm.Machine {
	b.Helper()
	testmain.WithoutLockdep(b)
	m, err := gomm.NewMachine(cfg)
	if err != nil {
		b.Fatal(err)
	}
	return m
}

// BenchmarkFaultIn: anonymous write faults taken by a CPU, one per page,
// over 64 MiB (fault, frame allocation, PTE install, TLB fill, store).
func BenchmarkFaultIn(b *testing.B) { benchFaultIn(b, false) }

// BenchmarkFaultInHuge is FaultIn with MADV_HUGEPAGE: one fault maps
// each 2 MiB (zeroing is free here: a frame's data is allocated on its
// first write, as FaultIn's is), the 511 other stores of a huge page hit.
func BenchmarkFaultInHuge(b *testing.B) { benchFaultIn(b, true) }

func benchFaultIn(b *testing.B, huge bool) {
	const size = 64 << 20
	m := benchMachine(b, gomm.Config{CPUs: 1, Frames: size/page + 1024})
	mm := m.NewMM()
	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("bench"))
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		// Fixed at a 2 MiB boundary, so every huge range is eligible.
		addr, err := mm.Mmap(0x4000_0000, size, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapFixed)
		if err == nil && huge {
			err = mm.Madvise(addr, size, gomm.MadvHugePage)
		}
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		for va := addr; va < addr+size; va += page {
			if err := cpu.Store64(va, va); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		if err := mm.Munmap(addr, size); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	if st := m.Stats().THP; huge && st.FaultFallback > 0 {
		b.Fatalf("%d huge faults fell back", st.FaultFallback)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/(size/page), "ns/page")
}

// BenchmarkFaultInParallel: the two CPUs of one MM take write faults at
// once, each over its own half of 64 MiB in the same VMA: what the
// faults of one address space serialize on (its anon_vma preparation,
// the LRU, the allocator) shows here and not in FaultIn.
func BenchmarkFaultInParallel(b *testing.B) {
	const size = 64 << 20
	m := benchMachine(b, gomm.Config{CPUs: 2, Frames: size/page + 1024})
	mm := m.NewMM()
	for _, c := range m.CPUs() {
		c.Switch(mm.NewTask("bench"))
	}
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		addr, err := mm.Mmap(0, size, gomm.ProtRead|gomm.ProtWrite, anon)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		var wg sync.WaitGroup
		for i, cpu := range m.CPUs() {
			half := addr + uint64(i)*size/2
			wg.Go(func() {
				for va := half; va < half+size/2; va += page {
					if err := cpu.Store64(va, va); err != nil {
						b.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		b.StopTimer()
		if err := mm.Munmap(addr, size); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/(size/page), "ns/page")
}

// BenchmarkMunmap1GiB: munmap of 1 GiB populated with 4 KiB pages while
// every CPU runs the MM; reports time per page and, per call, the TLB
// flushes and IPIs (one flush per gather batch, one IPI per CPU each).
func BenchmarkMunmap1GiB(b *testing.B) {
	const size = 1 << 30
	for _, cpus := range []int{1, 4} {
		b.Run(fmt.Sprintf("cpus=%d", cpus), func(b *testing.B) {
			m := benchMachine(b, gomm.Config{CPUs: cpus, Frames: size/page + 4096})
			mm := m.NewMM()
			for _, c := range m.CPUs() {
				c.Switch(mm.NewTask("t"))
			}
			var flushes, ipis uint64
			for b.Loop() {
				b.StopTimer()
				addr, err := mm.Mmap(0, size, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapPopulate)
				if err != nil {
					b.Fatal(err)
				}
				before := m.Stats().TLB
				b.StartTimer()
				if err := mm.Munmap(addr, size); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				after := m.Stats().TLB
				flushes += after.FlushRequests - before.FlushRequests
				ipis += after.IPIs - before.IPIs
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/(size/page), "ns/page")
			b.ReportMetric(float64(flushes)/float64(b.N), "flushes/op")
			b.ReportMetric(float64(ipis)/float64(b.N), "IPIs/op")
		})
	}
}

// BenchmarkLazyTLBSchedule: an exec/exit-heavy schedule on 4 CPUs: each
// round an MM is created, runs a task on one CPU, which then switches to
// a kernel thread (lazy), and the MM exits. Reports time, mm_count
// atomics and shootdown IPIs per round for both lazy-TLB schemes.
func BenchmarkLazyTLBSchedule(b *testing.B) {
	for _, mode := range []gomm.LazyTLBMode{gomm.LazyRefcount, gomm.LazyShootdown} {
		b.Run(mode.String(), func(b *testing.B) {
			m := benchMachine(b, gomm.Config{CPUs: 4, Frames: 4096, LazyTLB: mode})
			kthread := tlbIdle()
			const rounds = 1000 // per iteration, so that few iterations give a stable figure
			for b.Loop() {
				for i := range rounds {
					mm := m.NewMM()
					cpu := m.CPU(i % 4)
					cpu.Switch(mm.NewTask("t"))
					cpu.Switch(kthread)
					if err := mm.Exit(); err != nil {
						b.Fatal(err)
					}
				}
			}
			st := m.Stats().TLB
			n := float64(b.N * rounds)
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/n, "ns/round")
			b.ReportMetric(float64(st.CountOps)/n, "mm_count-atomics/round")
			b.ReportMetric(float64(st.ShootdownIPIs)/n, "shootdown-IPIs/round")
		})
	}
}

// BenchmarkMremapMove: mremap of 64 MiB of written anonymous memory to a
// new address and back (MREMAP_MAYMOVE|MREMAP_FIXED): page-table moves
// and one flush of the old range per call; reported per page moved.
func BenchmarkMremapMove(b *testing.B) {
	const size = 64 << 20
	m := benchMachine(b, gomm.Config{Frames: size/gomm.PageSize + 4096, CPUs: 1})
	mm := m.NewMM()
	defer func() { _ = mm.Exit() }()
	a, err := mm.Mmap(0x1000_0000, size, gomm.ProtRead|gomm.ProtWrite, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed|gomm.MapPopulate)
	if err != nil {
		b.Fatal(err)
	}
	other := uint64(0x4000_0000)
	for b.Loop() {
		if _, err := mm.Mremap(a, size, size, gomm.MremapMayMove|gomm.MremapFixed, other); err != nil {
			b.Fatal(err)
		}
		a, other = other, a
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/(size/gomm.PageSize), "ns/page")
}
