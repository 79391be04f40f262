package devtlb

import (
	"testing"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The index follows the table through re-installs and replacements: two
// faults installing the same page must not leave it counted twice, or a
// zap would leave the frame looking cached.
func TestTableKeepsItsIndexExact(t *testing.T) {
	tb := NewTable()
	const va = 0x1000
	_, err := tb.Install(va, pagetable.NewPTE(7, pagetable.User))
	require.NoError(t, err)
	old, err := tb.Install(va, pagetable.NewPTE(7, pagetable.User))
	require.NoError(t, err)
	assert.Equal(t, uint64(7), old.PFN())
	assert.Equal(t, 1, tb.Mapped(), "the same page installed twice is one translation")

	_, err = tb.Install(va, pagetable.NewPTE(8, pagetable.User|pagetable.Write))
	require.NoError(t, err)
	_, cached := tb.Cached(7)
	assert.False(t, cached, "replaced")
	_, cached = tb.Cached(8)
	assert.True(t, cached)
	assert.True(t, tb.Lookup(va).IsWritable())
	assert.Equal(t, uint64(8), tb.Walk(va, pagetable.AccessWrite|pagetable.AccessUser).PFN)

	_, err = tb.Install(va+pagetable.PageSize, pagetable.NewPTE(9, pagetable.User))
	require.NoError(t, err)
	assert.Equal(t, 2, tb.Unmap(0, 4*pagetable.PageSize))
	assert.Zero(t, tb.Mapped())
	_, cached = tb.Cached(8)
	assert.False(t, cached)
	_, err = tb.Install(3, pagetable.NewPTE(1, 0))
	assert.ErrorIs(t, err, pagetable.ErrInvalid)
}
