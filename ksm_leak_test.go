package gomm_test

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/stretchr/testify/require"
)

// TestKSMScanEmptyPassLeaksNoReference: a KSMScan whose pass found no
// page stops at the next wrap of its cursor; if that wrap's first look
// found a page (faulted in meanwhile), the reference next took on it
// must be dropped, or the frame outlives every mapping of it.
func TestKSMScanEmptyPassLeaksNoReference(t *testing.T) {
	m := newMachine(t, gomm.Config{Frames: 256})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, page, rw, anon)
	require.NoError(t, err)
	require.NoError(t, mm.Madvise(addr, page, gomm.MadvMergeable))
	var done atomic.Bool
	var wg sync.WaitGroup
	wg.Go(func() {
		defer done.Store(true)
		// The page comes and goes: some passes find it, some find nothing.
		for i := range 2000 {
			if _, err := mm.WriteAt([]byte{byte(i)}, addr); err != nil {
				t.Error(err)
				return
			}
			if err := mm.Madvise(addr, page, gomm.MadvDontNeed); err != nil {
				t.Error(err)
				return
			}
		}
	})
	for !done.Load() {
		m.KSMScan(16)
	}
	wg.Wait()
	require.NoError(t, mm.Exit())
	require.Equal(t, m.RAM().Frames()-1, m.RAM().Stats().Free, "frames left behind after the only MM exited")
}
