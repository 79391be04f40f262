package gomm

import (
	"fmt"

	"github.com/gomm-dev/gomm/notifier"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/rmap"
)

// MremapFlags are mremap's flags, with Linux's values.
type MremapFlags uint32

// Mremap flags.
const (
	MremapMayMove MremapFlags = 1
	MremapFixed   MremapFlags = 2
)

// Mremap resizes or moves the mapping at [oldAddr, oldAddr+oldLen)
// (mremap(2)); the old range must lie inside one VMA (else ErrFault).
// Shrinking unmaps the tail. Growing extends in place when the space
// after is free; otherwise, with MremapMayMove, the mapping moves: its
// page-table entries are carried to the new place, the old range is
// flushed from every TLB, and its page tables freed. MremapFixed (which
// needs MremapMayMove) moves to newAddr, replacing what is there. It
// returns the mapping's new address.
func (mm *MM) Mremap(oldAddr, oldLen, newLen uint64, flags MremapFlags, newAddr uint64) (uint64, error) {
	fail := func(why string, err error) (uint64, error) {
		return 0, fmt.Errorf("gomm: mremap(%#x, %#x, %#x, %#x, %#x): %s: %w", oldAddr, oldLen, newLen, uint32(flags), newAddr, why, err)
	}
	if flags&^(MremapMayMove|MremapFixed) != 0 || (flags&MremapFixed != 0 && flags&MremapMayMove == 0) {
		return fail("bad flags", ErrInvalid)
	}
	oldStart, oldEnd, err := checkRange("mremap", oldAddr, oldLen)
	if err != nil {
		return 0, err
	}
	size, ok := pageAlign(newLen)
	if newLen == 0 || !ok || size > TaskSize-MmapMinAddr {
		return fail("bad new length", ErrInvalid)
	}
	if flags&MremapFixed != 0 {
		if newAddr%PageSize != 0 || newAddr < MmapMinAddr || newAddr > TaskSize-size ||
			(newAddr < oldEnd && oldStart < newAddr+size) {
			return fail("bad or overlapping new address", ErrInvalid)
		}
	}
	mm.mmapLock.Lock()
	defer mm.mmapLock.Unlock()
	if err := mm.checkOpen(); err != nil {
		return 0, err
	}
	v := mm.vmas.lookup(oldStart)
	if v == nil || v.End < oldEnd {
		return fail("old range is not one mapping", ErrFault)
	}
	oldSize := oldEnd - oldStart
	switch {
	case flags&MremapFixed == 0 && size <= oldSize:
		if size < oldSize {
			since := mm.m.chk.BeginDowngrade()
			err := mm.unmapLocked(oldStart+size, oldEnd)
			mm.m.chk.EndDowngrade("mremap(shrink)", mm.ID(), oldStart+size, oldEnd, since, false)
			if err != nil {
				return 0, err
			}
		}
		return oldStart, nil
	case flags&MremapFixed == 0 && v.End == oldEnd && oldEnd <= TaskSize-(size-oldSize) &&
		len(mm.vmas.overlapping(oldEnd, oldStart+size)) == 0:
		if err := mm.splitAt(oldStart); err != nil {
			return 0, err
		}
		v = mm.vmas.lookup(oldStart)
		mm.m.anonVMAs.Adjust(&v.VMA, v.Start, oldStart+size, v.PgOff)
		mm.mergeAround(oldStart, v.End)
		return oldStart, nil
	case flags&MremapMayMove == 0:
		return fail("cannot grow in place", ErrNoMem)
	}

	// KSM pages are unmerged before they move (move_vma's ksm_madvise):
	// KSM's reverse map knows each mapping by its address and would not
	// find them at the new one. VM_MERGEABLE stays, so ksmd merges them
	// again there.
	if v.Flags()&rmap.VMMergeable != 0 {
		if err := mm.unmergeLocked(oldStart, oldStart+min(oldSize, size)); err != nil {
			return 0, err
		}
	}
	dest := newAddr
	if flags&MremapFixed == 0 {
		a, ok := mm.vmas.gap(size, MmapMinAddr, TaskSize)
		if !ok {
			return fail("no room", ErrNoMem)
		}
		dest = a
	}
	since := mm.m.chk.BeginDowngrade()
	if flags&MremapFixed != 0 {
		if err := mm.unmapLocked(dest, dest+size); err != nil {
			return 0, err
		}
	}
	moved := min(oldSize, size)
	// copy_vma: the new VMA keeps the pages' offsets and anon_vmas, so
	// the reverse maps find them at their new addresses.
	nv := v.dup(mm)
	nv.Start, nv.End, nv.PgOff = dest, dest+size, v.Index(oldStart)
	if v.anonymous() && v.AnonVMA == nil {
		nv.PgOff = dest / PageSize
	}
	_ = mm.m.anonVMAs.Clone(&nv.VMA, &v.VMA) // nv is fresh: cannot fail
	mm.insertVMA(nv)
	r := mm.invalidateStart(oldStart, oldStart+moved, notifier.EventUnmap)
	unlock := v.LockRmap()
	err = mm.movePageTables(oldStart, dest, moved)
	unlock()
	if err != nil {
		// Nothing moved; a fixed destination stays unmapped, as in Linux.
		// The destination tables made before the failure are freed.
		mm.vmas.delete(nv)
		_ = mm.zapAndFree([]*vma{nv}, dest, dest+size, false)
		mm.invalidateEnd(r)
		mm.m.chk.EndDowngrade("mremap(move failed)", mm.ID(), dest, dest+size, since, false)
		return 0, err
	}
	mm.m.sys.FlushRange(mm.ctx, oldStart, oldStart+moved, pagetable.PageShift, false)
	mm.invalidateEnd(r)
	// The old range is now empty of entries: remove its VMA part and the
	// tables nobody needs; anything past what moved is unmapped.
	err = mm.unmapLocked(oldStart, oldEnd)
	mm.mergeAround(dest, dest+size)
	mm.m.chk.EndDowngrade("mremap(move)", mm.ID(), oldStart, oldEnd, since, false)
	if err != nil {
		return 0, err
	}
	return dest, nil
}

