package pagetable

import (
	"encoding/binary"
	"errors"
	"maps"
	"slices"
	"testing"

	"pgregory.net/rapid"
)

// tableModel is what the table should hold: 4 KiB entries by page
// address, 2 MiB leaves by their base, and which PMD slots have a PTE
// table (populated or not), since that decides ErrBusy and FreeEmpty.
type tableModel struct {
	t      *Table
	small  map[uint64]PTE
	huge   map[uint64]PTE
	tables map[uint64]bool
}

func newTableModel() *tableModel {
	return &tableModel{t: New(Options{}), small: map[uint64]PTE{}, huge: map[uint64]PTE{}, tables: map[uint64]bool{}}
}

// modelSlots are the 2 MiB regions the model uses: three adjacent ones so
// ranges cross table boundaries, one in another PMD table, one in the
// upper half.
var modelSlots = []uint64{0, HugeSize, 2 * HugeSize, gib, kernelBase}

func drawPage(t *rapid.T, label string) uint64 {
	slot := rapid.SampledFrom(modelSlots).Draw(t, label+" slot")
	idx := rapid.OneOf(rapid.IntRange(0, 3), rapid.SampledFrom([]int{255, 256, 510, 511}), rapid.IntRange(0, 511)).Draw(t, label+" index")
	return slot + uint64(idx)<<PageShift
}

func drawLeaf(t *rapid.T) PTE {
	bits := []PTE{Write, User, NoExec, Accessed, Dirty, Global, SoftDirty}
	var f PTE
	for _, b := range bits {
		if rapid.Bool().Draw(t, b.String()) {
			f |= b
		}
	}
	return NewPTE(rapid.Uint64Range(0, 1<<20).Draw(t, "pfn"), f)
}

func slotOf(va uint64) uint64 { return va &^ (HugeSize - 1) }

func checkErr(t *rapid.T, op string, got, want error) {
	t.Helper()
	if want == nil && got != nil || want != nil && !errors.Is(got, want) {
		t.Fatalf("%s: got %v, want %v", op, got, want)
	}
}

func (m *tableModel) Map(t *rapid.T) {
	va, e := drawPage(t, "va"), drawLeaf(t)
	var want error
	switch {
	case m.huge[slotOf(va)] != 0:
		want = ErrBusy
	case m.small[va] != 0:
		want = ErrExist
	}
	checkErr(t, "Map", m.t.Map(va, e), want)
	if want == nil {
		m.small[va] = e
		m.tables[slotOf(va)] = true
	}
}

func (m *tableModel) SetSwap(t *rapid.T) {
	va := drawPage(t, "va")
	e, err := NewSwapPTE(SwapEntry{Type: SwapType(rapid.IntRange(0, int(SwapMarker)).Draw(t, "type")), Offset: rapid.Uint64Range(0, MaxSwapOffset).Draw(t, "off")}, 0)
	if err != nil {
		t.Fatal(err)
	}
	old, err := m.t.Set(va, e)
	if m.huge[slotOf(va)] != 0 {
		checkErr(t, "Set", err, ErrBusy)
		return
	}
	checkErr(t, "Set", err, nil)
	if old != m.small[va] {
		t.Fatalf("Set %#x returned %v, model %v", va, old, m.small[va])
	}
	m.small[va] = e
	m.tables[slotOf(va)] = true
}

func (m *tableModel) Unmap(t *rapid.T) {
	va := drawPage(t, "va")
	old, err := m.t.Unmap(va)
	if m.huge[slotOf(va)] != 0 {
		checkErr(t, "Unmap", err, ErrBusy)
		return
	}
	checkErr(t, "Unmap", err, nil)
	if old != m.small[va] {
		t.Fatalf("Unmap %#x returned %v, model %v", va, old, m.small[va])
	}
	delete(m.small, va)
}

func (m *tableModel) MapHuge(t *rapid.T) {
	base := rapid.SampledFrom(modelSlots).Draw(t, "base")
	e := drawLeaf(t)
	e = e.WithPFN(e.PFN() &^ (Entries - 1))
	var want error
	switch {
	case m.huge[base] != 0:
		want = ErrExist
	case m.tables[base]:
		want = ErrBusy
	}
	checkErr(t, "MapHuge", m.t.MapHuge(base, e), want)
	if want == nil {
		m.huge[base] = e.With(Huge)
	}
}

