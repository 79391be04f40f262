package gomm_test

import "github.com/gomm-dev/gomm/tlb"

func tlbIdle() *tlb.Task { return tlb.NewKernelThread("idle") }
