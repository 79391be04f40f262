package gomm

import (
	"errors"
	"sync/atomic"

	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
)

// ReclaimStats count what reclaim did, since the machine started when
// returned by Stats, or in one call when returned by Reclaim.
type ReclaimStats struct {
	Scanned     uint64 // frames looked at
	Freed       uint64 // frames freed
	SwappedOut  uint64 // anonymous pages written to swap
	WrittenBack uint64 // dirty file pages written back
	Discarded   uint64 // clean lazily freed or file pages dropped
	Activated   uint64 // referenced frames given another round
	Unevictable uint64 // mlocked frames taken off the LRU
	Busy        uint64 // frames somebody held or locked
}

type reclaimCounters struct {
	scanned, freed, swappedOut, writtenBack, discarded, activated, unevictable, busy atomic.Uint64
}

func (c *reclaimCounters) snapshot() ReclaimStats {
	return ReclaimStats{
		Scanned: c.scanned.Load(), Freed: c.freed.Load(), SwappedOut: c.swappedOut.Load(),
		WrittenBack: c.writtenBack.Load(), Discarded: c.discarded.Load(), Activated: c.activated.Load(),
		Unevictable: c.unevictable.Load(), Busy: c.busy.Load(),
	}
}

// Reclaim tries to free n frames (try_to_free_pages): it scans the LRU
// from the inactive tail, gives referenced frames (young in a CPU's page
// table or in a secondary MMU's) another round on the active list,
// writes anonymous pages to swap and dirty file pages back, unmaps each
// through the reverse map (invalidating every secondary MMU, flushing
// every TLB) and frees it. Mlocked frames leave the LRU. It returns what
// it did; freeing fewer than n is not an error.
func (m *Machine) Reclaim(n int) ReclaimStats {
	var st reclaimCounters
	m.lru.drainAll() // a page still queued on a CPU's batch is not on a list yet
	inactive, active := m.lru.lens()
	budget := 2 * (inactive + active)
	// Frames that stay inactive go back on the list only when the scan
	// is over (shrink_folio_list's putback after the batch): put back at
	// once, a busy frame would be the next one isolated, again and again.
	var putback []*physmem.Frame
	for scanned := 0; int(st.freed.Load()) < n && scanned < budget; scanned++ {
		pfn := m.lru.isolateTail()
		if pfn == 0 {
			break
		}
		f, err := m.ram.Frame(physmem.PFN(pfn - 1))
		if err != nil || !m.ram.TryGet(f) {
			continue // being freed
		}
		st.scanned.Add(1)
		if m.shrink(f, &st) {
			putback = append(putback, f)
		}
	}
	for _, f := range putback {
		m.lru.add(f, false)
		_ = m.ram.Put(f)
	}
	m.swap.dropOrphans()
	out := st.snapshot()
	m.reclaimed.scanned.Add(out.Scanned)
	m.reclaimed.freed.Add(out.Freed)
	m.reclaimed.swappedOut.Add(out.SwappedOut)
	m.reclaimed.writtenBack.Add(out.WrittenBack)
	m.reclaimed.discarded.Add(out.Discarded)
	m.reclaimed.activated.Add(out.Activated)
	m.reclaimed.unevictable.Add(out.Unevictable)
	m.reclaimed.busy.Add(out.Busy)
	return out
}

