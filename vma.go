package gomm

import (
	"fmt"
	"sync/atomic"

	"github.com/gomm-dev/gomm/rmap"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/google/btree"
)

// Prot is a mapping's protection (PROT_*).
type Prot uint8

// Protections, with Linux's values.
const (
	ProtNone  Prot = 0
	ProtRead  Prot = 0x1
	ProtWrite Prot = 0x2
	ProtExec  Prot = 0x4
	protMask       = ProtRead | ProtWrite | ProtExec
)

func (p Prot) String() string {
	b := []byte("---")
	if p&ProtRead != 0 {
		b[0] = 'r'
	}
	if p&ProtWrite != 0 {
		b[1] = 'w'
	}
	if p&ProtExec != 0 {
		b[2] = 'x'
	}
	return string(b)
}

// allows reports whether the protection permits the access.
func (p Prot) allows(acc pagetable.Access) bool {
	switch {
	case acc&pagetable.AccessWrite != 0:
		return p&ProtWrite != 0
	case acc&pagetable.AccessExec != 0:
		return p&ProtExec != 0
	}
	// x86 cannot map write-only or exec-only: either implies read.
	return p != ProtNone
}

// leafBits are the PTE bits a page of this protection gets, before the
// write bit, which faults grant page by page.
func (p Prot) leafBits() pagetable.PTE {
	var e pagetable.PTE
	if p != ProtNone {
		e |= pagetable.User
	}
	if p&ProtExec == 0 {
		e |= pagetable.NoExec
	}
	return e
}

// vma is one virtual memory area (struct vm_area_struct): [Start, End)
// with one protection, anonymous or mapping a file, private or shared.
// Its reverse-map side (range, page offset, anon_vma, file, flags) is the
// embedded rmap.VMA. The tree and every field are protected by the MM's
// mmap_lock; the range also by the rmap locks while it is linked (see
// rmap.VMA), and AnonVMA, set by the first anonymous fault under
// mmap_lock for read, by the MM's anonMu.
type vma struct {
	rmap.VMA
	prot Prot
	file *File // the mapped file (VMA.File is its address_space), or nil
	// anonReady is set once AnonVMA is, so a fault finds it without
	// anonMu (anon_vma_prepare's lockless fast path); false only costs
	// the slow path.
	anonReady atomic.Bool
}

func (v *vma) String() string { return fmt.Sprintf("[%#x, %#x) %v", v.Start, v.End, v.prot) }

// shared reports whether writes reach the file (MAP_SHARED).
func (v *vma) shared() bool { return v.Flags()&rmap.VMShared != 0 }

// anonymous reports whether the VMA maps no file (private anonymous).
func (v *vma) anonymous() bool { return v.File == nil }

// VMA describes one mapping, as /proc/PID/maps would.
type VMA struct {
	Start, End uint64
	Prot       Prot
	Shared     bool   // MAP_SHARED
	File       *File  // nil for anonymous memory (shared anonymous memory has one)
	Offset     uint64 // byte offset into File of Start
	Locked     bool   // mlocked
	Mergeable  bool   // KSM may merge its pages
	HugePage   bool   // MadvHugePage: transparent huge pages wanted
	NoHugePage bool   // MadvNoHugePage: transparent huge pages refused
}

func (v VMA) String() string {
	kind := "p"
	if v.Shared {
		kind = "s"
	}
	return fmt.Sprintf("%012x-%012x %v%s", v.Start, v.End, v.Prot, kind)
}

// vmaTree is the MM's ordered set of VMAs (the maple tree's job; a B-tree
// here). Callers hold mmap_lock. The tree holds small keys by value, so a
// lookup's pivot lives on the stack: a fault allocates nothing to find
// its VMA. A VMA's Start never changes while it is in the tree (splits
// insert the tail, merges and growth move End), so its key stays right.
type vmaTree struct {
	t *btree.BTreeG[vmaKey]
	// last is the VMA the last lookup found (the kernel's old per-thread
	// vmacache, here per MM): a run of faults in one VMA finds it without
	// walking the tree. Concurrent lookups under mmap_lock held for
	// reading load it and store it only when it changes, so faults in one
	// VMA share its line without writing it; every insert, delete and
	// clear, under mmap_lock held for writing, forgets it, so it always
	// names a VMA in the tree. Its bounds are checked at each use: a
	// VMA's End moves under mmap_lock held for writing.
	last *atomic.Pointer[vma]
}

