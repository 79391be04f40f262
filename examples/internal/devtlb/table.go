package devtlb

import "github.com/gomm-dev/gomm/pagetable"

// Table is a device page table (shadow or importer table) whose
// reverse index stays exact because entries only go in through Install
// and out through Unmap: replacing an entry un-indexes the old frame,
// which a hand-kept index easily forgets when two faults install the
// same page.
type Table struct {
	pt  *pagetable.Table
	idx PFNIndex
}

// NewTable returns an empty table.
func NewTable() *Table {
	return &Table{pt: pagetable.New(pagetable.Options{}), idx: PFNIndex{}}
}

// Install sets the 4 KiB entry at va and returns the one it replaced.
func (t *Table) Install(va uint64, e pagetable.PTE) (pagetable.PTE, error) {
	old, err := t.pt.Set(va, e)
	if err != nil {
		return 0, err
	}
	if old.IsPresent() {
		t.idx.Remove(old.PFN())
	}
	if e.IsPresent() {
		t.idx.Add(e.PFN())
	}
	return old, nil
}

// Unmap clears [start, end) and returns how many present entries went.
func (t *Table) Unmap(start, end uint64) int {
	n := 0
	_, _ = t.pt.UnmapRange(start, end, func(_ uint64, old pagetable.PTE) {
		if old.IsPresent() {
			t.idx.Remove(old.PFN())
			n++
		}
	})
	return n
}

// Lookup returns the entry at va.
func (t *Table) Lookup(va uint64) pagetable.PTE {
	e, _ := t.pt.Lookup(va)
	return e
}

// Walk translates va for acc as the device's walker does.
func (t *Table) Walk(va uint64, acc pagetable.Access) pagetable.Translation {
	return t.pt.Walk(va, acc)
}

// Cached answers gomm.Cache.CachedPFN.
func (t *Table) Cached(pfn uint64) (string, bool) { return t.idx.Cached(pfn) }

// Mapped returns how many present entries the table holds.
func (t *Table) Mapped() int { return t.idx.Total() }
