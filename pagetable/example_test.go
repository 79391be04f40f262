package pagetable_test

import (
	"fmt"

	"github.com/gomm-dev/gomm/pagetable"
)

// Map a page, translate through it as the hardware would, and see the
// Accessed and Dirty bits the walker set.
func Example() {
	pt := pagetable.New(pagetable.Options{})
	va := uint64(0x7f00_0000_1000)
	if err := pt.Map(va, pagetable.NewPTE(42, pagetable.Write|pagetable.User)); err != nil {
		panic(err)
	}
	tr := pt.Walk(va+0x10, pagetable.AccessWrite|pagetable.AccessUser)
	fmt.Println("pfn:", tr.PFN, "fault:", tr.Fault)
	e, level := pt.Lookup(va)
	fmt.Println(level, e)
	// Output:
	// pfn: 42 fault: none
	// PTE pfn 0x2a WUAD-----
}

// A shadow page table keyed by guest-physical address, as a VMM would
// keep it: a 2 MiB leaf for guest RAM and a write-protected 4 KiB page.
func Example_shadow() {
	ept := pagetable.New(pagetable.Options{})
	_ = ept.MapHuge(0, pagetable.NewPTE(0x80000, pagetable.Write))
	_ = ept.Map(0xfee0_0000, pagetable.NewPTE(0x1234, 0))

	tr := ept.Walk(0x1f_f008, pagetable.AccessRead)
	fmt.Printf("gpa 0x1ff008 -> pfn %#x (%v leaf)\n", tr.PFN, tr.Level)
	tr = ept.Walk(0xfee0_0000, pagetable.AccessWrite)
	fmt.Println("write to the read-only page:", tr.Fault)
	// Output:
	// gpa 0x1ff008 -> pfn 0x801ff (PMD leaf)
	// write to the read-only page: protection
}

// The split-lock API: lock one PTE table (pte_offset_map_lock) and work
// on its entries; an atomic get-and-clear keeps the hardware's dirty bit.
func ExampleTable_AllocLockPTE() {
	pt := pagetable.New(pagetable.Options{})
	tbl, err := pt.AllocLockPTE(0x40_0000)
	if err != nil {
		panic(err)
	}
	for i := range 4 {
		tbl.Set(i, pagetable.NewPTE(uint64(100+i), pagetable.Write|pagetable.User))
	}
	tbl.Unlock()

	pt.Walk(0x40_2000, pagetable.AccessWrite) // the "CPU" dirties page 2

	tbl, _, _ = pt.LockPTE(0x40_0000)
	for i := range 4 {
		old := tbl.GetAndClear(i)
		fmt.Printf("%#x dirty=%v\n", tbl.VA(i), old.IsDirty())
	}
	tbl.Unlock()
	// Output:
	// 0x400000 dirty=false
	// 0x401000 dirty=false
	// 0x402000 dirty=true
	// 0x403000 dirty=false
}

// Freeing tables hands them back so the caller can wait out lockless
// walkers before poisoning them (tlb_remove_table).
func ExampleTable_FreeEmpty() {
	pt := pagetable.New(pagetable.Options{})
	_ = pt.MapRange(0, 4<<20, pagetable.NewPTE(0, pagetable.Write))
	n, _ := pt.UnmapRange(0, 4<<20, nil)
	freed, _ := pt.FreeEmpty(0, 1<<30, nil)
	pt.SyncWalkers() // nobody can still be walking them
	for _, f := range freed {
		f.Poison()
	}
	fmt.Println("cleared", n, "entries; freed", freed)
	// Output: cleared 1024 entries; freed [PTE table at 0x0 PTE table at 0x200000 PMD table at 0x0]
}