func (m *tableModel) UnmapHuge(t *rapid.T) {
	base := rapid.SampledFrom(modelSlots).Draw(t, "base")
	old, err := m.t.UnmapHuge(base)
	if m.tables[base] {
		checkErr(t, "UnmapHuge", err, ErrBusy)
		return
	}
	checkErr(t, "UnmapHuge", err, nil)
	if old != m.huge[base] {
		t.Fatalf("UnmapHuge %#x returned %v, model %v", base, old, m.huge[base])
	}
	delete(m.huge, base)
}

func (m *tableModel) split(base uint64) {
	h := m.huge[base]
	delete(m.huge, base)
	for i := range uint64(Entries) {
		m.small[base+i<<PageShift] = h.Without(Huge).WithPFN(h.PFN() + i)
	}
	m.tables[base] = true
}

func (m *tableModel) Split(t *rapid.T) {
	base := rapid.SampledFrom(modelSlots).Draw(t, "base")
	s, ok, err := m.t.LockPMD(base, false)
	checkErr(t, "LockPMD", err, nil)
	if !ok {
		if m.huge[base] != 0 {
			t.Fatalf("no PMD table under a huge leaf at %#x", base)
		}
		return
	}
	err = s.Split()
	s.Unlock()
	if m.huge[base] == 0 {
		checkErr(t, "Split", err, ErrInvalid)
		return
	}
	checkErr(t, "Split", err, nil)
	m.split(base)
}

func drawRange(t *rapid.T) (uint64, uint64) {
	start := drawPage(t, "start")
	pages := rapid.IntRange(1, 1100).Draw(t, "pages")
	return start, start + uint64(pages)<<PageShift
}

func (m *tableModel) MapRange(t *rapid.T) {
	start, end := drawRange(t)
	first := drawLeaf(t)
	var want error
	var touched []uint64 // slots whose table the call allocates or finds
	for va := start; va < end && want == nil; va += PageSize {
		if m.huge[slotOf(va)] != 0 {
			want = ErrBusy
			break
		}
		if len(touched) == 0 || touched[len(touched)-1] != slotOf(va) {
			touched = append(touched, slotOf(va))
		}
		if m.small[va] != 0 {
			want = ErrExist
		}
	}
	checkErr(t, "MapRange", m.t.MapRange(start, end, first), want)
	for _, s := range touched {
		m.tables[s] = true
	}
	if want == nil {
		for va, e := start, first; va < end; va, e = va+PageSize, e.WithPFN(e.PFN()+1) {
			m.small[va] = e
		}
	}
}

func (m *tableModel) UnmapRange(t *rapid.T) {
	start, end := drawRange(t)
	want := 0
	for base, h := range m.huge {
		if base+HugeSize <= start || base >= end {
			continue
		}
		if base >= start && base+HugeSize <= end {
			delete(m.huge, base)
			want++
			continue
		}
		_ = h
		m.split(base)
	}
	for va := range m.small {
		if va >= start && va < end {
			delete(m.small, va)
			want++
		}
	}
	cleared := map[uint64]bool{}
	n, err := m.t.UnmapRange(start, end, func(va uint64, _ PTE) { cleared[va] = true })
	checkErr(t, "UnmapRange", err, nil)
	if n != want || len(cleared) != want {
		t.Fatalf("UnmapRange [%#x,%#x) cleared %d (%d distinct), model %d", start, end, n, len(cleared), want)
	}
}

func (m *tableModel) Walk(t *rapid.T) {
	va := drawPage(t, "va") + uint64(rapid.IntRange(0, PageSize-1).Draw(t, "offset"))
	acc := Access(rapid.IntRange(0, 7).Draw(t, "access"))
	page := va &^ (PageSize - 1)
	leaf, isHuge := m.huge[slotOf(va)], true
	if leaf == 0 {
		leaf, isHuge = m.small[page], false
	}
	tr := m.t.Walk(va, acc)
	want := FaultNone
	switch {
	case !leaf.IsPresent():
		want = FaultNotPresent
	case acc&AccessWrite != 0 && !leaf.IsWritable(), acc&AccessUser != 0 && leaf&User == 0, acc&AccessExec != 0 && leaf&NoExec != 0:
		want = FaultProtection
	}
	if tr.Fault != want {
		t.Fatalf("Walk %#x %v: fault %v, model %v (leaf %v)", va, acc, tr.Fault, want, leaf)
	}
	if want != FaultNone {
		return
	}
	leaf |= Accessed
	if acc&AccessWrite != 0 {
		leaf |= Dirty
	}
	wantPFN := leaf.PFN()
	if isHuge {
		m.huge[slotOf(va)] = leaf
		wantPFN += uint64(pteIndex(va))
	} else {
		m.small[page] = leaf
	}
	if tr.PTE != leaf || tr.PFN != wantPFN {
		t.Fatalf("Walk %#x: got %v pfn %#x, model %v pfn %#x", va, tr.PTE, tr.PFN, leaf, wantPFN)
	}
}

