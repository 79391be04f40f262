package pagetable

import (
	"errors"
	"slices"
	"testing"
	"unsafe"

	"github.com/gomm-dev/gomm/errno"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	kernelBase = 0xffff_8000_0000_0000 // first address of the upper half
	gib        = 1 << 30
)

func rw(pfn uint64) PTE { return NewPTE(pfn, Write|User) }

func TestBadAddressesAreErrInvalid(t *testing.T) {
	tb := New(Options{})
	nonCanonical := uint64(1 << 47)
	tests := []struct {
		name string
		err  error
	}{
		{"map non-canonical", tb.Map(nonCanonical, rw(1))},
		{"map unaligned", tb.Map(0x1001, rw(1))},
		{"map not present", tb.Map(0x1000, PTE(Write))},
		{"map huge bit", tb.Map(0x1000, rw(1).With(Huge))},
		{"map huge unaligned", tb.MapHuge(0x1000, rw(512))},
		{"map huge pfn unaligned", tb.MapHuge(0, rw(3))},
		{"map range empty", tb.MapRange(0x2000, 0x2000, rw(1))},
		{"map range backwards", tb.MapRange(0x3000, 0x2000, rw(1))},
		{"map range across the hole", tb.MapRange(0x7fff_ffff_f000, kernelBase+0x1000, rw(1))},
		{"map range pfn overflow", tb.MapRange(0, 0x2000, rw(MaxPFN))},
		{"populate bad level", tb.Populate(0, LevelPUD)},
		{"populate non-canonical", tb.Populate(nonCanonical, LevelPTE)},
		{"free tables unaligned", func() error { _, err := tb.FreeEmpty(1, 0x2000, nil); return err }()},
		{"range non-canonical", tb.Range(0, nonCanonical+PageSize, RangeFuncs{})},
		{"set garbage", func() error { _, err := tb.Set(0, PTE(0x800)); return err }()},
		{"set huge", func() error { _, err := tb.Set(0, rw(0).With(Huge)); return err }()},
		{"unmap unaligned", func() error { _, err := tb.Unmap(0x10); return err }()},
		{"unmap huge unaligned", func() error { _, err := tb.UnmapHuge(0x1000); return err }()},
		{"unmap range unaligned", func() error { _, err := tb.UnmapRange(0, 0x10, nil); return err }()},
		{"lock PTE non-canonical", func() error { _, _, err := tb.LockPTE(nonCanonical); return err }()},
		{"lock PMD non-canonical", func() error { _, _, err := tb.LockPMD(nonCanonical, true); return err }()},
	}
	for _, tc := range tests {
		assert.ErrorIs(t, tc.err, errno.ErrInvalid, tc.name)
	}
	assert.Equal(t, Stats{}, tb.Stats(), "refused calls allocate nothing")
	assert.Equal(t, pgdTableBytes, tb.TableBytes())
}

func TestMapLookupUnmap(t *testing.T) {
	tb := New(Options{})
	for _, va := range []uint64{0, 0x1000, 0x7fff_ffff_f000, kernelBase, 0xffff_ffff_ffff_f000} {
		require.NoError(t, tb.Map(va, rw(va>>12&0xffff)))
		e, l := tb.Lookup(va + 0x123)
		assert.Equal(t, LevelPTE, l)
		assert.Equal(t, va>>12&0xffff, e.PFN())
		assert.ErrorIs(t, tb.Map(va, rw(1)), ErrExist)
	}
	st := tb.Stats()
	assert.Equal(t, int64(4), st.PTETables, "0 and 0x1000 share a table")
	assert.Equal(t, int64(4), st.PUDTables)

	old, err := tb.Unmap(0x1000)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), old.PFN())
	old, err = tb.Unmap(0x1000)
	require.NoError(t, err)
	assert.True(t, old.IsNone(), "unmapping nothing is not an error")
	old, err = tb.Unmap(0x5000_0000_0000)
	require.NoError(t, err)
	assert.True(t, old.IsNone())

	e, l := tb.Lookup(0x5000_0000_0000)
	assert.True(t, e.IsNone())
	assert.Equal(t, LevelPGD, l)
	e, l = tb.Lookup(1 << 47)
	assert.True(t, e.IsNone())
	assert.Equal(t, LevelPGD, l)
}