// movePageTables moves the entries of [from, from+n) to [to, to+n)
// (move_page_tables), all or nothing: first huge leaves are split and the
// populated entries found (through Range, so the cost follows what is
// populated, not the size), then every destination table is allocated,
// and only then are entries moved, which cannot fail. An error from the
// first two steps leaves every entry where it was. The caller holds
// mmap_lock for write, so no table is freed meanwhile, and flushes the old
// range afterwards. Rmap state is unchanged: each frame keeps its one
// mapping.
func (mm *MM) movePageTables(from, to, n uint64) error {
	var offs []uint64
	var err error
	rerr := mm.table.Range(from, from+n, pagetable.RangeFuncs{
		PMD: func(s pagetable.PMDSlot) bool {
			if s.Get().IsHuge() {
				err = s.Split()
			}
			return err == nil
		},
		PTEs: func(pt pagetable.PTETable, first, last int) bool {
			for i := first; i < last; i++ {
				if !pt.Get(i).IsNone() {
					offs = append(offs, pt.VA(i)-from)
				}
			}
			return true
		},
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return err
	}
	lastTable := ^uint64(0)
	for _, off := range offs {
		if base := (to + off) &^ (pagetable.HugeSize - 1); base != lastTable {
			dst, aerr := mm.table.AllocLockPTE(to + off)
			if aerr != nil {
				return aerr
			}
			dst.Unlock()
			lastTable = base
		}
	}
	// A source table at a time: its entries come out under its lock,
	// then go in under each destination table's (at most two), so two
	// PTE locks are never held at once.
	var moving [pagetable.Entries]movedEntry
	for k := 0; k < len(offs); {
		table := (from + offs[k]) &^ (pagetable.HugeSize - 1)
		src, _, lerr := mm.table.LockPTE(from + offs[k])
		if lerr != nil {
			return lerr // cannot happen: nothing frees tables under mmap_lock
		}
		n := 0
		for ; k < len(offs) && (from+offs[k])&^(pagetable.HugeSize-1) == table; k++ {
			moving[n] = movedEntry{off: offs[k], e: src.GetAndClear(src.Index(from + offs[k]))}
			n++
		}
		src.Unlock()
		if err := mm.installMoved(to, moving[:n]); err != nil {
			return err
		}
	}
	return nil
}

// movedEntry is an entry on its way from one address to another,
// off bytes into the range.
type movedEntry struct {
	off uint64
	e   pagetable.PTE
}

// installMoved sets the moved entries at to+off, taking each destination
// table's lock once; the tables were allocated beforehand.
func (mm *MM) installMoved(to uint64, moved []movedEntry) error {
	for j := 0; j < len(moved); {
		dst, err := mm.table.AllocLockPTE(to + moved[j].off)
		if err != nil {
			return err // cannot happen: the table was allocated above
		}
		table := (to + moved[j].off) &^ (pagetable.HugeSize - 1)
		for ; j < len(moved) && (to+moved[j].off)&^(pagetable.HugeSize-1) == table; j++ {
			dst.Set(dst.Index(to+moved[j].off), moved[j].e)
		}
		dst.Unlock()
	}
	return nil
}
