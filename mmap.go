package gomm

import (
	"fmt"

	"github.com/gomm-dev/gomm/mmugather"
	"github.com/gomm-dev/gomm/notifier"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/rmap"
)

// MapFlags are mmap's flags (MAP_*), with Linux's values.
type MapFlags uint32

// Mmap flags.
const (
	MapShared         MapFlags = 0x01
	MapPrivate        MapFlags = 0x02
	MapFixed          MapFlags = 0x10
	MapAnonymous      MapFlags = 0x20
	MapPopulate       MapFlags = 0x8000
	MapFixedNoReplace MapFlags = 0x100000
	knownMapFlags              = MapShared | MapPrivate | MapFixed | MapAnonymous | MapPopulate | MapFixedNoReplace
	mapTypeMask                = MapShared | MapPrivate
)

// Mmap maps length bytes of anonymous memory and returns the address
// (mmap(2) with MAP_ANONYMOUS, which flags must include): private, or
// shared (MapShared: a new shared-memory file backs it, and a Fork
// shares its pages instead of copying them). addr is a hint unless
// MapFixed (replace whatever is there) or MapFixedNoReplace (fail with
// ErrExist if anything is there) is given, in which case it must be
// page-aligned. MapPopulate faults every page in before returning (a
// populate that runs out of memory still returns the mapping, as Linux
// does).
func (mm *MM) Mmap(addr, length uint64, prot Prot, flags MapFlags) (uint64, error) {
	size, err := mm.checkMmap(addr, length, prot, flags)
	if err != nil {
		return 0, err
	}
	if flags&MapAnonymous == 0 {
		return 0, fmt.Errorf("gomm: mmap without MAP_ANONYMOUS needs a file (MmapFile): %w", ErrInvalid)
	}
	var file *File
	if flags&MapShared != 0 {
		if file, err = mm.m.NewFile(size); err != nil {
			return 0, err
		}
		file.anon = true
	}
	return mm.mmapRegion(addr, size, prot, flags, file, 0)
}

// MmapFile maps length bytes of file from byte offset off (mmap(2) of a
// file descriptor): MapShared writes reach the file and every other
// mapping of it; MapPrivate copies a page on its first write. off must
// be page-aligned; pages past the end of the file fault with ErrFault
// (SIGBUS), as in Linux. The other flags are as for Mmap.
func (mm *MM) MmapFile(addr, length uint64, prot Prot, flags MapFlags, file *File, off uint64) (uint64, error) {
	size, err := mm.checkMmap(addr, length, prot, flags)
	if err != nil {
		return 0, err
	}
	switch {
	case file == nil || flags&MapAnonymous != 0:
		return 0, fmt.Errorf("gomm: mmap of a file needs the file and no MAP_ANONYMOUS: %w", ErrInvalid)
	case off%PageSize != 0 || off > MaxFileSize || size > MaxFileSize-off:
		return 0, fmt.Errorf("gomm: mmap of a file at offset %#x: %w", off, ErrInvalid)
	case file.m != mm.m:
		return 0, fmt.Errorf("gomm: mmap of another machine's file: %w", ErrInvalid)
	}
	return mm.mmapRegion(addr, size, prot, flags, file, off/PageSize)
}

