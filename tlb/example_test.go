package tlb_test

import (
	"fmt"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/tlb"
)

// A lazy CPU is skipped by a flush of pages, and catches up with a full
// flush when it switches back to the mm.
func ExampleSystem_FlushRange() {
	ram, _ := physmem.New(64)
	sys, _ := tlb.NewSystem(tlb.Config{CPUs: 2, RAM: ram})
	table := pagetable.New(pagetable.Options{})
	ctx := sys.NewContext(table, nil, nil)
	user := tlb.NewUserTask("a", ctx)
	for _, cpu := range sys.CPUs() {
		cpu.Switch(user)
	}
	sys.CPU(1).Switch(tlb.NewKernelThread("kworker")) // CPU 1 is now lazy

	sys.FlushRange(ctx, 0x1000, 0x3000, pagetable.PageShift, false)
	st := sys.Stats()
	fmt.Println("IPIs", st.IPIs, "lazy skipped", st.LazySkipped, "partial", st.PartialFlushes)

	sys.CPU(1).Switch(user)
	fmt.Println("full flushes after switching back", sys.Stats().FullFlushes)
	// Output:
	// IPIs 1 lazy skipped 1 partial 1
	// full flushes after switching back 1
}
