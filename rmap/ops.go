package rmap

import (
	"errors"

	"github.com/gomm-dev/gomm/internal/check"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/tlb"
)

// Env is the machine the reverse-map operations act in: its RAM, its
// CPUs' flush machinery, its swap slots and, when on, the checker.
type Env struct {
	RAM   *physmem.Allocator
	TLB   *tlb.System
	Swap  SwapRefs
	Check *check.Checker // nil when off
	// OnSplit, if set, is told of every huge leaf an operation split.
	OnSplit func()
}

// SwapRefs counts the references to swap slots (swap_duplicate): each
// page-table entry that names a slot holds one.
type SwapRefs interface {
	Dup(slot uint64) error
}

// mappedAt locks the PTE table of addr in v's space and returns it with
// the entry's index if that entry maps p; ok is false (nothing locked)
// otherwise. A huge leaf mapping p there is split first
// (split_huge_pmd_address, as TTU_SPLIT_HUGE_PMD asks), so the caller
// acts on p's own entry; the split keeps every translation and uses the
// leaf's deposited table, so it needs neither a flush nor memory.
//
// A device-exclusive entry for p becomes the present entry it stands
// for: every caller has opened an invalidation of addr, so the device
// has already let go of its claim. A device-private page's entry is
// returned as it is, non-present.
func (env *Env) mappedAt(v *VMA, addr uint64, p *physmem.Frame) (pt pagetable.PTETable, i int, e pagetable.PTE, ok bool) {
	pt, ok, err := v.Space.Table().LockPTE(addr)
	if errors.Is(err, pagetable.ErrBusy) {
		// Split it, or find it split by somebody else meanwhile.
		env.splitHuge(v, addr, p)
		pt, ok, err = v.Space.Table().LockPTE(addr)
	}
	if err != nil || !ok {
		return pt, 0, 0, false
	}
	i = pt.Index(addr)
	e = pt.Get(i)
	if pfn, held := e.HeldFrame(); held && pfn == uint64(p.PFN()) {
		if e.IsDeviceExclusive() {
			e = v.RestoreExclusive(e)
			pt.Set(i, e)
		}
		return pt, i, e, true
	}
	if !e.IsPresent() || e.PFN() != uint64(p.PFN()) {
		pt.Unlock()
		return pt, 0, 0, false
	}
	return pt, i, e, true
}

// splitHuge splits the huge leaf at addr in v's space if it maps p.
func (env *Env) splitHuge(v *VMA, addr uint64, p *physmem.Frame) bool {
	s, ok, err := v.Space.Table().LockPMD(addr, false)
	if err != nil || !ok {
		return false
	}
	defer s.Unlock()
	if e := s.Get(); !hugeMaps(e, p) || s.Split() != nil {
		return false
	}
	if env.OnSplit != nil {
		env.OnSplit()
	}
	return true
}

// hugeMaps reports whether e is a huge leaf with p among its frames.
func hugeMaps(e pagetable.PTE, p *physmem.Frame) bool {
	pfn := uint64(p.PFN())
	return e.IsHuge() && pfn >= e.PFN() && pfn < e.PFN()+pagetable.Entries
}

// startRange opens a blockable invalidation of one page of v's space.
func startRange(v *VMA, addr uint64, ev notifier.Event, owner any) *notifier.Range {
	return v.Space.Notifiers().StartRange(addr, addr+pageSize, ev, owner)
}

func endRange(v *VMA, r *notifier.Range) { v.Space.Notifiers().EndRange(r) }

// clearFlush clears entry i of the locked table and flushes it from every
// CPU and, through the space's hook, every secondary TLB
// (ptep_clear_flush): once it returns nobody translates addr to the old
// frame.
func (env *Env) clearFlush(v *VMA, pt pagetable.PTETable, i int, addr uint64) pagetable.PTE {
	old := pt.GetAndClear(i)
	if !old.IsPresent() {
		return old // no TLB holds a non-present entry
	}
	env.TLB.FlushRange(v.Space.Context(), addr, addr+pageSize, pagetable.PageShift, false)
	return old
}

// UnmapResult says how TryToUnmap ended.
type UnmapResult struct {
	Unmapped  int  // entries removed
	Mlocked   bool // a VM_LOCKED mapping keeps the frame; it is now marked mlocked
	Redirtied bool // a lazily freed page was written again: it stays
	Contended bool // a TryLock walk gave up on a lock
}