func TestSetSwapEntries(t *testing.T) {
	tb := New(Options{})
	sw, err := NewSwapPTE(SwapEntry{Type: 1, Offset: 99}, SwapExclusive)
	require.NoError(t, err)
	old, err := tb.Set(0x4000, sw)
	require.NoError(t, err)
	assert.True(t, old.IsNone())
	tr := tb.Walk(0x4000, AccessRead)
	assert.Equal(t, FaultNotPresent, tr.Fault)
	assert.Equal(t, sw, tr.PTE, "the walker reports the swap entry it found")

	old, err = tb.Set(0x4000, rw(3))
	require.NoError(t, err)
	assert.Equal(t, sw, old)
	old, err = tb.Set(0x4000, 0)
	require.NoError(t, err)
	assert.Equal(t, uint64(3), old.PFN())

	before := tb.Stats()
	old, err = tb.Set(0x9_0000_0000, 0)
	require.NoError(t, err)
	assert.True(t, old.IsNone())
	assert.Equal(t, before, tb.Stats(), "setting none allocates nothing")
}

func TestWalkPermissionsAndAD(t *testing.T) {
	tests := []struct {
		name  string
		e     PTE
		acc   Access
		fault Fault
		setAD PTE
	}{
		{"read sets A", NewPTE(1, User), AccessRead | AccessUser, FaultNone, Accessed},
		{"write sets A and D", NewPTE(1, User|Write), AccessWrite | AccessUser, FaultNone, Accessed | Dirty},
		{"write to read-only", NewPTE(1, User), AccessWrite | AccessUser, FaultProtection, 0},
		{"supervisor write to read-only (CR0.WP)", NewPTE(1, 0), AccessWrite, FaultProtection, 0},
		{"user access to kernel page", NewPTE(1, Write), AccessUser, FaultProtection, 0},
		{"supervisor read of user page", NewPTE(1, User), AccessRead, FaultNone, Accessed},
		{"exec of NX page", NewPTE(1, User|NoExec), AccessExec | AccessUser, FaultProtection, 0},
		{"exec allowed", NewPTE(1, User), AccessExec | AccessUser, FaultNone, Accessed},
		{"already young and dirty", NewPTE(1, User|Write|Accessed|Dirty), AccessWrite | AccessUser, FaultNone, Accessed | Dirty},
	}
	for _, tc := range tests {
		for _, huge := range []bool{false, true} {
			name := tc.name
			if huge {
				name += " (2M)"
			}
			t.Run(name, func(t *testing.T) {
				tb := New(Options{})
				va := uint64(0x20_0000)
				e := tc.e
				off := uint64(0x8)
				if huge {
					off = 0x5008
					e = e.WithPFN(512)
					require.NoError(t, tb.MapHuge(va, e))
				} else {
					require.NoError(t, tb.Map(va, e))
				}
				tr := tb.Walk(va+off, tc.acc)
				require.Equal(t, tc.fault, tr.Fault, tr.Err(va, tc.acc))
				got, _ := tb.Lookup(va)
				assert.Equal(t, tc.setAD, got&(Accessed|Dirty), "A/D in the entry")
				if tc.fault == FaultNone {
					assert.NoError(t, tr.Err(va, tc.acc))
					want := e.PFN()
					wantLevel := LevelPTE
					if huge {
						want += 5
						wantLevel = LevelPMD
					}
					assert.Equal(t, want, tr.PFN)
					assert.Equal(t, wantLevel, tr.Level)
					assert.Equal(t, got, tr.PTE)
				} else {
					var we *WalkError
					require.ErrorAs(t, tr.Err(va, tc.acc), &we)
					assert.Equal(t, tc.fault, we.Fault)
				}
			})
		}
	}
}

