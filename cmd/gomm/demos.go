package main

import (
	"io"

	"github.com/gomm-dev/gomm/examples/gru/gru"
	"github.com/gomm-dev/gomm/examples/hmm/hmm"
	"github.com/gomm-dev/gomm/examples/iommu/iommu"
	"github.com/gomm-dev/gomm/examples/kvm/kvm"
	"github.com/gomm-dev/gomm/examples/xpmem/xpmem"
)

// demos are the example drivers' demos, with their defaults (the same as
// 'go run ./examples/NAME').
var demos = []demo{
	{"kvm", "a guest bigger than host RAM while the host swaps and merges its memory",
		func(w io.Writer) error { _, err := kvm.RunDemo(w, kvm.DemoConfig{}); return err }},
	{"gru", "a device TLB shared by processes; per-range vs per-table flushing of a 1 GiB munmap",
		func(w io.Writer) error { _, err := gru.RunDemo(w, gru.DemoConfig{}); return err }},
	{"iommu", "an SVA device walking the CPU page table; the flush order that is right and two that are not",
		func(w io.Writer) error { _, err := iommu.RunDemo(w, iommu.DemoConfig{}); return err }},
	{"xpmem", "memory exported to a remote partition over a link with latency",
		func(w io.Writer) error { _, err := xpmem.RunDemo(w, xpmem.DemoConfig{}); return err }},
	{"hmm", "a device mirror: faults, migration to device memory and back, exclusive access",
		func(w io.Writer) error { _, err := hmm.RunDemo(w, hmm.DemoConfig{}); return err }},
}
