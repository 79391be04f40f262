package pagetable

import (
	"math/rand/v2"
	"testing"

	"github.com/gomm-dev/gomm/internal/testmain"
)

// The 4 KiB page walks, maps and unmaps are scenario benchmarks in
// benchmarks/; these are the 2 MiB-leaf paths and the ones that need the
// package's insides. They work on 1 GiB of address space (512 leaves)
// unless they say otherwise.

const benchSpan = 1 << 30

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

func mappedHuge(b *testing.B, span uint64) *Table {
	b.Helper()
	testmain.WithoutLockdep(b)
	tb := New(Options{})
	for va := uint64(0); va < span; va += HugeSize {
		if err := tb.MapHuge(va, NewPTE(va>>PageShift, Write|User|Accessed|Dirty)); err != nil {
			b.Fatal(err)
		}
	}
	return tb
}

// BenchmarkLookupHuge: Lookup at random addresses over 1 GiB of 2 MiB
// leaves.
func BenchmarkLookupHuge(b *testing.B) {
	tb := mappedHuge(b, benchSpan)
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

// BenchmarkWalkHuge: the hardware walker over the same leaves, already
// young.
func BenchmarkWalkHuge(b *testing.B) {
	tb := mappedHuge(b, benchSpan)
	vas := randomVAs(benchSpan, 1<<16)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if tr := tb.Walk(vas[i&(len(vas)-1)], AccessRead|AccessUser); tr.Fault != FaultNone {
			b.Fatal(tr.Fault)
		}
		i++
	}
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
