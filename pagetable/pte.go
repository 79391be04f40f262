package pagetable

import (
	"fmt"
	"strings"
)

// PTE is one page-table entry, encoded like x86-64's (pte_t): a present
// entry holds a frame number and permission bits; a non-present one is
// either none (zero) or a swap-format entry (a swap slot, a migration
// entry, ...). The same encoding serves 4 KiB PTEs and 2 MiB PMD leaves,
// which carry Huge.
type PTE uint64

// Hardware bits of a present entry (arch/x86/include/asm/pgtable_types.h).
const (
	Present      PTE = 1 << 0 // _PAGE_PRESENT
	Write        PTE = 1 << 1 // _PAGE_RW
	User         PTE = 1 << 2 // _PAGE_USER
	WriteThrough PTE = 1 << 3 // _PAGE_PWT
	CacheDisable PTE = 1 << 4 // _PAGE_PCD
	Accessed     PTE = 1 << 5 // _PAGE_ACCESSED, set by the walker
	Dirty        PTE = 1 << 6 // _PAGE_DIRTY, set by the walker on write
	Huge         PTE = 1 << 7 // _PAGE_PSE: a PMD leaf
	Global       PTE = 1 << 8 // _PAGE_GLOBAL
	NoExec       PTE = 1 << 63
)

// Software bits of a present entry, ignored by the walker.
const (
	Special   PTE = 1 << 9  // _PAGE_SPECIAL: no struct page behind the PFN
	UffdWP    PTE = 1 << 10 // _PAGE_UFFD_WP
	SoftDirty PTE = 1 << 11 // _PAGE_SOFT_DIRTY
)

const (
	pfnShift = 12
	pfnBits  = 40
	pfnMask  = PTE((1<<pfnBits)-1) << pfnShift
	// MaxPFN is the largest frame number an entry can hold.
	MaxPFN = 1<<pfnBits - 1
	// flagMask is every bit of a present entry that is not the PFN.
	flagMask = ^pfnMask
)

// NewPTE builds a present entry mapping pfn with the given bits. Present
// is always set; PFN bits in flags are ignored.
func NewPTE(pfn uint64, flags PTE) PTE {
	return PTE(pfn<<pfnShift)&pfnMask | flags&flagMask | Present
}

// PFN returns the frame number of a present entry.
func (e PTE) PFN() uint64 { return uint64(e&pfnMask) >> pfnShift }

// Flags returns every bit but the frame number.
func (e PTE) Flags() PTE { return e & flagMask }

// IsNone reports whether the entry is empty (pte_none).
func (e PTE) IsNone() bool { return e == 0 }

// IsPresent reports whether the entry maps a frame (pte_present).
func (e PTE) IsPresent() bool { return e&Present != 0 }

// IsWritable reports whether a present entry allows writes (pte_write).
func (e PTE) IsWritable() bool { return e&Write != 0 }

// IsYoung reports whether the accessed bit is set (pte_young).
func (e PTE) IsYoung() bool { return e&Accessed != 0 }

// IsDirty reports whether the dirty bit is set (pte_dirty).
func (e PTE) IsDirty() bool { return e&Dirty != 0 }

// PFNAt returns the frame the present leaf e maps at va: its own frame
// for a 4 KiB entry, the one at va's offset for a 2 MiB leaf.
func (e PTE) PFNAt(va uint64) uint64 {
	if e.IsHuge() {
		return e.PFN() + va>>PageShift&(Entries-1)
	}
	return e.PFN()
}

// IsHuge reports whether a present entry is a 2 MiB leaf (pmd_trans_huge).
func (e PTE) IsHuge() bool { return e&(Present|Huge) == Present|Huge }

// With returns the entry with bits set (pte_mkwrite, pte_mkyoung, ...).
func (e PTE) With(bits PTE) PTE { return e | bits&flagMask }

// Without returns the entry with bits cleared (pte_wrprotect, ...).
func (e PTE) Without(bits PTE) PTE { return e &^ (bits & flagMask) }

// WithPFN returns the entry pointing at another frame, bits unchanged.
func (e PTE) WithPFN(pfn uint64) PTE { return e&flagMask | PTE(pfn<<pfnShift)&pfnMask }

