package gomm_test

import (
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A write fault on a swapped-out page whose slot a fork child also names
// must be resolved by that one fault (do_swap_page goes on to
// do_wp_page): mapped read-only, the page could be reclaimed again before
// the retried write, and the write would fault forever while every fault
// reports success.
func TestSwapInWriteFaultResolvesWrite(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 256, SwapSlots: 256})
	parent := m.NewMM()
	addr, err := parent.Mmap(0, 4*page, rw, anon)
	require.NoError(t, err)
	fillPages(t, parent, addr, 4, 50)
	child, err := parent.Fork()
	require.NoError(t, err)
	for range 3 {
		m.Reclaim(1000)
	}
	e, _ := parent.Table().Lookup(addr)
	require.True(t, e.IsSwap(), "swapped out: %v", e)

	// The CPU's retry loop, with reclaim between a fault and the retried
	// access each time (as direct reclaim or kswapd may do).
	wr := pagetable.AccessWrite | pagetable.AccessUser
	for i := range 8 {
		require.NoError(t, parent.HandleFault(addr, wr))
		e, _ = parent.Table().Lookup(addr)
		if e.IsPresent() && e.IsWritable() {
			break
		}
		assert.Failf(t, "write fault left the page read-only", "fault %d: entry %v", i, e)
		for range 2 {
			m.Reclaim(1000)
		}
	}
	cpu := m.CPU(0)
	cpu.Switch(parent.NewTask("parent"))
	require.NoError(t, cpu.Store64(addr, 7))
	cpu.Switch(tlbIdle())
	assert.Equal(t, uint64(7), readWord(t, parent, addr))
	checkPages(t, child, addr, 4, 50)
	require.NoError(t, m.CheckRmap(parent, child))
	require.NoError(t, child.Exit())
	require.NoError(t, parent.Exit())
	assert.Zero(t, m.Stats().Swap.Used)
}
