//lint:file-ignore SA2001 the benchmarks measure the lock operations themselves.

package physmem

import (
	"testing"

	"github.com/gomm-dev/gomm/internal/testmain"
)

// BenchmarkAllocPut: one frame allocated and freed (with its free hook
// path, no data).
func BenchmarkAllocPut(b *testing.B) {
	a, _ := New(1024)
	b.ReportAllocs()
	for b.Loop() {
		f, err := a.Alloc()
		if err != nil {
			b.Fatal(err)
		}
		if err := a.Put(f); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkGetPut: a reference taken and dropped.
func BenchmarkGetPut(b *testing.B) {
	a, _ := New(1)
	f, _ := a.Alloc()
	for b.Loop() {
		_ = a.Get(f)
		_ = a.Put(f)
	}
}

// BenchmarkFirstWrite: allocate, write one word (allocating the 4 KiB of
// data), free (poisoning it).
func BenchmarkFirstWrite(b *testing.B) {
	a, _ := New(1024)
	b.ReportAllocs()
	for b.Loop() {
		f, _ := a.Alloc()
		_ = f.Store64(0, 1)
		_ = a.Put(f)
	}
}

func BenchmarkLoad64(b *testing.B) {
	a, _ := New(1)
	f, _ := a.Alloc()
	_ = f.Store64(8, 42)
	for b.Loop() {
		if v, _ := f.Load64(8); v != 42 {
			b.Fatal(v)
		}
	}
}

// BenchmarkReadPage: a whole 4 KiB page read out, reported as bytes/s.
func BenchmarkReadPage(b *testing.B) {
	a, _ := New(1)
	f, _ := a.Alloc()
	_ = f.Store64(8, 42)
	buf := make([]byte, PageSize)
	b.SetBytes(PageSize)
	for b.Loop() {
		_, _ = f.ReadAt(buf, 0)
	}
}

func BenchmarkPageLock(b *testing.B) {
	testmain.WithoutLockdep(b)
	a, _ := New(1)
	f, _ := a.Alloc()
	for b.Loop() {
		f.Lock()
		f.Unlock()
	}
}
