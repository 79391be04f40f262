package gomm

import (
	"fmt"

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

// vma is one virtual memory area (struct vm_area_struct): an
// anonymous private mapping of [start, end) with one protection. The tree
// and every field are protected by the MM's mmap_lock.
type vma struct {
	start, end uint64
	prot       Prot
}

func (v *vma) String() string { return fmt.Sprintf("[%#x, %#x) %v", v.start, v.end, v.prot) }

func vmaLess(a, b *vma) bool { return a.start < b.start }

// VMA describes one mapping, as /proc/PID/maps would.
type VMA struct {
	Start, End uint64
	Prot       Prot
}

func (v VMA) String() string { return fmt.Sprintf("%012x-%012x %v", v.Start, v.End, v.Prot) }

// vmaTree is the MM's ordered set of VMAs (the maple tree's job; a B-tree
// here). Callers hold mmap_lock.
type vmaTree struct {
	t *btree.BTreeG[*vma]
}

func newVMATree() vmaTree { return vmaTree{t: btree.NewG(8, vmaLess)} }

// find returns the first VMA that ends above addr (find_vma), or nil.
func (vt vmaTree) find(addr uint64) *vma {
	var found *vma
	vt.t.DescendLessOrEqual(&vma{start: addr}, func(v *vma) bool {
		if v.end > addr {
			found = v
		}
		return false
	})
	if found != nil {
		return found
	}
	vt.t.AscendGreaterOrEqual(&vma{start: addr}, func(v *vma) bool {
		found = v
		return false
	})
	return found
}

// lookup returns the VMA containing addr, or nil (vma_lookup).
func (vt vmaTree) lookup(addr uint64) *vma {
	if v := vt.find(addr); v != nil && v.start <= addr {
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
		if v.start >= end {
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
	vt.t.DescendLessOrEqual(&vma{start: start - 1}, func(v *vma) bool {
		if v.end <= start {
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
	vt.t.AscendGreaterOrEqual(&vma{start: end}, func(v *vma) bool {
		n = v
		return false
	})
	return n
}

// covered reports whether [start, end) is mapped without holes.
func (vt vmaTree) covered(start, end uint64) bool {
	at := start
	for _, v := range vt.overlapping(start, end) {
		if v.start > at {
			return false
		}
		at = v.end
	}
	return at >= end
}

// split cuts the VMA containing addr in two at addr, if addr is inside it
// (split_vma).
func (vt vmaTree) split(addr uint64) {
	v := vt.lookup(addr)
	if v == nil || v.start == addr {
		return
	}
	tail := &vma{start: addr, end: v.end, prot: v.prot}
	v.end = addr
	vt.t.ReplaceOrInsert(tail)
}

// isolate splits VMAs so that [start, end) begins and ends on VMA
// boundaries and returns the VMAs inside it.
func (vt vmaTree) isolate(start, end uint64) []*vma {
	vt.split(start)
	vt.split(end)
	return vt.overlapping(start, end)
}

// mergeAround merges the VMAs touching [start, end) with compatible
// neighbours (vma_merge): same protection, adjacent.
func (vt vmaTree) mergeAround(start, end uint64) {
	lo := start
	if p := vt.prev(start); p != nil {
		lo = p.start
	}
	hi := end
	if n := vt.next(end); n != nil {
		hi = n.end
	}
	vs := vt.overlapping(lo, hi)
	for i := 1; i < len(vs); i++ {
		a, b := vs[i-1], vs[i]
		if a.end == b.start && a.prot == b.prot {
			vt.t.Delete(b)
			a.end = b.end
			vs[i] = a
		}
	}
}

// gap finds the highest free range of length size below top and at or
// above floor (unmapped_area_topdown); ok is false if none.
func (vt vmaTree) gap(size, floor, top uint64) (addr uint64, ok bool) {
	found := false
	vt.t.Descend(func(v *vma) bool {
		if v.start >= top {
			return true
		}
		if v.end <= top && top-v.end >= size {
			addr, found = top-size, true
			return false
		}
		top = min(top, v.start)
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
