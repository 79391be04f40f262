package pagetable

import "fmt"

// validSmall reports whether e may be stored in a 4 KiB slot: none, a
// present non-huge leaf, or a valid swap-format entry.
func validSmall(e PTE) bool {
	return e == 0 || (e.IsPresent() && e&Huge == 0) || e.IsSwap()
}

// Populate allocates the tables needed for va to have an entry at the
// given level: LevelPMD allocates down to the PMD table, LevelPTE down to
// the PTE table (unless a huge leaf is there, which is ErrBusy).
func (t *Table) Populate(va uint64, level Level) error {
	if err := checkAddr("populate", va, 1); err != nil {
		return err
	}
	switch level {
	case LevelPMD:
		_, err := t.pmdOf(va, true)
		return err
	case LevelPTE:
		pt, err := t.AllocLockPTE(va)
		if err != nil {
			return err
		}
		pt.Unlock()
		return nil
	}
	return fmt.Errorf("pagetable: populate to %v: %w", level, ErrInvalid)
}

// Map installs a present 4 KiB leaf at va, allocating tables as needed.
// The slot must be none (else ErrExist) and not under a huge leaf (else
// ErrBusy); e must be present and not huge (else ErrInvalid).
func (t *Table) Map(va uint64, e PTE) error {
	if err := checkAddr("map", va, PageSize); err != nil {
		return err
	}
	if !e.IsPresent() || e&Huge != 0 {
		return fmt.Errorf("pagetable: map %#x to %v: %w", va, e, ErrInvalid)
	}
	pt, err := t.AllocLockPTE(va)
	if err != nil {
		return err
	}
	i := pteIndex(va)
	if !pt.CompareAndSet(i, 0, e) {
		cur := pt.Get(i)
		pt.Unlock()
		return fmt.Errorf("pagetable: map %#x: holds %v: %w", va, cur, ErrExist)
	}
	pt.Unlock()
	return nil
}

// Set stores any valid 4 KiB entry at va (a present leaf, a swap-format
// entry, or none) and returns the entry it replaced. Storing none where
// no table exists allocates nothing.
func (t *Table) Set(va uint64, e PTE) (PTE, error) {
	if err := checkAddr("set", va, PageSize); err != nil {
		return 0, err
	}
	if !validSmall(e) {
		return 0, fmt.Errorf("pagetable: set %#x to %v: %w", va, e, ErrInvalid)
	}
	var pt PTETable
	var err error
	if e == 0 {
		var ok bool
		pt, ok, err = t.LockPTE(va)
		if !ok {
			return 0, err
		}
	} else if pt, err = t.AllocLockPTE(va); err != nil {
		return 0, err
	}
	old := pt.Set(pteIndex(va), e)
	pt.Unlock()
	return old, nil
}

// Unmap clears the 4 KiB entry at va and returns what it held (none if
// nothing was mapped). A huge leaf over va is ErrBusy.
func (t *Table) Unmap(va uint64) (PTE, error) {
	if err := checkAddr("unmap", va, PageSize); err != nil {
		return 0, err
	}
	pt, ok, err := t.LockPTE(va)
	if !ok {
		return 0, err
	}
	old := pt.GetAndClear(pteIndex(va))
	pt.Unlock()
	return old, nil
}

// MapHuge installs a 2 MiB leaf at the 2 MiB-aligned va; Huge is added to
// e, which must be present. A leaf already there is ErrExist; a PTE table
// there is ErrBusy.
func (t *Table) MapHuge(va uint64, e PTE) error {
	if err := checkAddr("map huge", va, HugeSize); err != nil {
		return err
	}
	if !e.IsPresent() || e.PFN()%Entries != 0 {
		return fmt.Errorf("pagetable: map huge %#x to %v: %w", va, e, ErrInvalid)
	}
	s, _, err := t.LockPMD(va, true)
	if err != nil {
		return err
	}
	defer s.Unlock()
	if cur := s.Get(); cur != 0 {
		return fmt.Errorf("pagetable: map huge %#x: holds %v: %w", va, cur, ErrExist)
	}
	_, err = s.Set(e.With(Huge))
	return err
}

