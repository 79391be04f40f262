package kvm

import (
	"context"
	"errors"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/mmtest"
)

// FuzzGuestAccess gives the VM arbitrary memslots and guest addresses:
// no panic, typed errors only, a bad memslot changes nothing, and the
// checker stays quiet through teardown.
func FuzzGuestAccess(f *testing.F) {
	f.Add(uint64(0), uint64(4*PageSize), uint64(0x1000_0000), uint64(8), uint64(42), false)
	f.Add(uint64(PageSize), uint64(PageSize), uint64(0x1000_0000), uint64(PageSize+16), uint64(1), true)
	f.Add(uint64(1<<47-PageSize), uint64(2*PageSize), uint64(0x1000_0000), uint64(1<<47), uint64(0), true)
	f.Add(uint64(0), uint64(1<<40), uint64(1<<46), uint64(3), uint64(0), false)
	f.Fuzz(func(t *testing.T, gpa, size, hva, addr, v uint64, store bool) {
		m := mmtest.Machine(t, gomm.Config{CPUs: 1, Frames: 128})
		mm := m.NewMM()
		mmtest.MapAnon(t, mm, 0x1000_0000, 4, 0)
		vm, err := New(context.Background(), m, mm)
		if err != nil {
			t.Fatal(err)
		}
		typed := func(op string, err error) {
			if _, ok := errno.Of(err); err != nil && !ok && !errors.Is(err, ErrNoSlot) && !errors.Is(err, ErrBadSlot) {
				t.Fatalf("%s: untyped error %v", op, err)
			}
		}
		// A valid slot first, so a bad one has something to overlap.
		if err := vm.SetMemslot(Memslot{GPA: 1 << 40, Size: PageSize, HVA: 0x1000_0000}); err != nil {
			t.Fatal(err)
		}
		err = vm.SetMemslot(Memslot{GPA: gpa, Size: size, HVA: hva})
		typed("SetMemslot", err)
		if err != nil {
			if _, lerr := vm.Load64(1 << 40); lerr != nil {
				t.Fatalf("a refused memslot broke the one before it: %v", lerr)
			}
		}
		for _, a := range []uint64{addr, gpa + addr%max(size, 1), 1<<40 + addr%PageSize} {
			if store {
				typed("Store64", vm.Store64(a, v))
			} else {
				_, err := vm.Load64(a)
				typed("Load64", err)
			}
		}
		if err := vm.Close(); err != nil {
			t.Fatal(err)
		}
		mmtest.ExitAndCheck(t, m, mm)
	})
}
