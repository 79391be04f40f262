// Package mmtest holds what the tests of code above the MM (drivers,
// commands, the MM's own external tests) do at either end of a test: a
// machine with the checker on, some memory to work on, and, at the end,
// every MM exited and the machine checked back to where it started. It
// has no kernel counterpart.
package mmtest

import (
	"testing"

	"github.com/gomm-dev/gomm"
)

// Machine returns a machine built from cfg with the checker on.
func Machine(t testing.TB, cfg gomm.Config) *gomm.Machine {
	t.Helper()
	cfg.Check = true
	m, err := gomm.NewMachine(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// MapAnon maps pages pages of private anonymous read-write memory at
// addr (MAP_FIXED) in mm and returns addr.
func MapAnon(t testing.TB, mm *gomm.MM, addr uint64, pages int, extra gomm.MapFlags) uint64 {
	t.Helper()
	a, err := mm.Mmap(addr, uint64(pages)*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite,
		gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed|extra)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// ExitAndCheck exits each of mms, then fails t unless the machine is
// back to where it started: every frame of RAM free but the zero page,
// no swap slot used, and no checker violation.
func ExitAndCheck(t testing.TB, m *gomm.Machine, mms ...*gomm.MM) {
	t.Helper()
	for _, mm := range mms {
		if err := mm.Exit(); err != nil {
			t.Fatal(err)
		}
	}
	st := m.Stats()
	if want := m.RAM().Frames() - 1; st.RAM.Free != want {
		t.Fatalf("%d frames free after every exit, want %d", st.RAM.Free, want)
	}
	if st.Swap.Used != 0 {
		t.Fatalf("%d swap slots used after every exit", st.Swap.Used)
	}
	if v, n := m.Violations(); n > 0 {
		t.Fatalf("%d checker violations; first: %v", n, v[0])
	}
}
