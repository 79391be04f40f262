package devtlb

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestTLBKeepsItsIndexExact(t *testing.T) {
	tlb := New[uint64](2)
	tlb.Fill(1, Entry{PFN: 10})
	tlb.Fill(2, Entry{PFN: 10})
	_, ok := tlb.Index.Cached(10)
	assert.True(t, ok)
	assert.Equal(t, 2, tlb.Index.Total())
	tlb.Fill(3, Entry{PFN: 30}) // evicts one of the two
	assert.Equal(t, 2, tlb.Len())
	assert.Equal(t, 2, tlb.Index.Total())
	tlb.Fill(3, Entry{PFN: 31, Writable: true}) // replaces
	e, ok := tlb.Lookup(3)
	assert.True(t, ok)
	assert.Equal(t, Entry{PFN: 31, Writable: true}, e)
	_, ok = tlb.Index.Cached(30)
	assert.False(t, ok)
	assert.Equal(t, 2, tlb.DropIf(func(uint64) bool { return true }))
	assert.Zero(t, tlb.Index.Total())
	assert.Empty(t, tlb.Index)
}
