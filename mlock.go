package gomm

import (
	"errors"
	"fmt"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
)

// Mlock locks [addr, addr+length) into memory (mlock(2)): the VMAs are
// marked VM_LOCKED and every page is faulted in (writable private
// mappings with a write fault, so no later copy is needed); reclaim
// leaves their frames alone. The whole range must be mapped (else
// ErrNoMem and nothing changes). A page that cannot be faulted in ends
// the population, the VMAs staying locked and the pages faulted so far
// locked, as in Linux, which also translates the error: out of memory is
// ErrAgain ("could not be locked"), a bad page ErrNoMem.
func (mm *MM) Mlock(addr, length uint64) error {
	return mm.setLocked("mlock", addr, length, true)
}

// Munlock undoes Mlock for [addr, addr+length) (munlock(2)); its frames
// go back on the LRU. A frame another locked mapping still maps is found
// again by reclaim's reverse-map walk and set aside once more.
func (mm *MM) Munlock(addr, length uint64) error {
	return mm.setLocked("munlock", addr, length, false)
}

func (mm *MM) setLocked(op string, addr, length uint64, lock bool) error {
	start, end, err := checkRange(op, addr, length)
	if err != nil {
		return err
	}
	mm.mmapLock.Lock()
	err = mm.updateVMAsLocked(op, start, end, func(v *vma) {
		if lock {
			v.SetFlags(rmap.VMLocked)
		} else {
			v.ClearFlags(rmap.VMLocked)
		}
	})
	if err != nil {
		mm.mmapLock.Unlock()
		return err
	}
	mm.mmapLock.DowngradeWrite()
	defer mm.mmapLock.RUnlock()
	if lock {
		err = mm.populateLocked(start, end)
	}
	mm.markLocked(start, end, lock)
	return mlockError(err)
}

// mlockError translates a population error as __mlock_posix_error_return
// does.
func mlockError(err error) error {
	switch {
	case errors.Is(err, ErrNoMem):
		return fmt.Errorf("gomm: mlock: %w (%v)", ErrAgain, err)
	case errors.Is(err, ErrFault):
		return fmt.Errorf("gomm: mlock: %w (%v)", ErrNoMem, err)
	}
	return err
}

// markLocked sets or clears the mlocked flag of the frames mapped in
// [start, end) (mlock_folio / munlock_folio), taking them off the LRU or
// putting them back.
func (mm *MM) markLocked(start, end uint64, lock bool) {
	mark := func(pfn uint64) {
		f, err := mm.m.ram.Frame(physmem.PFN(pfn))
		if err != nil {
			return
		}
		if lock {
			f.SetFlags(physmem.FlagMlocked)
			mm.m.lru.del(f)
		} else if f.TestAndClearFlag(physmem.FlagMlocked) {
			mm.m.lru.add(f, false)
		}
	}
	_ = mm.table.Range(start, end, pagetable.RangeFuncs{
		PMD: func(s pagetable.PMDSlot) bool {
			// The VMA split at the range's edges split any huge leaf
			// they cut, so a leaf here lies wholly inside.
			if e := s.Get(); e.IsHuge() && e&pagetable.Special == 0 {
				for i := range uint64(pagetable.Entries) {
					mark(e.PFN() + i)
				}
			}
			return true
		},
		PTEs: func(pt pagetable.PTETable, first, last int) bool {
			for i := first; i < last; i++ {
				if e := pt.Get(i); e.IsPresent() && e&pagetable.Special == 0 {
					mark(e.PFN())
				}
			}
			return true
		},
	})
}

// Mapper is one place a frame is mapped.
type Mapper struct {
	MM   *MM
	Addr uint64
}

// Mappers returns every place the frame pfn is mapped, found through its
// reverse map (an rmap walk that checks each candidate entry), in no
// particular order: present entries, and the device entries that count
// as mappings (a device-private page's, a device-exclusive one).
func (m *Machine) Mappers(pfn uint64) ([]Mapper, error) {
	f, err := m.ram.Frame(physmem.PFN(pfn))
	if err != nil {
		return nil, err
	}
	if !m.ram.TryGet(f) {
		return nil, nil
	}
	defer func() { _ = m.ram.Put(f) }()
	var out []Mapper
	f.Lock()
	defer f.Unlock()
	rmap.Walk(f, &rmap.Control{Visit: func(v *rmap.VMA, addr uint64) bool {
		e, _ := v.Space.Table().Lookup(addr)
		mapped, ok := e.MappedFrame()
		if ok && e.IsHuge() {
			mapped = e.PFNAt(addr)
		}
		if ok && mapped == pfn {
			out = append(out, Mapper{MM: (*MM)(v.Space.(*space)), Addr: addr})
		}
		return true
	}})
	return out, nil
}
