package tlb_test

import (
	"fmt"
	"testing"

	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/gomm-dev/gomm/internal/testrig"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/tlb"
)

// oneMappedPage returns a CPU running a space with 0x1000 mapped.
func oneMappedPage(b *testing.B) *tlb.CPU {
	testmain.WithoutLockdep(b)
	r := testrig.New(b, 1, tlb.LazyRefcount)
	s := r.NewSpace()
	s.MapPage(0x1000, testrig.RWU, 0)
	cpu := r.Sys.CPU(0)
	cpu.Switch(tlb.NewUserTask("t", s.Ctx))
	return cpu
}

// BenchmarkTLBHit: Translate of an address whose entry is in the TLB.
func BenchmarkTLBHit(b *testing.B) {
	cpu := oneMappedPage(b)
	if _, err := cpu.Translate(0x1000, pagetable.AccessRead); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := cpu.Translate(0x1008, pagetable.AccessRead); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLoad64Hit: a whole load through a TLB hit, data included.
func BenchmarkLoad64Hit(b *testing.B) {
	cpu := oneMappedPage(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := cpu.Load64(0x1008); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTLBMiss: a walk and fill every time (the entry is flushed
// locally between accesses).
func BenchmarkTLBMiss(b *testing.B) {
	cpu := oneMappedPage(b)
	for b.Loop() {
		cpu.FlushLocal()
		if _, err := cpu.Translate(0x1008, pagetable.AccessRead); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFlushRange: one-page flush with 1 to 16 CPUs in the mask, each
// handling its IPI.
func BenchmarkFlushRange(b *testing.B) {
	for _, n := range []int{1, 2, 4, 8, 16} {
		b.Run(fmt.Sprintf("cpus=%d", n), func(b *testing.B) {
			testmain.WithoutLockdep(b)
			r := testrig.New(b, 16, tlb.LazyRefcount)
			s := r.NewSpace()
			for _, c := range r.Sys.CPUs()[:n] {
				c.Switch(tlb.NewUserTask("t", s.Ctx))
			}
			for b.Loop() {
				r.Sys.FlushRange(s.Ctx, 0x1000, 0x2000, pagetable.PageShift, false)
			}
			b.ReportMetric(float64(r.Sys.Stats().IPIs)/float64(b.N), "IPIs/op")
		})
	}
}

// BenchmarkFlushRangeHuge: a partial flush of 32 2 MiB strides (what
// zapping huge leaves asks for) on one CPU.
func BenchmarkFlushRangeHuge(b *testing.B) {
	testmain.WithoutLockdep(b)
	r := testrig.New(b, 1, tlb.LazyRefcount)
	s := r.NewSpace()
	r.Sys.CPU(0).Switch(tlb.NewUserTask("t", s.Ctx))
	for b.Loop() {
		r.Sys.FlushRange(s.Ctx, 0, 32*pagetable.HugeSize, pagetable.HugeShift, false)
	}
}
