// Command hmm runs the HMM-mirror demo: a device and a CPU sharing a
// process's memory while pages move between RAM and device memory and
// the device takes pages for its atomics.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/gomm-dev/gomm/examples/hmm/hmm"
)

func main() {
	var cfg hmm.DemoConfig
	flag.IntVar(&cfg.Pages, "pages", 64, "pages of shared data")
	flag.IntVar(&cfg.Rounds, "rounds", 200, "rounds of each side")
	flag.Parse()
	if _, err := hmm.RunDemo(os.Stdout, cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
