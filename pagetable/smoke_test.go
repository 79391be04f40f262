package pagetable

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestSmoke(t *testing.T) {
	tb := New(Options{})
	require.NoError(t, tb.Map(0x1000, NewPTE(5, Write|User)))
	e, l := tb.Lookup(0x1000)
	require.Equal(t, LevelPTE, l)
	require.Equal(t, uint64(5), e.PFN())
	tr := tb.Walk(0x1234, AccessWrite|AccessUser)
	require.Equal(t, FaultNone, tr.Fault)
	require.True(t, tr.PTE.IsDirty())
	require.NoError(t, tb.MapHuge(0x40000000, NewPTE(512, Write)))
	tr = tb.Walk(0x40003000, AccessRead)
	require.Equal(t, uint64(515), tr.PFN)
	n, err := tb.UnmapRange(0, 0x80000000, nil)
	require.NoError(t, err)
	require.Equal(t, 2, n)
	freed, err := tb.FreeEmpty(0, 1<<47, nil)
	require.NoError(t, err)
	require.Len(t, freed, 4)
	st := tb.Stats()
	require.Zero(t, st.PTETables+st.PMDTables+st.PUDTables)
}
