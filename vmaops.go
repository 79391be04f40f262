package gomm

import (
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
	"github.com/gomm-dev/gomm/tlb"
)

// space is the MM as reverse-map operations see it (rmap.Space): a
// separate method set, so the MM's own API does not grow rmap's hooks.
type space MM

func (s *space) ID() uint64                { return (*MM)(s).ID() }
func (s *space) Table() *pagetable.Table   { return s.table }
func (s *space) Context() *tlb.Context     { return s.ctx }
func (s *space) Notifiers() *notifier.List { return &s.notifiers }
func (s *space) Unmapped(*physmem.Frame)   { (*MM)(s).addRSS(noCPU, -1) }
func (mm *MM) space() *space               { return (*space)(mm) }

// newVMA makes a VMA of mm, not yet in the tree: anonymous when file is
// nil (its page offset is its address in pages), else mapping file from
// page offset pgoff.
func (mm *MM) newVMA(start, end uint64, prot Prot, file *File, pgoff uint64, flags rmap.VMFlags) *vma {
	v := &vma{prot: prot, file: file}
	v.Start, v.End, v.Space = start, end, mm.space()
	if file != nil {
		v.File = file.as
	}
	v.PgOff = pgoff
	if file == nil {
		v.PgOff = start / PageSize
	}
	v.SetFlags(flags)
	v.setProt(prot)
	return v
}

// setProt changes the protection and what rmap operations see of it.
// Called with mmap_lock held for write.
func (v *vma) setProt(p Prot) {
	v.prot = p
	v.SetPageProt(p.leafBits() | pagetable.Present)
	if p&ProtWrite != 0 {
		v.SetFlags(rmap.VMWrite)
	} else {
		v.ClearFlags(rmap.VMWrite)
	}
}

// insertVMA links a new VMA into the tree and its file's i_mmap.
func (mm *MM) insertVMA(v *vma) {
	mm.vmas.insert(v)
	if v.File != nil {
		_ = v.File.Link(&v.VMA) // cannot fail: v is new and non-empty
	}
}

// unlinkVMA takes a VMA, already out of the tree and zapped, out of the
// reverse maps (unlink_anon_vmas, unlink_file_vma), before the page
// tables under it are freed: a walker that can still find it finds them.
func (mm *MM) unlinkVMA(v *vma) {
	if v.File != nil {
		v.File.Unlink(&v.VMA)
		v.file.releaseIfUnmapped()
	}
	mm.m.anonVMAs.Unlink(&v.VMA)
}

// dupVMA copies v's identity into a new VMA of to (vm_area_dup), without
// chains; its anon_vma pointer is copied, as the kernel's is.
func (v *vma) dup(to *MM) *vma {
	n := to.newVMA(v.Start, v.End, v.prot, v.file, v.PgOff, v.Flags())
	n.PgOff = v.PgOff
	n.AnonVMA = v.AnonVMA
	return n
}

// splitAt cuts the VMA containing addr in two at addr, if addr is inside
// it (__split_vma): the tail shares the anon_vma and the chains, and
// both are re-keyed in the reverse maps. A huge leaf cannot span two
// VMAs (vma_adjust_trans_huge), so the leaf around addr is split first;
// if that fails (a leaf mapped through Table() without a deposit, with
// RAM full), nothing changes.
func (mm *MM) splitAt(addr uint64) error {
	v := mm.vmas.lookup(addr)
	if v == nil || v.Start == addr {
		return nil
	}
	if err := mm.splitHugeAt(addr); err != nil {
		return err
	}
	tail := v.dup(mm)
	tail.Start, tail.PgOff = addr, v.Index(addr)
	_ = mm.m.anonVMAs.Clone(&tail.VMA, &v.VMA) // tail is fresh: cannot fail
	// The tail goes into its file's i_mmap before v stops covering it:
	// a reverse-map walk (remove_migration_ptes above all) must find the
	// tail's entries through one VMA or the other at every moment.
	mm.insertVMA(tail)
	mm.m.anonVMAs.Adjust(&v.VMA, v.Start, addr, v.PgOff)
	return nil
}

