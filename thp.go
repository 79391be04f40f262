package gomm

import (
	"fmt"
	"runtime"
	"sync/atomic"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
)

// THPMode says when anonymous memory is mapped with 2 MiB leaves
// (/sys/kernel/mm/transparent_hugepage/enabled).
type THPMode int

// THP modes. The zero value is THPMadvise, the common distribution
// default.
const (
	THPMadvise THPMode = iota // only in VMAs given MadvHugePage
	THPAlways                 // in every eligible VMA not given MadvNoHugePage
	THPNever                  // never
)

func (m THPMode) String() string {
	switch m {
	case THPMadvise:
		return "madvise"
	case THPAlways:
		return "always"
	case THPNever:
		return "never"
	}
	return fmt.Sprintf("THPMode(%d)", int(m))
}

// THPStats count transparent huge page events, as /proc/vmstat's thp_*
// lines do.
type THPStats struct {
	FaultAlloc    uint64 // huge pages mapped by a fault (thp_fault_alloc)
	FaultFallback uint64 // eligible faults that found no free aligned block (thp_fault_fallback)
	SplitPMD      uint64 // huge leaves split into 512 entries (thp_split_pmd)
	CopiedOnFork  uint64 // huge leaves shared with a child by fork
	Reused        uint64 // write faults that took over a huge page nobody else maps
}

type thpCounters struct {
	faultAlloc, faultFallback, splitPMD, copiedOnFork, reused atomic.Uint64
}

func (c *thpCounters) snapshot() THPStats {
	return THPStats{
		FaultAlloc:    c.faultAlloc.Load(),
		FaultFallback: c.faultFallback.Load(),
		SplitPMD:      c.splitPMD.Load(),
		CopiedOnFork:  c.copiedOnFork.Load(),
		Reused:        c.reused.Load(),
	}
}

// hugeEligible reports whether a fault at page of v may map the whole
// aligned 2 MiB around it with one leaf (thp_vma_allowable_order):
// private anonymous memory, the mode and the VMA's advice allow it, and
// the VMA covers the whole aligned range.
func (mm *MM) hugeEligible(v *vma, page uint64) bool {
	switch mode := mm.m.cfg.THP; {
	case mode == THPNever, !v.anonymous() || v.shared():
		return false
	case v.Flags()&rmap.VMNoHugePage != 0:
		return false
	case mode == THPMadvise && v.Flags()&rmap.VMHugePage == 0:
		return false
	}
	base := page &^ (pagetable.HugeSize - 1)
	return base >= v.Start && base+pagetable.HugeSize <= v.End
}

// hasPTETable reports whether a PTE table covers page, so that a fault
// there can only be a 4 KiB one.
func (mm *MM) hasPTETable(page uint64) bool {
	_, level := mm.table.Lookup(page)
	return level == pagetable.LevelPTE
}

// hugeFault handles a fault at page whose PMD slot holds no PTE table
// (do_huge_pmd_anonymous_page, do_huge_pmd_wp_page): an empty slot in an
// eligible VMA gets a new zeroed huge page; a huge leaf is fixed up in
// place, reused for a write when nobody else maps its frames, or split so
// that the 4 KiB path copies the one page written. handled false sends
// the fault down the 4 KiB path, as VM_FAULT_FALLBACK does.
func (mm *MM) hugeFault(v *vma, page uint64, write bool) (handled bool, err error) {
	base := page &^ (pagetable.HugeSize - 1)
	for {
		s, _, err := mm.table.LockPMD(base, true)
		if err != nil {
			return false, nil // the 4 KiB path allocates with reclaim
		}
		e := s.Get()
		switch {
		case s.HasTable():
			s.Unlock()
			return false, nil
		case !e.IsPresent() && !e.IsNone():
			s.Unlock() // gomm makes no PMD swap or migration entries
			return false, fmt.Errorf("gomm: fault at %#x: PMD entry %v cannot be faulted in: %w", page, e, ErrFault)
		case e.IsNone():
			s.Unlock()
			if !mm.hugeEligible(v, page) {
				return false, nil
			}
			installed, raced := mm.newHugeAnon(v, base)
			if installed {
				return true, nil
			}
			if !raced {
				return false, nil
			}
			continue
		}
		// A huge leaf: add rights the VMA grants but the leaf lacks
		// since a PROT_NONE or non-exec spell.
		if fixed := e.Without(pagetable.User|pagetable.NoExec) | v.prot.leafBits(); fixed != e {
			_, _ = s.Set(fixed)
			e = fixed
		}
		switch {
		case !write || e.IsWritable():
			s.Unlock() // spurious: resolved meanwhile, or a stale TLB
			return true, nil
		case mm.m.hugeReusable(e):
			_, _ = s.Set(e.With(pagetable.Write | pagetable.Dirty | pagetable.Accessed))
			s.Unlock()
			mm.m.thp.reused.Add(1)
			return true, nil
		}
		// Shared with a fork, or partly KSM or swap-cache: copy only the
		// page written, as the kernel has done since it stopped copying
		// whole huge pages on COW. The split keeps every translation, so
		// neither a flush nor an invalidation is needed for it; the copy
		// does both for the page it replaces.
		err = s.Split()
		s.Unlock()
		if err != nil {
			return false, fmt.Errorf("gomm: splitting the huge page at %#x for a write: %w", base, err)
		}
		mm.m.thp.splitPMD.Add(1)
		return false, nil
	}
}

