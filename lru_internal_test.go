package gomm

import (
	"testing"

	"github.com/gomm-dev/gomm/physmem"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A frame's LRU flags change with its list membership, under the list
// lock: isolation clears them before anybody can add the frame back, so
// a later add's flags are never undone and a listed frame is always
// flagged (the free hook relies on the flag to take it off).
func TestLRUFlagsFollowMembership(t *testing.T) {
	ram, err := physmem.New(8)
	require.NoError(t, err)
	l := newLRU(ram)
	f, err := ram.Alloc()
	require.NoError(t, err)
	l.add(f, true)
	assert.True(t, f.Has(physmem.FlagLRU|physmem.FlagActive))
	require.Equal(t, uint32(f.PFN())+1, l.isolateTail())
	assert.False(t, f.Has(physmem.FlagLRU), "cleared by the isolation itself")
	assert.False(t, f.Has(physmem.FlagActive))
	l.add(f, false) // a racing putback or munlock
	assert.True(t, f.Has(physmem.FlagLRU))
	inactive, active := l.lens()
	assert.Equal(t, 1, inactive)
	assert.Zero(t, active)
	l.del(f)
	assert.False(t, f.Has(physmem.FlagLRU))
	inactive, _ = l.lens()
	assert.Zero(t, inactive)
}