// Non-present swap-format entries (swp_entry_t, include/linux/swapops.h).
//
//	bit 0      0 (not present)
//	bit 1      1 (swap format; keeps the entry non-zero for type 0 slot 0)
//	bits 2-6   type: a swap device, or a special kind below
//	bit 7      exclusive (_PAGE_SWP_EXCLUSIVE)
//	bit 8      soft-dirty (_PAGE_SWP_SOFT_DIRTY)
//	bit 9      uffd-wp (_PAGE_SWP_UFFD_WP)
//	bits 10-11 reserved, zero
//	bits 12-57 offset: swap slot, or PFN for migration entries
//	bits 58-63 reserved, zero
const (
	swapFormat    PTE = 1 << 1
	swapTypeShift     = 2
	swapTypeMask  PTE = 0x1f << swapTypeShift
	// SwapExclusive marks an anonymous page that was exclusive to one mm
	// when it was swapped out.
	SwapExclusive PTE = 1 << 7
	// SwapSoftDirty carries the soft-dirty bit across swap-out.
	SwapSoftDirty PTE = 1 << 8
	// SwapUffdWP carries the uffd write-protect bit across swap-out.
	SwapUffdWP      PTE = 1 << 9
	swapOffsetShift     = 12
	swapOffsetBits      = 46
	swapOffsetMask  PTE = (1<<swapOffsetBits - 1) << swapOffsetShift
	swapReserved    PTE = 3<<10 | 0x3f<<(swapOffsetShift+swapOffsetBits)
	swapBitsMask        = SwapExclusive | SwapSoftDirty | SwapUffdWP
	// MaxSwapOffset is the largest slot (or PFN) a swap entry can hold.
	MaxSwapOffset = 1<<swapOffsetBits - 1
)

// SwapType says what a swap-format entry stands for. Types below
// MaxSwapFiles are swap devices; the rest are the kernel's special kinds.
type SwapType uint8

// Swap types.
const (
	MaxSwapFiles                    = 21
	SwapDevicePrivateRead  SwapType = 21 // SWP_DEVICE_READ
	SwapDevicePrivateWrite SwapType = 22 // SWP_DEVICE_WRITE
	// SwapDeviceExclusive stands for a present, writable mapping a
	// device has taken for itself (make_device_exclusive): the CPU
	// faults on it and takes the page back.
	SwapDeviceExclusive SwapType = 24 // SWP_DEVICE_EXCLUSIVE
	SwapMigrationRead   SwapType = 25 // SWP_MIGRATION_READ
	SwapMigrationReadEx SwapType = 26 // SWP_MIGRATION_READ_EXCLUSIVE
	SwapMigrationWrite  SwapType = 27 // SWP_MIGRATION_WRITE
	SwapHWPoison        SwapType = 28 // SWP_HWPOISON
	SwapMarker          SwapType = 29 // SWP_PTE_MARKER
	swapTypeLimit       SwapType = 30 // types from here on are not valid entries
	poisonType          SwapType = 31
)

// SwapEntry is a decoded swap-format entry.
type SwapEntry struct {
	Type   SwapType
	Offset uint64 // swap slot, or the PFN of a migration entry
}

// NewSwapPTE encodes a swap-format entry, with optional SwapExclusive,
// SwapSoftDirty and SwapUffdWP bits. An invalid type or an offset beyond
// MaxSwapOffset is ErrInvalid.
func NewSwapPTE(s SwapEntry, bits PTE) (PTE, error) {
	if s.Type >= swapTypeLimit || s.Offset > MaxSwapOffset || bits&^swapBitsMask != 0 {
		return 0, fmt.Errorf("pagetable: swap entry %+v bits %#x: %w", s, uint64(bits), ErrInvalid)
	}
	return swapFormat | PTE(s.Type)<<swapTypeShift | bits | PTE(s.Offset)<<swapOffsetShift, nil
}

// NewMigrationPTE encodes a migration entry for pfn (make_migration_entry):
// writable says whether the original mapping allowed writes.
func NewMigrationPTE(pfn uint64, writable bool) PTE {
	t := SwapMigrationRead
	if writable {
		t = SwapMigrationWrite
	}
	return mustSwapPTE(SwapEntry{Type: t, Offset: pfn})
}

// IsSwap reports whether the entry is a valid swap-format entry of any
// type (is_swap_pte).
func (e PTE) IsSwap() bool {
	return e&(Present|swapFormat) == swapFormat && e&swapReserved == 0 &&
		SwapType((e&swapTypeMask)>>swapTypeShift) < swapTypeLimit
}

// Swap decodes a swap-format entry; ok is false for anything else.
func (e PTE) Swap() (s SwapEntry, ok bool) {
	if !e.IsSwap() {
		return SwapEntry{}, false
	}
	return SwapEntry{
		Type:   SwapType((e & swapTypeMask) >> swapTypeShift),
		Offset: uint64(e&swapOffsetMask) >> swapOffsetShift,
	}, true
}

// SwapBits returns the SwapExclusive, SwapSoftDirty and SwapUffdWP bits of
// a swap-format entry.
func (e PTE) SwapBits() PTE { return e & swapBitsMask }