func (m *tableModel) AgeAndProtect(t *rapid.T) {
	va := drawPage(t, "va")
	pt, ok, err := m.t.LockPTE(va)
	if m.huge[slotOf(va)] != 0 {
		checkErr(t, "LockPTE", err, ErrBusy)
		return
	}
	checkErr(t, "LockPTE", err, nil)
	if !ok {
		if m.tables[slotOf(va)] {
			t.Fatalf("LockPTE %#x found no table; model has one", va)
		}
		return
	}
	defer pt.Unlock()
	i := pt.Index(va)
	e := m.small[va]
	young := pt.TestAndClearYoung(i)
	if young != (e.IsPresent() && e.IsYoung()) {
		t.Fatalf("TestAndClearYoung %#x = %v for %v", va, young, e)
	}
	if e.IsPresent() {
		e = e.Without(Accessed)
	}
	if rapid.Bool().Draw(t, "wrprotect") {
		pt.WriteProtect(i)
		if e.IsPresent() {
			e = e.Without(Write)
		}
	}
	if e != 0 {
		m.small[va] = e
	}
}

func (m *tableModel) FreeEmpty(t *rapid.T) {
	floor := rapid.SampledFrom(append(modelSlots, PageSize)).Draw(t, "floor")
	ceiling := rapid.SampledFrom([]uint64{floor + HugeSize, floor + 2*HugeSize, floor + 3*HugeSize - PageSize, floor + 2*gib}).Draw(t, "ceiling")
	if floor >= kernelBase {
		ceiling = min(ceiling, 0xffff_ffff_ffff_f000)
	}
	used := map[uint64]bool{}
	for va := range m.small {
		used[slotOf(va)] = true
	}
	want := 0
	for s := range m.tables {
		if !used[s] && s >= floor && s+HugeSize <= ceiling {
			delete(m.tables, s)
			want++
		}
	}
	freed, err := m.t.FreeEmpty(floor, ceiling, nil)
	checkErr(t, "FreeEmpty", err, nil)
	got := 0
	for _, f := range freed {
		if f.Level == LevelPTE {
			got++
		}
	}
	if got != want {
		t.Fatalf("FreeEmpty [%#x,%#x) freed %d PTE tables, model %d", floor, ceiling, got, want)
	}
	m.t.SyncWalkers()
	for _, f := range freed {
		f.Poison()
	}
}

func (m *tableModel) Check(t *rapid.T) {
	for va, e := range m.small {
		if got, l := m.t.Lookup(va); got != e || l != LevelPTE {
			t.Fatalf("Lookup %#x = %v at %v, model %v", va, got, l, e)
		}
	}
	for base, e := range m.huge {
		if got, l := m.t.Lookup(base + 0x1234); got != e || l != LevelPMD {
			t.Fatalf("Lookup %#x = %v at %v, model huge %v", base, got, l, e)
		}
	}
	seenSmall, seenHuge := map[uint64]PTE{}, map[uint64]PTE{}
	err := m.t.Range(0, 1<<47, m.collect(seenSmall, seenHuge))
	if err == nil {
		err = m.t.Range(kernelBase, 0xffff_ffff_ffff_f000, m.collect(seenSmall, seenHuge))
	}
	if err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(seenSmall, m.small) || !maps.Equal(seenHuge, m.huge) {
		t.Fatalf("Range saw %d small, %d huge; model %d, %d", len(seenSmall), len(seenHuge), len(m.small), len(m.huge))
	}
	st := m.t.Stats()
	if st.PTETables != int64(len(m.tables)) {
		t.Fatalf("%d PTE tables, model %v", st.PTETables, slices.Sorted(maps.Keys(m.tables)))
	}
	if st.PoisonedReads != 0 {
		t.Fatalf("%d poisoned reads", st.PoisonedReads)
	}
}

