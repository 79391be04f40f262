package gomm

import (
	"fmt"

	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
)

// Mprotect changes the protection of [addr, addr+length) (mprotect(2)).
// The whole range must be mapped (else ErrNoMem, and nothing changes).
// VMAs are split at the edges and merged with equal neighbours. Present
// entries lose the rights the new protection lacks, and then every TLB is
// flushed of the range before Mprotect returns; rights are never added to
// entries (an upgrade needs no flush: the next write faults and gets
// them).
func (mm *MM) Mprotect(addr, length uint64, prot Prot) error {
	start, end, err := checkRange("mprotect", addr, length)
	if err != nil {
		return err
	}
	if prot&^protMask != 0 {
		return fmt.Errorf("gomm: mprotect prot %#x: %w", uint8(prot), ErrInvalid)
	}
	mm.mmapLock.Lock()
	defer mm.mmapLock.Unlock()
	if err := mm.checkMapped("mprotect", start, end); err != nil {
		return err
	}
	vs, err := mm.isolate(start, end)
	if err != nil {
		return err
	}
	since := mm.m.chk.BeginDowngrade()
	revoked := ProtNone
	for _, v := range vs {
		revoked |= v.prot &^ prot
		v.setProt(prot)
	}
	if revoked != ProtNone {
		r := mm.invalidateStart(start, end, notifier.EventProtectionVMA)
		mm.changeProtection(start, end, prot)
		mm.m.sys.FlushRange(mm.ctx, start, end, pagetable.PageShift, false)
		mm.invalidateEnd(r)
	}
	mm.mergeAround(start, end)
	if revoked != ProtNone {
		// Only read and write rights are tracked by the checker; taking
		// away read (PROT_NONE) revokes every access.
		writeOnly := prot != ProtNone
		mm.m.chk.EndDowngrade("mprotect", mm.ID(), start, end, since, writeOnly)
	}
	return nil
}

// changeProtection rewrites the present entries of [start, end) for prot
// (change_protection): rights prot lacks are removed, none added. Huge
// leaves the range only partly covers are split.
func (mm *MM) changeProtection(start, end uint64, prot Prot) {
	want := prot.leafBits()
	fix := func(e pagetable.PTE) pagetable.PTE {
		if prot&ProtWrite == 0 {
			e = e.Without(pagetable.Write)
		}
		if want&pagetable.User == 0 {
			e = e.Without(pagetable.User)
		}
		return e.Without(pagetable.NoExec) | want&pagetable.NoExec
	}
	_ = mm.table.Range(start, end, pagetable.RangeFuncs{
		PTEs: func(pt pagetable.PTETable, first, last int) bool {
			for i := first; i < last; i++ {
				for {
					e := pt.Get(i)
					if pfn, held := e.HeldFrame(); held {
						if e.IsDeviceExclusive() {
							// The device has let go (the invalidation is
							// open): the page is mapped again, as asked.
							pt.Set(i, fix(pagetable.NewPTE(pfn, want|pagetable.Write|pagetable.Accessed|pagetable.Dirty)))
						} else if prot&ProtWrite == 0 && e.IsSwapWritable() {
							pt.Set(i, pagetable.NewDevicePrivatePTE(pfn, false))
						}
						break
					}
					if !e.IsPresent() || pt.CompareAndSet(i, e, fix(e)) {
						break
					}
				}
			}
			return true
		},
		PMD: func(s pagetable.PMDSlot) bool {
			// isolate left only leaves the range covers whole.
			if e := s.Get(); e.IsPresent() {
				_, _ = s.Set(fix(e))
			}
			return true
		},
	})
}

// splitHugeAt splits the huge leaf around addr unless addr is its first
// page (split_huge_pmd_address).
func (mm *MM) splitHugeAt(addr uint64) error {
	if addr&(pagetable.HugeSize-1) == 0 {
		return nil
	}
	return mm.splitHuge(addr)
}

// splitHuge splits the huge leaf mapping addr, if one does
// (split_huge_pmd).
func (mm *MM) splitHuge(addr uint64) error {
	base := addr &^ (pagetable.HugeSize - 1)
	s, ok, err := mm.table.LockPMD(base, false)
	if err != nil || !ok {
		return nil
	}
	defer s.Unlock()
	if !s.Get().IsHuge() {
		return nil
	}
	if err := s.Split(); err != nil {
		return fmt.Errorf("gomm: splitting the huge page at %#x: %w", base, err)
	}
	mm.m.thp.splitPMD.Add(1)
	return nil
}

// Madvise advice values, with Linux's numbers.
type Advice int

// Advice.
const (
	MadvNormal      Advice = 0
	MadvRandom      Advice = 1
	MadvSequential  Advice = 2
	MadvWillNeed    Advice = 3
	MadvDontNeed    Advice = 4
	MadvFree        Advice = 8
	MadvMergeable   Advice = 12
	MadvUnmergeable Advice = 13
	MadvHugePage    Advice = 14
	MadvNoHugePage  Advice = 15
)

