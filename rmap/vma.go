package rmap

import (
	"sync/atomic"

	"github.com/gomm-dev/gomm/internal/itree"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/tlb"
)

// Space is the address space a VMA belongs to, as reverse-map operations
// see it: the page table to change, the TLB context to flush and the
// subscribers to tell. gomm's MM provides one. The methods must not
// sleep on the MM's mmap_lock: walks run without it.
type Space interface {
	notifier.MM
	Table() *pagetable.Table
	Context() *tlb.Context
	Notifiers() *notifier.List
	// Unmapped is told of every frame an rmap operation takes out of the
	// space's page table, for its RSS counters.
	Unmapped(f *physmem.Frame)
}

// VMFlags are the VMA flags reverse-map operations look at (vm_flags).
type VMFlags uint32

// VMA flags.
const (
	// VMShared: a shared mapping; writes reach the file (VM_SHARED).
	VMShared VMFlags = 1 << iota
	// VMLocked: mlocked; reclaim must leave its pages alone (VM_LOCKED).
	VMLocked
	// VMMergeable: KSM may merge its pages (VM_MERGEABLE).
	VMMergeable
	// VMWrite: the protection allows writing (VM_WRITE).
	VMWrite
	// VMHugePage: MADV_HUGEPAGE asked for transparent huge pages
	// (VM_HUGEPAGE).
	VMHugePage
	// VMNoHugePage: MADV_NOHUGEPAGE refused them (VM_NOHUGEPAGE).
	VMNoHugePage
)

// VMA is the reverse-map side of a vm_area_struct: where it is, its page
// offset (for a file mapping, the offset into the file in pages; for
// anonymous memory, the address it was created at in pages, which stays
// with the pages when the VMA moves), its anon_vma and chains, its file,
// and the space it belongs to. The MM embeds one in every VMA.
//
// Start, End and PgOff change only under the MM's mmap_lock held for
// write and, while the VMA is linked, the locks of the trees it is in
// (Adjust takes them), so a walker holding either tree lock reads them
// safely. AnonVMA, File and Space are set before the VMA is linked. The
// flags are atomic: walkers read them without the mmap_lock.
type VMA struct {
	Start, End uint64 // addresses, [Start, End)
	PgOff      uint64 // page offset of Start
	AnonVMA    *AnonVMA
	File       *File
	Space      Space

	flags    atomic.Uint32 // VMFlags
	pageProt atomic.Uint64 // vm_page_prot: leaf bits of its entries, before Write
	chains   []*Chain      // oldest (the family root's) first
	fileNode itree.Node[*VMA]
	inFile   bool // linked into File's i_mmap tree; under File's i_mmap_rwsem
}

// Flags returns the VMA's flags.
func (v *VMA) Flags() VMFlags { return VMFlags(v.flags.Load()) }

// SetFlags sets flags; the caller holds the MM's mmap_lock for write.
func (v *VMA) SetFlags(f VMFlags) { v.flags.Or(uint32(f)) }

// ClearFlags clears flags; the caller holds the MM's mmap_lock for write.
func (v *VMA) ClearFlags(f VMFlags) { v.flags.And(^uint32(f)) }

// PageProt returns the bits a present entry of the VMA carries, before
// Write and Dirty (vm_page_prot).
func (v *VMA) PageProt() pagetable.PTE { return pagetable.PTE(v.pageProt.Load()) }

// SetPageProt sets them; the caller holds the MM's mmap_lock for write.
func (v *VMA) SetPageProt(e pagetable.PTE) { v.pageProt.Store(uint64(e)) }

// Chains returns the VMA's chains, oldest first.
func (v *VMA) Chains() []*Chain { return v.chains }

// Pages returns the VMA's length in pages.
func (v *VMA) Pages() uint64 { return (v.End - v.Start) / pageSize }

// lastIndex is the page offset of the VMA's last page.
func (v *VMA) lastIndex() uint64 { return v.PgOff + v.Pages() - 1 }

// Address returns where v maps page offset index, and whether it does
// (vma_address).
func (v *VMA) Address(index uint64) (uint64, bool) {
	if index < v.PgOff || index > v.lastIndex() {
		return 0, false
	}
	return v.Start + (index-v.PgOff)*pageSize, true
}

// Index returns the page offset v maps at addr (linear_page_index).
func (v *VMA) Index(addr uint64) uint64 { return v.PgOff + (addr-v.Start)/pageSize }

// Adjust changes v's range (a split, shrink, growth or merge, vma_adjust):
// with the i_mmap_rwsem of its file and its anon_vma family lock held
// for write, it leaves the trees, changes, and goes back in, so no
// walker sees it half-changed.
func (p *Pool) Adjust(v *VMA, start, end, pgoff uint64) {
	var root *AnonVMA
	if len(v.chains) > 0 {
		root = v.chains[0].AnonVMA.root
	}
	if v.inFile {
		v.File.immap.Lock()
	}
	if root != nil {
		root.rwsem.Lock()
	}
	for _, c := range v.chains {
		c.AnonVMA.tree.Remove(&c.node)
	}
	if v.inFile {
		v.File.tree.Remove(&v.fileNode)
	}
	v.Start, v.End, v.PgOff = start, end, pgoff
	if v.inFile {
		v.fileNode = itree.Node[*VMA]{Start: v.PgOff, Last: v.lastIndex(), Value: v}
		v.File.tree.Insert(&v.fileNode)
	}
	for _, c := range v.chains {
		c.node = itree.Node[*Chain]{Start: v.PgOff, Last: v.lastIndex(), Value: c}
		c.AnonVMA.tree.Insert(&c.node)
	}
	if root != nil {
		root.rwsem.Unlock()
	}
	if v.inFile {
		v.File.immap.Unlock()
	}
}

// LockRmap takes, for write, the locks every reverse-map walk that can
// reach v holds: its file's i_mmap_rwsem, then its anon_vma family lock
// (take_rmap_locks). mremap holds them while it moves entries, so no walk
// sees an entry in neither place. It returns the unlock.
func (v *VMA) LockRmap() (unlock func()) {
	if v.File != nil {
		v.File.immap.Lock()
	}
	var root *AnonVMA
	if v.AnonVMA != nil {
		root = v.AnonVMA.root
		root.rwsem.Lock()
	}
	return func() {
		if root != nil {
			root.rwsem.Unlock()
		}
		if v.File != nil {
			v.File.immap.Unlock()
		}
	}
}

// RestoreExclusive returns the present entry the device-exclusive entry
// e stands for (restore_exclusive_pte): young and dirty, since the
// device may have written, and writable if the VMA is.
func (v *VMA) RestoreExclusive(e pagetable.PTE) pagetable.PTE {
	pfn, _ := e.HeldFrame()
	ne := pagetable.NewPTE(pfn, v.PageProt()|pagetable.Accessed|pagetable.Dirty)
	if v.Flags()&VMWrite != 0 {
		ne |= pagetable.Write
	}
	return ne
}