// shrink tries to free one isolated frame the caller holds a reference
// to (shrink_folio_list for one folio). A frame it activates goes back on
// the active list; inactive true hands a frame that stays inactive back
// to the caller, with the reference, to put back after the scan.
func (m *Machine) shrink(f *physmem.Frame, st *reclaimCounters) (inactive bool) {
	keep := func(active bool) {
		if !active {
			inactive = true
			return
		}
		m.lru.add(f, true)
		_ = m.ram.Put(f)
	}
	if !f.TryLock() {
		st.busy.Add(1)
		keep(false)
		return
	}
	unlockKeep := func(active bool) {
		f.Unlock()
		keep(active)
	}
	if f.Has(physmem.FlagMlocked) {
		st.unevictable.Add(1)
		f.Unlock()
		_ = m.ram.Put(f)
		return
	}
	mapping, _ := f.Mapping()
	file, isFile := mapping.(*rmap.File)
	inSwap := m.swap.cached(f)
	switch {
	case isFile && !file.Cached(f), !isFile && mapping == nil && !inSwap:
		// Truncated, or not a page reclaim can drop: leave it.
		unlockKeep(false)
		return
	}
	if f.MapCount() > 0 {
		refs, mlocked, contended := m.rmapEnv.Referenced(f, true)
		switch {
		case mlocked:
			f.SetFlags(physmem.FlagMlocked)
			st.unevictable.Add(1)
			f.Unlock()
			_ = m.ram.Put(f)
			return
		case contended:
			st.busy.Add(1)
			unlockKeep(false)
			return
		case refs > 0:
			st.activated.Add(1)
			unlockKeep(true)
			return
		}
	}
	anon := f.Has(physmem.FlagAnon)
	lazyFree := anon && !f.Has(physmem.FlagSwapBacked)
	if anon && !lazyFree && !inSwap {
		if m.shouldFail(InjectSwapSlot) || !m.swap.addToCache(f) {
			unlockKeep(true) // no swap space: anonymous memory stays
			return
		}
		inSwap = true
	}
	if f.MapCount() > 0 {
		res := m.rmapEnv.TryToUnmap(f, true)
		if res.Mlocked {
			st.unevictable.Add(1)
			f.Unlock()
			_ = m.ram.Put(f)
			return
		}
		if f.MapCount() > 0 {
			if res.Contended {
				st.busy.Add(1)
			}
			unlockKeep(res.Redirtied)
			return
		}
	}
	// Write it out while it is still findable, so a fault meanwhile
	// finds the page in the cache and waits for its lock.
	switch {
	case inSwap && m.swap.entries(f.Private()) > 0:
		if err := m.swap.write(f); err != nil {
			unlockKeep(true)
			return
		}
		f.ClearFlags(physmem.FlagDirty)
		st.swappedOut.Add(1)
	case isFile && f.Has(physmem.FlagDirty):
		if err := file.WritePage(f); err != nil {
			unlockKeep(true)
			return
		}
		f.ClearFlags(physmem.FlagDirty)
		st.writtenBack.Add(1)
	case lazyFree || isFile:
		st.discarded.Add(1)
	}
	// __remove_mapping: only the cache's reference and ours may be left.
	refs := int32(1)
	if inSwap || isFile {
		refs = 2
	}
	if !m.ram.Freeze(f, refs) {
		st.busy.Add(1)
		unlockKeep(false)
		return
	}
	switch {
	case inSwap:
		m.swap.removeFrozen(f)
	case isFile:
		file.Remove(f)
	}
	f.Unlock()
	if err := m.ram.FreeFrozen(f); err == nil {
		st.freed.Add(1)
	}
	return false
}

// allocFrame takes a free frame, reclaiming when there is none (the
// allocator's slow path with direct reclaim): it fails with ErrNoMem only
// when reclaim frees nothing. Callers hold no page-table or rmap lock.
func (m *Machine) allocFrame() (*physmem.Frame, error) {
	return m.allocFrameOn(noCPU)
}

// allocFrameOn is allocFrame for code running on cpu: the frame comes
// from the CPU's cache.
func (m *Machine) allocFrameOn(cpu int) (*physmem.Frame, error) {
	if m.shouldFail(InjectFrame) {
		return nil, errInjected("frame")
	}
	return withReclaim(m, func() (*physmem.Frame, error) { return m.ram.AllocOn(cpu) })
}

// withReclaim runs alloc, and while it fails with ErrNoMem and reclaim
// frees something, reclaims and runs it again (a bounded number of
// times: another allocator may take what was freed).
func withReclaim[T any](m *Machine, alloc func() (T, error)) (T, error) {
	for range 8 {
		v, err := alloc()
		if err == nil || !errors.Is(err, ErrNoMem) || errors.Is(err, errInjectedFailure) || m.Reclaim(reclaimBatch).Freed == 0 {
			return v, err
		}
	}
	return alloc()
}

// reclaimBatch is how many frames direct reclaim frees at a time
// (SWAP_CLUSTER_MAX).
const reclaimBatch = 32