func TestWalkNotPresentLevels(t *testing.T) {
	tb := New(Options{})
	require.NoError(t, tb.Map(0x1000, rw(1)))
	tests := []struct {
		va    uint64
		level Level
		fault Fault
	}{
		{0x2000, LevelPTE, FaultNotPresent},
		{HugeSize, LevelPMD, FaultNotPresent},
		{gib, LevelPUD, FaultNotPresent},
		{1 << 39, LevelPGD, FaultNotPresent},
		{1 << 47, LevelPGD, FaultNonCanonical},
	}
	for _, tc := range tests {
		tr := tb.Walk(tc.va, AccessRead)
		assert.Equal(t, tc.fault, tr.Fault, "%#x", tc.va)
		assert.Equal(t, tc.level, tr.Level, "%#x", tc.va)
	}
}

func TestLockedOperations(t *testing.T) {
	tb := New(Options{})
	pt, err := tb.AllocLockPTE(0x40_1000)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x40_0000), pt.Base())
	i := pt.Index(0x40_1000)
	assert.Equal(t, 1, i)
	assert.Equal(t, uint64(0x40_1000), pt.VA(i))
	assert.True(t, pt.Set(i, rw(7).With(Accessed)).IsNone())
	assert.Equal(t, 1, pt.Count())
	assert.True(t, pt.TestAndClearYoung(i))
	assert.False(t, pt.TestAndClearYoung(i))
	assert.False(t, pt.TestAndClearYoung(i+1), "none is never young")
	assert.True(t, pt.WriteProtect(i).IsWritable(), "returns the entry as it was")
	assert.False(t, pt.Get(i).IsWritable())
	assert.Equal(t, PTE(0), pt.WriteProtect(i+1), "write-protecting none changes nothing")
	assert.False(t, pt.CompareAndSet(i, rw(7), rw(8)), "stale expected value")
	assert.True(t, pt.CompareAndSet(i, pt.Get(i), 0))
	assert.Equal(t, 0, pt.Count())
	assert.False(t, pt.IsContended())
	pt.Unlock()

	_, ok, err := tb.LockPTE(0x80_0000)
	require.NoError(t, err)
	assert.False(t, ok, "no table there")

	require.NoError(t, tb.MapHuge(0x60_0000, rw(1024)))
	_, _, err = tb.LockPTE(0x60_1000)
	assert.ErrorIs(t, err, ErrBusy)
	_, err = tb.AllocLockPTE(0x60_1000)
	assert.ErrorIs(t, err, ErrBusy)
	assert.ErrorIs(t, tb.Map(0x60_1000, rw(1)), ErrBusy)
	_, err = tb.Unmap(0x60_1000)
	assert.ErrorIs(t, err, ErrBusy)
}

func TestHugeLeaves(t *testing.T) {
	tb := New(Options{})
	require.NoError(t, tb.MapHuge(HugeSize, rw(512)))
	e, l := tb.Lookup(HugeSize + 0x1234)
	assert.Equal(t, LevelPMD, l)
	assert.True(t, e.IsHuge())
	assert.ErrorIs(t, tb.MapHuge(HugeSize, rw(1024)), ErrExist)

	require.NoError(t, tb.Map(2*HugeSize, rw(1)))
	assert.ErrorIs(t, tb.MapHuge(2*HugeSize, rw(1024)), ErrBusy, "a PTE table is in the way")
	_, err := tb.UnmapHuge(2 * HugeSize)
	assert.ErrorIs(t, err, ErrBusy)

	s, ok, err := tb.LockPMD(HugeSize, false)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, uint64(HugeSize), s.Base())
	assert.False(t, s.HasTable())
	_, err = s.Set(rw(3))
	assert.ErrorIs(t, err, ErrInvalid, "a present PMD entry must be huge")
	_, err = s.Set(PTE(0x800))
	assert.ErrorIs(t, err, ErrInvalid, "garbage is refused")
	_, err = s.Set(NewPTE(MaxPFN, Huge))
	assert.ErrorIs(t, err, ErrInvalid, "a huge leaf must start on a 512-frame boundary")
	assert.True(t, s.Get().IsHuge(), "refused sets change nothing")
	assert.False(t, s.TestAndClearYoung())
	assert.True(t, s.WriteProtect().IsWritable())
	assert.False(t, s.Get().IsWritable())
	s.Unlock()

	old, err := tb.UnmapHuge(HugeSize)
	require.NoError(t, err)
	assert.Equal(t, uint64(512), old.PFN())
	old, err = tb.UnmapHuge(HugeSize)
	require.NoError(t, err)
	assert.True(t, old.IsNone())
	old, err = tb.UnmapHuge(64 * gib)
	require.NoError(t, err)
	assert.True(t, old.IsNone())

	s, _, _ = tb.LockPMD(2*HugeSize, false)
	_, err = s.Set(rw(512).With(Huge))
	assert.ErrorIs(t, err, ErrBusy, "the slot holds a PTE table")
	assert.ErrorIs(t, s.Split(), ErrInvalid, "nothing to split")
	s.Unlock()
}

