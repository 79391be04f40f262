// Package benchmarks holds gomm's scenario benchmarks: the hot paths of
// the whole MM measured the way a user meets them, across packages, each
// reporting per-page or per-operation figures (b.ReportMetric) and
// allocations, most of them by size from 4 KiB to 1 GiB.
//
//   - walk_test.go: Lookup in order and at random, the lockless hardware
//     walk, a TLB hit, a TLB miss and fill.
//   - populate_test.go: per-page Map, range Map, anonymous faults taken
//     by a CPU, MAP_POPULATE.
//   - teardown_test.go: per-page Unmap, range Unmap, MADV_DONTNEED (a
//     range zap into a gather), munmap with its flushes and IPIs, exit.
//   - notifiers_test.go: munmap under 0, 1 and 8 subscribers and 8 that
//     implement nothing munmap calls, an interval notifier's read side,
//     Register over 1 to 10,000 VMAs.
//   - concurrency_test.go: faults in disjoint 2 MiB regions from 1 to 8
//     CPUs, with the page's first store and without it (the fault path
//     alone), the same faults in 1 or 2 machines that share nothing
//     (this machine's scaling ceiling), zeroing pages on 1 or 2 cores,
//     FlushRange to 1 to 16 CPUs, the lazy-TLB schemes.
//   - rmap_test.go: rmap walks by fork depth, fork, reclaim, the KSM
//     scan, migration.
//
// The package's only code is in its tests; per-package microbenchmarks
// (locks, physmem, notifier dispatch, ...) stay next to their packages.
// The lock-order checker is off in every benchmark (it captures a stack
// per lock operation). Run and compare with the committed baseline:
//
//	go test -run='^$' -bench=. -benchmem -count=6 ./benchmarks/ | tee new.txt
//	go run golang.org/x/perf/cmd/benchstat@latest benchmarks/baseline/scenarios.txt new.txt
//
// benchmarks/compare, a module of its own, sets gomm's page table beside
// gVisor's and a Go map.
package benchmarks
