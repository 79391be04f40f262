package pagetable

import (
	"fmt"
	"math/bits"
	"sync/atomic"
	"unsafe"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/locks"
)

// Geometry of the x86-64 4-level table.
const (
	PageShift = 12
	PageSize  = 1 << PageShift // 4 KiB
	HugeShift = 21
	HugeSize  = 1 << HugeShift // 2 MiB, one PMD leaf
	// Entries is the number of entries in a table at every level.
	Entries = 512
	// VABits is the width of a canonical virtual address.
	VABits = 48

	pudShift = 30
	pgdShift = 39
	pudSize  = 1 << pudShift // 1 GiB covered by one PMD table
	pgdSize  = 1 << pgdShift // 512 GiB covered by one PUD table
	idxMask  = Entries - 1
)

// Errors returned by pagetable: the shared errno values.
var (
	ErrInvalid = errno.ErrInvalid // non-canonical or unaligned address, bad length or entry
	ErrNoMem   = errno.ErrNoMem   // a table could not be allocated
	ErrExist   = errno.ErrExist   // the slot is already populated
	ErrBusy    = errno.ErrBusy    // a huge leaf (or a table) is in the way
)

// errUnderPMD is LockPTE's answer for an address a PMD entry maps. It is
// preformatted because callers meet it on purpose (the rmap walks, GUP
// and KSM take it as "look at the PMD instead"), per 4 KiB page of a huge
// one, where a formatted error would cost more than the lock.
var errUnderPMD = fmt.Errorf("pagetable: the address is under a PMD entry: %w", ErrBusy)

// Level names a level of the table, numbered from the leaves up as in x86
// manuals.
type Level uint8

// Levels.
const (
	LevelPTE Level = 1 // 4 KiB leaves
	LevelPMD Level = 2 // 2 MiB leaves or PTE tables
	LevelPUD Level = 3 // PMD tables
	LevelPGD Level = 4 // PUD tables; the root
)

func (l Level) String() string {
	switch l {
	case LevelPTE:
		return "PTE"
	case LevelPMD:
		return "PMD"
	case LevelPUD:
		return "PUD"
	case LevelPGD:
		return "PGD"
	}
	return fmt.Sprintf("Level(%d)", uint8(l))
}

// bitmap records which of a table's 512 slots are populated, so that range
// walks skip empty slots a word at a time. Written under the lock that
// protects the slots, read locklessly.
type bitmap [Entries / 64]atomic.Uint64

func (b *bitmap) set(i int)   { b[i/64].Or(1 << (i % 64)) }
func (b *bitmap) clear(i int) { b[i/64].And(^uint64(1 << (i % 64))) }

// next returns the first set slot in [from, to), or to if none.
func (b *bitmap) next(from, to int) int {
	for from < to {
		w := b[from/64].Load() >> (from % 64)
		if w != 0 {
			i := from + bits.TrailingZeros64(w)
			return min(i, to)
		}
		from = (from/64 + 1) * 64
	}
	return to
}

// ptePage is one PTE table: exactly 4 KiB, so Go's allocator gives it a
// size class of its own with no waste.
type ptePage [Entries]atomic.Uint64

// pmdTable is a PMD table. Each slot holds a 2 MiB leaf (or a non-present
// PMD entry) in entries, or a PTE table in next, never both. A PTE table's
// split lock comes and goes with it, in ptl (the kernel's ptlock, which
// lives in or hangs off the PTE table's struct page): it is published
// before the table and cleared with it, and whoever locks ptl[i]
// re-checks that next[i] is still the table it meant.
type pmdTable struct {
	entries [Entries]atomic.Uint64           // leaf or non-present PMD entries; 0 if empty or a table
	next    [Entries]atomic.Pointer[ptePage] // PTE tables; written under lock
	ptl     [Entries]atomic.Pointer[ptlSlot] // the PTE tables' split locks; written under lock
	present bitmap                           // slots holding a table or a non-zero entry
	lock    locks.SpinLock                   // the split PMD lock: installs, removals, leaves
	count   int                              // populated slots; protected by lock
	dead    bool                             // unlinked from its PUD; protected by lock
	// deposit holds PTE tables set aside for splitting the huge leaves of
	// their slots (pgtable_trans_huge_deposit), so that a split never
	// allocates; nil until the first Deposit. Protected by lock.
	deposit map[int]*ptePage
}

