package gomm

import (
	"slices"
	"sync"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
)

// KSMStats are the same-page merging counters, named as in
// /sys/kernel/mm/ksm.
type KSMStats struct {
	PagesShared   int    // KSM pages in use (one per distinct content)
	PagesSharing  int    // further mappings of them: the pages saved
	PagesScanned  uint64 // pages looked at
	PagesVolatile uint64 // pages skipped because they changed since the last look
	FullScans     uint64 // passes over every mergeable MM
	Merges        uint64 // mappings replaced by a KSM page
}

// ksm is the machine's same-page merger (mm/ksm.c). Its stable and
// unstable trees are indexed by the xxhash of the page contents, with a
// byte-for-byte comparison on every hit, instead of being rbtrees
// ordered by memcmp: the same matches, one hash per page instead of
// O(log n) page comparisons, and no order to corrupt when an unstable
// page changes under the tree.
type ksm struct {
	listMu sync.Mutex // ksm_mmlist_lock: a leaf, taken under mmap_lock
	mms    []*MM      // MMs with mergeable VMAs; protected by listMu

	mu       sync.Mutex               // ksm_thread_mutex: one scan at a time; never taken under mmap_lock
	cursorMM int                      // protected by mu
	cursorVA uint64                   // protected by mu
	items    map[ksmKey]*ksmItem      // protected by mu
	stable   map[uint64][]*stableNode // by content hash; protected by mu
	unstable map[uint64][]ksmKey      // rebuilt every pass; protected by mu
	stats    KSMStats                 // protected by mu
	buf      [PageSize]byte           // the page being checksummed; protected by mu
}

type ksmKey struct {
	mm *MM
	va uint64
}

// ksmItem is what the scanner remembers of one (mm, address) (struct
// ksm_rmap_item): the checksum it last saw, and the stable node its page
// was merged into.
type ksmItem struct {
	sum  uint64
	seen bool
	node *stableNode
}

// stableNode is one KSM page (struct ksm_stable_node): its frame and
// content hash, and the rmap side that lists where it is mapped. It holds
// no reference: the frame is checked every time it is used.
type stableNode struct {
	rnode *rmap.StableNode
	frame *physmem.Frame
	sum   uint64
}

func newKSM() *ksm {
	return &ksm{items: map[ksmKey]*ksmItem{}, stable: map[uint64][]*stableNode{},
		unstable: map[uint64][]ksmKey{}}
}

// enter puts mm on the scanner's list (__ksm_enter).
func (k *ksm) enter(mm *MM) {
	k.listMu.Lock()
	defer k.listMu.Unlock()
	if !slices.Contains(k.mms, mm) {
		k.mms = append(k.mms, mm)
	}
}

// exit takes mm off it (__ksm_exit).
func (k *ksm) exit(mm *MM) {
	k.listMu.Lock()
	defer k.listMu.Unlock()
	if i := slices.Index(k.mms, mm); i >= 0 {
		k.mms = slices.Delete(k.mms, i, i+1)
	}
}

// setMergeable is madvise(MADV_MERGEABLE / MADV_UNMERGEABLE). Unmerging
// copies every KSM page first and clears VM_MERGEABLE only once that
// succeeded, so a copy that runs out of memory leaves the range
// mergeable, as ksm_madvise does.
func (mm *MM) setMergeable(start, end uint64, on bool) error {
	mm.mmapLock.Lock()
	defer mm.mmapLock.Unlock()
	if !on {
		if err := mm.unmergeLocked(start, end); err != nil {
			return err
		}
	}
	err := mm.updateVMAsLocked("madvise", start, end, func(v *vma) {
		switch {
		case !v.anonymous() || v.shared():
		case on:
			v.SetFlags(rmap.VMMergeable)
		default:
			v.ClearFlags(rmap.VMMergeable)
		}
	})
	if err == nil && on {
		mm.m.ksm.enter(mm)
	}
	return err
}

