// Command gru runs the GRU demo: a TLB-only device shared by several
// contexts and MMs, and the flush count of a big munmap.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/gomm-dev/gomm/examples/gru/gru"
)

func main() {
	var cfg gru.DemoConfig
	flag.IntVar(&cfg.Pages, "pages", 64, "pages each context works on")
	flag.IntVar(&cfg.Rounds, "rounds", 200, "host munmap/mmap rounds")
	flag.Uint64Var(&cfg.Munmap, "munmap", 1<<30, "bytes of the big munmap (a multiple of 2 MiB)")
	flag.Parse()
	if _, err := gru.RunDemo(os.Stdout, cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
