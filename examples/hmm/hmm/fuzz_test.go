package hmm

import (
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/mmtest"
)

// FuzzMirror drives every mirror operation with arbitrary addresses,
// lengths and buffer sizes: no panic, typed errors only, the checker
// quiet, and every frame and device page back after teardown.
func FuzzMirror(f *testing.F) {
	f.Add(uint8(0), uint64(0x1000_0000), uint64(4*PageSize), uint16(8))
	f.Add(uint8(2), uint64(0x1000_0000), uint64(2*PageSize), uint16(0))
	f.Add(uint8(4), uint64(0x1000_0008), uint64(PageSize), uint16(1))
	f.Add(uint8(6), uint64(0), uint64(1<<46), uint16(3))
	f.Fuzz(func(t *testing.T, op uint8, addr, length uint64, n uint16) {
		m := mmtest.Machine(t, gomm.Config{CPUs: 1, Frames: 128})
		dev, err := NewDevice(m, 8)
		if err != nil {
			t.Fatal(err)
		}
		mm := m.NewMM()
		mmtest.MapAnon(t, mm, 0x1000_0000, 4, gomm.MapPopulate)
		mi, err := dev.Open(mm)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range []uint64{addr, 0x1000_0000 + addr%(4*PageSize)} {
			switch op % 8 {
			case 0:
				err = mi.Read(a, make([]byte, int(n)%(3*PageSize)))
			case 1:
				err = mi.Write(a, make([]byte, int(n)%(3*PageSize)))
			case 2:
				_, err = mi.MigrateToDevice(a, length)
			case 3:
				_, err = mi.MigrateToSystem(a, length)
			case 4:
				err = mi.MakeExclusive(a, length)
			case 5:
				_, err = mi.AtomicAdd(a, uint64(n))
			case 6:
				_, err = mi.Snapshot(a, length)
			default:
				_, err = mi.ExclusivePages(a, length)
			}
			if _, ok := errno.Of(err); err != nil && !ok {
				t.Fatalf("op %d at %#x, %#x: untyped error %v", op%8, a, length, err)
			}
		}
		if err := mi.Close(); err != nil {
			t.Fatal(err)
		}
		mmtest.ExitAndCheck(t, m, mm)
		if n := dev.Pagemap().InUse(); n != 0 {
			t.Fatalf("%d device pages in use after exit", n)
		}
	})
}