// IsMigration reports whether the entry is a migration entry.
func (e PTE) IsMigration() bool {
	s, ok := e.Swap()
	return ok && s.Type >= SwapMigrationRead && s.Type <= SwapMigrationWrite
}

// NewDevicePrivatePTE encodes an entry for device-private frame pfn
// (make_writable_device_private_entry / make_readable_...): the CPU cannot
// map device memory, so the entry is non-present and a CPU access faults
// to the device's driver, which migrates the page back to RAM.
func NewDevicePrivatePTE(pfn uint64, writable bool) PTE {
	t := SwapDevicePrivateRead
	if writable {
		t = SwapDevicePrivateWrite
	}
	return mustSwapPTE(SwapEntry{Type: t, Offset: pfn})
}

// NewDeviceExclusivePTE encodes a device-exclusive entry for frame pfn
// (make_device_exclusive_entry): the page stays where it is, mapped
// writable in spirit, but only the device may touch it until a CPU
// access takes it back.
func NewDeviceExclusivePTE(pfn uint64) PTE {
	return mustSwapPTE(SwapEntry{Type: SwapDeviceExclusive, Offset: pfn})
}

func mustSwapPTE(s SwapEntry) PTE {
	e, err := NewSwapPTE(s, 0)
	if err != nil {
		panic(err) // pfn > MaxSwapOffset cannot come from a valid PTE
	}
	return e
}

// IsDevicePrivate reports whether the entry names a device-private
// frame (is_device_private_entry).
func (e PTE) IsDevicePrivate() bool {
	s, ok := e.Swap()
	return ok && (s.Type == SwapDevicePrivateRead || s.Type == SwapDevicePrivateWrite)
}

// IsDeviceExclusive reports whether the entry is a device-exclusive
// entry (is_device_exclusive_entry).
func (e PTE) IsDeviceExclusive() bool {
	s, ok := e.Swap()
	return ok && s.Type == SwapDeviceExclusive
}

// HeldFrame returns the frame a non-present entry still counts as a
// mapping of, with a reference and a map count, as a present entry
// would: a device-private or a device-exclusive entry's. Swap and
// migration entries hold no frame.
func (e PTE) HeldFrame() (pfn uint64, ok bool) {
	s, isSwap := e.Swap()
	if !isSwap {
		return 0, false
	}
	switch s.Type {
	case SwapDevicePrivateRead, SwapDevicePrivateWrite, SwapDeviceExclusive:
		return s.Offset, true
	}
	return 0, false
}

// MappedFrame returns the 4 KiB frame an entry counts as a mapping of,
// with a reference and a map count: a present entry's unless it is
// Special (the zero page, PFN maps), a device entry's (HeldFrame). For a
// huge leaf it is the first frame. Swap, migration and none entries map
// nothing.
func (e PTE) MappedFrame() (pfn uint64, ok bool) {
	if e.IsPresent() {
		return e.PFN(), e&Special == 0
	}
	return e.HeldFrame()
}

// IsSwapWritable reports whether a migration or device-private entry
// stands for a writable mapping (is_writable_migration_entry,
// is_writable_device_private_entry); a device-exclusive entry always does.
func (e PTE) IsSwapWritable() bool {
	s, ok := e.Swap()
	return ok && (s.Type == SwapMigrationWrite || s.Type == SwapDevicePrivateWrite || s.Type == SwapDeviceExclusive)
}

// PoisonPTE fills every entry of a freed page table once lockless walkers
// are done with it. It is a non-present swap-format entry of a type and
// reserved bits no valid entry has, so a walker checks for it only on its
// not-present path.
const PoisonPTE = swapFormat | PTE(poisonType)<<swapTypeShift | 3<<10 | PTE(0x6b6b6b6b6b)<<swapOffsetShift

// IsPoison reports whether the entry was read from a poisoned table.
func (e PTE) IsPoison() bool { return e == PoisonPTE }

func (e PTE) String() string {
	switch {
	case e.IsNone():
		return "none"
	case e.IsPoison():
		return "POISON"
	case e.IsSwap():
		s, _ := e.Swap()
		return fmt.Sprintf("swap{type %d offset %#x bits %#x}", s.Type, s.Offset, uint64(e.SwapBits()))
	case !e.IsPresent():
		return fmt.Sprintf("invalid(%#x)", uint64(e))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "pfn %#x ", e.PFN())
	for _, bit := range []struct {
		bit  PTE
		name string
	}{{Write, "W"}, {User, "U"}, {Accessed, "A"}, {Dirty, "D"}, {Huge, "H"}, {Global, "G"}, {NoExec, "NX"}, {Special, "S"}, {SoftDirty, "SD"}} {
		if e&bit.bit != 0 {
			b.WriteString(bit.name)
		} else {
			b.WriteString("-")
		}
	}
	return b.String()
}