// ptlSlot is one PTE table's split lock and the count it protects,
// allocated with the table (ALLOC_SPLIT_PTLOCKS) and a cache line in
// size, so that Go's allocator gives each one a line of its own: CPUs
// faulting in neighbouring 2 MiB regions take neighbouring locks, and
// packed into the PMD table each lock and count update would take the
// line from the other CPU. In the PMD table itself, a line per slot
// would cost every PMD table 32 KiB, populated or not.
type ptlSlot struct {
	lock locks.SpinLock
	nr   uint16 // non-none entries of the PTE table; protected by lock
	_    [cacheLine - unsafe.Sizeof(locks.SpinLock{}) - 2]byte
}

func newPTLock() *ptlSlot {
	s := new(ptlSlot)
	s.lock.Init(locks.ClassPTLock)
	return s
}

const cacheLine = 64

// pudTable is a PUD table; every populated slot is a PMD table.
type pudTable struct {
	next    [Entries]atomic.Pointer[pmdTable] // written under the page_table_lock
	present bitmap
	count   int  // populated slots; protected by the page_table_lock
	dead    bool // unlinked from the PGD; protected by the page_table_lock
}

// pgdTable is the root.
type pgdTable struct {
	next    [Entries]atomic.Pointer[pudTable] // written under the page_table_lock
	present bitmap
}

// Memory per table, for TableBytes.
const (
	ptePageBytes  = int64(unsafe.Sizeof(ptePage{}) + unsafe.Sizeof(ptlSlot{})) // a deposited table gets its lock when installed, and counts as if it had it
	pmdTableBytes = int64(unsafe.Sizeof(pmdTable{}))
	pudTableBytes = int64(unsafe.Sizeof(pudTable{}))
	pgdTableBytes = int64(unsafe.Sizeof(pgdTable{}))
)

// Options configure a Table.
type Options struct {
	// AllocHook, if set, is asked before every table allocation; an error
	// makes the allocation (and the operation that needed it) fail with
	// that error wrapped in ErrNoMem. Fault injection plugs in here.
	AllocHook func(Level) error
}

// Table is a 4-level page table (the pgd of an mm and everything under
// it). All methods are safe for concurrent use; see the package
// documentation for the locking rules.
type Table struct {
	pgd  pgdTable
	lock locks.SpinLock // page_table_lock: PGD and PUD slots
	opts Options

	// walkers brackets lockless walks (LocklessBegin) so that SyncWalkers
	// can wait them out before freed tables are poisoned.
	walkers locks.SRCU

	tables       [LevelPGD + 1]atomic.Int64 // live tables per level
	allocated    atomic.Uint64              // tables ever allocated
	freed        atomic.Uint64              // tables handed to callers by FreeEmpty
	poisonedSeen atomic.Uint64              // reads of poisoned entries
}

// New returns an empty table.
func New(opts Options) *Table {
	t := &Table{opts: opts}
	t.lock.Init(locks.ClassPageTableLock)
	t.tables[LevelPGD].Store(1)
	return t
}

// Stats are a table's counters.
type Stats struct {
	PTETables, PMDTables, PUDTables int64  // live tables per level
	Allocated                       uint64 // tables allocated since New
	Freed                           uint64 // tables freed by FreeEmpty
	PoisonedReads                   uint64 // walks and lookups that read a poisoned table
}

// Stats returns a snapshot of the table's counters.
func (t *Table) Stats() Stats {
	return Stats{
		PTETables:     t.tables[LevelPTE].Load(),
		PMDTables:     t.tables[LevelPMD].Load(),
		PUDTables:     t.tables[LevelPUD].Load(),
		Allocated:     t.allocated.Load(),
		Freed:         t.freed.Load(),
		PoisonedReads: t.poisonedSeen.Load(),
	}
}

// TableBytes returns the memory held by the live tables, root included.
func (t *Table) TableBytes() int64 {
	return pgdTableBytes + t.tables[LevelPUD].Load()*pudTableBytes +
		t.tables[LevelPMD].Load()*pmdTableBytes + t.tables[LevelPTE].Load()*ptePageBytes
}

// Address helpers.

func pgdIndex(va uint64) int { return int(va>>pgdShift) & idxMask }
func pudIndex(va uint64) int { return int(va>>pudShift) & idxMask }
func pmdIndex(va uint64) int { return int(va>>HugeShift) & idxMask }
func pteIndex(va uint64) int { return int(va>>PageShift) & idxMask }

// canonical reports whether va sign-extends bit 47.
func canonical(va uint64) bool {
	top := va >> (VABits - 1)
	return top == 0 || top == 1<<(64-VABits+1)-1
}

// Canonical reports whether va is a canonical 48-bit address.
func Canonical(va uint64) bool { return canonical(va) }

