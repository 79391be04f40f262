package gru

import (
	"context"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/mmtest"
)

// FuzzContextAccess gives the chip arbitrary sizes and modes and a
// context arbitrary addresses: no panic, typed errors only, the checker
// quiet through teardown.
func FuzzContextAccess(f *testing.F) {
	f.Add(16, uint8(0), uint64(0x1000_0000), uint64(7), true)
	f.Add(0, uint8(1), uint64(0x1000_0008), uint64(1), false)
	f.Add(4, uint8(9), uint64(gomm.TaskSize), uint64(0), true)
	f.Fuzz(func(t *testing.T, entries int, mode uint8, va, v uint64, store bool) {
		m := mmtest.Machine(t, gomm.Config{CPUs: 1, Frames: 128})
		chip, err := New(m, entries%1024, Mode(mode))
		if err != nil {
			if _, ok := errno.Of(err); !ok {
				t.Fatalf("New(%d, %d): untyped error %v", entries, mode, err)
			}
			if chip, err = New(m, 8, ModePerRange); err != nil {
				t.Fatal(err)
			}
		}
		mm := m.NewMM()
		mmtest.MapAnon(t, mm, 0x1000_0000, 4, 0)
		x, err := chip.Open(context.Background(), mm)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range []uint64{va, 0x1000_0000 + va%(4*PageSize)} {
			if store {
				err = x.Store64(a, v)
			} else {
				_, err = x.Load64(a)
			}
			if _, ok := errno.Of(err); err != nil && !ok {
				t.Fatalf("access at %#x: untyped error %v", a, err)
			}
		}
		if err := x.Close(); err != nil {
			t.Fatal(err)
		}
		chip.Close()
		mmtest.ExitAndCheck(t, m, mm)
	})
}
