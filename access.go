package gomm

import (
	"errors"
	"fmt"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
)

// ReadAt copies len(p) bytes of the address space from va into p, faulting
// pages in as needed, without going through any CPU's TLB
// (access_process_vm, as ptrace and /proc/PID/mem do). It returns how many
// bytes were copied; a page that cannot be read stops it with ErrFault.
func (mm *MM) ReadAt(p []byte, va uint64) (int, error) {
	return mm.access(p, va, pagetable.AccessRead)
}

// WriteAt copies p into the address space at va, like ReadAt.
func (mm *MM) WriteAt(p []byte, va uint64) (int, error) {
	return mm.access(p, va, pagetable.AccessWrite)
}

// GetUserPage returns the frame mapped at va with a reference held,
// faulting it in first if needed, for a write (breaking copy-on-write)
// when write is set (get_user_pages_unlocked of one page, without
// FOLL_PIN). The reference keeps the frame from being freed, not from
// being unmapped, swapped or migrated away: a driver that keeps the
// translation after dropping it must drop it again when an invalidation
// covers va, which is what KVM does. Drop the reference with
// m.RAM().Put. An address outside every mapping, or one whose protection
// forbids the access, is ErrFault; an exited MM is ErrClosed.
func (mm *MM) GetUserPage(va uint64, write bool) (*physmem.Frame, error) {
	if va >= TaskSize {
		return nil, fmt.Errorf("gomm: get user page at %#x: %w", va, ErrFault)
	}
	acc := pagetable.AccessRead
	if write {
		acc = pagetable.AccessWrite
	}
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	if err := mm.checkOpen(); err != nil {
		return nil, err
	}
	return mm.getPage(va, acc)
}

func (mm *MM) access(p []byte, va uint64, acc pagetable.Access) (int, error) {
	if va+uint64(len(p)) < va || va+uint64(len(p)) > TaskSize {
		return 0, fmt.Errorf("gomm: access of %d bytes at %#x: %w", len(p), va, ErrFault)
	}
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	if err := mm.checkOpen(); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		f, err := mm.getPage(va, acc)
		if err != nil {
			return done, err
		}
		off := int(va & (PageSize - 1))
		n := min(len(p)-done, PageSize-off)
		if acc&pagetable.AccessWrite != 0 {
			_, err = f.WriteAt(p[done:done+n], off)
			f.SetFlags(physmem.FlagDirty) // set_page_dirty_lock: the entry's bit is not set
		} else {
			_, err = f.ReadAt(p[done:done+n], off)
		}
		if perr := mm.m.ram.Put(f); err == nil {
			err = perr
		}
		if err != nil {
			return done, err
		}
		done += n
		va += uint64(n)
	}
	return done, nil
}

// getPage returns the frame mapped at va with a reference held, faulting
// it in for the access first if needed (get_user_pages of one page).
// Called with mmap_lock held.
func (mm *MM) getPage(va uint64, acc pagetable.Access) (*physmem.Frame, error) {
	v := mm.vmas.lookup(va)
	if v == nil {
		return nil, fmt.Errorf("gomm: %v at %#x: no mapping: %w", acc, va, ErrFault)
	}
	if !v.prot.allows(acc) {
		return nil, fmt.Errorf("gomm: %v at %#x: mapping is %v: %w", acc, va, v.prot, ErrFault)
	}
	write := acc&pagetable.AccessWrite != 0
	// Look first and fault only when the page is not there as needed
	// (follow_page_mask, then faultin_page).
	for range 8 {
		f, err := mm.mappedPage(va, write)
		if err != nil || f != nil {
			return f, err
		}
		if err := mm.faultLocked(v, va, acc, noCPU); err != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("gomm: %v at %#x: page keeps going away: %w", acc, va, ErrFault)
}

// mappedPage takes a reference on the frame mapped at va, 4 KiB entry or
// huge leaf, if the entry allows the access; nil if not. The entry's lock
// is held meanwhile, so the frame cannot be freed and reused in between.
func (mm *MM) mappedPage(va uint64, write bool) (*physmem.Frame, error) {
	var e pagetable.PTE
	pt, ok, err := mm.table.LockPTE(va)
	switch {
	case errors.Is(err, pagetable.ErrBusy):
		s, sok, serr := mm.table.LockPMD(va, false)
		if serr != nil || !sok {
			return nil, serr
		}
		defer s.Unlock()
		e = s.Get()
	case err != nil:
		return nil, err
	case !ok:
		return nil, nil
	default:
		defer pt.Unlock()
		e = pt.Get(pt.Index(va))
	}
	if !e.IsPresent() || write && !e.IsWritable() {
		return nil, nil
	}
	f, err := mm.m.ram.Frame(physmem.PFN(e.PFNAt(va)))
	if err != nil || !mm.m.ram.TryGet(f) {
		return nil, nil
	}
	return f, nil
}
