package pagetable

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPTEEncoding(t *testing.T) {
	tests := []struct {
		name                          string
		e                             PTE
		present, writable, huge, swap bool
		young, dirty                  bool
		pfn                           uint64
		str                           string
	}{
		{"none", 0, false, false, false, false, false, false, 0, "none"},
		{"ro user", NewPTE(0x1234, User), true, false, false, false, false, false, 0x1234, "pfn 0x1234 -U-------"},
		{"rw dirty", NewPTE(7, Write|Accessed|Dirty), true, true, false, false, true, true, 7, "pfn 0x7 W-AD-----"},
		{"huge", NewPTE(512, Write|Huge), true, true, true, false, false, false, 512, "pfn 0x200 W---H----"},
		{"max pfn", NewPTE(MaxPFN, NoExec), true, false, false, false, false, false, MaxPFN, "pfn 0xffffffffff ------NX--"},
		{"pfn bits in flags ignored", NewPTE(1, PTE(0xfff000)|Write), true, true, false, false, false, false, 1, "pfn 0x1 W--------"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.present, tc.e.IsPresent())
			assert.Equal(t, tc.writable, tc.e.IsWritable())
			assert.Equal(t, tc.huge, tc.e.IsHuge())
			assert.Equal(t, tc.swap, tc.e.IsSwap())
			assert.Equal(t, tc.young, tc.e.IsYoung())
			assert.Equal(t, tc.dirty, tc.e.IsDirty())
			assert.Equal(t, tc.e == 0, tc.e.IsNone())
			if tc.present {
				assert.Equal(t, tc.pfn, tc.e.PFN())
			}
			assert.Equal(t, tc.str, tc.e.String())
		})
	}
}

func TestPTEBitHelpers(t *testing.T) {
	e := NewPTE(9, User)
	w := e.With(Write | Dirty)
	assert.True(t, w.IsWritable())
	assert.Equal(t, uint64(9), w.PFN())
	assert.Equal(t, e, w.Without(Write|Dirty))
	assert.Equal(t, uint64(10), w.WithPFN(10).PFN())
	assert.Equal(t, w.Flags(), w.WithPFN(10).Flags())
	assert.Equal(t, uint64(9), e.With(PTE(0xabc000)).PFN(), "With cannot change the PFN")
}

func TestSwapEntries(t *testing.T) {
	tests := []struct {
		name  string
		s     SwapEntry
		bits  PTE
		valid bool
	}{
		{"type 0 slot 0", SwapEntry{0, 0}, 0, true},
		{"device 3", SwapEntry{3, 12345}, SwapExclusive, true},
		{"max offset", SwapEntry{MaxSwapFiles - 1, MaxSwapOffset}, SwapSoftDirty | SwapUffdWP, true},
		{"migration write", SwapEntry{SwapMigrationWrite, 77}, 0, true},
		{"marker", SwapEntry{SwapMarker, 0}, 0, true},
		{"type too big", SwapEntry{swapTypeLimit, 0}, 0, false},
		{"poison type", SwapEntry{poisonType, 0}, 0, false},
		{"offset too big", SwapEntry{0, MaxSwapOffset + 1}, 0, false},
		{"present bit as swap bit", SwapEntry{0, 1}, Present, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, err := NewSwapPTE(tc.s, tc.bits)
			if !tc.valid {
				assert.ErrorIs(t, err, ErrInvalid)
				return
			}
			require.NoError(t, err)
			assert.False(t, e.IsPresent())
			assert.False(t, e.IsNone())
			assert.True(t, e.IsSwap())
			got, ok := e.Swap()
			assert.True(t, ok)
			assert.Equal(t, tc.s, got)
			assert.Equal(t, tc.bits, e.SwapBits())
			assert.False(t, e.IsPoison())
		})
	}
	m := NewMigrationPTE(42, true)
	assert.True(t, m.IsMigration())
	s, _ := m.Swap()
	assert.Equal(t, SwapEntry{SwapMigrationWrite, 42}, s)
	assert.False(t, NewMigrationPTE(42, false).IsMigration() == false)
	sw, _ := NewSwapPTE(SwapEntry{1, 1}, 0)
	assert.False(t, sw.IsMigration())
	assert.False(t, NewPTE(1, 0).IsMigration())
}

func TestEntryKinds(t *testing.T) {
	swap, _ := NewSwapPTE(SwapEntry{MaxSwapFiles - 1, 5}, 0)
	tests := []struct {
		name                          string
		e                             PTE
		migration, private, exclusive bool
		held                          bool
		writable                      bool
	}{
		{"present", NewPTE(7, Write), false, false, false, false, false},
		{"swap", swap, false, false, false, false, false},
		{"migration read", NewMigrationPTE(7, false), true, false, false, false, false},
		{"migration write", NewMigrationPTE(7, true), true, false, false, false, true},
		{"device private read", NewDevicePrivatePTE(7, false), false, true, false, true, false},
		{"device private write", NewDevicePrivatePTE(7, true), false, true, false, true, true},
		{"device exclusive", NewDeviceExclusivePTE(7), false, false, true, true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.migration, tc.e.IsMigration())
			assert.Equal(t, tc.private, tc.e.IsDevicePrivate())
			assert.Equal(t, tc.exclusive, tc.e.IsDeviceExclusive())
			assert.Equal(t, tc.writable, tc.e.IsSwapWritable())
			pfn, held := tc.e.HeldFrame()
			assert.Equal(t, tc.held, held)
			mpfn, mapped := tc.e.MappedFrame()
			assert.Equal(t, tc.held || tc.e.IsPresent(), mapped)
			if mapped {
				assert.Equal(t, uint64(7), mpfn)
			}
			if held {
				assert.Equal(t, uint64(7), pfn)
				assert.False(t, tc.e.IsPresent())
			}
		})
	}
}

func TestSpecialMapsNoFrame(t *testing.T) {
	_, ok := NewPTE(7, Special).MappedFrame()
	assert.False(t, ok)
	_, ok = PTE(0).MappedFrame()
	assert.False(t, ok)
}

func TestPoisonIsNothingElse(t *testing.T) {
	assert.False(t, PoisonPTE.IsPresent())
	assert.False(t, PoisonPTE.IsSwap(), "no valid entry decodes as poison")
	assert.False(t, PoisonPTE.IsNone())
	assert.True(t, PoisonPTE.IsPoison())
	_, ok := PoisonPTE.Swap()
	assert.False(t, ok)
	assert.Equal(t, "POISON", PoisonPTE.String())
	assert.Equal(t, "invalid(0x800)", PTE(0x800).String())
}