// mmapRegion places and inserts the new VMA (mmap_region), then
// populates it if asked.
func (mm *MM) mmapRegion(addr, size uint64, prot Prot, flags MapFlags, file *File, pgoff uint64) (uint64, error) {
	mm.mmapLock.Lock()
	if err := mm.checkOpen(); err != nil {
		mm.mmapLock.Unlock()
		return 0, err
	}
	start, err := mm.placeLocked(addr, size, flags)
	if err != nil {
		mm.mmapLock.Unlock()
		return 0, err
	}
	if flags&MapFixed != 0 {
		since := mm.m.chk.BeginDowngrade()
		if err := mm.unmapLocked(start, start+size); err != nil {
			mm.mmapLock.Unlock()
			return 0, err
		}
		defer mm.m.chk.EndDowngrade("mmap(MAP_FIXED)", mm.ID(), start, start+size, since, false)
	}
	var vf rmap.VMFlags
	if flags&MapShared != 0 {
		vf |= rmap.VMShared
	}
	mm.insertVMA(mm.newVMA(start, start+size, prot, file, pgoff, vf))
	mm.mergeAround(start, start+size)
	if flags&MapPopulate == 0 || prot == ProtNone {
		mm.mmapLock.Unlock()
		return start, nil
	}
	mm.mmapLock.DowngradeWrite()
	defer mm.mmapLock.RUnlock()
	_ = mm.populateLocked(start, start+size) // MAP_POPULATE is best effort
	return start, nil
}

// populateLocked faults [start, end) in, stopping at the first failure
// (populate_vma_page_range): one look-up per VMA, not per page; writable
// private memory is faulted for writing, so copy-on-write is broken now
// rather than at the first store, everything else for reading; PROT_NONE
// is skipped; and a fault that mapped a huge leaf covers its 2 MiB.
// Called with mmap_lock held.
func (mm *MM) populateLocked(start, end uint64) error {
	for _, v := range mm.vmas.overlapping(start, end) {
		if v.prot == ProtNone {
			continue
		}
		acc := pagetable.AccessRead
		if v.prot&ProtWrite != 0 && !v.shared() {
			acc = pagetable.AccessWrite
		}
		for va := max(start, v.Start); va < min(end, v.End); va += PageSize {
			if err := mm.faultLocked(v, va, acc, noCPU); err != nil {
				return err
			}
			if _, level := mm.table.Lookup(va); level == pagetable.LevelPMD {
				va = va&^(pagetable.HugeSize-1) + pagetable.HugeSize - PageSize
			}
		}
	}
	return nil
}

func (mm *MM) checkMmap(addr, length uint64, prot Prot, flags MapFlags) (uint64, error) {
	fail := func(why string, err error) (uint64, error) {
		return 0, fmt.Errorf("gomm: mmap(%#x, %#x, %v, %#x): %s: %w", addr, length, prot, uint32(flags), why, err)
	}
	switch {
	case length == 0:
		return fail("zero length", ErrInvalid)
	case prot&^protMask != 0:
		return fail("unknown protection bits", ErrInvalid)
	case flags&^knownMapFlags != 0:
		return fail("unknown flags", ErrInvalid)
	case flags&mapTypeMask == 0 || flags&mapTypeMask == mapTypeMask:
		return fail("exactly one of MAP_SHARED and MAP_PRIVATE", ErrInvalid)
	case flags&(MapFixed|MapFixedNoReplace) != 0 && addr%PageSize != 0:
		return fail("unaligned fixed address", ErrInvalid)
	}
	size, ok := pageAlign(length)
	if !ok || size > TaskSize-MmapMinAddr {
		return fail("too long", ErrNoMem)
	}
	if flags&(MapFixed|MapFixedNoReplace) != 0 && (addr < MmapMinAddr || addr > TaskSize-size) {
		return fail("fixed range outside user space", ErrInvalid)
	}
	return size, nil
}

// placeLocked chooses where a new mapping of size bytes goes
// (get_unmapped_area). Called with mmap_lock held for write.
func (mm *MM) placeLocked(addr, size uint64, flags MapFlags) (uint64, error) {
	switch {
	case flags&MapFixedNoReplace != 0:
		if len(mm.vmas.overlapping(addr, addr+size)) > 0 {
			return 0, fmt.Errorf("gomm: mmap [%#x, %#x): already mapped: %w", addr, addr+size, ErrExist)
		}
		return addr, nil
	case flags&MapFixed != 0:
		return addr, nil
	}
	hint := addr &^ (PageSize - 1)
	if hint >= MmapMinAddr && hint <= TaskSize-size && len(mm.vmas.overlapping(hint, hint+size)) == 0 {
		return hint, nil
	}
	if a, ok := mm.vmas.gap(size, MmapMinAddr, TaskSize); ok {
		return a, nil
	}
	return 0, fmt.Errorf("gomm: no room for %#x bytes: %w", size, ErrNoMem)
}

