package compare

import (
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/gomm-dev/gomm/pagetable"
	"go.uber.org/goleak"
	"gvisor.dev/gvisor/pkg/cpuid"
	"gvisor.dev/gvisor/pkg/hostarch"
	"gvisor.dev/gvisor/pkg/ring0/pagetables"
)

const (
	span  = 1 << 30
	pages = span >> pagetable.PageShift
	// physBase offsets every physical address by one page, so that no
	// 2 MiB of it is aligned and gVisor's range Map builds 4 KiB entries
	// as the others do instead of huge leaves.
	physBase = pagetable.PageSize
)

func TestMain(m *testing.M) {
	// gVisor's page tables read the CPU's features when they build entries.
	cpuid.Initialize()
	goleak.VerifyTestMain(m)
}

var gvisorOpts = pagetables.MapOpts{AccessType: hostarch.ReadWrite, User: true}

func gommPTE(va uint64) pagetable.PTE {
	return pagetable.NewPTE((va+physBase)>>pagetable.PageShift, pagetable.Write|pagetable.User)
}

func newGVisor() *pagetables.PageTables {
	return pagetables.New(pagetables.NewRuntimeAllocator())
}

// Filled tables, built with the timer stopped.

func filledGomm(b *testing.B) *pagetable.Table {
	t := pagetable.New(pagetable.Options{})
	if err := t.MapRange(0, span, gommPTE(0)); err != nil {
		b.Fatal(err)
	}
	return t
}

func filledGVisor() *pagetables.PageTables {
	t := newGVisor()
	t.Map(0, span, gvisorOpts, physBase)
	return t
}

func filledMap() map[uint64]uint64 {
	m := make(map[uint64]uint64)
	for va := uint64(0); va < span; va += pagetable.PageSize {
		m[va>>pagetable.PageShift] = va + physBase
	}
	return m
}

// perPage reports the loop's time per page of the 2^18 each iteration
// works on.
func perPage(b *testing.B) {
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/pages, "ns/page")
}

// perLookup reports a lookup loop's time per call.
func perLookup(b *testing.B) {
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/page")
}

// sink keeps a result the compiler could otherwise drop as unused.
var sink any

// timed runs op, which works on all 2^18 pages, once per iteration.
func timed(b *testing.B, op func()) {
	b.ReportAllocs()
	for b.Loop() {
		op()
	}
	perPage(b)
}

// onFull runs op, which works on all 2^18 pages, once per iteration on a
// full table that build makes with the timer stopped.
func onFull[T any](b *testing.B, build func() T, op func(T)) {
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		t := build()
		b.StartTimer()
		op(t)
	}
	perPage(b)
}

