package pagetable

import "fmt"

// RangeFuncs are Range's callbacks. Either may be nil to skip that kind of
// slot.
type RangeFuncs struct {
	// PTEs is called with the table's lock held for every PTE table that
	// intersects the range; entries first to last-1 lie inside it.
	// Returning false stops the walk.
	PTEs func(pt PTETable, first, last int) bool
	// PMD is called with the PMD lock held for every slot in the range
	// that holds a huge leaf or a non-present PMD entry. If it splits the
	// leaf (PMDSlot.Split), the walk goes on into the new PTE table.
	// Returning false stops the walk.
	PMD func(s PMDSlot) bool
}

// sext sign-extends a 48-bit address.
func sext(va uint64) uint64 {
	if va&(1<<(VABits-1)) != 0 {
		return va | 0xffff_0000_0000_0000
	}
	return va
}

// Range visits, in address order, every populated PTE table and PMD entry
// intersecting [start, end) (start and end page-aligned), each under its
// lock, as walk_page_range does. Empty subtrees are skipped through
// per-table bitmaps of populated slots, so the cost grows with what is
// populated in the range, not with its size.
//
// Range may run concurrently with every operation but FreeEmpty over the
// same range; see the package documentation.
func (t *Table) Range(start, end uint64, fns RangeFuncs) error {
	if err := checkRange("range", start, end, PageSize); err != nil {
		return err
	}
	t.eachPMDTable(start, end-1, func(_ *pudTable, _ int, pmd *pmdTable, uBase, lo, hi uint64) bool {
		return eachSlot(pmd, uBase, lo, hi, func(i int, base, lo, hi uint64) bool {
			return t.visitSlot(pmd, i, base, pteIndex(lo), pteIndex(hi)+1, fns)
		})
	}, nil)
	return nil
}

// eachPMDTable calls visit for every PMD table that covers part of
// [lo, hi] (inclusive bounds, so the top of the address space can be
// named), with the table's base and the part of the range inside it;
// visit returns false to stop. After the PMD tables of one PUD table,
// leavePUD (if not nil) is called with the PGD slot and base. Populated
// slots are found through the bitmaps; nothing is locked.
func (t *Table) eachPMDTable(lo, hi uint64, visit func(pud *pudTable, ui int, pmd *pmdTable, base, lo, hi uint64) bool, leavePUD func(gi int, base uint64)) {
	for gi, gEnd := pgdIndex(lo), pgdIndex(hi)+1; ; gi++ {
		if gi = t.pgd.present.next(gi, gEnd); gi == gEnd {
			return
		}
		pud := t.pgd.next[gi].Load()
		if pud == nil {
			continue
		}
		gBase := sext(uint64(gi) << pgdShift)
		gLo, gHi := max(lo, gBase), min(hi, gBase+pgdSize-1)
		for ui, uEnd := pudIndex(gLo), pudIndex(gHi)+1; ; ui++ {
			if ui = pud.present.next(ui, uEnd); ui == uEnd {
				break
			}
			pmd := pud.next[ui].Load()
			if pmd == nil {
				continue
			}
			uBase := gBase + uint64(ui)<<pudShift
			if !visit(pud, ui, pmd, uBase, max(gLo, uBase), min(gHi, uBase+pudSize-1)) {
				return
			}
		}
		if leavePUD != nil {
			leavePUD(gi, gBase)
		}
	}
}

// eachSlot calls fn for every populated slot of pmd (based at base) that
// covers part of [lo, hi], with the slot's base and the part inside it; fn
// returns false to stop, and eachSlot then returns false.
func eachSlot(pmd *pmdTable, base, lo, hi uint64, fn func(i int, base, lo, hi uint64) bool) bool {
	for mi, mEnd := pmdIndex(lo), pmdIndex(hi)+1; ; mi++ {
		if mi = pmd.present.next(mi, mEnd); mi == mEnd {
			return true
		}
		mBase := base + uint64(mi)<<HugeShift
		if !fn(mi, mBase, max(lo, mBase), min(hi, mBase+HugeSize-1)) {
			return false
		}
	}
}