// unmergeLocked gives every KSM page mapped in [start, end) back a
// private copy (unmerge_ksm_pages / break_ksm). Called with mmap_lock
// held for writing, so ksmd merges nothing new in the range meanwhile.
// The KSM pages are found first, in one pass over the populated tables
// under their locks; copyOnWrite then takes the locks itself. A range
// with no KSM page, the usual case for mremap, costs that pass alone.
func (mm *MM) unmergeLocked(start, end uint64) error {
	var merged []uint64
	err := mm.table.Range(start, end, pagetable.RangeFuncs{
		PTEs: func(pt pagetable.PTETable, first, last int) bool {
			for i := first; i < last; i++ {
				if mm.mapsKSMPage(pt.Get(i)) {
					merged = append(merged, pt.VA(i))
				}
			}
			return true
		},
	})
	if err != nil {
		return err
	}
	for _, va := range merged {
		v := mm.vmas.lookup(va)
		if v == nil {
			continue // a hole: updateVMAsLocked reports it
		}
		for range 8 {
			e, _ := mm.table.Lookup(va)
			if !mm.mapsKSMPage(e) {
				break
			}
			if _, err := mm.copyOnWrite(v, va, e, v.prot&ProtWrite != 0, noCPU); err != nil {
				return err
			}
		}
	}
	return nil
}

// mapsKSMPage reports whether the 4 KiB entry e maps a KSM page.
func (mm *MM) mapsKSMPage(e pagetable.PTE) bool {
	if !e.IsPresent() || e&pagetable.Special != 0 || e.IsHuge() {
		return false
	}
	f, err := mm.m.ram.Frame(physmem.PFN(e.PFN()))
	return err == nil && f.Has(physmem.FlagKSM)
}

// KSMScan runs the same-page merger over up to pages pages of the
// mergeable MMs (one batch of ksmd's work), continuing where the last
// call stopped. A page is a candidate once its checksum stayed the same
// between two looks (pages that change are volatile and skipped). A
// candidate identical, byte for byte, to a KSM page is merged into it;
// one identical to another candidate of this pass (the unstable tree)
// is merged with it into a new KSM page. Merging write-protects the
// page and then replaces it, each with an EventClear invalidation and
// a clear and flush before the new entry is set; the first write to a
// KSM page copies it. It returns the counters after the batch.
func (m *Machine) KSMScan(pages int) KSMStats {
	k := m.ksm
	k.mu.Lock()
	defer k.mu.Unlock()
	passes := k.stats.FullScans
	for n, found := 0, true; n < pages; {
		key, f, ok := k.next()
		if !ok {
			break
		}
		if k.stats.FullScans != passes {
			if !found {
				// A whole pass without a page to look at. This wrap's
				// look may have found one since: give its reference back.
				if f != nil {
					_ = m.ram.Put(f)
				}
				break
			}
			passes, found = k.stats.FullScans, false
		}
		if f == nil {
			continue
		}
		found = true
		n++
		k.stats.PagesScanned++
		k.scanOne(m, key, f)
		_ = m.ram.Put(f)
	}
	return k.statsLocked(m)
}

// next returns the next mapped anonymous page of a mergeable VMA, with a
// reference, advancing the cursor; f is nil for a place with nothing to
// look at, ok false when no MM is mergeable. A wrap of the cursor ends a
// pass: the unstable tree starts again.
func (k *ksm) next() (ksmKey, *physmem.Frame, bool) {
	k.listMu.Lock()
	if len(k.mms) == 0 {
		k.listMu.Unlock()
		return ksmKey{}, nil, false
	}
	if k.cursorMM >= len(k.mms) {
		k.cursorMM, k.cursorVA = 0, 0
		k.endPass()
	}
	mm := k.mms[k.cursorMM]
	k.listMu.Unlock()
	if mm.Get() != nil {
		k.cursorMM, k.cursorVA = k.cursorMM+1, 0
		return ksmKey{}, nil, true
	}
	defer func() { _ = mm.Put() }()
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	v := mm.vmas.find(k.cursorVA)
	for v != nil && (v.Flags()&rmap.VMMergeable == 0 || !v.anonymous()) {
		v = mm.vmas.next(v.End)
	}
	if v == nil {
		k.cursorMM, k.cursorVA = k.cursorMM+1, 0
		return ksmKey{}, nil, true
	}
	// The next present page of the VMA, skipping empty tables whole.
	from := max(k.cursorVA, v.Start)
	var found uint64
	var e pagetable.PTE
	_ = mm.table.Range(from, v.End, pagetable.RangeFuncs{
		PMD: func(s pagetable.PMDSlot) bool {
			// A huge page is scanned a 4 KiB page at a time; a merge
			// splits its leaf (write_protect_page).
			if x := s.Get(); x.IsHuge() && x&pagetable.Special == 0 {
				found, e = max(from, s.Base()), x
				return false
			}
			return true
		},
		PTEs: func(pt pagetable.PTETable, first, last int) bool {
			for i := first; i < last; i++ {
				if x := pt.Get(i); x.IsPresent() && x&pagetable.Special == 0 {
					found, e = pt.VA(i), x
					return false
				}
			}
			return true
		},
	})
	if e == 0 {
		k.cursorVA = v.End
		return ksmKey{}, nil, true
	}
	k.cursorVA = found + PageSize
	key := ksmKey{mm, found}
	f, err := mm.m.ram.Frame(physmem.PFN(e.PFNAt(found)))
	if err != nil || !mm.m.ram.TryGet(f) {
		return key, nil, true
	}
	return key, f, true
}