// Munmap removes the mappings of [addr, addr+length) (munmap(2)): VMAs
// are split at the edges, the pages zapped into one gather, the page
// tables no mapping needs any more freed, and the TLBs flushed before any
// frame is freed. Unmapping a range with nothing mapped is not an error.
func (mm *MM) Munmap(addr, length uint64) error {
	start, end, err := checkRange("munmap", addr, length)
	if err != nil {
		return err
	}
	mm.mmapLock.Lock()
	if err := mm.checkOpen(); err != nil {
		mm.mmapLock.Unlock()
		return err
	}
	since := mm.m.chk.BeginDowngrade()
	err = mm.unmapLocked(start, end)
	mm.mmapLock.Unlock()
	mm.m.chk.EndDowngrade("munmap", mm.ID(), start, end, since, false)
	return err
}

// checkRange validates a page-aligned start and a length that rounds up
// to a range inside user space.
func checkRange(op string, addr, length uint64) (start, end uint64, err error) {
	size, ok := pageAlign(length)
	if addr%PageSize != 0 || length == 0 || !ok || addr > TaskSize || size > TaskSize-addr {
		return 0, 0, fmt.Errorf("gomm: %s(%#x, %#x): %w", op, addr, length, ErrInvalid)
	}
	return addr, addr + size, nil
}

// unmapLocked removes [start, end): detach the VMAs, zap their pages,
// unlink them from the reverse maps, free the tables between the
// neighbours, flush, free (do_vmi_munmap). Called with mmap_lock held
// for write.
func (mm *MM) unmapLocked(start, end uint64) error {
	vs, err := mm.isolate(start, end)
	if err != nil {
		return err // nothing changed yet
	}
	if len(vs) == 0 {
		return nil
	}
	for _, v := range vs {
		mm.vmas.delete(v)
	}
	return mm.zapAndFree(vs, start, end, false)
}

// zapAndFree tears down the pages of the detached VMAs vs, which covered
// parts of [start, end), takes them out of the reverse maps, and frees
// the page tables between the remaining neighbours. fullMM says the MM
// is exiting: vs is every VMA, and the gather may skip per-range work.
func (mm *MM) zapAndFree(vs []*vma, start, end uint64, fullMM bool) error {
	r := mm.invalidateStart(start, end, notifier.EventUnmap)
	defer mm.invalidateEnd(r)
	var g *mmugather.Gather
	if fullMM {
		g = newFullGather(mm)
	} else {
		g = newGather(mm)
	}
	var err error
	for _, v := range vs {
		st, zerr := g.Zap(v.Start, v.End)
		mm.addRSS(noCPU, -int64(st.Frames))
		if zerr != nil && err == nil {
			err = zerr
		}
	}
	// free_pgtables: out of the reverse maps first, so no walker can
	// reach a table about to be freed.
	for _, v := range vs {
		mm.unlinkVMA(v)
	}
	floor, ceiling := uint64(0), uint64(userCeiling)
	if p := mm.vmas.prev(start); p != nil {
		floor = p.End
	}
	if n := mm.vmas.next(end); n != nil {
		ceiling = n.Start
	}
	nfreed := 0
	if floor < ceiling {
		freed, ferr := mm.table.FreeEmpty(floor&^(PageSize-1), ceiling, nil)
		g.RemoveTables(freed...)
		nfreed = len(freed)
		if ferr != nil && err == nil {
			err = ferr
		}
	}
	if ferr := g.Finish(); ferr != nil && err == nil {
		err = ferr
	}
	mm.unchargeTables(nfreed)
	mm.m.swap.dropOrphans()
	return err
}
