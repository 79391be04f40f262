// Command xpmem runs the cross-partition sharing demo: an importer reads
// an exported segment over a slow link while the exporter churns it.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/gomm-dev/gomm/examples/xpmem/xpmem"
)

func main() {
	var cfg xpmem.DemoConfig
	flag.IntVar(&cfg.Pages, "pages", 64, "pages in each half of the segment")
	flag.IntVar(&cfg.Rounds, "rounds", 300, "exporter churn rounds")
	flag.DurationVar(&cfg.Latency, "latency", 0, "one-way link latency (default 20µs)")
	flag.Parse()
	if _, err := xpmem.RunDemo(os.Stdout, cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
