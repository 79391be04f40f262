package pagetable

import (
	"math/rand/v2"
	"testing"

	"github.com/gomm-dev/gomm/internal/testmain"
)

// The benchmarks work on 1 GiB of address space: 2^18 4 KiB pages or 512
// 2 MiB leaves. Per-page figures are reported as ns/page.

const (
	benchSpan  = 1 << 30
	benchPages = benchSpan >> PageShift
)

// randomVAs returns addresses spread at random over [0, span), each with
// a random offset inside its page.
func randomVAs(span uint64, n int) []uint64 {
	rng := rand.New(rand.NewPCG(1, 2))
	vas := make([]uint64, n)
	for i := range vas {
		vas[i] = rng.Uint64N(span)
	}
	return vas
}

func mappedTable(b *testing.B, huge bool) *Table {
	b.Helper()
	testmain.WithoutLockdep(b)
	if huge {
		return mappedHuge(b, benchSpan)
	}
	tb := New(Options{})
	if err := tb.MapRange(0, benchSpan, NewPTE(0, Write|User|Accessed|Dirty)); err != nil {
		b.Fatal(err)
	}
	return tb
}

func mappedHuge(b *testing.B, span uint64) *Table {
	tb := New(Options{})
	for va := uint64(0); va < span; va += HugeSize {
		if err := tb.MapHuge(va, NewPTE(va>>PageShift, Write|User|Accessed|Dirty)); err != nil {
			b.Fatal(err)
		}
	}
	return tb
}

func benchLookup(b *testing.B, huge bool) {
	tb := mappedTable(b, huge)
	vas := randomVAs(benchSpan, 1<<16)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if e, _ := tb.Lookup(vas[i&(len(vas)-1)]); e == 0 {
			b.Fatal("unmapped")
		}
		i++
	}
}

// BenchmarkLookup: a mapped 4 KiB page at a random address over 1 GiB.
func BenchmarkLookup(b *testing.B) { benchLookup(b, false) }

// BenchmarkLookupHuge: the same over 2 MiB leaves.
func BenchmarkLookupHuge(b *testing.B) { benchLookup(b, true) }

func benchWalk(b *testing.B, huge bool, acc Access) {
	tb := mappedTable(b, huge)
	vas := randomVAs(benchSpan, 1<<16)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if tr := tb.Walk(vas[i&(len(vas)-1)], acc); tr.Fault != FaultNone {
			b.Fatal(tr.Fault)
		}
		i++
	}
}

// BenchmarkWalkLockless: the hardware walker, random addresses over 1 GiB,
// entries already young (the steady state, no compare-and-swap).
func BenchmarkWalkLockless(b *testing.B) {
	b.Run("read", func(b *testing.B) { benchWalk(b, false, AccessRead|AccessUser) })
	b.Run("write", func(b *testing.B) { benchWalk(b, false, AccessWrite|AccessUser) })
	b.Run("huge", func(b *testing.B) { benchWalk(b, true, AccessRead|AccessUser) })
}

// BenchmarkWalkSetsAccessed: every walk finds the entry old and sets
// Accessed by compare-and-swap, as after an aging pass.
func BenchmarkWalkSetsAccessed(b *testing.B) {
	testmain.WithoutLockdep(b)
	tb := New(Options{})
	if err := tb.MapRange(0, HugeSize, NewPTE(0, Write|User)); err != nil {
		b.Fatal(err)
	}
	pt, _, _ := tb.LockPTE(0)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		j := i & (Entries - 1)
		pt.page[j].And(^uint64(Accessed)) // age it, as TestAndClearYoung would
		if tr := tb.Walk(uint64(j)<<PageShift, AccessRead); tr.Fault != FaultNone {
			b.Fatal(tr.Fault)
		}
		i++
	}
	pt.Unlock()
}

// perPage runs op once per b.Loop iteration and reports the time per page.
// op gets a fresh table: an empty one made inside the timed region when
// setup is nil (making it costs one 4 KiB allocation), else one built by
// setup with the timer stopped.
func perPage(b *testing.B, pages int, setup func() *Table, op func(*Table)) {
	testmain.WithoutLockdep(b)
	b.ReportAllocs()
	for b.Loop() {
		var tb *Table
		if setup == nil {
			tb = New(Options{})
		} else {
			b.StopTimer()
			tb = setup()
			b.StartTimer()
		}
		op(tb)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(pages), "ns/page")
}

// hugeSpan is where the 2 MiB benchmarks work: 32768 leaves, so that one
// iteration is long enough to make stopping the timer for setup cheap.
const hugeSpan = 64 << 30

// BenchmarkMap: 2^18 sequential 4 KiB pages, one Map call each (split PT
// lock taken and released per page), tables allocated on demand.
func BenchmarkMap(b *testing.B) {
	perPage(b, benchPages, nil, func(tb *Table) {
		for va := uint64(0); va < benchSpan; va += PageSize {
			if err := tb.Map(va, NewPTE(va>>PageShift, Write|User)); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkMapHuge: 32768 sequential 2 MiB leaves, reported per leaf.
func BenchmarkMapHuge(b *testing.B) {
	perPage(b, hugeSpan/HugeSize, nil, func(tb *Table) {
		for va := uint64(0); va < hugeSpan; va += HugeSize {
			if err := tb.MapHuge(va, NewPTE(va>>PageShift, Write|User)); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkUnmap: 2^18 sequential 4 KiB pages, one Unmap call each.
func BenchmarkUnmap(b *testing.B) {
	perPage(b, benchPages, func() *Table { return mappedTable(b, false) }, func(tb *Table) {
		for va := uint64(0); va < benchSpan; va += PageSize {
			if _, err := tb.Unmap(va); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkUnmapHuge: 32768 2 MiB leaves, one UnmapHuge call each.
func BenchmarkUnmapHuge(b *testing.B) {
	perPage(b, hugeSpan/HugeSize, func() *Table { return mappedHuge(b, hugeSpan) }, func(tb *Table) {
		for va := uint64(0); va < hugeSpan; va += HugeSize {
			if _, err := tb.UnmapHuge(va); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkMapRange: one MapRange call over 1 GiB, per page. Its B/op is
// the table memory needed to map 1 GiB with 4 KiB pages; table-MiB/GiB
// reports the same from the table's own accounting.
func BenchmarkMapRange(b *testing.B) {
	var bytes int64
	perPage(b, benchPages, nil, func(tb *Table) {
		if err := tb.MapRange(0, benchSpan, NewPTE(0, Write|User)); err != nil {
			b.Fatal(err)
		}
		bytes = tb.TableBytes()
	})
	b.ReportMetric(float64(bytes)/(1<<20), "table-MiB/GiB")
}

// BenchmarkUnmapRange: one UnmapRange call over 1 GiB populated, per page.
func BenchmarkUnmapRange(b *testing.B) {
	perPage(b, benchPages, func() *Table { return mappedTable(b, false) }, func(tb *Table) {
		if n, err := tb.UnmapRange(0, benchSpan, nil); err != nil || n != benchPages {
			b.Fatal(n, err)
		}
	})
}

// BenchmarkLockPTEUnderHugeLeaf: LockPTE on an address a huge leaf
// maps, which rmap walks, GUP and KSM meet per 4 KiB page of a huge page
// and take as "look at the PMD".
func BenchmarkLockPTEUnderHugeLeaf(b *testing.B) {
	testmain.WithoutLockdep(b)
	tb := New(Options{})
	if err := tb.MapHuge(0, NewPTE(512, Write|User)); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := tb.LockPTE(0x3000); err == nil {
			b.Fatal("no error under a huge leaf")
		}
	}
}
