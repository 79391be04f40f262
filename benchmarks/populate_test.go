package benchmarks

import (
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/gomm-dev/gomm/pagetable"
)

// BenchmarkMap: one Map call per 4 KiB page, in order, into an empty
// table (tables allocated on demand, the split PT lock taken per call).
func BenchmarkMap(b *testing.B) {
	bySize(b, 0, func(b *testing.B, size uint64) {
		testmain.WithoutLockdep(b)
		b.ReportAllocs()
		for b.Loop() {
			tb := pagetable.New(pagetable.Options{})
			for va := uint64(0); va < size; va += page {
				must(b, tb.Map(va, pagetable.NewPTE(va/page, pagetable.Write|pagetable.User)))
			}
		}
		perPage(b, size/page)
	})
}

// BenchmarkMapRange: one MapRange call over the size into an empty
// table; table-MiB/GiB is the table memory per GiB mapped.
func BenchmarkMapRange(b *testing.B) {
	bySize(b, 0, func(b *testing.B, size uint64) {
		testmain.WithoutLockdep(b)
		b.ReportAllocs()
		var bytes int64
		for b.Loop() {
			tb := pagetable.New(pagetable.Options{})
			must(b, tb.MapRange(0, size, pagetable.NewPTE(0, pagetable.Write|pagetable.User)))
			bytes = tb.TableBytes()
		}
		perPage(b, size/page)
		b.ReportMetric(float64(bytes)/(1<<20)*gib/float64(size), "table-MiB/GiB")
	})
}

// BenchmarkFaultIn: anonymous write faults taken by a CPU, one store per
// 4 KiB page of a fresh mapping: the fault, the frame, its first-write
// data, the PTE, the TLB fill and the store.
func BenchmarkFaultIn(b *testing.B) {
	bySize(b, rebuiltMin, func(b *testing.B, size uint64) { faultIn(b, size, false) })
}

// BenchmarkFaultInHuge: the same with MADV_HUGEPAGE, one fault per 2 MiB.
func BenchmarkFaultInHuge(b *testing.B) {
	bySize(b, rebuiltMin, func(b *testing.B, size uint64) { faultIn(b, size, true) })
}

func faultIn(b *testing.B, size uint64, huge bool) {
	m := newMachine(b, gomm.Config{CPUs: 1, Frames: framesFor(size)})
	mm := m.NewMM()
	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("bench"))
	b.ReportAllocs()
	for b.Loop() {
		var addr uint64
		untimed(b, func() {
			// At a 2 MiB boundary, so that every huge range is eligible.
			var err error
			addr, err = mm.Mmap(0x4000_0000, size, rw, anon|gomm.MapFixed)
			if err == nil && huge {
				err = mm.Madvise(addr, size, gomm.MadvHugePage)
			}
			must(b, err)
		})
		for va := addr; va < addr+size; va += page {
			must(b, cpu.Store64(va, va))
		}
		untimed(b, func() { must(b, mm.Munmap(addr, size)) })
	}
	if st := m.Stats().THP; huge && st.FaultFallback > 0 {
		b.Fatalf("%d huge faults fell back", st.FaultFallback)
	}
	perPage(b, size/page)
}

// BenchmarkMapPopulate: mmap with MAP_POPULATE: every page faulted in
// by the MM itself (no CPU, no data written: each page is a fresh zeroed
// frame).
func BenchmarkMapPopulate(b *testing.B) {
	bySize(b, rebuiltMin, func(b *testing.B, size uint64) {
		m := newMachine(b, gomm.Config{CPUs: 1, Frames: framesFor(size)})
		mm := m.NewMM()
		b.ReportAllocs()
		for b.Loop() {
			addr, err := mm.Mmap(0, size, rw, anon|gomm.MapPopulate)
			must(b, err)
			untimed(b, func() { must(b, mm.Munmap(addr, size)) })
		}
		perPage(b, size/page)
	})
}
