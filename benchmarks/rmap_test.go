package benchmarks

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
			m := newMachine(b, gomm.Config{CPUs: 1})
			mm := m.NewMM()
			addr := populated(b, mm, page)
			chain := []*gomm.MM{mm}
			for range depth {
				c, err := chain[len(chain)-1].Fork()
				must(b, err)
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

// BenchmarkFork: fork of an MM with the size of written anonymous memory
// (copy_page_range with anon_vma_fork), and the child's exit.
func BenchmarkFork(b *testing.B) {
	bySize(b, 0, func(b *testing.B, size uint64) {
		m := newMachine(b, gomm.Config{CPUs: 1, Frames: framesFor(size)})
		mm := m.NewMM()
		populated(b, mm, size)
		b.ReportAllocs()
		for b.Loop() {
			child, err := mm.Fork()
			must(b, err)
			must(b, child.Exit())
		}
		perPage(b, size/page)
		_ = mm.Exit()
	})
}

// BenchmarkReclaimSwap: pages per second reclaimed to swap and faulted
// back: each iteration swaps 2048 written pages out and reads them all
// back in.
func BenchmarkReclaimSwap(b *testing.B) {
	const pages = 2048
	m := newMachine(b, gomm.Config{CPUs: 1, Frames: 4 * pages, SwapSlots: 2 * pages})
	mm := m.NewMM()
	addr := populated(b, mm, pages*page)
	buf := make([]byte, 8)
	b.ReportAllocs()
	for b.Loop() {
		if st := m.Reclaim(pages); st.Freed < pages/2 {
			b.Fatalf("reclaim freed only %d", st.Freed)
		}
		for va := addr; va < addr+pages*page; va += page {
			_, err := mm.ReadAt(buf, va)
			must(b, err)
		}
	}
	b.ReportMetric(float64(b.N*pages)/b.Elapsed().Seconds(), "pages/s")
	_ = mm.Exit()
}

// BenchmarkKSMScan: the merger's throughput over page contents (MB/s):
// each iteration is one full pass over 1024 mergeable pages (half of them
// identical pairs already merged, half distinct), checksumming every page
// and looking each up in the stable and unstable trees.
func BenchmarkKSMScan(b *testing.B) {
	const pages = 1024
	m, mm, _ := mergeable(b, pages, func(i uint64, buf []byte) {
		buf[0], buf[1] = byte(i/2), byte(i/2>>8)
		if i >= pages/2 {
			buf[2] = byte(i)
		}
	})
	m.KSMScan(2 * pages)
	b.SetBytes(pages * page)
	b.ReportAllocs()
	for b.Loop() {
		m.KSMScan(pages)
	}
	b.ReportMetric(float64(m.KSMStats().PagesSharing), "pages-sharing")
	_ = mm.Exit()
}

// BenchmarkMovePages: migration of written anonymous pages to new frames
// (move_pages: unmap to migration entries, copy, remap), per page.
func BenchmarkMovePages(b *testing.B) {
	bySize(b, 0, func(b *testing.B, size uint64) {
		if size > 64<<20 {
			b.Skip("each page's data is copied: 64 MiB shows the rate")
		}
		m := newMachine(b, gomm.Config{CPUs: 1, Frames: 2 * framesFor(size)})
		mm := m.NewMM()
		addr := populated(b, mm, size)
		addrs := make([]uint64, size/page)
		for i := range addrs {
			addrs[i] = addr + uint64(i)*page
			_, err := mm.WriteAt([]byte{byte(i)}, addrs[i])
			must(b, err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if n, err := mm.MovePages(addrs); err != nil || n != len(addrs) {
				b.Fatal(n, err)
			}
		}
		perPage(b, size/page)
		b.ReportMetric(float64(b.N)*float64(len(addrs))/b.Elapsed().Seconds(), "pages/s")
		_ = mm.Exit()
	})
}

// BenchmarkRmapWalkKSM: every mapping of a KSM page that 256 places of
// one MM share (a walk of the stable node's items, each through its
// anon_vma).
func BenchmarkRmapWalkKSM(b *testing.B) {
	const pages = 256
	m, mm, addr := mergeable(b, pages, func(_ uint64, buf []byte) { buf[0] = 42 })
	m.KSMScan(2 * pages)
	m.KSMScan(2 * pages)
	e, _ := mm.Table().Lookup(addr)
	if ms, err := m.Mappers(e.PFN()); err != nil || len(ms) != pages {
		b.Fatalf("%d mappers of the KSM page, %v", len(ms), err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Mappers(e.PFN()); err != nil {
			b.Fatal(err)
		}
	}
	_ = mm.Exit()
}

// mergeable returns a machine and an MM with pages populated pages under
// MADV_MERGEABLE at addr, page i starting with the 8 bytes fill(i) set.
func mergeable(b *testing.B, pages uint64, fill func(i uint64, buf []byte)) (*gomm.Machine, *gomm.MM, uint64) {
	m := newMachine(b, gomm.Config{CPUs: 1, Frames: 4 * int(pages)})
	mm := m.NewMM()
	addr := populated(b, mm, pages*page)
	must(b, mm.Madvise(addr, pages*page, gomm.MadvMergeable))
	buf := make([]byte, 8)
	for i := range pages {
		clear(buf)
		fill(i, buf)
		_, err := mm.WriteAt(buf, addr+i*page)
		must(b, err)
	}
	return m, mm, addr
}