// UnmapHuge clears the PMD entry at the 2 MiB-aligned va and returns it
// (none if there was none). A PTE table there is ErrBusy.
func (t *Table) UnmapHuge(va uint64) (PTE, error) {
	if err := checkAddr("unmap huge", va, HugeSize); err != nil {
		return 0, err
	}
	s, ok, err := t.LockPMD(va, false)
	if !ok {
		return 0, err
	}
	defer s.Unlock()
	if s.HasTable() {
		return 0, fmt.Errorf("pagetable: unmap huge %#x: holds a PTE table: %w", va, ErrBusy)
	}
	return s.GetAndClear(), nil
}

// MapRange maps [start, end) to consecutive frames: the page at start to
// first.PFN(), each next page to the next frame, all with first's bits
// (remap_pfn_range). It is all or nothing: if any page in the range is
// already populated (ErrExist), under a huge leaf (ErrBusy), or a table
// cannot be allocated, every page it mapped is unmapped again before it
// returns the error.
func (t *Table) MapRange(start, end uint64, first PTE) error {
	if err := checkRange("map range", start, end, PageSize); err != nil {
		return err
	}
	pages := (end - start) >> PageShift
	if !first.IsPresent() || first&Huge != 0 || first.PFN()+pages-1 > MaxPFN {
		return fmt.Errorf("pagetable: map range [%#x, %#x) to %v: %w", start, end, first, ErrInvalid)
	}
	e := first
	for va := start; va < end; {
		pt, err := t.AllocLockPTE(va)
		if err != nil {
			t.undoMapRange(start, va)
			return err
		}
		lo := pteIndex(va)
		hi := Entries
		if end-pt.Base() < HugeSize {
			hi = pteIndex(end-1) + 1
		}
		for i := lo; i < hi; i++ {
			if pt.page[i].Load() != 0 {
				cur := pt.Get(i)
				pt.Unlock()
				t.undoMapRange(start, va)
				return fmt.Errorf("pagetable: map range: %#x holds %v: %w", pt.VA(i), cur, ErrExist)
			}
		}
		for i := lo; i < hi; i++ {
			pt.page[i].Store(uint64(e))
			e += 1 << pfnShift
		}
		pt.ptl.nr += uint16(hi - lo)
		pt.Unlock()
		va = pt.Base() + uint64(hi)<<PageShift
	}
	return nil
}

// undoMapRange clears [start, end), which MapRange just mapped.
func (t *Table) undoMapRange(start, end uint64) {
	if end > start {
		_, _ = t.UnmapRange(start, end, nil)
	}
}

// UnmapRange clears every entry in [start, end), 4 KiB entries, huge
// leaves and swap entries alike, calling fn (if not nil) with each
// entry's address and the value it held, under the entry's lock. A huge
// leaf the range covers only partly is split first; a non-present PMD
// entry is cleared only if the range covers all of it. It returns how many
// entries were cleared (a huge leaf counts once).
func (t *Table) UnmapRange(start, end uint64, fn func(va uint64, old PTE)) (int, error) {
	if err := checkRange("unmap range", start, end, PageSize); err != nil {
		return 0, err
	}
	n := 0
	var splitErr error
	err := t.Range(start, end, RangeFuncs{
		PTEs: func(pt PTETable, first, last int) bool {
			for i, old := range pt.GetAndClearRange(first, last) {
				n++
				if fn != nil {
					fn(pt.VA(i), old)
				}
			}
			return true
		},
		PMD: func(s PMDSlot) bool {
			covered := s.Base() >= start && s.Base()+HugeSize <= end
			switch {
			case covered:
				old := s.GetAndClear()
				n++
				if fn != nil {
					fn(s.Base(), old)
				}
			case s.Get().IsHuge():
				// Range visits the PTE table the split leaves behind.
				if err := s.Split(); err != nil {
					splitErr = err
					return false
				}
			}
			// A non-present PMD entry (a PMD migration entry) partly in
			// range has no PTE form to split into: it is left for its
			// owner to resolve.
			return true
		},
	})
	if err == nil {
		err = splitErr
	}
	return n, err
}
