package tlb_test

import (
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