// visitSlot visits PMD slot i of pmd; it returns false to stop the walk.
func (t *Table) visitSlot(pmd *pmdTable, i int, base uint64, first, last int, fns RangeFuncs) bool {
	for {
		if pmd.entries[i].Load() != 0 {
			if fns.PMD == nil {
				return true
			}
			pmd.lock.Lock()
			if pmd.dead || pmd.entries[i].Load() == 0 {
				pmd.lock.Unlock()
				if pmd.dead {
					return true
				}
				continue
			}
			cont := fns.PMD(PMDSlot{t: t, pmd: pmd, slot: i, base: base})
			split := pmd.entries[i].Load() == 0 && pmd.next[i].Load() != nil
			pmd.lock.Unlock()
			if !cont {
				return false
			}
			if !split {
				return true
			}
			continue
		}
		page := pmd.next[i].Load()
		if page == nil || fns.PTEs == nil {
			return true
		}
		ptl := pmd.lockPTL(i, page)
		if ptl == nil {
			continue
		}
		cont := fns.PTEs(PTETable{page: page, ptl: ptl, base: base}, first, last)
		ptl.lock.Unlock()
		return cont
	}
}

// FreedTable is a page table unlinked by FreeEmpty. Lockless walkers that
// started before the unlink may still be reading it, so it is handed to
// the caller instead of being discarded: the caller waits them out
// (SyncWalkers, or its TLB-flush protocol) and then calls Poison, after
// which any walker that still reads it is caught (tlb_remove_table).
type FreedTable struct {
	Level Level  // the level of the entries it held: LevelPTE for a PTE table
	VA    uint64 // the first address it covered
	pte   *ptePage
	pmd   *pmdTable
	pud   *pudTable
}

// End returns the end of the range the table covered: 2 MiB for a PTE
// table, 1 GiB for a PMD table, 512 GiB for a PUD table.
func (f FreedTable) End() uint64 {
	switch f.Level {
	case LevelPMD:
		return f.VA + pudSize
	case LevelPUD:
		return f.VA + pgdSize
	}
	return f.VA + HugeSize
}

// poisonPMD is what every slot of a poisoned PUD table points at: a PMD
// table whose entries are all PoisonPTE, so a walker that descends through
// a poisoned PUD trips over poison one level down.
var poisonPMD = func() *pmdTable {
	m := newPMDTable()
	m.dead = true
	for i := range m.entries {
		m.entries[i].Store(uint64(PoisonPTE))
	}
	return m
}()

// Poison fills the freed table with PoisonPTE. Call it only once no
// lockless walker can still be reading the table.
func (f FreedTable) Poison() {
	switch {
	case f.pte != nil:
		for i := range f.pte {
			f.pte[i].Store(uint64(PoisonPTE))
		}
	case f.pmd != nil:
		for i := range f.pmd.entries {
			f.pmd.entries[i].Store(uint64(PoisonPTE))
		}
	case f.pud != nil:
		for i := range f.pud.next {
			f.pud.next[i].Store(poisonPMD)
		}
	}
}

func (f FreedTable) String() string {
	return fmt.Sprintf("%v table at %#x", f.Level, f.VA)
}

// FreeEmpty unlinks every empty table whose whole span lies inside
// [floor, ceiling) (free_pgtables): PTE tables with no entries, then PMD
// and PUD tables left with no tables, and appends them to freed. Tables
// partly outside the bounds are kept, because a neighbour may still use
// them; non-empty ones are kept too. The root is never freed.
//
// Concurrent operations elsewhere in the table are safe: an install that
// races with the unlink of its parent notices and retries. Operations and
// walks inside the bounds must be excluded by the caller (the kernel's
// mmap_lock) or run inside LocklessBegin/End, because the returned tables
// are poisoned once the caller calls Poison.
func (t *Table) FreeEmpty(floor, ceiling uint64, freed []FreedTable) ([]FreedTable, error) {
	if err := checkRange("free tables", floor, ceiling, PageSize); err != nil {
		return freed, err
	}
	last := ceiling - 1
	inside := func(base, size uint64) bool { return base >= floor && base+size-1 <= last }
	t.eachPMDTable(floor, last, func(pud *pudTable, ui int, pmd *pmdTable, uBase, lo, hi uint64) bool {
		eachSlot(pmd, uBase, lo, hi, func(i int, base, _, _ uint64) bool {
			if inside(base, HugeSize) {
				freed = t.freePTETable(pmd, i, base, freed)
			}
			return true
		})
		freed = t.freeDeposits(pmd, uBase, inside, freed)
		if inside(uBase, pudSize) {
			freed = t.freePMDTable(pud, ui, uBase, freed)
		}
		return true
	}, func(gi int, gBase uint64) {
		if inside(gBase, pgdSize) {
			freed = t.freePUDTable(gi, gBase, freed)
		}
	})
	return freed, nil
}