// checkRange validates [start, end) as a non-empty, canonical, aligned
// range that does not cross the non-canonical hole.
func checkRange(op string, start, end, align uint64) error {
	if start%align != 0 || end%align != 0 || end <= start || !canonical(start) || !canonical(end-1) ||
		(start>>(VABits-1)) != ((end-1)>>(VABits-1)) {
		return fmt.Errorf("pagetable: %s [%#x, %#x): %w", op, start, end, ErrInvalid)
	}
	return nil
}

func checkAddr(op string, va, align uint64) error {
	if va%align != 0 || !canonical(va) {
		return fmt.Errorf("pagetable: %s %#x: %w", op, va, ErrInvalid)
	}
	return nil
}

func (t *Table) allocate(l Level) error {
	if t.opts.AllocHook != nil {
		if err := t.opts.AllocHook(l); err != nil {
			return fmt.Errorf("pagetable: allocating a %v table: %w: %w", l, ErrNoMem, err)
		}
	}
	t.tables[l].Add(1)
	t.allocated.Add(1)
	return nil
}

// lockPTL locks the split lock of slot i's PTE table, which the caller
// found to be page, and returns it; nil if page was freed or replaced
// before the lock was had.
func (m *pmdTable) lockPTL(i int, page *ptePage) *ptlSlot {
	// The lock is published before its table and cleared after it: once
	// page was seen, the lock loaded now is page's, a later table's, or
	// none, and the re-check under it tells which.
	ptl := m.ptl[i].Load()
	if ptl == nil {
		return nil
	}
	ptl.lock.Lock()
	if m.next[i].Load() != page {
		ptl.lock.Unlock()
		return nil
	}
	return ptl
}

func newPMDTable() *pmdTable {
	m := new(pmdTable)
	m.lock.Init(locks.ClassPMDLock)
	return m
}

// pmdOf finds (alloc: creating as needed) the PMD table covering va.
// Without alloc it returns nil where the walk ends early.
func (t *Table) pmdOf(va uint64, alloc bool) (*pmdTable, error) {
	for {
		gi := pgdIndex(va)
		pud := t.pgd.next[gi].Load()
		if pud == nil {
			if !alloc {
				return nil, nil
			}
			if err := t.installPUD(gi); err != nil {
				return nil, err
			}
			continue
		}
		ui := pudIndex(va)
		pmd := pud.next[ui].Load()
		if pmd == nil {
			if !alloc {
				return nil, nil
			}
			if err := t.installPMD(pud, ui); err != nil {
				return nil, err
			}
			continue
		}
		return pmd, nil
	}
}

func (t *Table) installPUD(gi int) error {
	t.lock.Lock()
	defer t.lock.Unlock()
	if t.pgd.next[gi].Load() != nil {
		return nil
	}
	if err := t.allocate(LevelPUD); err != nil {
		return err
	}
	t.pgd.next[gi].Store(new(pudTable))
	t.pgd.present.set(gi)
	return nil
}

// installPMD puts a new PMD table in pud's slot ui. If pud was freed
// meanwhile it does nothing: the caller's retry finds the new state.
func (t *Table) installPMD(pud *pudTable, ui int) error {
	t.lock.Lock()
	defer t.lock.Unlock()
	if pud.dead || pud.next[ui].Load() != nil {
		return nil
	}
	if err := t.allocate(LevelPMD); err != nil {
		return err
	}
	pud.next[ui].Store(newPMDTable())
	pud.present.set(ui)
	pud.count++
	return nil
}

// installPTE puts a new PTE table in pmd's slot i unless something is
// there already or pmd was freed; the caller re-reads either way.
func (t *Table) installPTE(pmd *pmdTable, i int) error {
	pmd.lock.Lock()
	defer pmd.lock.Unlock()
	if pmd.dead || pmd.entries[i].Load() != 0 || pmd.next[i].Load() != nil {
		return nil
	}
	page, err := t.depositedOrNew(pmd, i)
	if err != nil {
		return err
	}
	pmd.ptl[i].Store(newPTLock())
	pmd.next[i].Store(page)
	pmd.present.set(i)
	pmd.count++
	return nil
}

// depositedOrNew withdraws the table deposited for pmd's slot i, or
// allocates one; the caller holds pmd's lock.
func (t *Table) depositedOrNew(pmd *pmdTable, i int) (*ptePage, error) {
	if page := pmd.deposit[i]; page != nil {
		delete(pmd.deposit, i)
		return page, nil
	}
	if err := t.allocate(LevelPTE); err != nil {
		return nil, err
	}
	return new(ptePage), nil
}

// notePoison counts a read of a poisoned entry.
func (t *Table) notePoison() { t.poisonedSeen.Add(1) }
