package benchmarks

import (
	"fmt"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/mmugather"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/tlb"
)

// BenchmarkUnmap: one Unmap call per 4 KiB page of a full table. The
// table is rebuilt with the timer stopped, so the spans start at 64 MiB,
// where the rebuild costs no more than what is timed.
func BenchmarkUnmap(b *testing.B) {
	onFullTable(b, func(tb *pagetable.Table, size uint64) {
		for va := uint64(0); va < size; va += page {
			if _, err := tb.Unmap(va); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkUnmapRange: one UnmapRange call over a full table, from
// 64 MiB for the same reason.
func BenchmarkUnmapRange(b *testing.B) {
	onFullTable(b, func(tb *pagetable.Table, size uint64) {
		if n, err := tb.UnmapRange(0, size, nil); err != nil || n != int(size/page) {
			b.Fatal(n, err)
		}
	})
}

// onFullTable times op on a table mapping [0, size), rebuilt with the
// timer stopped for each iteration, and reports it per page.
func onFullTable(b *testing.B, op func(tb *pagetable.Table, size uint64)) {
	bySize(b, 64<<20, func(b *testing.B, size uint64) {
		b.ReportAllocs()
		for b.Loop() {
			var tb *pagetable.Table
			untimed(b, func() { tb = mappedTable(b, size) })
			op(tb, size)
		}
		perPage(b, size/page)
	})
}

// BenchmarkZapDontNeed: MADV_DONTNEED of populated memory: the range zap
// into a gather (zap_page_range), its TLB flushes and the frees, with the
// VMA left in place.
func BenchmarkZapDontNeed(b *testing.B) {
	bySize(b, rebuiltMin, func(b *testing.B, size uint64) {
		m := newMachine(b, gomm.Config{CPUs: 1, Frames: framesFor(size)})
		mm := m.NewMM()
		m.CPU(0).Switch(mm.NewTask("bench"))
		b.ReportAllocs()
		for b.Loop() {
			var addr uint64
			untimed(b, func() { addr = populated(b, mm, size) }) // over the last round's emptied VMA
			must(b, mm.Madvise(addr, size, gomm.MadvDontNeed))
		}
		perPage(b, size/page)
	})
}

// BenchmarkMunmap: munmap of populated memory while 1 or 4 CPUs run the
// MM. Besides ns/page it reports, per call, the TLB flushes and IPIs,
// and the flushes per gather batch per CPU running the MM (the target
// is at most one).
func BenchmarkMunmap(b *testing.B) {
	for _, cpus := range []int{1, 4} {
		b.Run(fmt.Sprintf("cpus=%d", cpus), func(b *testing.B) {
			bySize(b, rebuiltMin, func(b *testing.B, size uint64) {
				m := newMachine(b, gomm.Config{CPUs: cpus, Frames: framesFor(size)})
				mm := m.NewMM()
				for _, c := range m.CPUs() {
					c.Switch(mm.NewTask("bench"))
				}
				var flushes, ipis uint64
				for b.Loop() {
					var addr uint64
					var before tlb.Stats
					untimed(b, func() {
						addr = populated(b, mm, size)
						before = m.Stats().TLB
					})
					must(b, mm.Munmap(addr, size))
					untimed(b, func() {
						after := m.Stats().TLB
						flushes += after.FlushRequests - before.FlushRequests
						ipis += after.IPIs - before.IPIs
					})
				}
				n := float64(b.N)
				batches := float64((size/page + mmugather.BatchPages - 1) / mmugather.BatchPages)
				perPage(b, size/page)
				b.ReportMetric(float64(flushes)/n, "flushes/op")
				b.ReportMetric(float64(ipis)/n, "IPIs/op")
				b.ReportMetric(float64(ipis)/n/batches/float64(cpus), "IPIs/batch/CPU")
			})
		})
	}
}

// BenchmarkExit: exit of an MM with the size populated (the fullmm
// gather: one flush of everything per batch, then the tables).
func BenchmarkExit(b *testing.B) {
	bySize(b, rebuiltMin, func(b *testing.B, size uint64) {
		m := newMachine(b, gomm.Config{CPUs: 1, Frames: framesFor(size)})
		b.ReportAllocs()
		for b.Loop() {
			var mm *gomm.MM
			untimed(b, func() {
				mm = m.NewMM()
				populated(b, mm, size)
			})
			must(b, mm.Exit())
		}
		perPage(b, size/page)
	})
}

// BenchmarkMremapMove: mremap of 64 MiB of written anonymous memory to a
// new address and back (MREMAP_MAYMOVE|MREMAP_FIXED): page-table moves
// and one flush of the old range per call; reported per page moved.
// "mergeable" is the same memory under MADV_MERGEABLE with no page merged
// yet: the KSM pages a move must unmerge first are looked for, and there
// are none.
func BenchmarkMremapMove(b *testing.B) {
	const size = 64 << 20
	for _, mergeable := range []bool{false, true} {
		name := "plain"
		if mergeable {
			name = "mergeable"
		}
		b.Run(name, func(b *testing.B) {
			m := newMachine(b, gomm.Config{CPUs: 1, Frames: framesFor(size)})
			mm := m.NewMM()
			defer func() { _ = mm.Exit() }()
			a := populated(b, mm, size)
			if mergeable {
				must(b, mm.Madvise(a, size, gomm.MadvMergeable))
			}
			other := a + 2*size
			for b.Loop() {
				_, err := mm.Mremap(a, size, size, gomm.MremapMayMove|gomm.MremapFixed, other)
				must(b, err)
				a, other = other, a
			}
			perPage(b, size/page)
		})
	}
}
