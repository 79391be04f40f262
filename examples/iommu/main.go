// Command iommu runs the SVA-device demo: DMA through the CPU page table
// while the host changes it underneath, with the correct flush point and
// the two wrong ones of the 2014 discussion.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/gomm-dev/gomm/examples/iommu/iommu"
)

func main() {
	var cfg iommu.DemoConfig
	flag.IntVar(&cfg.Pages, "pages", 64, "pages in each DMA buffer")
	flag.IntVar(&cfg.Rounds, "rounds", 300, "host churn rounds per mode")
	flag.Parse()
	if _, err := iommu.RunDemo(os.Stdout, cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
