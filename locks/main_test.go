package locks

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// TestMain runs every test with the lock-order checker on and fails the
// run if any goroutine survives or an unexpected violation was recorded.
// Tests that provoke violations on purpose clear them before they return.
func TestMain(m *testing.M) {
	EnableLockdep()
	code := m.Run()
	if v, dropped := LockdepViolations(); len(v) > 0 || dropped > 0 {
		fmt.Fprintf(os.Stderr, "unexpected lockdep violations (%d, %d dropped); first:\n%v\n", len(v), dropped, v[0])
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

// expectViolations returns the violations a test provoked and clears them,
// so TestMain's final check only sees unexpected ones.
func expectViolations(t *testing.T) []Violation {
	t.Helper()
	v, _ := LockdepViolations()
	ClearLockdepViolations()
	return v
}