type vmaKey struct {
	start uint64
	v     *vma
}

func newVMATree() vmaTree {
	return vmaTree{
		t:    btree.NewG(8, func(a, b vmaKey) bool { return a.start < b.start }),
		last: new(atomic.Pointer[vma]),
	}
}

func (vt vmaTree) insert(v *vma) {
	vt.last.Store(nil) // it may be the VMA this one replaces
	vt.t.ReplaceOrInsert(vmaKey{v.Start, v})
}

func (vt vmaTree) delete(v *vma) {
	vt.last.Store(nil)
	vt.t.Delete(vmaKey{start: v.Start})
}

func (vt vmaTree) clear() {
	vt.last.Store(nil)
	vt.t.Clear(false)
}

// all yields the VMAs in address order.
func (vt vmaTree) all(yield func(*vma) bool) {
	vt.t.Ascend(func(k vmaKey) bool { return yield(k.v) })
}

// find returns the first VMA that ends above addr (find_vma), or nil.
func (vt vmaTree) find(addr uint64) *vma {
	var found *vma
	vt.t.DescendLessOrEqual(vmaKey{start: addr}, func(k vmaKey) bool {
		if k.v.End > addr {
			found = k.v
		}
		return false
	})
	if found != nil {
		return found
	}
	return vt.next(addr)
}

// lookup returns the VMA containing addr, or nil (vma_lookup).
func (vt vmaTree) lookup(addr uint64) *vma {
	last := vt.last.Load()
	if last != nil && last.Start <= addr && addr < last.End {
		return last
	}
	if v := vt.find(addr); v != nil && v.Start <= addr {
		if v != last {
			vt.last.Store(v)
		}
		return v
	}
	return nil
}

// overlapping returns the VMAs that intersect [start, end), in order.
func (vt vmaTree) overlapping(start, end uint64) []*vma {
	first := vt.find(start)
	if first == nil {
		return nil
	}
	var out []*vma
	vt.t.AscendGreaterOrEqual(vmaKey{start: first.Start}, func(k vmaKey) bool {
		if k.start >= end {
			return false
		}
		out = append(out, k.v)
		return true
	})
	return out
}

// prev returns the VMA that ends at or below start, nearest to it.
func (vt vmaTree) prev(start uint64) *vma {
	if start == 0 {
		return nil
	}
	var p *vma
	vt.t.DescendLessOrEqual(vmaKey{start: start - 1}, func(k vmaKey) bool {
		if k.v.End <= start {
			p = k.v
		}
		return false
	})
	return p
}

// next returns the first VMA that starts at or above end.
func (vt vmaTree) next(end uint64) *vma {
	var n *vma
	vt.t.AscendGreaterOrEqual(vmaKey{start: end}, func(k vmaKey) bool {
		n = k.v
		return false
	})
	return n
}

// covered reports whether [start, end) is mapped without holes.
func (vt vmaTree) covered(start, end uint64) bool {
	at := start
	for _, v := range vt.overlapping(start, end) {
		if v.Start > at {
			return false
		}
		at = v.End
	}
	return at >= end
}

// gap finds the highest free range of length size below top and at or
// above floor (unmapped_area_topdown); ok is false if none.
func (vt vmaTree) gap(size, floor, top uint64) (addr uint64, ok bool) {
	found := false
	vt.t.Descend(func(k vmaKey) bool {
		v := k.v
		if v.Start >= top {
			return true
		}
		if v.End <= top && top-v.End >= size {
			addr, found = top-size, true
			return false
		}
		top = min(top, v.Start)
		return top > floor
	})
	if found {
		return addr, addr >= floor
	}
	if top >= floor+size {
		return top - size, true
	}
	return 0, false
}