// hugeReusable reports whether a write may take over every frame of the
// read-only huge leaf e: each anonymous, mapped once, and neither KSM nor
// in the swap cache. Called under the PMD lock.
func (m *Machine) hugeReusable(e pagetable.PTE) bool {
	if e&pagetable.Special != 0 {
		return false
	}
	for i := range uint64(pagetable.Entries) {
		f, err := m.ram.Frame(physmem.PFN(e.PFN() + i))
		if err != nil || !f.Has(physmem.FlagAnon) || f.Has(physmem.FlagKSM) || f.Has(physmem.FlagSwapCache) || f.MapCount() != 1 {
			return false
		}
	}
	return true
}

// newHugeAnon allocates a zeroed huge page and maps it writable at base
// with a deposited page table for its later split. installed false with
// raced true means the slot changed meanwhile; with raced false there is
// no huge page to be had (no free aligned block, or no frame for the
// deposit) and the fault falls back.
func (mm *MM) newHugeAnon(v *vma, base uint64) (installed, raced bool) {
	av := mm.anonVMA(v)
	var head *physmem.Frame
	var err error
	if mm.m.shouldFail(InjectFrame) {
		err = errInjected("huge page")
	} else {
		head, err = mm.m.ram.AllocHuge()
	}
	if err != nil {
		mm.m.thp.faultFallback.Add(1)
		return false, false
	}
	frame := func(i uint64) *physmem.Frame {
		f, _ := mm.m.ram.Frame(head.PFN() + physmem.PFN(i))
		return f
	}
	for i := range uint64(pagetable.Entries) {
		f := frame(i)
		f.SetFlags(physmem.FlagAnon | physmem.FlagSwapBacked | physmem.FlagUptodate)
		// As in allocAnon: a holder of a stale frame number may read the
		// mapping under the page lock.
		for !f.TryLock() {
			runtime.Gosched()
		}
		f.SetMapping(av, v.Index(base+i*PageSize))
		f.Unlock()
	}
	giveUp := func(fallback bool) (bool, bool) {
		for i := range uint64(pagetable.Entries) {
			_ = mm.m.ram.Put(frame(i))
		}
		if fallback {
			mm.m.thp.faultFallback.Add(1)
		}
		return false, !fallback
	}
	for i := range uint64(pagetable.Entries) {
		// On the LRU before the leaf can be visible, as in mapNewAnon.
		mm.m.lru.add(frame(i), true)
	}
	s, _, err := mm.table.LockPMD(base, true)
	if err != nil {
		return giveUp(true)
	}
	if !s.Get().IsNone() || s.HasTable() {
		s.Unlock()
		return giveUp(false)
	}
	if err := s.Deposit(); err != nil {
		s.Unlock()
		return giveUp(true)
	}
	for i := range uint64(pagetable.Entries) {
		frame(i).IncMapCount() // the allocation's reference becomes the leaf's
	}
	e := anonPTE(v, head).With(pagetable.Huge)
	if v.prot&ProtWrite == 0 {
		// A read fault in read-only memory: the leaf must not let a
		// store through.
		e = e.Without(pagetable.Write | pagetable.Dirty)
	}
	_, _ = s.Set(e)
	s.Unlock()
	mm.addRSS(noCPU, pagetable.Entries)
	mm.m.thp.faultAlloc.Add(1)
	return true, false
}