// TryToUnmap removes every mapping of p (try_to_unmap), one entry at a
// time: an EventClear invalidation of the page, then clear and flush
// under the PT lock, and only then the replacement: a swap entry naming
// p's swap slot for anonymous memory (p must be in the swap cache), or
// nothing for a page-cache page or a clean lazily freed page
// (MADV_FREE), which is discarded. A dirty bit moves to the frame. Each
// removed entry drops its map count and its reference. The caller holds
// p's page lock and a reference; p is unmapped if its map count is then
// zero.
func (env *Env) TryToUnmap(p *physmem.Frame, tryLock bool) UnmapResult {
	var res UnmapResult
	if p.IsDevicePrivate() {
		return res // device memory is never reclaimed, only migrated
	}
	anon := p.Has(physmem.FlagAnon)
	c := &Control{
		TryLock: tryLock,
		Done:    func() bool { return p.MapCount() <= 0 },
		Visit: func(v *VMA, addr uint64) bool {
			if v.Flags()&VMLocked != 0 {
				res.Mlocked = true
				p.SetFlags(physmem.FlagMlocked)
				return false
			}
			r := startRange(v, addr, notifier.EventClear, nil)
			defer endRange(v, r)
			pt, i, _, ok := env.mappedAt(v, addr, p)
			if !ok {
				return true
			}
			defer pt.Unlock()
			old := env.clearFlush(v, pt, i, addr)
			var repl pagetable.PTE
			switch {
			case anon && !p.Has(physmem.FlagSwapBacked):
				// Lazily freed: discard, unless written since.
				if old.IsDirty() || p.Has(physmem.FlagDirty) {
					pt.Set(i, old)
					p.SetFlags(physmem.FlagSwapBacked)
					res.Redirtied = true
					return false
				}
			case anon:
				slot := p.Private()
				var err error
				if repl, err = pagetable.NewSwapPTE(pagetable.SwapEntry{Offset: slot}, 0); err == nil && p.Has(physmem.FlagSwapCache) {
					err = env.Swap.Dup(slot)
				}
				if err != nil || !p.Has(physmem.FlagSwapCache) {
					pt.Set(i, old)
					return false
				}
			}
			if old.IsDirty() {
				p.SetFlags(physmem.FlagDirty)
			}
			pt.Set(i, repl)
			p.DecMapCount()
			v.Space.Unmapped(p)
			_ = env.RAM.Put(p) // the caller's reference keeps it
			res.Unmapped++
			return true
		},
	}
	res.Contended = Walk(p, c)
	return res
}

// Mkclean write-protects and cleans every shared mapping of p
// (folio_mkclean), so the next write faults and dirties the page again
// before writeback can miss it: per entry an EventProtectionPage
// invalidation, then clear, flush and set the clean read-only entry. It
// returns whether any entry was dirty. The caller holds p's page lock.
func (env *Env) Mkclean(p *physmem.Frame) (dirty bool) {
	c := &Control{Visit: func(v *VMA, addr uint64) bool {
		if v.Flags()&VMShared == 0 {
			return true
		}
		r := startRange(v, addr, notifier.EventProtectionPage, nil)
		defer endRange(v, r)
		pt, i, e, ok := env.mappedAt(v, addr, p)
		if !ok {
			return true
		}
		if !e.IsWritable() && !e.IsDirty() {
			pt.Unlock()
			return true
		}
		since := env.Check.BeginDowngrade()
		old := env.clearFlush(v, pt, i, addr)
		dirty = dirty || old.IsDirty()
		pt.Set(i, old.Without(pagetable.Write|pagetable.Dirty))
		pt.Unlock()
		env.Check.EndDowngrade("page_mkclean", v.Space.ID(), addr, addr+pageSize, since, true)
		return true
	}}
	Walk(p, c)
	return dirty
}

// Referenced reports how many mappings of p were accessed since the last
// look, clearing their accessed bits (folio_referenced): a young entry is
// cleared and flushed, so the next access sets it again, and each
// secondary MMU's ClearFlushYoung is ORed in. mlocked is true if a
// VM_LOCKED mapping maps it. The caller holds p's page lock.
func (env *Env) Referenced(p *physmem.Frame, tryLock bool) (refs int, mlocked, contended bool) {
	c := &Control{TryLock: tryLock, Visit: func(v *VMA, addr uint64) bool {
		if v.Flags()&VMLocked != 0 {
			mlocked = true
			return false
		}
		young, mapped := env.testClearYoung(v, addr, p)
		if !mapped {
			return true // not mapped here: secondary MMUs mirror only what is
		}
		if v.Space.Notifiers().ClearFlushYoung(addr, addr+pageSize) {
			young = true
		}
		if young {
			refs++
		}
		return true
	}}
	contended = Walk(p, c)
	return refs, mlocked, contended
}

