package benchmarks

import (
	"fmt"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/internal/mmtest"
	"github.com/gomm-dev/gomm/internal/testmain"
)

const (
	page = gomm.PageSize
	rw   = gomm.ProtRead | gomm.ProtWrite
	anon = gomm.MapPrivate | gomm.MapAnonymous
	gib  = 1 << 30
)

// sizes are the spans the sized benchmarks run over.
var sizes = []uint64{4 << 10, 2 << 20, 64 << 20, gib}

func sizeName(size uint64) string {
	switch {
	case size >= gib:
		return fmt.Sprintf("%dGiB", size/gib)
	case size >= 1<<20:
		return fmt.Sprintf("%dMiB", size>>20)
	default:
		return fmt.Sprintf("%dKiB", size>>10)
	}
}

// rebuiltMin is the smallest size of the benchmarks that rebuild their
// state with the timer stopped in every iteration: below it, stopping
// and starting the timer (which reads the runtime's memory statistics)
// costs more than the work timed, and b.Loop's ramp to the bench time
// would take minutes of wall time. What they measure per page does not
// depend on the span below it.
const rebuiltMin = 2 << 20

// bySize runs fn as one sub-benchmark per size of at least min bytes.
func bySize(b *testing.B, min uint64, fn func(b *testing.B, size uint64)) {
	for _, size := range sizes {
		if size >= min {
			b.Run(sizeName(size), func(b *testing.B) { fn(b, size) })
		}
	}
}

// newMachine makes a machine with the lock-order checker off.
func newMachine(b *testing.B, cfg gomm.Config) *gomm.Machine {
	b.Helper()
	testmain.WithoutLockdep(b)
	m, err := gomm.NewMachine(cfg)
	if err != nil {
		b.Fatal(err)
	}
	return m
}

// framesFor is a machine size with room for size bytes of pages and
// their tables.
func framesFor(size uint64) int { return int(size/page) + 4096 }

// perPage reports the benchmark's timed time per page, pages being what
// one iteration works on.
func perPage(b *testing.B, pages uint64) {
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(pages), "ns/page")
}

// populated maps size bytes of anonymous memory with MAP_POPULATE at
// populatedBase (MAP_FIXED: over what an earlier round left there).
func populated(b *testing.B, mm *gomm.MM, size uint64) uint64 {
	return mmtest.MapAnon(b, mm, populatedBase, int(size/page), gomm.MapPopulate)
}

// populatedBase is 2 MiB-aligned, so huge-page benchmarks can use it too.
const populatedBase = 0x4000_0000

// untimed runs fn with the timer stopped.
func untimed(b *testing.B, fn func()) {
	b.StopTimer()
	fn()
	b.StartTimer()
}

// must fails the benchmark on an error. It is called per page in timed
// loops: b.Helper, which walks the stack, is called only on failure.
func must(b *testing.B, err error) {
	if err != nil {
		b.Helper()
		b.Fatal(err)
	}
}
