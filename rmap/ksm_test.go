package rmap_test

import (
	"testing"

	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// space stands for an MM: a KSM walk only tells spaces apart.
type space struct{ rmap.Space }

// TestKSMWalkVisitsEachPlaceOnce: a KSM page's items of one anon_vma
// family at one address (a parent's item kept for its forks, and the
// child's own after the child's page was merged again) both reach the
// child's VMA; the walk must visit it once. Items of unrelated families
// at one address never meet.
func TestKSMWalkVisitsEachPlaceOnce(t *testing.T) {
	const addr = 0x13000
	var pool rmap.Pool
	parent, child := newVMA(0x10000, 16), newVMA(0x10000, 16)
	require.NoError(t, pool.Prepare(parent))
	require.NoError(t, pool.Fork(child, parent))
	other := newVMA(0x10000, 16) // another process, never forked
	require.NoError(t, pool.Prepare(other))
	pSpace, cSpace, oSpace := &space{}, &space{}, &space{}

	tests := []struct {
		name  string
		items []rmap.KSMItem
		want  map[*rmap.VMA]int
	}{
		{"one family, one address", []rmap.KSMItem{
			{Space: pSpace, Addr: addr, AnonVMA: parent.AnonVMA},
			{Space: cSpace, Addr: addr, AnonVMA: child.AnonVMA},
		}, map[*rmap.VMA]int{parent: 1, child: 1}},
		{"two families, one address", []rmap.KSMItem{
			{Space: pSpace, Addr: addr, AnonVMA: parent.AnonVMA},
			{Space: oSpace, Addr: addr, AnonVMA: other.AnonVMA},
		}, map[*rmap.VMA]int{parent: 1, child: 1, other: 1}},
		{"one family, two addresses", []rmap.KSMItem{
			{Space: pSpace, Addr: addr, AnonVMA: parent.AnonVMA},
			{Space: cSpace, Addr: addr + 0x1000, AnonVMA: child.AnonVMA},
		}, map[*rmap.VMA]int{parent: 1, child: 2}}, // the child at each address
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ram, err := physmem.New(4)
			require.NoError(t, err)
			f, err := ram.Alloc()
			require.NoError(t, err)
			var node rmap.StableNode
			for _, it := range tt.items {
				node.Add(it)
			}
			f.Lock()
			f.SetMapping(&node, 0)
			visits := map[*rmap.VMA]int{}
			type place struct {
				v    *rmap.VMA
				addr uint64
			}
			seen := map[place]bool{}
			rmap.Walk(f, &rmap.Control{Visit: func(v *rmap.VMA, a uint64) bool {
				assert.False(t, seen[place{v, a}], "%#x visited twice", a)
				seen[place{v, a}] = true
				visits[v]++
				return true
			}})
			f.SetMapping(nil, 0)
			f.Unlock()
			assert.Equal(t, tt.want, visits)
		})
	}
}
