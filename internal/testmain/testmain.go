// Package testmain is the TestMain every gomm package above locks uses:
// the lock-order checker on for the whole run, failure on any lockdep
// violation or leaked goroutine. Benchmarks turn the checker off with
// WithoutLockdep.
//
// It has no kernel counterpart. (The locks package cannot use it: its
// tests would import a package that imports locks.)
package testmain

import (
	"fmt"
	"os"
	"testing"

	"github.com/gomm-dev/gomm/locks"
	"go.uber.org/goleak"
)

// Run is a TestMain body: lockdep on, m.Run, then fail the binary if the
// checker recorded a violation or a goroutine outlived the tests.
func Run(m *testing.M) {
	locks.EnableLockdep()
	code := m.Run()
	if v, dropped := locks.LockdepViolations(); len(v) > 0 {
		fmt.Fprintf(os.Stderr, "%d unexpected lockdep violations (%d more dropped); first:\n%v\n", len(v), dropped, v[0])
		code = 1
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// WithoutLockdep turns the lock-order checker off for the rest of one
// benchmark, or of one long sequential test whose lock paths other tests
// cover with it on: it costs a stack capture per lock operation, which
// would swamp what is measured, or make a state-machine test too slow
// to run enough steps. Never use it in a test that runs in parallel
// with others.
func WithoutLockdep(tb testing.TB) {
	if locks.LockdepEnabled() {
		locks.DisableLockdep()
		tb.Cleanup(locks.EnableLockdep)
	}
}

// Iterations returns full, or short under -short: how long a stress or
// soak loop runs.
func Iterations(full, short int) int {
	if testing.Short() {
		return short
	}
	return full
}