// isolate splits VMAs so that [start, end) begins and ends on VMA
// boundaries and returns the VMAs inside it. The huge leaves the edges
// cut are split before any VMA is, so an error leaves everything as it
// was: callers fail before they change anything.
func (mm *MM) isolate(start, end uint64) ([]*vma, error) {
	for _, edge := range [2]uint64{start, end} {
		if err := mm.splitHugeAt(edge); err != nil {
			return nil, err
		}
	}
	for _, edge := range [2]uint64{start, end} {
		if err := mm.splitAt(edge); err != nil {
			return nil, err // cannot happen: no leaf is left to split
		}
	}
	return mm.vmas.overlapping(start, end), nil
}

// canMerge reports whether b, which follows a, can become part of it
// (is_mergeable_vma and is_mergeable_anon_vma): adjacent, the same
// protection, flags and file, contiguous page offsets, and the same
// anon_vma, or one side without any that meets one never forked.
func canMerge(a, b *vma) bool {
	if a.End != b.Start || a.prot != b.prot || a.Flags() != b.Flags() || a.File != b.File ||
		b.PgOff != a.PgOff+a.Pages() {
		return false
	}
	switch {
	case a.AnonVMA == b.AnonVMA:
		return true
	case a.AnonVMA == nil:
		return len(a.Chains()) == 0 && len(b.Chains()) == 1
	case b.AnonVMA == nil:
		return len(b.Chains()) == 0 && len(a.Chains()) == 1
	}
	return false
}

// merge folds b into a (vma_merge): a takes b's anon_vma if it had none,
// grows over b under the rmap locks, and b leaves the tree and the
// reverse maps. b's entries stay where they are: a covers them now.
func (mm *MM) merge(a, b *vma) {
	if a.AnonVMA == nil && b.AnonVMA != nil {
		a.AnonVMA = b.AnonVMA
		_ = mm.m.anonVMAs.Clone(&a.VMA, &b.VMA) // a has no chains
	}
	mm.m.anonVMAs.Adjust(&a.VMA, a.Start, b.End, a.PgOff)
	mm.vmas.delete(b)
	mm.unlinkVMA(b)
}

// mergeAround merges the VMAs touching [start, end) with their
// compatible neighbours.
func (mm *MM) mergeAround(start, end uint64) {
	lo := start
	if p := mm.vmas.prev(start); p != nil {
		lo = p.Start
	}
	hi := end
	if n := mm.vmas.next(end); n != nil {
		hi = n.End
	}
	vs := mm.vmas.overlapping(lo, hi)
	for i := 1; i < len(vs); i++ {
		if a, b := vs[i-1], vs[i]; canMerge(a, b) {
			mm.merge(a, b)
			vs[i] = a
		}
	}
}

// anonVMA returns v's anon_vma, preparing one on the first anonymous
// fault (anon_vma_prepare): a neighbour's, if it can merge with v
// later, else a new family. Faults run under mmap_lock for read, so
// anonMu serializes the preparation; once done, faults only load a flag.
func (mm *MM) anonVMA(v *vma) *rmap.AnonVMA {
	if v.anonReady.Load() {
		return v.AnonVMA
	}
	mm.anonMu.Lock()
	defer mm.anonMu.Unlock()
	if v.AnonVMA == nil {
		var n *vma
		if p := mm.vmas.prev(v.Start); p != nil && canMerge(p, v) {
			n = p
		} else if q := mm.vmas.next(v.End); q != nil && canMerge(v, q) {
			n = q
		}
		var nv *rmap.VMA
		if n != nil {
			nv = &n.VMA
		}
		_ = mm.m.anonVMAs.PrepareFrom(&v.VMA, nv) // v is non-empty: cannot fail
	}
	v.anonReady.Store(true)
	return v.AnonVMA
}
