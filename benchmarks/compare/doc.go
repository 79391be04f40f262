// Package compare measures gomm's page table against what a Go program
// would otherwise use for the same job: gVisor's x86-64 page tables
// (gvisor.dev/gvisor/pkg/ring0/pagetables, the closest Go counterpart of
// a hardware radix table) and a plain map[uint64]uint64 from page number
// to physical address.
//
// It is its own module so that gomm never depends on gVisor. Every
// benchmark runs the same work on the three tables as sub-benchmarks
// named gomm, gvisor and map, reports ns/page and, where tables are
// built, table-bytes/GiB: the heap a table holds per GiB mapped with
// 4 KiB pages. The ratios command prints gomm/gvisor from one run:
//
//	go test -run='^$' -bench=. -benchmem -count=6 . | tee compare.txt
//	go run ./ratios compare.txt
//
// The work is 2^18 pages (1 GiB) at address 0: per-page Map, Lookup in
// order and at random, per-page Unmap, and one range Map and range Unmap
// call over all of it. gomm takes its split page-table locks on every
// call; gVisor's tables have no locks (their user serialises), and the
// map has none either.
package compare