// testClearYoung clears the accessed bit of the entry mapping p at addr
// in v's space, flushing it if it was set so the next access sets it
// again. A huge leaf is aged as a whole, without a split
// (pmdp_clear_flush_young): its bit says whether any of its pages was
// touched.
func (env *Env) testClearYoung(v *VMA, addr uint64, p *physmem.Frame) (young, mapped bool) {
	t := v.Space.Table()
	pt, ok, err := t.LockPTE(addr)
	if errors.Is(err, pagetable.ErrBusy) {
		if young, mapped, huge := env.testClearYoungHuge(v, addr, p); huge {
			return young, mapped
		}
		pt, ok, err = t.LockPTE(addr) // split meanwhile
	}
	if err != nil || !ok {
		return false, false
	}
	defer pt.Unlock()
	i := pt.Index(addr)
	e := pt.Get(i)
	if pfn, held := e.HeldFrame(); held && pfn == uint64(p.PFN()) {
		return true, true // a device is using it for itself
	}
	if !e.IsPresent() || e.PFN() != uint64(p.PFN()) {
		return false, false
	}
	if pt.TestAndClearYoung(i) {
		env.TLB.FlushRange(v.Space.Context(), addr, addr+pageSize, pagetable.PageShift, false)
		return true, true
	}
	// A young huge leaf aged before its split left the bit on the frame.
	return p.TestAndClearFlag(physmem.FlagReferenced), true
}

// testClearYoungHuge ages the huge leaf at addr if one maps p; huge is
// false if the slot holds something else now (a split raced with us).
func (env *Env) testClearYoungHuge(v *VMA, addr uint64, p *physmem.Frame) (young, mapped, huge bool) {
	s, ok, _ := v.Space.Table().LockPMD(addr, false)
	if !ok {
		return false, false, true
	}
	defer s.Unlock()
	if s.HasTable() {
		return false, false, false
	}
	if !hugeMaps(s.Get(), p) {
		return false, false, true
	}
	if s.TestAndClearYoung() {
		env.TLB.FlushRange(v.Space.Context(), s.Base(), s.Base()+pagetable.HugeSize, pagetable.HugeShift, false)
		// The bit spoke for every page of the leaf; reclaim looks at
		// them one by one, so the others keep it as a frame flag.
		head := s.Get().PFN()
		for i := range uint64(pagetable.Entries) {
			if f, err := env.RAM.Frame(physmem.PFN(head + i)); err == nil && f != p {
				f.SetFlags(physmem.FlagReferenced)
			}
		}
		return true, true, true
	}
	return p.TestAndClearFlag(physmem.FlagReferenced), true, true
}

// TryToMigrate replaces every mapping of p with a migration entry
// (try_to_migrate): an EventMigrate invalidation carrying owner (so a
// device can tell its own migrations), clear, flush, and the entry that
// remembers whether the mapping was writable. Faults on it wait for the
// migration to finish. The caller holds p's page lock; it reports how
// many entries it replaced.
func (env *Env) TryToMigrate(p *physmem.Frame, owner any) int {
	n := 0
	c := &Control{
		Done: func() bool { return p.MapCount() <= 0 },
		Visit: func(v *VMA, addr uint64) bool {
			r := startRange(v, addr, notifier.EventMigrate, owner)
			defer endRange(v, r)
			pt, i, _, ok := env.mappedAt(v, addr, p)
			if !ok {
				return true
			}
			old := env.clearFlush(v, pt, i, addr)
			writable := old.IsWritable()
			switch {
			case !old.IsPresent(): // a device-private page: device memory is always dirty
				writable = old.IsSwapWritable()
				p.SetFlags(physmem.FlagDirty)
			case old.IsDirty():
				p.SetFlags(physmem.FlagDirty)
			}
			pt.Set(i, pagetable.NewMigrationPTE(uint64(p.PFN()), writable))
			pt.Unlock()
			p.DecMapCount()
			_ = env.RAM.Put(p)
			n++
			return true
		},
	}
	Walk(p, c)
	return n
}

// RemoveMigrationEntries points every migration entry for old at dst
// (remove_migration_ptes): dst has taken over old's mapping and
// contents, and both are locked. Each entry becomes a present, young
// mapping of dst with the VMA's protection, writable if the original
// was and the VMA still allows it, or, for a device-private dst, a
// device-private entry; each takes a map count and a reference on dst.
// It returns how many it restored.
func (env *Env) RemoveMigrationEntries(old, dst *physmem.Frame) int {
	n := 0
	want := uint64(old.PFN())
	c := &Control{Visit: func(v *VMA, addr uint64) bool {
		pt, ok, err := v.Space.Table().LockPTE(addr)
		if err != nil || !ok {
			return true
		}
		defer pt.Unlock()
		i := pt.Index(addr)
		e := pt.Get(i)
		s, isSwap := e.Swap()
		if !isSwap || !e.IsMigration() || s.Offset != want {
			return true
		}
		writable := s.Type == pagetable.SwapMigrationWrite && v.Flags()&VMWrite != 0
		ne := pagetable.NewPTE(uint64(dst.PFN()), v.PageProt()|pagetable.Accessed)
		switch {
		case dst.IsDevicePrivate():
			ne = pagetable.NewDevicePrivatePTE(uint64(dst.PFN()), writable)
		case writable:
			ne |= pagetable.Write | pagetable.Dirty
		}
		if err := env.RAM.Get(dst); err != nil {
			return false
		}
		dst.IncMapCount()
		pt.Set(i, ne)
		n++
		return true
	}}
	Walk(dst, c)
	return n
}
