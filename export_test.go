package gomm

import (
	"iter"

	"github.com/gomm-dev/gomm/locks"
)

// RmapLocks exposes the locks RegisterNotifier takes, for the test of
// mm_take_all_locks over a real MM.
func (mm *MM) RmapLocks() iter.Seq[*locks.RWSem] {
	return mm.rmapLocks()
}
