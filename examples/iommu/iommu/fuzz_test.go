package iommu

import (
	"context"
	"errors"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/mmtest"
)

// FuzzDMA binds a device with arbitrary IOTLB sizes and modes and sends
// DMA to arbitrary addresses: no panic, typed errors only (ErrDMA wraps
// the page request's errno), the checker quiet through teardown.
func FuzzDMA(f *testing.F) {
	f.Add(16, uint8(0), uint64(0x1000_0000), uint64(7), true)
	f.Add(-1, uint8(0), uint64(0x1000_0004), uint64(1), false)
	f.Add(4, uint8(7), uint64(0x2000_0000), uint64(0), true)
	f.Fuzz(func(t *testing.T, entries int, mode uint8, va, v uint64, write bool) {
		m := mmtest.Machine(t, gomm.Config{CPUs: 1, Frames: 128})
		mm := m.NewMM()
		mmtest.MapAnon(t, mm, 0x1000_0000, 4, 0)
		if err := mm.Mprotect(0x1000_0000, 4*PageSize, gomm.ProtRead); err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		md := Mode(mode)
		if md == ModeFlushAtStart || md == ModeFlushAtEnd {
			md = ModeSecondaryTLBs // wrong on purpose: their violations are the demo's point
		}
		d, err := Bind(ctx, m, mm, entries%1024, md)
		if err != nil {
			if _, ok := errno.Of(err); !ok {
				t.Fatalf("Bind(%d): untyped error %v", entries, err)
			}
			if d, err = Bind(ctx, m, mm, 8, ModeSecondaryTLBs); err != nil {
				t.Fatal(err)
			}
		}
		for _, a := range []uint64{va, 0x1000_0000 + va%(4*PageSize)} {
			if write {
				err = d.Write64(a, v)
			} else {
				_, err = d.Read64(a)
			}
			if _, ok := errno.Of(err); err != nil && !ok && !errors.Is(err, ErrDMA) {
				t.Fatalf("DMA at %#x: untyped error %v", a, err)
			}
		}
		if err := d.Unbind(); err != nil {
			t.Fatal(err)
		}
		mmtest.ExitAndCheck(t, m, mm)
	})
}
