package pagetable

import (
	"fmt"
	"iter"
)

// PTETable is one PTE table with its split lock held: what
// pte_offset_map_lock returns. Entries are addressed by index 0..511;
// Index and VA convert. Every method requires the lock to be held, that
// is, must be called before Unlock; an index outside 0..511 panics, like
// any out-of-range slice index.
//
// Entries change atomically, so the hardware walker's concurrent
// Accessed/Dirty updates are never lost: Set and GetAndClear return the
// entry as it was at the instant it was replaced.
type PTETable struct {
	page *ptePage
	ptl  *ptlSlot
	base uint64
}

// Base returns the virtual address mapped by entry 0.
func (p PTETable) Base() uint64 { return p.base }

// Index returns the entry index of va, which must lie in this table.
func (p PTETable) Index(va uint64) int { return pteIndex(va) }

// VA returns the virtual address of entry i.
func (p PTETable) VA(i int) uint64 { return p.base + uint64(i)<<PageShift }

// Count returns how many entries are not none.
func (p PTETable) Count() int { return int(p.ptl.nr) }

// Get returns entry i (ptep_get).
func (p PTETable) Get(i int) PTE { return PTE(p.page[i].Load()) }

// Set replaces entry i and returns the old one (set_pte_at, with the old
// value as ptep_get_and_clear would see it).
func (p PTETable) Set(i int, e PTE) PTE {
	old := PTE(p.page[i].Swap(uint64(e)))
	p.account(old, e)
	return old
}

// GetAndClear empties entry i and returns what it held, including any
// Accessed or Dirty bit the walker set up to that instant
// (ptep_get_and_clear).
func (p PTETable) GetAndClear(i int) PTE {
	old := p.take(i)
	p.account(old, 0)
	return old
}

// take empties entry i without accounting for it.
func (p PTETable) take(i int) PTE {
	if testNonAtomicClear {
		return p.racyClear(i)
	}
	return PTE(p.page[i].Swap(0))
}

// GetAndClearRange empties the entries of [first, last) that are not
// none, in order, yielding each index with what it held (GetAndClear over
// a whole run of one table, as zap_pte_range clears under one lock). It
// is the range operations' cursor: one bounds check and one update of
// the table's count for the run, not one per entry. Breaking out of the
// loop leaves the entries after the last one yielded untouched. Count is
// brought up to date when the loop ends, not while it runs; the loop
// must end before Unlock. A body that panics leaves Count too high, so
// the table is not freed when empty: a leak, never a table freed under
// its entries. (A deferred update would cost more than the clears: it
// keeps the iterator from being inlined into its loop.)
func (p PTETable) GetAndClearRange(first, last int) iter.Seq2[int, PTE] {
	return func(yield func(int, PTE) bool) {
		run := p.page[first:last:last]
		var cleared uint16
		for j := range run {
			if run[j].Load() == 0 {
				continue
			}
			old := p.take(first + j)
			cleared++
			if !yield(first+j, old) {
				break
			}
		}
		p.ptl.nr -= cleared
	}
}

// testNonAtomicClear switches GetAndClear to a read followed by a separate
// store, the bug ptep_get_and_clear exists to avoid: a Dirty bit the
// walker sets between the two is lost. Only the regression test that
// proves the test can see that sets it.
var testNonAtomicClear = false

// testClearWindow, if set, runs between the read and the store of the
// non-atomic clear: the test puts another CPU's walk exactly there.
var testClearWindow func()

func (p PTETable) racyClear(i int) PTE {
	old := PTE(p.page[i].Load())
	if testClearWindow != nil {
		testClearWindow()
	}
	p.page[i].Store(0)
	return old
}

// CompareAndSet replaces entry i with e only if it still equals old
// (the pte_same check of fault paths).
func (p PTETable) CompareAndSet(i int, old, e PTE) bool {
	if !p.page[i].CompareAndSwap(uint64(old), uint64(e)) {
		return false
	}
	p.account(old, e)
	return true
}

// TestAndClearYoung clears the accessed bit of entry i and reports whether
// it was set (ptep_test_and_clear_young).
func (p PTETable) TestAndClearYoung(i int) bool {
	e := PTE(p.page[i].Load())
	if !e.IsPresent() || !e.IsYoung() {
		return false
	}
	return PTE(p.page[i].And(^uint64(Accessed)))&Accessed != 0
}