func TestSplitKeepsTranslations(t *testing.T) {
	tb := New(Options{})
	require.NoError(t, tb.MapHuge(0, NewPTE(1024, Write|User|Dirty)))
	require.Equal(t, FaultNone, tb.Walk(0x3000, AccessUser).Fault)
	s, _, _ := tb.LockPMD(0, false)
	require.NoError(t, s.Split())
	assert.True(t, s.HasTable())
	assert.True(t, s.Get().IsNone())
	s.Unlock()
	for i := range uint64(Entries) {
		e, l := tb.Lookup(i << PageShift)
		require.Equal(t, LevelPTE, l)
		require.Equal(t, 1024+i, e.PFN())
		require.False(t, e&Huge != 0)
		require.True(t, e.IsDirty())
		require.True(t, e.IsYoung(), "the leaf's A bit reaches every PTE")
	}
	pt, _, _ := tb.LockPTE(0)
	assert.Equal(t, Entries, pt.Count())
	pt.Unlock()
}

func TestMapRangeAllOrNothing(t *testing.T) {
	tb := New(Options{})
	start, end := uint64(HugeSize-4*PageSize), uint64(2*HugeSize+8*PageSize)
	require.NoError(t, tb.MapRange(start, end, rw(100)))
	for va := start; va < end; va += PageSize {
		e, _ := tb.Lookup(va)
		require.Equal(t, 100+(va-start)>>PageShift, e.PFN(), "%#x", va)
	}
	// Overlap at the far end: nothing of the new range may stay mapped.
	err := tb.MapRange(end-PageSize-3*HugeSize/2, end+HugeSize, rw(5000))
	assert.ErrorIs(t, err, ErrExist)
	err = tb.MapRange(end, end+HugeSize, rw(5000))
	require.NoError(t, err, "the failed call left nothing behind")

	require.NoError(t, tb.MapHuge(8*HugeSize, rw(512*8)))
	err = tb.MapRange(7*HugeSize, 9*HugeSize, rw(1))
	assert.ErrorIs(t, err, ErrBusy)
	e, _ := tb.Lookup(7 * HugeSize)
	assert.True(t, e.IsNone(), "rolled back")
}

func TestUnmapRange(t *testing.T) {
	tb := New(Options{})
	require.NoError(t, tb.MapRange(0, 4*HugeSize, rw(0)))
	require.NoError(t, tb.MapHuge(4*HugeSize, rw(4*512)))
	require.NoError(t, tb.MapHuge(5*HugeSize, rw(5*512)))
	sw, _ := NewSwapPTE(SwapEntry{0, 5}, 0)
	_, _ = tb.Set(6*HugeSize, sw)

	var seen []uint64
	n, err := tb.UnmapRange(HugeSize, 5*HugeSize+3*PageSize, func(va uint64, old PTE) {
		seen = append(seen, va)
	})
	require.NoError(t, err)
	// 3 whole PTE tables, one whole huge leaf, 3 pages of the split leaf.
	assert.Equal(t, 3*Entries+1+3, n)
	assert.Len(t, seen, n)
	assert.Equal(t, uint64(HugeSize), seen[0])

	e, l := tb.Lookup(5*HugeSize + 3*PageSize)
	assert.Equal(t, LevelPTE, l, "the partly covered leaf was split")
	assert.Equal(t, uint64(5*512+3), e.PFN())
	e, _ = tb.Lookup(5*HugeSize + 2*PageSize)
	assert.True(t, e.IsNone())
	e, _ = tb.Lookup(HugeSize - PageSize)
	assert.False(t, e.IsNone(), "outside the range")

	n, err = tb.UnmapRange(6*HugeSize, 6*HugeSize+PageSize, nil)
	require.NoError(t, err)
	assert.Equal(t, 1, n, "swap entries are cleared too")
}

