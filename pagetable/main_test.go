package pagetable

import (
	"fmt"
	"os"
	"testing"

	"github.com/gomm-dev/gomm/locks"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	locks.EnableLockdep()
	code := m.Run()
	if v, _ := locks.LockdepViolations(); len(v) > 0 {
		fmt.Fprintf(os.Stderr, "unexpected lockdep violations; first:\n%v\n", v[0])
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
