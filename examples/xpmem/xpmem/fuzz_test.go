package xpmem

import (
	"context"
	"errors"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/mmtest"
)

// FuzzSegment exports arbitrary ranges and reads arbitrary offsets: no
// panic, typed errors only, no goroutine left behind (goleak in
// TestMain), the checker quiet through teardown.
func FuzzSegment(f *testing.F) {
	f.Add(uint64(0x1000_0000), uint64(4*PageSize), uint64(8))
	f.Add(uint64(0x1000_0001), uint64(PageSize), uint64(0))
	f.Add(uint64(0x1000_0000), uint64(1<<40), uint64(1<<39))
	f.Add(uint64(gomm.TaskSize-PageSize), uint64(2*PageSize), uint64(4))
	f.Fuzz(func(t *testing.T, start, length, off uint64) {
		m := mmtest.Machine(t, gomm.Config{CPUs: 1, Frames: 128})
		mm := m.NewMM()
		mmtest.MapAnon(t, mm, 0x1000_0000, 4, 0)
		seg, err := Export(context.Background(), m, mm, start, length, NewLink(0))
		if err != nil {
			if _, ok := errno.Of(err); !ok {
				t.Fatalf("Export(%#x, %#x): untyped error %v", start, length, err)
			}
			if seg, err = Export(context.Background(), m, mm, 0x1000_0000, 4*PageSize, NewLink(0)); err != nil {
				t.Fatal(err)
			}
		}
		for _, o := range []uint64{off, off % (4 * PageSize)} {
			_, err := seg.Read64(o)
			if _, ok := errno.Of(err); err != nil && !ok && !errors.Is(err, ErrClosed) {
				t.Fatalf("Read64(%#x): untyped error %v", o, err)
			}
		}
		if err := seg.Close(); err != nil {
			t.Fatal(err)
		}
		mmtest.ExitAndCheck(t, m, mm)
	})
}