func TestRangeVisitsOnlyPopulated(t *testing.T) {
	tb := New(Options{})
	vas := []uint64{0x1000, 3 * gib, 3*gib + 5*HugeSize + 0x7000, 600 * gib, kernelBase + 0x5000}
	for _, va := range vas {
		require.NoError(t, tb.Map(va, rw(va>>12&0xfff)))
	}
	require.NoError(t, tb.MapHuge(10*gib, rw(512)))
	var tables []uint64
	var leaves []uint64
	fns := RangeFuncs{
		PTEs: func(pt PTETable, first, last int) bool {
			tables = append(tables, pt.Base()+uint64(first)<<PageShift)
			return true
		},
		PMD: func(s PMDSlot) bool { leaves = append(leaves, s.Base()); return true },
	}
	require.NoError(t, tb.Range(0, 1<<47, fns))
	assert.Equal(t, []uint64{0, 3 * gib, 3*gib + 5*HugeSize, 600 * gib}, tables)
	assert.Equal(t, []uint64{10 * gib}, leaves)

	tables, leaves = nil, nil
	require.NoError(t, tb.Range(kernelBase, 0xffff_ffff_ffff_f000, fns))
	assert.Equal(t, []uint64{kernelBase}, tables)

	tables = nil
	require.NoError(t, tb.Range(3*gib+5*HugeSize+0x7000, 3*gib+5*HugeSize+0x9000, RangeFuncs{
		PTEs: func(pt PTETable, first, last int) bool {
			assert.Equal(t, 7, first)
			assert.Equal(t, 9, last)
			tables = append(tables, pt.Base())
			return true
		},
	}))
	assert.Len(t, tables, 1)

	calls := 0
	require.NoError(t, tb.Range(0, 1<<47, RangeFuncs{PTEs: func(PTETable, int, int) bool { calls++; return false }}))
	assert.Equal(t, 1, calls, "returning false stops the walk")
}

func TestFreeEmptyRespectsBounds(t *testing.T) {
	tb := New(Options{})
	require.NoError(t, tb.Map(0x1000, rw(1)))
	require.NoError(t, tb.Map(HugeSize+0x1000, rw(2)))
	require.NoError(t, tb.Map(gib, rw(3)))
	_, _ = tb.Unmap(HugeSize + 0x1000)
	_, _ = tb.Unmap(gib)

	// The second PTE table is empty but [floor, ceiling) does not cover
	// its whole span: kept.
	freed, err := tb.FreeEmpty(HugeSize+PageSize, 4*HugeSize, nil)
	require.NoError(t, err)
	assert.Empty(t, freed)

	freed, err = tb.FreeEmpty(HugeSize, 2*gib, nil)
	require.NoError(t, err)
	var got []string
	for _, f := range freed {
		got = append(got, f.String())
	}
	// The first PMD table still holds the table at 0: only the leaf-level
	// tables and the empty PMD table of the second GiB go.
	assert.Equal(t, []string{"PTE table at 0x200000", "PTE table at 0x40000000", "PMD table at 0x40000000"}, got)
	assert.Equal(t, []uint64{2 * HugeSize, gib + HugeSize, 2 * gib}, []uint64{freed[0].End(), freed[1].End(), freed[2].End()},
		"each covered its level's span")
	st := tb.Stats()
	assert.Equal(t, int64(1), st.PTETables)
	assert.Equal(t, int64(1), st.PMDTables)
	assert.Equal(t, uint64(3), st.Freed)

	freed, err = tb.FreeEmpty(0, 1<<47, freed[:0])
	require.NoError(t, err)
	assert.Empty(t, freed, "a non-empty table is never freed")
	_, _ = tb.Unmap(0x1000)
	freed, err = tb.FreeEmpty(0, 1<<47, nil)
	require.NoError(t, err)
	assert.Len(t, freed, 3)
	for _, f := range freed {
		f.Poison()
	}
	assert.Equal(t, Stats{Allocated: 6, Freed: 6}, tb.Stats())
	assert.Equal(t, pgdTableBytes, tb.TableBytes())

	require.NoError(t, tb.Map(0x1000, rw(1)), "the table grows back")
	e, _ := tb.Lookup(0x1000)
	assert.Equal(t, uint64(1), e.PFN())
	assert.Zero(t, tb.Stats().PoisonedReads)
}

