package gomm

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
)

// migrateFlags are the frame flags that move with the contents.
const migrateFlags = physmem.FlagAnon | physmem.FlagSwapBacked | physmem.FlagDirty | physmem.FlagUptodate |
	physmem.FlagReferenced | physmem.FlagKSM | physmem.FlagActive

// Migrate moves the contents of frame pfn to a new frame and points
// every mapping at it (migrate_pages for one folio): each entry becomes
// a migration entry (an EventMigrate invalidation carrying owner, so a
// device driver can skip its own migrations; clear; flush), the
// contents and the page-cache or swap-cache slot move, and the
// migration entries are replaced with entries for the new frame. A fault
// on a migration entry waits for this to finish. It returns the new
// frame. A frame nobody maps, a KSM page, or a frame somebody else holds
// a reference to throughout is ErrBusy, and stays where it was.
func (m *Machine) Migrate(pfn uint64, owner any) (uint64, error) {
	f, err := m.ram.Frame(physmem.PFN(pfn))
	if err != nil {
		return 0, err
	}
	if f == m.zero || !m.ram.TryGet(f) {
		return 0, fmt.Errorf("gomm: migrate pfn %#x: not in use: %w", pfn, ErrBusy)
	}
	dst, err := m.migrate(f, migration{owner: owner, alloc: m.allocFrame})
	if err != nil {
		return 0, err
	}
	return uint64(dst.PFN()), nil
}

// migration says how migrate moves one page.
type migration struct {
	owner    any                            // tags the EventMigrate invalidations
	alloc    func() (*physmem.Frame, error) // the new frame, with one reference
	migrated func(src, dst *physmem.Frame)  // if set: runs once the mappings point at dst, before src is freed
	// tryLock gives up on a page somebody has locked rather than wait
	// for it (migrate_vma_collect's trylock): two faults migrating the
	// same page back would otherwise each hold a reference the other's
	// freeze waits for.
	tryLock bool
}

// migrate moves f as how says and consumes the caller's reference to f:
// on success f is freed with it, on failure it is dropped. It returns
// the new frame, which the caller holds no reference to.
func (m *Machine) migrate(f *physmem.Frame, how migration) (*physmem.Frame, error) {
	dst, err := how.alloc()
	if err != nil {
		_ = m.ram.Put(f)
		return nil, err
	}
	if !how.tryLock {
		f.Lock()
	} else if !f.TryLock() {
		_ = m.ram.Put(dst)
		_ = m.ram.Put(f)
		return nil, fmt.Errorf("gomm: migrate %v: locked: %w", f, ErrBusy)
	}
	mapping, _ := f.Mapping()
	file, isFile := mapping.(*rmap.File)
	inSwap := m.swap.cached(f)
	why := ""
	switch {
	case mapping == nil || f.MapCount() == 0 || (isFile && !file.Cached(f)):
		why = "not mapped"
	case f.Has(physmem.FlagKSM):
		why = "a KSM page"
	case dst.IsDevicePrivate() && (isFile || inSwap):
		// Device memory holds private anonymous pages only; a swap-cache
		// page stays in RAM for the slot that names it.
		why = "not private anonymous memory"
	}
	if why != "" {
		f.Unlock()
		_ = m.ram.Put(dst)
		_ = m.ram.Put(f)
		return nil, fmt.Errorf("gomm: migrate %v: %s: %w", f, why, ErrBusy)
	}
	_ = dst.TryLock() // new and invisible to everybody: cannot fail
	fail := func(why string) (*physmem.Frame, error) {
		m.rmapEnv.RemoveMigrationEntries(f, f) // back to the old frame
		dst.Unlock()
		_ = m.ram.Put(dst)
		f.Unlock()
		_ = m.ram.Put(f)
		return nil, fmt.Errorf("gomm: migrate %v: %s: %w", f, why, ErrBusy)
	}
	m.rmapEnv.TryToMigrate(f, how.owner)
	if f.MapCount() > 0 {
		return fail("still mapped")
	}
	// folio_ref_freeze: ours, and the cache's if any. A fault waiting
	// for us holds one for a moment: wait for it to let go.
	refs := int32(1)
	if isFile || inSwap {
		refs = 2
	}
	frozen := false
	for range 100 {
		if frozen = m.ram.Freeze(f, refs); frozen {
			break
		}
		runtime.Gosched()
	}
	if !frozen {
		return fail("referenced")
	}
	if err := dst.CopyFrom(f); err != nil {
		m.ram.Unfreeze(f, refs)
		return fail(err.Error())
	}
	dst.SetFlags(f.Flags() & migrateFlags)
	m2, idx := f.Mapping()
	dst.SetMapping(m2, idx)
	switch {
	case isFile:
		_ = m.ram.Get(dst)
		file.Replace(f, dst)
	case inSwap:
		_ = m.ram.Get(dst)
		m.swap.replace(f, dst)
	}
	m.rmapEnv.RemoveMigrationEntries(f, dst)
	if !dst.IsDevicePrivate() {
		m.lru.add(dst, f.Has(physmem.FlagActive))
	}
	if how.migrated != nil {
		how.migrated(f, dst)
	}
	dst.Unlock()
	f.Unlock()
	// f's references, ours among them, were frozen away: free it. The
	// entries and the cache hold dst's; the allocation's goes.
	ferr := m.ram.FreeFrozen(f)
	_ = m.ram.Put(dst)
	return dst, ferr
}

// MovePages migrates the frames mapped at each of addrs to new frames
// (move_pages(2) with one node), as Migrate does, with the MM as the
// invalidations' owner. It returns how many moved; the addresses that
// could not be moved (not mapped, busy) are reported joined in err.
func (mm *MM) MovePages(addrs []uint64) (int, error) {
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	if err := mm.checkOpen(); err != nil {
		return 0, err
	}
	moved := 0
	var errs []error
	for _, va := range addrs {
		e, _ := mm.table.Lookup(va)
		if !e.IsPresent() || e&pagetable.Special != 0 || mm.vmas.lookup(va) == nil {
			errs = append(errs, fmt.Errorf("gomm: move page at %#x: nothing mapped: %w", va, ErrFault))
			continue
		}
		if _, err := mm.m.Migrate(e.PFNAt(va), mm); err != nil {
			errs = append(errs, fmt.Errorf("gomm: move page at %#x: %w", va, err))
			continue
		}
		moved++
	}
	return moved, errors.Join(errs...)
}