// endPass forgets the unstable tree and the items of exited MMs.
func (k *ksm) endPass() {
	k.stats.FullScans++
	clear(k.unstable)
	for key := range k.items {
		if key.mm.Users() <= 0 {
			delete(k.items, key)
		}
	}
}

func (k *ksm) scanOne(m *Machine, key ksmKey, f *physmem.Frame) {
	it := k.items[key]
	if it == nil {
		it = &ksmItem{}
		k.items[key] = it
	}
	if f.Has(physmem.FlagKSM) {
		return // merged already
	}
	if it.node != nil {
		k.forget(m, key, it) // the page it shared was copied on write
	}
	if !f.Has(physmem.FlagAnon) || f.Has(physmem.FlagSwapCache) {
		return
	}
	if _, err := f.ReadAt(k.buf[:], 0); err != nil {
		return
	}
	sum := xxhash.Sum64(k.buf[:])
	if !it.seen || it.sum != sum {
		it.sum, it.seen = sum, true
		k.stats.PagesVolatile++
		return
	}
	if node := k.findStable(m, sum, f); node != nil {
		if _, ok := key.mm.ksmMerge(key.va, f, node.frame); ok {
			it.node = node
			k.stats.Merges++
		}
		_ = m.ram.Put(node.frame)
		return
	}
	for i, other := range k.unstable[sum] {
		tf := other.mm.pageAt(other.va)
		if tf == nil {
			continue
		}
		if tf.Has(physmem.FlagKSM) || !tf.Equal(f) {
			_ = m.ram.Put(tf)
			continue
		}
		// One of the two becomes the KSM page and the other is merged
		// into it: the candidate first, else this page (a page mapped
		// more than once cannot become the KSM page).
		pair := [2]struct {
			key ksmKey
			f   *physmem.Frame
		}{{other, tf}, {key, f}}
		for _, order := range [2][2]int{{0, 1}, {1, 0}} {
			a, b := pair[order[0]], pair[order[1]]
			rnode, ok := a.key.mm.ksmMerge(a.key.va, a.f, nil)
			if !ok {
				continue
			}
			node := &stableNode{rnode: rnode, frame: a.f, sum: sum}
			k.stable[sum] = append(k.stable[sum], node)
			k.items[a.key].node = node
			k.unstable[sum] = slices.Delete(k.unstable[sum], i, i+1)
			if _, ok := b.key.mm.ksmMerge(b.key.va, b.f, a.f); ok {
				k.items[b.key].node = node
				k.stats.Merges++
			}
			_ = m.ram.Put(tf)
			return
		}
		_ = m.ram.Put(tf)
	}
	k.unstable[sum] = append(k.unstable[sum], key)
}

// forget takes key's place off the stable node it was merged into.
func (k *ksm) forget(m *Machine, key ksmKey, it *ksmItem) {
	f := it.node.frame
	if m.ram.TryGet(f) {
		if f.TryLock() {
			if ksmNodeOf(f) == it.node.rnode {
				// Not Remove: the children key.mm forked since the
				// merge may map f at key.va through this item
				// (remove_rmap_item_from_tree leaves them to ksmd's
				// scan of the children; here no walk may miss them).
				pfn := uint64(f.PFN())
				it.node.rnode.Forget(key.mm.space(), key.va, func(v *rmap.VMA, addr uint64) bool {
					e, _ := v.Space.Table().Lookup(addr)
					mapped, ok := e.MappedFrame()
					if ok && e.IsHuge() {
						mapped = e.PFNAt(addr)
					}
					return ok && mapped == pfn
				})
			}
			f.Unlock()
		}
		_ = m.ram.Put(f)
	}
	it.node = nil
}