// Madvise gives advice about [addr, addr+length) (madvise(2)). The range
// must be mapped without holes (else ErrNoMem and nothing is done;
// Linux applies the advice to the mapped parts before failing).
//
//   - MadvDontNeed zaps the range: the pages are freed (after the TLB
//     flush) and the next access sees zeros. It runs under mmap_lock for
//     read, so two may overlap: the race the nested-gather fix closes.
//   - MadvFree marks the range's exclusive anonymous pages lazily freeable:
//     their entries are cleaned and flushed, the frames lose Dirty and
//     SwapBacked, and reclaim may drop them unless they are written again.
//   - MadvMergeable lets KSM merge the range's anonymous private pages with
//     identical ones (VM_MERGEABLE) and puts the MM on the scanner's list;
//     MadvUnmergeable takes the flag away and gives every merged page of
//     the range back a private copy (file and shared mappings are left
//     alone by both, as in Linux).
//   - MadvHugePage lets faults in the range's private anonymous memory
//     map whole aligned 2 MiB ranges with one huge leaf when the machine's
//     THP mode is THPMadvise (VM_HUGEPAGE); MadvNoHugePage forbids it
//     whatever the mode (VM_NOHUGEPAGE). Each clears the other; huge
//     pages already mapped stay.
//   - MadvNormal, MadvRandom, MadvSequential and MadvWillNeed are accepted
//     and change nothing (there is no readahead to tune).
func (mm *MM) Madvise(addr, length uint64, advice Advice) error {
	start, end, err := checkRange("madvise", addr, length)
	if err != nil {
		return err
	}
	switch advice {
	case MadvNormal, MadvRandom, MadvSequential, MadvWillNeed, MadvDontNeed, MadvFree:
	case MadvMergeable, MadvUnmergeable:
		return mm.setMergeable(start, end, advice == MadvMergeable)
	case MadvHugePage:
		return mm.setVMAFlags("madvise", start, end, rmap.VMHugePage, rmap.VMNoHugePage)
	case MadvNoHugePage:
		return mm.setVMAFlags("madvise", start, end, rmap.VMNoHugePage, rmap.VMHugePage)
	default:
		return fmt.Errorf("gomm: madvise advice %d: %w", advice, ErrInvalid)
	}
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	if err := mm.checkMapped("madvise", start, end); err != nil {
		return err
	}
	switch advice {
	case MadvDontNeed:
		return mm.dontNeed(start, end)
	case MadvFree:
		mm.lazyFree(start, end)
	}
	return nil
}

// setVMAFlags sets and clears VMA flags over [start, end), which must be
// mapped without holes, splitting VMAs at the edges and merging what the
// change made alike.
func (mm *MM) setVMAFlags(op string, start, end uint64, set, clear rmap.VMFlags) error {
	mm.mmapLock.Lock()
	defer mm.mmapLock.Unlock()
	return mm.updateVMAsLocked(op, start, end, func(v *vma) {
		v.ClearFlags(clear)
		v.SetFlags(set)
	})
}

// updateVMAsLocked applies change to the VMAs of [start, end), which must
// be mapped without holes, splitting VMAs at the edges first and merging
// what the change made alike afterwards (the madvise/mlock VMA walk).
// Called with mmap_lock held for write.
func (mm *MM) updateVMAsLocked(op string, start, end uint64, change func(*vma)) error {
	if err := mm.checkMapped(op, start, end); err != nil {
		return err
	}
	vs, err := mm.isolate(start, end)
	if err != nil {
		return err
	}
	for _, v := range vs {
		change(v)
	}
	mm.mergeAround(start, end)
	return nil
}

func (mm *MM) dontNeed(start, end uint64) error { return mm.zapRange("madvise(DONTNEED)", start, end) }

// zapRange frees the pages mapped in [start, end) and leaves the VMAs
// (zap_page_range_single): an EventClear invalidation around a gather of
// its own, and the checker told the range lost every access. The caller
// holds what keeps the VMAs and their tables alive: mmap_lock, or the
// file's i_mmap_rwsem.
func (mm *MM) zapRange(op string, start, end uint64) error {
	since := mm.m.chk.BeginDowngrade()
	r := mm.invalidateStart(start, end, notifier.EventClear)
	g := newGather(mm)
	st, err := g.Zap(start, end)
	mm.addRSS(noCPU, -int64(st.Frames))
	if ferr := g.Finish(); err == nil {
		err = ferr
	}
	mm.invalidateEnd(r)
	mm.m.chk.EndDowngrade(op, mm.ID(), start, end, since, false)
	return err
}

// lazyFree is madvise_free_pte_range: clean the entries of exclusive
// anonymous pages, flush, and let reclaim see the frames as clean and not
// swap-backed.
func (mm *MM) lazyFree(start, end uint64) {
	r := mm.invalidateStart(start, end, notifier.EventClear)
	defer mm.invalidateEnd(r)
	cleaned := false
	_ = mm.table.Range(start, end, pagetable.RangeFuncs{
		PTEs: func(pt pagetable.PTETable, first, last int) bool {
			for i := first; i < last; i++ {
				e := pt.Get(i)
				if !e.IsPresent() || e&pagetable.Special != 0 || !mm.m.reusable(e) {
					continue
				}
				for !pt.CompareAndSet(i, e, e.Without(pagetable.Dirty|pagetable.Accessed)) {
					e = pt.Get(i)
				}
				// The frame's flags change here, under the PTE lock that
				// keeps it mapped: once the lock is dropped a concurrent
				// zap may free it and a fault reuse it.
				if f, err := mm.m.ram.Frame(physmem.PFN(e.PFN())); err == nil {
					f.ClearFlags(physmem.FlagDirty | physmem.FlagSwapBacked)
				}
				cleaned = true
			}
			return true
		},
	})
	if cleaned {
		// A CPU must not keep writing through an entry cached dirty, or
		// the new data would not mark the page dirty again.
		mm.m.sys.FlushRange(mm.ctx, start, end, pagetable.PageShift, false)
	}
}