func (m *tableModel) collect(small, huge map[uint64]PTE) RangeFuncs {
	return RangeFuncs{
		PTEs: func(pt PTETable, first, last int) bool {
			n := 0
			for i := first; i < last; i++ {
				if e := pt.Get(i); e != 0 {
					small[pt.VA(i)] = e
					n++
				}
			}
			if first == 0 && last == Entries && n != pt.Count() {
				panic("entry count out of step with the entries")
			}
			return true
		},
		PMD: func(s PMDSlot) bool { huge[s.Base()] = s.Get(); return true },
	}
}

func TestTableStateMachine(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		t.Repeat(rapid.StateMachineActions(newTableModel()))
	})
}

// FuzzTable runs arbitrary operations with arbitrary addresses, lengths
// and entries: no panic, only typed errors, and the table stays
// consistent with what the successful calls did.
func FuzzTable(f *testing.F) {
	f.Add([]byte("\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00\x01"))
	f.Add([]byte("\x03\x00\x00\x00\x00\x00\x20\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x00\x07"))
	f.Add([]byte("\x05\xff\xff\x80\x00\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xf0\x00\x00\x00\x00\x00\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, prog []byte) {
		// A table budget bounds the work of an arbitrary huge MapRange:
		// past it the call fails with ErrNoMem and must roll back.
		budget := 64
		tb := New(Options{AllocHook: func(Level) error {
			if budget == 0 {
				return errors.New("fuzz table budget spent")
			}
			budget--
			return nil
		}})
		for len(prog) >= 25 {
			op := prog[0] % 12
			a := binary.BigEndian.Uint64(prog[1:9])
			b := binary.BigEndian.Uint64(prog[9:17])
			e := PTE(binary.BigEndian.Uint64(prog[17:25]))
			prog = prog[25:]
			before := tb.Stats()
			var err error
			switch op {
			case 0:
				err = tb.Map(a, e)
			case 1:
				_, err = tb.Unmap(a)
			case 2:
				_, err = tb.Set(a, e)
			case 3:
				err = tb.MapRange(a, b, e)
			case 4:
				_, err = tb.UnmapRange(a, b, nil)
			case 5:
				err = tb.MapHuge(a, e)
			case 6:
				_, err = tb.UnmapHuge(a)
			case 7:
				var freed []FreedTable
				freed, err = tb.FreeEmpty(a, b, nil)
				for _, f := range freed {
					f.Poison()
				}
			case 8:
				tr := tb.Walk(a, Access(b))
				if tr.Fault == FaultPoisoned {
					t.Fatalf("walk read poison")
				}
			case 9:
				if got, _ := tb.Lookup(a); got.IsPoison() {
					t.Fatalf("lookup read poison")
				}
			case 10:
				err = tb.Populate(a, Level(b%5))
			case 11:
				err = tb.Range(a, b, RangeFuncs{PMD: func(s PMDSlot) bool { return s.Get() != 0 }})
			}
			if err != nil {
				if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrExist) && !errors.Is(err, ErrBusy) && !errors.Is(err, ErrNoMem) {
					t.Fatalf("op %d(%#x, %#x, %v): untyped error %v", op, a, b, e, err)
				}
				if errors.Is(err, ErrInvalid) && tb.Stats() != before {
					t.Fatalf("op %d refused as invalid but changed the table", op)
				}
			}
			// Whatever happened, Range must agree with Lookup.
			if op == 3 || op == 4 || op == 7 {
				if err := tb.Range(0, 1<<47, RangeFuncs{PTEs: func(pt PTETable, first, last int) bool {
					for i := first; i < last; i++ {
						if got, _ := tb.Lookup(pt.VA(i)); got != pt.Get(i) {
							t.Fatalf("Lookup and Range disagree at %#x", pt.VA(i))
						}
					}
					return true
				}}); err != nil {
					t.Fatal(err)
				}
			}
		}
		if tb.Stats().PoisonedReads != 0 {
			t.Fatal("poisoned reads")
		}
	})
}
