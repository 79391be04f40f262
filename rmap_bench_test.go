package gomm_test

import (
	"fmt"
	"testing"

	"github.com/gomm-dev/gomm"
)

// BenchmarkRmapWalk: finding every mapping of a page shared by a chain
// of forked processes (an rmap walk through the root anon_vma's tree,
// checking each candidate entry), by the depth of the chain.
func BenchmarkRmapWalk(b *testing.B) {
	for _, depth := range []int{1, 4, 16, 64} {
		b.Run(fmt.Sprintf("depth=%d", depth), func(b *testing.B) {
			m := benchMachine(b, gomm.Config{CPUs: 1})
			mm := m.NewMM()
			addr, err := mm.Mmap(0x1000_0000, page, rw, anon|gomm.MapFixed|gomm.MapPopulate)
			if err != nil {
				b.Fatal(err)
			}
			chain := []*gomm.MM{mm}
			for range depth {
				c, err := chain[len(chain)-1].Fork()
				if err != nil {
					b.Fatal(err)
				}
				chain = append(chain, c)
			}
			e, _ := mm.Table().Lookup(addr)
			b.ReportAllocs()
			for b.Loop() {
				ms, err := m.Mappers(e.PFN())
				if err != nil || len(ms) != depth+1 {
					b.Fatalf("%d mappers, %v", len(ms), err)
				}
			}
			for _, c := range chain {
				_ = c.Exit()
			}
		})
	}
}

// BenchmarkReclaimSwap: pages per second reclaimed to swap and faulted
// back: each iteration swaps 2048 written pages out and reads them all
// back in.
func BenchmarkReclaimSwap(b *testing.B) {
	const pages = 2048
	m := benchMachine(b, gomm.Config{CPUs: 1, Frames: 4 * pages, SwapSlots: 2 * pages})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, pages*page, rw, anon|gomm.MapPopulate)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 8)
	b.ReportAllocs()
	for b.Loop() {
		if st := m.Reclaim(pages); st.Freed < pages/2 {
			b.Fatalf("reclaim freed only %d", st.Freed)
		}
		for va := addr; va < addr+pages*page; va += page {
			if _, err := mm.ReadAt(buf, va); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.N*pages)/b.Elapsed().Seconds(), "pages/s")
	_ = mm.Exit()
}

// BenchmarkFork1GiB: forking an MM with 1 GiB of written anonymous
// memory (copy_page_range with anon_vma_fork), and the child's exit.
func BenchmarkFork1GiB(b *testing.B) {
	const size = 1 << 30
	m := benchMachine(b, gomm.Config{CPUs: 1, Frames: size/page + 4096})
	mm := m.NewMM()
	if _, err := mm.Mmap(0, size, rw, anon|gomm.MapPopulate); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		child, err := mm.Fork()
		if err != nil {
			b.Fatal(err)
		}
		if err := child.Exit(); err != nil {
			b.Fatal(err)
		}
	}
	_ = mm.Exit()
}

// BenchmarkKSMScan: the merger's throughput over page contents: each
// iteration is one full pass over 1024 mergeable pages (half of them
// identical pairs already merged, half distinct), checksumming every page
// and looking each up in the stable and unstable trees.
func BenchmarkKSMScan(b *testing.B) {
	const pages = 1024
	m := benchMachine(b, gomm.Config{CPUs: 1, Frames: 4 * pages})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, pages*page, rw, anon|gomm.MapPopulate)
	if err != nil {
		b.Fatal(err)
	}
	if err := mm.Madvise(addr, pages*page, gomm.MadvMergeable); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 8)
	for i := range uint64(pages) {
		buf[0], buf[1] = byte(i/2), byte(i/2>>8)
		if i >= pages/2 {
			buf[2] = byte(i)
		}
		if _, err := mm.WriteAt(buf, addr+i*page); err != nil {
			b.Fatal(err)
		}
	}
	m.KSMScan(2 * pages)
	b.SetBytes(pages * page)
	b.ReportAllocs()
	for b.Loop() {
		m.KSMScan(pages)
	}
	b.ReportMetric(float64(m.KSMStats().PagesSharing), "pages-sharing")
	_ = mm.Exit()
}
