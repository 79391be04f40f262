package gomm_test

import (
	"errors"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// After a PROT_NONE spell the entries keep lacking the user bit until a
// fault upgrades them (mprotect back to read-write rewrites nothing).
// RangeFault asked to fault must fault such an entry in, as
// hmm_range_fault does for a pte_protnone one, not report it as not
// present: a mirror then retries forever while the process's CPU leaves
// the page alone (the stress run's hang after the EFAULT fix).
func TestRangeFaultUpgradesProtNoneEntries(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	addr, err := mm.Mmap(0x1000_0000, 2*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapFixed)
	require.NoError(t, err)
	_, err = mm.WriteAt(le64(77), addr)
	require.NoError(t, err)
	require.NoError(t, mm.Mprotect(addr, 2*page, gomm.ProtNone))
	require.NoError(t, mm.Mprotect(addr, 2*page, gomm.ProtRead|gomm.ProtWrite))
	d := newMirror(t, m, mm, addr, 2*page)
	for _, write := range []bool{false, true} {
		r := &gomm.HMMRange{Interval: d.in, Start: addr, End: addr + 2*page, Fault: true, FaultWrite: write}
		for { // a copy-on-write invalidates the snapshot: start over, as a driver does
			r.NotifierSeq = d.in.ReadBegin()
			if err := mm.RangeFault(r); !errors.Is(err, gomm.ErrBusy) {
				require.NoError(t, err)
				break
			}
		}
		for i, p := range r.PFNs {
			assert.NotZero(t, p.Flags&gomm.PFNValid, "write %v: page %d faulted in", write, i)
		}
	}
	v, err := d.access(addr, false, 0)
	require.NoError(t, err)
	assert.Equal(t, uint64(77), v)
	require.NoError(t, mm.Exit())
}
