package benchmarks

import (
	"math/rand/v2"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/gomm-dev/gomm/pagetable"
)

// mappedTable returns a table with [0, size) mapped by 4 KiB entries
// that are already young and dirty, as a walk finds them in the steady
// state.
func mappedTable(b *testing.B, size uint64) *pagetable.Table {
	testmain.WithoutLockdep(b)
	tb := pagetable.New(pagetable.Options{})
	flags := pagetable.Write | pagetable.User | pagetable.Accessed | pagetable.Dirty
	must(b, tb.MapRange(0, size, pagetable.NewPTE(1, flags)))
	return tb
}

// walkAddrs returns up to 2^16 addresses inside [0, size), in page order
// or at random, each with an offset inside its page. Lookups cycle
// through them.
func walkAddrs(size uint64, random bool) []uint64 {
	n := min(size/page, 1<<16)
	vas := make([]uint64, n)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range vas {
		if random {
			vas[i] = rng.Uint64N(size)
		} else {
			vas[i] = uint64(i)*page + uint64(i*8)%page
		}
	}
	return vas
}

// BenchmarkLookup: one software walk (Lookup) of a mapped 4 KiB page per
// operation, pages in address order or at random over the size.
func BenchmarkLookup(b *testing.B) {
	for _, order := range []string{"seq", "random"} {
		b.Run(order, func(b *testing.B) {
			bySize(b, 0, func(b *testing.B, size uint64) {
				tb := mappedTable(b, size)
				vas := walkAddrs(size, order == "random")
				b.ReportAllocs()
				i := 0
				for b.Loop() {
					if e, _ := tb.Lookup(vas[i%len(vas)]); !e.IsPresent() {
						b.Fatal("unmapped")
					}
					i++
				}
			})
		})
	}
}

// BenchmarkWalkLockless: the hardware walker (Walk: permission checks,
// Accessed and Dirty already set) at random addresses over the size.
func BenchmarkWalkLockless(b *testing.B) {
	bySize(b, 0, func(b *testing.B, size uint64) {
		tb := mappedTable(b, size)
		vas := walkAddrs(size, true)
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if tr := tb.Walk(vas[i%len(vas)], pagetable.AccessWrite|pagetable.AccessUser); tr.Fault != pagetable.FaultNone {
				b.Fatal(tr.Fault)
			}
			i++
		}
	})
}

// runningCPU returns CPU 0 running a task of an MM with one written page
// at the returned address.
func runningCPU(b *testing.B) (*gomm.Machine, uint64) {
	m := newMachine(b, gomm.Config{CPUs: 1, Frames: 1024})
	mm := m.NewMM()
	addr := populated(b, mm, page)
	m.CPU(0).Switch(mm.NewTask("bench"))
	must(b, m.CPU(0).Store64(addr, 1))
	return m, addr
}

// BenchmarkTLBHit: a CPU's translation of an address its TLB holds.
func BenchmarkTLBHit(b *testing.B) {
	m, addr := runningCPU(b)
	cpu := m.CPU(0)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := cpu.Translate(addr+8, pagetable.AccessRead); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTLBMissFill: the same translation after a local flush: a walk
// of the MM's table and a TLB fill every time.
func BenchmarkTLBMissFill(b *testing.B) {
	m, addr := runningCPU(b)
	cpu := m.CPU(0)
	b.ReportAllocs()
	for b.Loop() {
		cpu.FlushLocal()
		if _, err := cpu.Translate(addr+8, pagetable.AccessRead); err != nil {
			b.Fatal(err)
		}
	}
}
