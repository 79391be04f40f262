package mmugather_test

import (
	"fmt"

	"github.com/gomm-dev/gomm/mmugather"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/tlb"
)

type device struct{}

func (device) InvalidateSecondaryTLBs(start, end uint64) {
	fmt.Printf("device TLB invalidated [%#x, %#x)\n", start, end)
}

// Zap a range into a gather: one TLB flush for the whole batch, then the
// device's invalidation, then the frames are freed.
func Example() {
	ram, _ := physmem.New(64)
	sys, _ := tlb.NewSystem(tlb.Config{CPUs: 1, RAM: ram})
	table := pagetable.New(pagetable.Options{})
	ctx := sys.NewContext(table, nil, nil)
	for i := range uint64(4) {
		f, _ := ram.Alloc()
		f.IncMapCount()
		_ = table.Map(0x10000+i*pagetable.PageSize, pagetable.NewPTE(uint64(f.PFN()), pagetable.Write|pagetable.User))
	}
	ram.OnFree(func(f *physmem.Frame) { fmt.Println("freed pfn", f.PFN()) })

	ctx.SetSecondaryTLBs(device{})
	g := mmugather.Start(sys, ram, ctx)
	st, _ := g.Zap(0x10000, 0x14000)
	_ = g.Finish()
	fmt.Println("cleared", st.Present, "flushes", g.Flushes())
	// Output:
	// device TLB invalidated [0x10000, 0x14000)
	// freed pfn 0
	// freed pfn 1
	// freed pfn 2
	// freed pfn 3
	// cleared 4 flushes 1
}