// findStable returns the live KSM page whose contents are p's, with a
// reference on its frame, dropping stale nodes (their page freed, or no
// longer KSM) on the way.
func (k *ksm) findStable(m *Machine, sum uint64, p *physmem.Frame) *stableNode {
	nodes := k.stable[sum]
	for i := 0; i < len(nodes); i++ {
		n := nodes[i]
		if !k.live(m, n) {
			nodes = slices.Delete(nodes, i, i+1)
			i--
			continue
		}
		// The reference comes first: without it the page may be freed
		// and its data recycled into another frame mid-compare.
		if !m.ram.TryGet(n.frame) {
			continue // freed since live: dropped on a later pass
		}
		if n.frame.Equal(p) {
			k.stable[sum] = nodes
			return n
		}
		_ = m.ram.Put(n.frame)
	}
	if len(nodes) == 0 {
		delete(k.stable, sum)
	} else {
		k.stable[sum] = nodes
	}
	return nil
}

// live reports whether n's frame is still its KSM page.
func (k *ksm) live(m *Machine, n *stableNode) bool {
	f := n.frame
	if !m.ram.TryGet(f) {
		return false
	}
	defer func() { _ = m.ram.Put(f) }()
	if !f.TryLock() {
		return f.Has(physmem.FlagKSM) // busy: judge by the flag
	}
	defer f.Unlock()
	return f.Has(physmem.FlagKSM) && ksmNodeOf(f) == n.rnode && f.MapCount() > 0
}

// ksmNodeOf returns the stable node that is the locked frame f's
// mapping, or nil.
func ksmNodeOf(f *physmem.Frame) *rmap.StableNode {
	m, _ := f.Mapping()
	n, _ := m.(*rmap.StableNode)
	return n
}

func (k *ksm) statsLocked(m *Machine) KSMStats {
	st := k.stats
	st.PagesShared, st.PagesSharing = 0, 0
	for _, nodes := range k.stable {
		for _, n := range nodes {
			if k.live(m, n) {
				st.PagesShared++
				st.PagesSharing += int(n.frame.MapCount()) - 1
			}
		}
	}
	return st
}

// KSMStats returns the merger's counters.
func (m *Machine) KSMStats() KSMStats {
	m.ksm.mu.Lock()
	defer m.ksm.mu.Unlock()
	return m.ksm.statsLocked(m)
}

// StartKSM runs KSMScan(pages) every interval on a goroutine of its own
// (ksmd) until the returned stop is called; stop waits for the goroutine
// to finish. Calling stop twice is harmless.
func (m *Machine) StartKSM(interval time.Duration, pages int) (stop func()) {
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				m.KSMScan(pages)
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(done) })
		<-exited
	}
}

// pageAt returns the anonymous frame mapped at va with a reference, or nil.
func (mm *MM) pageAt(va uint64) *physmem.Frame {
	if mm.Get() != nil {
		return nil
	}
	defer func() { _ = mm.Put() }()
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	e, _ := mm.table.Lookup(va)
	if !e.IsPresent() || e&pagetable.Special != 0 {
		return nil
	}
	f, err := mm.m.ram.Frame(physmem.PFN(e.PFNAt(va)))
	if err != nil || !mm.m.ram.TryGet(f) {
		return nil
	}
	return f
}