// WriteProtect clears the write bit of a present entry i and returns the
// entry as it was (ptep_set_wrprotect). The dirty bit is kept.
func (p PTETable) WriteProtect(i int) PTE {
	e := PTE(p.page[i].Load())
	if !e.IsPresent() {
		return e
	}
	return PTE(p.page[i].And(^uint64(Write)))
}

// Unlock releases the table's lock.
func (p PTETable) Unlock() { p.ptl.lock.Unlock() }

// IsContended reports whether another goroutine waits for this table's
// lock, for long loops that want to break the lock.
func (p PTETable) IsContended() bool { return p.ptl.lock.IsContended() }

func (p PTETable) account(old, e PTE) {
	switch {
	case old == 0 && e != 0:
		p.ptl.nr++
	case old != 0 && e == 0:
		p.ptl.nr--
	}
}

// LockPTE locks the PTE table covering va and returns it; ok is false if
// no PTE table covers va. A huge leaf at va's PMD slot is ErrBusy: lock it
// with LockPMD instead.
func (t *Table) LockPTE(va uint64) (pt PTETable, ok bool, err error) {
	return t.lockPTE(va, false)
}

// AllocLockPTE is LockPTE that allocates the tables down to the PTE level
// as needed (pte_alloc_map_lock).
func (t *Table) AllocLockPTE(va uint64) (PTETable, error) {
	pt, _, err := t.lockPTE(va, true)
	return pt, err
}

func (t *Table) lockPTE(va uint64, alloc bool) (PTETable, bool, error) {
	if !canonical(va) {
		return PTETable{}, false, fmt.Errorf("pagetable: lock PTE table of %#x: %w", va, ErrInvalid)
	}
	i := pmdIndex(va)
	for {
		pmd, err := t.pmdOf(va, alloc)
		if err != nil || pmd == nil {
			return PTETable{}, false, err
		}
		if e := PTE(pmd.entries[i].Load()); e != 0 {
			return PTETable{}, false, errUnderPMD
		}
		page := pmd.next[i].Load()
		if page == nil {
			if !alloc {
				return PTETable{}, false, nil
			}
			if err := t.installPTE(pmd, i); err != nil {
				return PTETable{}, false, err
			}
			continue
		}
		ptl := pmd.lockPTL(i, page)
		if ptl == nil {
			continue // freed (or replaced) meanwhile
		}
		return PTETable{page: page, ptl: ptl, base: va &^ (HugeSize - 1)}, true, nil
	}
}

// PMDSlot is one PMD entry with its PMD table's lock held (pmd_lock): the
// handle for 2 MiB leaves and non-present PMD entries. Every method
// requires the lock to be held.
type PMDSlot struct {
	t    *Table
	pmd  *pmdTable
	slot int
	base uint64
}

// Base returns the 2 MiB-aligned address the slot maps.
func (s PMDSlot) Base() uint64 { return s.base }

// Get returns the PMD entry: a leaf, a non-present entry, or none (which
// it also is while the slot holds a PTE table; see HasTable).
func (s PMDSlot) Get() PTE { return PTE(s.pmd.entries[s.slot].Load()) }

// HasTable reports whether the slot holds a PTE table.
func (s PMDSlot) HasTable() bool { return s.pmd.next[s.slot].Load() != nil }

// Set replaces the PMD entry and returns the old one (set_pmd_at). e must
// be none, a huge leaf or a swap-format entry (a PMD migration entry), and
// the slot must not hold a PTE table: otherwise ErrInvalid or ErrBusy, and
// nothing changes.
func (s PMDSlot) Set(e PTE) (PTE, error) {
	if e != 0 && !e.IsHuge() && !e.IsSwap() || e.IsHuge() && e.PFN()%Entries != 0 {
		return 0, fmt.Errorf("pagetable: PMD entry %v is not a 512-aligned huge leaf: %w", e, ErrInvalid)
	}
	if s.HasTable() {
		return 0, fmt.Errorf("pagetable: PMD slot %#x holds a PTE table: %w", s.base, ErrBusy)
	}
	old := PTE(s.pmd.entries[s.slot].Swap(uint64(e)))
	s.account(old, e)
	return old, nil
}

// GetAndClear empties the PMD entry and returns it, hardware A/D bits
// included (pmdp_huge_get_and_clear).
func (s PMDSlot) GetAndClear() PTE {
	old := PTE(s.pmd.entries[s.slot].Swap(0))
	s.account(old, 0)
	return old
}

