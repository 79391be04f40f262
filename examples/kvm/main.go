// Command kvm runs the fake-KVM demo: a guest larger than host RAM runs
// a checked workload while the host swaps and merges its memory.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/gomm-dev/gomm/examples/kvm/kvm"
)

func main() {
	var cfg kvm.DemoConfig
	flag.IntVar(&cfg.RAMPages, "ram", 2048, "host RAM in 4 KiB pages")
	flag.IntVar(&cfg.GuestPages, "guest", 0, "guest memory in pages (default twice the RAM)")
	flag.IntVar(&cfg.VCPUs, "vcpus", 2, "vCPUs")
	flag.IntVar(&cfg.Rounds, "rounds", 3, "passes of the workload over guest memory")
	flag.Parse()
	if _, err := kvm.RunDemo(os.Stdout, cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