// ksmMerge merges the page f mapped at va (try_to_merge_one_page): it
// write-protects f's entry, then, with kpage nil, makes f itself a KSM
// page (and returns its new stable node); else, if f still holds exactly
// kpage's contents, replaces the entry with one for kpage. The caller
// holds references to f and kpage.
func (mm *MM) ksmMerge(va uint64, f, kpage *physmem.Frame) (*rmap.StableNode, bool) {
	if mm.Get() != nil {
		return nil, false
	}
	defer func() { _ = mm.Put() }()
	mm.mmapLock.RLock()
	defer mm.mmapLock.RUnlock()
	v := mm.vmas.lookup(va)
	if v == nil || v.Flags()&rmap.VMMergeable == 0 || !v.anonymous() || v.AnonVMA == nil {
		return nil, false
	}
	f.Lock()
	defer f.Unlock()
	if !f.Has(physmem.FlagAnon) || f.Has(physmem.FlagKSM) || f.Has(physmem.FlagSwapCache) {
		return nil, false
	}
	if kpage == nil && f.MapCount() != 1 {
		// Shared with a fork: its other mappings may lie in VMAs the
		// stable node's walk cannot reach (an ancestor's, or one that is
		// not mergeable), and a KSM page must be reachable from every
		// place it is mapped. It can still be merged into another.
		return nil, false
	}
	orig, ok := mm.writeProtectPage(v, va, f)
	if !ok {
		return nil, false
	}
	item := rmap.KSMItem{Space: mm.space(), Addr: va, AnonVMA: v.AnonVMA}
	if kpage == nil {
		node := &rmap.StableNode{}
		node.Add(item)
		f.SetMapping(node, 0)
		f.SetFlags(physmem.FlagKSM)
		return node, true
	}
	if !kpage.TryLock() {
		return nil, false
	}
	defer kpage.Unlock()
	if !kpage.Has(physmem.FlagKSM) || !kpage.Equal(f) {
		return nil, false
	}
	if !mm.replacePage(v, va, f, kpage, orig) {
		return nil, false
	}
	node := ksmNodeOf(kpage)
	node.Add(item)
	return node, true
}

// writeProtectPage makes f's entry at va read-only and clean
// (write_protect_page): an EventClear invalidation, then clear and flush
// before the protected entry is set, so no TLB keeps writing while the
// contents are compared. It refuses a page somebody holds beyond its
// mappings (a pinned page could change under the merge). It returns the
// protected entry.
func (mm *MM) writeProtectPage(v *vma, va uint64, f *physmem.Frame) (pagetable.PTE, bool) {
	r := mm.invalidateStart(va, va+PageSize, notifier.EventClear)
	defer mm.invalidateEnd(r)
	// Of a huge page only this page's entry is protected, and later
	// replaced.
	pt, ok, err := mm.lockPTESplitting(va)
	if err != nil || !ok {
		return 0, false
	}
	defer pt.Unlock()
	i := pt.Index(va)
	e := pt.Get(i)
	if !e.IsPresent() || e.PFN() != uint64(f.PFN()) {
		return 0, false
	}
	if !e.IsWritable() && !e.IsDirty() {
		return e, true
	}
	if f.RefCount() != f.MapCount()+1 {
		return 0, false // pinned (GUP) beyond the mappings and our reference
	}
	since := mm.m.chk.BeginDowngrade()
	old := mm.clearFlush(pt, i, va)
	if old.IsDirty() {
		f.SetFlags(physmem.FlagDirty)
	}
	e = old.Without(pagetable.Write | pagetable.Dirty)
	pt.Set(i, e)
	mm.m.chk.EndDowngrade("ksm write_protect_page", mm.ID(), va, va+PageSize, since, true)
	return e, true
}

// replacePage points the entry at va, still orig, at kpage (replace_page):
// an EventClear invalidation, clear and flush, then the read-only entry
// for kpage; f loses the mapping and its reference.
func (mm *MM) replacePage(v *vma, va uint64, f, kpage *physmem.Frame, orig pagetable.PTE) bool {
	r := mm.invalidateStart(va, va+PageSize, notifier.EventClear)
	defer mm.invalidateEnd(r)
	pt, ok, err := mm.table.LockPTE(va)
	if err != nil || !ok {
		return false
	}
	i := pt.Index(va)
	if pt.Get(i) != orig {
		pt.Unlock()
		return false
	}
	if err := mm.m.ram.Get(kpage); err != nil {
		pt.Unlock()
		return false
	}
	kpage.IncMapCount()
	mm.clearFlush(pt, i, va)
	pt.Set(i, pagetable.NewPTE(uint64(kpage.PFN()), v.PageProt()|pagetable.Accessed))
	pt.Unlock()
	f.DecMapCount()
	_ = mm.m.ram.Put(f)
	return true
}
