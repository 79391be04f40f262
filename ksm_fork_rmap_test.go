package gomm_test

import (
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/stretchr/testify/require"
)

// TestKSMForkedMappingStaysReachable: a KSM page forked into a child
// stays reachable from its stable node after the parent, whose rmap
// item the child's mapping was found through, copies the page on write
// and ksmd sees that (cmp_and_merge_page's remove_rmap_item_from_tree).
func TestKSMForkedMappingStaysReachable(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	a, b, va := ksmSetup(t, m, 1)
	m.KSMScan(1000)
	m.KSMScan(1000)
	require.True(t, frameAt(t, m, a, va).Has(physmem.FlagKSM))
	c, err := a.Fork()
	require.NoError(t, err)
	d, err := b.Fork()
	require.NoError(t, err)
	require.NoError(t, m.CheckRmap(a, b, c, d))
	writeWord(t, a, va, 1) // a's copy: its rmap item no longer maps the KSM page
	writeWord(t, b, va, 1)
	m.KSMScan(1000)
	m.KSMScan(1000)
	require.True(t, frameAt(t, m, c, va).Has(physmem.FlagKSM))
	require.NoError(t, m.CheckRmap(a, b, c, d), "the children's mappings of the KSM page are found")
	for _, mm := range []*gomm.MM{a, b, c, d} {
		require.NoError(t, mm.Exit())
	}
}