// BenchmarkMap: 2^18 sequential pages, one call each, into an empty table.
func BenchmarkMap(b *testing.B) {
	b.Run("gomm", func(b *testing.B) {
		timed(b, func() {
			t := pagetable.New(pagetable.Options{})
			for va := uint64(0); va < span; va += pagetable.PageSize {
				if err := t.Map(va, gommPTE(va)); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("gvisor", func(b *testing.B) {
		timed(b, func() {
			t := newGVisor()
			for va := uint64(0); va < span; va += pagetable.PageSize {
				t.Map(hostarch.Addr(va), pagetable.PageSize, gvisorOpts, uintptr(va+physBase))
			}
		})
	})
	// A map has no range call: its per-page loop is its range Map too.
	b.Run("map", func(b *testing.B) { timed(b, func() { sink = filledMap() }) })
}

// BenchmarkUnmap: 2^18 sequential pages of a full table, one call each.
func BenchmarkUnmap(b *testing.B) {
	b.Run("gomm", func(b *testing.B) {
		onFull(b, func() *pagetable.Table { return filledGomm(b) }, func(t *pagetable.Table) {
			for va := uint64(0); va < span; va += pagetable.PageSize {
				if _, err := t.Unmap(va); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("gvisor", func(b *testing.B) {
		onFull(b, filledGVisor, func(t *pagetables.PageTables) {
			for va := uint64(0); va < span; va += pagetable.PageSize {
				t.Unmap(hostarch.Addr(va), pagetable.PageSize)
			}
		})
	})
	b.Run("map", func(b *testing.B) {
		onFull(b, filledMap, func(m map[uint64]uint64) {
			for va := uint64(0); va < span; va += pagetable.PageSize {
				delete(m, va>>pagetable.PageShift)
			}
		})
	})
}

// BenchmarkMapRange: one call mapping all 2^18 pages into an empty table.
func BenchmarkMapRange(b *testing.B) {
	b.Run("gomm", func(b *testing.B) { timed(b, func() { filledGomm(b) }) })
	b.Run("gvisor", func(b *testing.B) { timed(b, func() { filledGVisor() }) })
	b.Run("map", func(b *testing.B) { timed(b, func() { sink = filledMap() }) })
}

// BenchmarkUnmapRange: one call unmapping all 2^18 pages of a full table.
func BenchmarkUnmapRange(b *testing.B) {
	b.Run("gomm", func(b *testing.B) {
		onFull(b, func() *pagetable.Table { return filledGomm(b) }, func(t *pagetable.Table) {
			if n, err := t.UnmapRange(0, span, nil); err != nil || n != pages {
				b.Fatal(n, err)
			}
		})
	})
	b.Run("gvisor", func(b *testing.B) {
		onFull(b, filledGVisor, func(t *pagetables.PageTables) { t.Unmap(0, span) })
	})
	b.Run("map", func(b *testing.B) { onFull(b, filledMap, func(m map[uint64]uint64) { clear(m) }) })
}

// lookupAddrs returns the addresses a lookup benchmark visits: every page
// in order, or the same pages shuffled, each with an offset inside its
// page.
func lookupAddrs(random bool) []uint64 {
	vas := make([]uint64, pages)
	for i := range vas {
		vas[i] = uint64(i)<<pagetable.PageShift | uint64(i*8)&(pagetable.PageSize-1)
	}
	if random {
		rng := rand.New(rand.NewPCG(1, 2))
		rng.Shuffle(len(vas), func(i, j int) { vas[i], vas[j] = vas[j], vas[i] })
	}
	return vas
}

// benchLookup writes the three lookup loops out on purpose: a shared
// loop would call each table's lookup through a closure, an indirect
// call as long as gomm's whole 4 ns lookup.
func benchLookup(b *testing.B, random bool) {
	vas := lookupAddrs(random)
	want := func(va uint64) uint64 { return va&^(pagetable.PageSize-1) + physBase }
	b.Run("gomm", func(b *testing.B) {
		t := filledGomm(b)
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			va := vas[i&(pages-1)]
			if e, _ := t.Lookup(va); e.PFN()<<pagetable.PageShift != want(va) {
				b.Fatalf("%#x -> %v", va, e)
			}
			i++
		}
		perLookup(b)
	})
	b.Run("gvisor", func(b *testing.B) {
		t := filledGVisor()
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			va := vas[i&(pages-1)]
			if _, pa, _, _ := t.Lookup(hostarch.Addr(va), false); uint64(pa) != want(va) {
				b.Fatalf("%#x -> %#x", va, pa)
			}
			i++
		}
		perLookup(b)
	})
	b.Run("map", func(b *testing.B) {
		m := filledMap()
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			va := vas[i&(pages-1)]
			if pa := m[va>>pagetable.PageShift]; pa != want(va) {
				b.Fatalf("%#x -> %#x", va, pa)
			}
			i++
		}
		perLookup(b)
	})
}

// BenchmarkLookupSeq: one lookup per call, pages in address order.
func BenchmarkLookupSeq(b *testing.B) { benchLookup(b, false) }

// BenchmarkLookupRandom: one lookup per call, the same pages shuffled.
func BenchmarkLookupRandom(b *testing.B) { benchLookup(b, true) }

// BenchmarkTableMemory builds each table over 1 GiB and reports the heap
// it holds (after a GC, so only what stays reachable) as table-bytes/GiB.
// Its time includes the collections and is not meant to be read; the
// timer is never stopped, or b.Loop would ramp the count up against a
// clock that hardly moves.
func BenchmarkTableMemory(b *testing.B) {
	measure := func(b *testing.B, build func() any) {
		var held uint64
		for b.Loop() {
			before := liveHeap()
			t := build()
			held = liveHeap() - before
			runtime.KeepAlive(t)
		}
		b.ReportMetric(float64(held), "table-bytes/GiB")
	}
	b.Run("gomm", func(b *testing.B) {
		var own int64
		measure(b, func() any {
			t := filledGomm(b)
			own = t.TableBytes()
			return t
		})
		// gomm's own count of its tables' bytes, to read against the heap's.
		b.ReportMetric(float64(own), "accounted-bytes/GiB")
	})
	b.Run("gvisor", func(b *testing.B) { measure(b, func() any { return filledGVisor() }) })
	b.Run("map", func(b *testing.B) { measure(b, func() any { return filledMap() }) })
}

func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}