func TestAllocHookFailure(t *testing.T) {
	fail := errors.New("injected")
	var refuse Level
	tb := New(Options{AllocHook: func(l Level) error {
		if l == refuse {
			return fail
		}
		return nil
	}})
	refuse = LevelPMD
	err := tb.Map(0x1000, rw(1))
	assert.ErrorIs(t, err, ErrNoMem)
	assert.ErrorIs(t, err, fail)
	e, _ := tb.Lookup(0x1000)
	assert.True(t, e.IsNone())

	refuse = LevelPTE
	err = tb.MapRange(0, 2*HugeSize, rw(1))
	assert.ErrorIs(t, err, ErrNoMem)
	require.NoError(t, tb.MapHuge(0, rw(0)))
	s, _, _ := tb.LockPMD(0, false)
	assert.ErrorIs(t, s.Split(), ErrNoMem)
	assert.True(t, s.Get().IsHuge(), "a failed split leaves the leaf")
	s.Unlock()
	refuse = 0
	require.NoError(t, tb.Map(4*HugeSize, rw(1)))
}

func TestPopulate(t *testing.T) {
	tb := New(Options{})
	require.NoError(t, tb.Populate(gib, LevelPMD))
	assert.Equal(t, Stats{PMDTables: 1, PUDTables: 1, Allocated: 2}, tb.Stats())
	require.NoError(t, tb.Populate(gib, LevelPTE))
	assert.Equal(t, int64(1), tb.Stats().PTETables)
	assert.Equal(t, pgdTableBytes+pudTableBytes+pmdTableBytes+ptePageBytes, tb.TableBytes())
}

func TestLevelAndFaultStrings(t *testing.T) {
	assert.Equal(t, "PMD", LevelPMD.String())
	assert.Equal(t, "Level(9)", Level(9).String())
	assert.Equal(t, "poisoned table", FaultPoisoned.String())
	assert.Equal(t, "Fault(9)", Fault(9).String())
	assert.Equal(t, "user write", (AccessUser | AccessWrite).String())
	assert.Equal(t, "exec", AccessExec.String())
	assert.True(t, Canonical(kernelBase))
	assert.False(t, Canonical(1<<47))
}