// TestAndClearYoung clears the accessed bit of a present leaf and reports
// whether it was set (pmdp_test_and_clear_young).
func (s PMDSlot) TestAndClearYoung() bool {
	e := s.Get()
	if !e.IsPresent() || !e.IsYoung() {
		return false
	}
	return PTE(s.pmd.entries[s.slot].And(^uint64(Accessed)))&Accessed != 0
}

// WriteProtect clears the write bit of a present leaf and returns the
// entry as it was (pmdp_set_wrprotect).
func (s PMDSlot) WriteProtect() PTE {
	e := s.Get()
	if !e.IsPresent() {
		return e
	}
	return PTE(s.pmd.entries[s.slot].And(^uint64(Write)))
}

// Deposit sets a PTE table aside for the slot (pgtable_trans_huge_deposit),
// so that splitting a huge leaf there, or installing a PTE table, takes it
// instead of allocating: a split that reclaim or an munmap needs then
// cannot fail for lack of memory. The table counts as a PTE table in
// Stats from now on; it stays with the slot until used, or until
// FreeEmpty frees the slot's tables. A slot that already holds a deposit
// or a PTE table needs none, and Deposit does nothing.
func (s PMDSlot) Deposit() error {
	if s.HasTable() || s.pmd.deposit[s.slot] != nil {
		return nil
	}
	if err := s.t.allocate(LevelPTE); err != nil {
		return err
	}
	if s.pmd.deposit == nil {
		s.pmd.deposit = make(map[int]*ptePage)
	}
	s.pmd.deposit[s.slot] = new(ptePage)
	return nil
}

// HasDeposit reports whether a PTE table is set aside for the slot.
func (s PMDSlot) HasDeposit() bool { return s.pmd.deposit[s.slot] != nil }

// Split replaces a present huge leaf by a PTE table of 512 entries
// mapping the same frames with the same bits (__split_huge_pmd_locked,
// without the TLB flush, which is the caller's). It uses the slot's
// deposited table if there is one, and cannot fail then. Accessed and Dirty set by
// the walker during the split reach every new entry. A slot without a
// present leaf is ErrInvalid.
func (s PMDSlot) Split() error {
	e := s.Get()
	if !e.IsHuge() {
		return fmt.Errorf("pagetable: split %#x: %v is not a huge leaf: %w", s.base, e, ErrInvalid)
	}
	page, err := s.t.depositedOrNew(s.pmd, s.slot)
	if err != nil {
		return err
	}
	small := e.Without(Huge)
	for i := range page {
		page[i].Store(uint64(small.WithPFN(e.PFN() + uint64(i))))
	}
	// Publish the table before clearing the leaf: a walker that reads the
	// PMD entry as zero must find the table.
	// The new table's lock is held until the late A/D bits are in, so no
	// locked operation sees the table half made.
	ptl := newPTLock()
	ptl.lock.Lock()
	defer ptl.lock.Unlock()
	ptl.nr = Entries
	s.pmd.ptl[s.slot].Store(ptl)
	s.pmd.next[s.slot].Store(page)
	final := PTE(s.pmd.entries[s.slot].Swap(0))
	if late := final &^ e & (Accessed | Dirty); late != 0 {
		for i := range page {
			page[i].Or(uint64(late))
		}
	}
	return nil
}

// Unlock releases the PMD lock.
func (s PMDSlot) Unlock() { s.pmd.lock.Unlock() }

func (s PMDSlot) account(old, e PTE) {
	switch {
	case old == 0 && e != 0:
		s.pmd.present.set(s.slot)
		s.pmd.count++
	case old != 0 && e == 0:
		s.pmd.present.clear(s.slot)
		s.pmd.count--
	}
}

// LockPMD locks the PMD slot covering va and returns it. With alloc the
// tables down to the PMD level are created as needed; without, ok is
// false if they do not exist.
func (t *Table) LockPMD(va uint64, alloc bool) (s PMDSlot, ok bool, err error) {
	if !canonical(va) {
		return PMDSlot{}, false, fmt.Errorf("pagetable: lock PMD of %#x: %w", va, ErrInvalid)
	}
	for {
		pmd, err := t.pmdOf(va, alloc)
		if err != nil || pmd == nil {
			return PMDSlot{}, false, err
		}
		pmd.lock.Lock()
		if pmd.dead {
			pmd.lock.Unlock()
			continue
		}
		return PMDSlot{t: t, pmd: pmd, slot: pmdIndex(va), base: va &^ (HugeSize - 1)}, true, nil
	}
}
