package gomm

import (
	"fmt"

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
}

func (v *vma) String() string { return fmt.Sprintf("[%#x, %#x) %v", v.Start, v.End, v.prot) }

func vmaLess(a, b *vma) bool { return a.Start < b.Start }

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
}

func (v VMA) String() string {
	kind := "p"
	if v.Shared {
		kind = "s"
	}
	return fmt.Sprintf("%012x-%012x %v%s", v.Start, v.End, v.Prot, kind)
}

// vmaTree is the MM's ordered set of VMAs (the maple tree's job; a B-tree
// here). Callers hold mmap_lock.
type vmaTree struct {
	t *btree.BTreeG[*vma]
}

func newVMATree() vmaTree { return vmaTree{t: btree.NewG(8, vmaLess)} }

// find returns the first VMA that ends above addr (find_vma), or nil.
func (vt vmaTree) find(addr uint64) *vma {
	var found *vma
	vt.t.DescendLessOrEqual(&vma{VMA: rmap.VMA{Start: addr}}, func(v *vma) bool {
		if v.End > addr {
			found = v
		}
		return false
	})
	if found != nil {
		return found
	}
	vt.t.AscendGreaterOrEqual(&vma{VMA: rmap.VMA{Start: addr}}, func(v *vma) bool {
		found = v
		return false
	})
	return found
}

// lookup returns the VMA containing addr, or nil (vma_lookup).
func (vt vmaTree) lookup(addr uint64) *vma {
	if v := vt.find(addr); v != nil && v.Start <= addr {
		return v
	}
	return nil
}

// overlapping returns the VMAs that intersect [start, end), in order.
func (vt vmaTree) overlapping(start, end uint64) []*vma {
	var out []*vma
	first := vt.find(start)
	if first == nil {
		return nil
	}
	vt.t.AscendGreaterOrEqual(first, func(v *vma) bool {
		if v.Start >= end {
			return false
		}
		out = append(out, v)
		return true
	})
	return out
}

// prev and next return the neighbours of [start, end).
func (vt vmaTree) prev(start uint64) *vma {
	var p *vma
	vt.t.DescendLessOrEqual(&vma{VMA: rmap.VMA{Start: start - 1}}, func(v *vma) bool {
		if v.End <= start {
			p = v
		}
		return false
	})
	if start == 0 {
		return nil
	}
	return p
}

func (vt vmaTree) next(end uint64) *vma {
	var n *vma
	vt.t.AscendGreaterOrEqual(&vma{VMA: rmap.VMA{Start: end}}, func(v *vma) bool {
		n = v
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
	vt.t.Descend(func(v *vma) bool {
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