// A deposited table makes a later split, or a PTE table at the slot,
// need no allocation, and FreeEmpty gives it back once the leaf is gone.
func TestDepositedTable(t *testing.T) {
	failing := false
	tb := New(Options{AllocHook: func(Level) error {
		if failing {
			return errors.New("injected")
		}
		return nil
	}})
	const va = 4 * HugeSize
	s, _, err := tb.LockPMD(va, true)
	require.NoError(t, err)
	require.NoError(t, s.Deposit())
	require.True(t, s.HasDeposit())
	require.NoError(t, s.Deposit(), "a second deposit is a no-op")
	_, err = s.Set(rw(512).With(Huge))
	require.NoError(t, err)
	s.Unlock()
	assert.EqualValues(t, 1, tb.Stats().PTETables, "the deposit counts as a PTE table")

	failing = true
	s, _, _ = tb.LockPMD(va, false)
	require.NoError(t, s.Split(), "the split takes the deposit and allocates nothing")
	assert.False(t, s.HasDeposit())
	s.Unlock()
	e, level := tb.Lookup(va + 7*PageSize)
	assert.Equal(t, LevelPTE, level)
	assert.EqualValues(t, 512+7, e.PFN())
	assert.EqualValues(t, 1, tb.Stats().PTETables)

	// Empty the split table: FreeEmpty frees it like any other.
	_, err = tb.UnmapRange(va, va+HugeSize, nil)
	require.NoError(t, err)
	freed, err := tb.FreeEmpty(va, va+HugeSize, nil)
	require.NoError(t, err)
	require.Len(t, freed, 1)
	assert.Zero(t, tb.Stats().PTETables)

	// A deposit whose leaf was zapped unsplit goes back with FreeEmpty too,
	// and one at a slot that gets a PTE table is used for it.
	failing = false
	for _, base := range []uint64{va, va + HugeSize} {
		s, _, err = tb.LockPMD(base, true)
		require.NoError(t, err)
		require.NoError(t, s.Deposit())
		s.Unlock()
	}
	_, err = tb.UnmapHuge(va)
	require.NoError(t, err)
	failing = true
	require.NoError(t, tb.Map(va+HugeSize, rw(3)), "the PTE table comes from the deposit")
	assert.EqualValues(t, 2, tb.Stats().PTETables)
	_, err = tb.Unmap(va + HugeSize)
	require.NoError(t, err)
	freed, err = tb.FreeEmpty(0, 1<<30, nil)
	require.NoError(t, err)
	assert.Len(t, freed, 3, "two PTE tables (one a deposit) and the PMD table")
	assert.Zero(t, tb.Stats().PTETables)
	for _, f := range freed {
		f.Poison()
	}
}

func TestGetAndClearRange(t *testing.T) {
	tests := []struct {
		name        string
		mapped      []int // indices mapped before the loop
		first, last int
		stopAfter   int // entries the loop takes before breaking; -1 never
		wantYielded []int
		wantCount   int // entries left in the table
	}{
		{"whole table", []int{0, 7, 511}, 0, Entries, -1, []int{0, 7, 511}, 0},
		{"part of the table", []int{0, 7, 8, 511}, 7, 9, -1, []int{7, 8}, 2},
		{"empty run", []int{0, 511}, 1, 511, -1, nil, 2},
		{"break keeps the rest", []int{1, 2, 3, 4}, 0, Entries, 2, []int{1, 2}, 2},
		{"break on the last", []int{1, 2}, 0, Entries, 2, []int{1, 2}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tb := New(Options{})
			for _, i := range tt.mapped {
				require.NoError(t, tb.Map(uint64(i)<<PageShift, NewPTE(uint64(100+i), Write)))
			}
			pt, ok, err := tb.LockPTE(0)
			require.NoError(t, err)
			require.True(t, ok)
			var yielded []int
			for i, old := range pt.GetAndClearRange(tt.first, tt.last) {
				assert.Equal(t, uint64(100+i), old.PFN(), "entry %d", i)
				yielded = append(yielded, i)
				if len(yielded) == tt.stopAfter {
					break
				}
			}
			assert.Equal(t, tt.wantYielded, yielded)
			assert.Equal(t, tt.wantCount, pt.Count())
			for _, i := range tt.mapped {
				cleared := slices.Contains(yielded, i)
				assert.Equal(t, cleared, pt.Get(i).IsNone(), "entry %d", i)
			}
			pt.Unlock()
		})
	}
}

// TestSplitLocksHaveALineEach: the PTE tables of neighbouring 2 MiB
// regions have their locks and counts on cache lines of their own, so
// CPUs working in them share no line through them.
func TestSplitLocksHaveALineEach(t *testing.T) {
	assert.Equal(t, uintptr(cacheLine), unsafe.Sizeof(ptlSlot{}))
	tb := New(Options{})
	var ptls []*ptlSlot
	for va := uint64(0); va < 4*HugeSize; va += HugeSize {
		pt, err := tb.AllocLockPTE(va)
		require.NoError(t, err)
		ptls = append(ptls, pt.ptl)
		pt.Unlock()
	}
	lines := map[uintptr]bool{}
	for _, p := range ptls {
		addr := uintptr(unsafe.Pointer(p))
		assert.Zero(t, addr%cacheLine, "lock at %#x straddles a line", addr)
		assert.False(t, lines[addr/cacheLine], "two locks on one line")
		lines[addr/cacheLine] = true
	}
}
