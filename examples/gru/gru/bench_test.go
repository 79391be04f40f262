package gru

import (
	"context"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/internal/testmain"
)

// BenchmarkMunmap1GiB: munmap of 1 GiB of populated memory (zero-page
// mapped) with a GRU chip attached, per flush mode; reports the device
// flushes per munmap.
func BenchmarkMunmap1GiB(b *testing.B) {
	const size = 1 << 30
	for _, mode := range []Mode{ModePerRange, ModePerPTTable} {
		b.Run(mode.String(), func(b *testing.B) {
			testmain.WithoutLockdep(b)
			m, err := gomm.NewMachine(gomm.Config{Frames: size/ptSpan + 1024, CPUs: 1})
			if err != nil {
				b.Fatal(err)
			}
			chip, err := New(m, 64, mode)
			if err != nil {
				b.Fatal(err)
			}
			defer chip.Close()
			mm := m.NewMM()
			x, err := chip.Open(context.Background(), mm)
			if err != nil {
				b.Fatal(err)
			}
			var flushes uint64
			for b.Loop() {
				b.StopTimer()
				addr, err := mm.Mmap(0x40_0000_0000, size, gomm.ProtRead, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed|gomm.MapPopulate)
				if err != nil {
					b.Fatal(err)
				}
				for p := range uint64(64) {
					if _, err := x.Load64(addr + p*ptSpan); err != nil {
						b.Fatal(err)
					}
				}
				before := chip.Stats().Flushes
				b.StartTimer()
				if err := mm.Munmap(addr, size); err != nil {
					b.Fatal(err)
				}
				flushes += chip.Stats().Flushes - before
			}
			b.ReportMetric(float64(flushes)/float64(b.N), "flushes/op")
			if err := x.Close(); err != nil {
				b.Fatal(err)
			}
			if err := mm.Exit(); err != nil {
				b.Fatal(err)
			}
		})
	}
}