func (t *Table) freePTETable(pmd *pmdTable, i int, base uint64, freed []FreedTable) []FreedTable {
	pmd.lock.Lock()
	defer pmd.lock.Unlock()
	page := pmd.next[i].Load()
	if page == nil {
		return freed
	}
	ptl := pmd.ptl[i].Load() // set with the table, under pmd.lock, which we hold
	ptl.lock.Lock()
	defer ptl.lock.Unlock()
	if ptl.nr != 0 {
		return freed
	}
	pmd.next[i].Store(nil)
	pmd.ptl[i].Store(nil)
	pmd.present.clear(i)
	pmd.count--
	t.tables[LevelPTE].Add(-1)
	t.freed.Add(1)
	return append(freed, FreedTable{Level: LevelPTE, VA: base, pte: page})
}

// freeDeposits frees the deposits of pmd's slots inside the bounds that
// hold neither a leaf nor a table: a slot whose huge leaf was zapped is
// no longer populated, so the slot walk never sees it. This is the only
// place deposits are freed; a PMD table with none of its slots
// populated has none left after it.
func (t *Table) freeDeposits(pmd *pmdTable, uBase uint64, inside func(base, size uint64) bool, freed []FreedTable) []FreedTable {
	pmd.lock.Lock()
	defer pmd.lock.Unlock()
	for i, dep := range pmd.deposit {
		base := uBase + uint64(i)*HugeSize
		if inside(base, HugeSize) && pmd.entries[i].Load() == 0 && pmd.next[i].Load() == nil {
			delete(pmd.deposit, i)
			freed = t.freeDeposit(base, dep, freed)
		}
	}
	return freed
}

// freeDeposit hands out a deposited PTE table no leaf needs any more.
// Nobody can have walked it, but it goes the way of every freed table.
func (t *Table) freeDeposit(base uint64, dep *ptePage, freed []FreedTable) []FreedTable {
	t.tables[LevelPTE].Add(-1)
	t.freed.Add(1)
	return append(freed, FreedTable{Level: LevelPTE, VA: base, pte: dep})
}

func (t *Table) freePMDTable(pud *pudTable, i int, base uint64, freed []FreedTable) []FreedTable {
	t.lock.Lock()
	defer t.lock.Unlock()
	pmd := pud.next[i].Load()
	if pmd == nil {
		return freed
	}
	pmd.lock.Lock()
	defer pmd.lock.Unlock()
	if pmd.count != 0 {
		return freed
	}
	pmd.dead = true
	pud.next[i].Store(nil)
	pud.present.clear(i)
	pud.count--
	t.tables[LevelPMD].Add(-1)
	t.freed.Add(1)
	return append(freed, FreedTable{Level: LevelPMD, VA: base, pmd: pmd})
}

func (t *Table) freePUDTable(gi int, base uint64, freed []FreedTable) []FreedTable {
	t.lock.Lock()
	defer t.lock.Unlock()
	pud := t.pgd.next[gi].Load()
	if pud == nil || pud.count != 0 {
		return freed
	}
	pud.dead = true
	t.pgd.next[gi].Store(nil)
	t.pgd.present.clear(gi)
	t.tables[LevelPUD].Add(-1)
	t.freed.Add(1)
	return append(freed, FreedTable{Level: LevelPUD, VA: base, pud: pud})
}
