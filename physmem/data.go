package physmem

import (
	"encoding/binary"
	"fmt"
	"sync"
)

// Frame data is little-endian, like the x86 memory it stands for.

// Load64 reads the aligned 64-bit word at byte offset off.
func (f *Frame) Load64(off int) (uint64, error) {
	if off < 0 || off >= PageSize || off%8 != 0 {
		return 0, fmt.Errorf("physmem: load64 at %d: %w", off, ErrInvalid)
	}
	d := f.data.Load()
	if d == nil {
		return 0, nil
	}
	return d[off/8].Load(), nil
}

// Store64 writes the aligned 64-bit word at byte offset off. A store to a
// free frame is dropped and reported as ErrFreed.
func (f *Frame) Store64(off int, v uint64) error {
	if off < 0 || off >= PageSize || off%8 != 0 {
		return fmt.Errorf("physmem: store64 at %d: %w", off, ErrInvalid)
	}
	d, err := f.writable()
	if err != nil {
		return err
	}
	d[off/8].Store(v)
	return nil
}

// ReadAt copies len(p) bytes from offset off of the frame into p. A frame
// never written reads as zeros, a free frame as PoisonWord bytes.
func (f *Frame) ReadAt(p []byte, off int) (int, error) {
	if err := checkSpan(off, len(p)); err != nil {
		return 0, fmt.Errorf("physmem: read %d bytes at %d: %w", len(p), off, err)
	}
	d := f.data.Load()
	if d == nil {
		clear(p)
		return len(p), nil
	}
	var word [8]byte
	for n := 0; n < len(p); {
		pos := off + n
		binary.LittleEndian.PutUint64(word[:], d[pos/8].Load())
		n += copy(p[n:], word[pos%8:])
	}
	return len(p), nil
}

// WriteAt copies p into the frame at offset off. Whole aligned words are
// stored directly; partial words are merged by compare-and-swap so that a
// concurrent writer of the other bytes of the word is never overwritten.
// A write to a free frame is dropped and reported as ErrFreed.
func (f *Frame) WriteAt(p []byte, off int) (int, error) {
	if err := checkSpan(off, len(p)); err != nil {
		return 0, fmt.Errorf("physmem: write %d bytes at %d: %w", len(p), off, err)
	}
	d, err := f.writable()
	if err != nil {
		return 0, err
	}
	for n := 0; n < len(p); {
		pos := off + n
		w, b := pos/8, pos%8
		if b == 0 && len(p)-n >= 8 {
			d[w].Store(binary.LittleEndian.Uint64(p[n:]))
			n += 8
			continue
		}
		chunk := min(8-b, len(p)-n)
		for {
			old := d[w].Load()
			var word [8]byte
			binary.LittleEndian.PutUint64(word[:], old)
			copy(word[b:], p[n:n+chunk])
			if d[w].CompareAndSwap(old, binary.LittleEndian.Uint64(word[:])) {
				break
			}
		}
		n += chunk
	}
	return len(p), nil
}

// CopyFrom makes the frame's contents a copy of src's (copy_user_highpage,
// for COW and migration). src must not be written concurrently if the copy
// is to be a snapshot; the caller arranges that, as the kernel does by
// write-protecting or unmapping first.
func (f *Frame) CopyFrom(src *Frame) error {
	s := src.data.Load()
	if s == poisonData {
		return fmt.Errorf("physmem: copy from pfn %#x: %w", src.pfn, ErrFreed)
	}
	if s == nil {
		return f.Zero()
	}
	d, err := f.writable()
	if err != nil {
		return err
	}
	for i := range d {
		d[i].Store(s[i].Load())
	}
	return nil
}

// Zero clears the frame's contents.
func (f *Frame) Zero() error {
	for {
		d := f.data.Load()
		if d == poisonData {
			return fmt.Errorf("physmem: zero pfn %#x: %w", f.pfn, ErrFreed)
		}
		if d == nil || f.data.CompareAndSwap(d, nil) {
			return nil
		}
	}
}

// IsZero reports whether every byte of the frame is zero (a never-written
// frame is).
func (f *Frame) IsZero() bool {
	d := f.data.Load()
	if d == nil {
		return true
	}
	for i := range d {
		if d[i].Load() != 0 {
			return false
		}
	}
	return true
}

// Equal reports whether f and g hold the same bytes (memcmp_pages, as
// KSM compares candidates), without copying either. A freed frame equals
// nothing.
func (f *Frame) Equal(g *Frame) bool {
	a, b := f.data.Load(), g.data.Load()
	switch {
	case a == poisonData || b == poisonData:
		return false
	case a == b:
		return true
	case a == nil:
		return g.IsZero()
	case b == nil:
		return f.IsZero()
	}
	for i := range a {
		if a[i].Load() != b[i].Load() {
			return false
		}
	}
	return true
}

// HasData reports whether the frame's data has been allocated, that is,
// whether it was ever written since it was allocated.
func (f *Frame) HasData() bool {
	d := f.data.Load()
	return d != nil && d != poisonData
}

// writable returns the frame's data, allocating it on first write.
func (f *Frame) writable() (*pageData, error) {
	var fresh *pageData
	for {
		d := f.data.Load()
		if d == nil {
			// Loop rather than trust one retry: a concurrent Zero can
			// put nil back between our failed swap and the next load.
			if fresh == nil {
				fresh = newData()
			}
			if f.data.CompareAndSwap(nil, fresh) {
				return fresh, nil
			}
			continue
		}
		if fresh != nil {
			dataPool.Put(fresh) // zeroed and never published
		}
		if d == poisonData {
			return nil, fmt.Errorf("physmem: write to pfn %#x: %w", f.pfn, ErrFreed)
		}
		return d, nil
	}
}

// dataPool holds the data of freed frames for the next first write to
// reuse, so that a frame's life costs the Go heap no allocation and the
// collector no work (RAM does not come and go either). A frame's data
// comes here only from the free path (Allocator.release), after it has
// swapped poisonData in: whoever loads the frame's data from then on
// sees poison. An access that loaded the data before the free and uses
// it after is one the TLB flush and the reference counts must order
// before the free; one that is not (a translation that survived the
// free, which the checker reports) may land in the frame the data is
// recycled into, as a stale TLB's store lands in the reused page on
// hardware, and under the race detector it races with the clear below
// and is reported. Zero drops data instead: concurrent writers may still
// hold it. sync.Pool keeps per-P lists and lets the collector shrink the
// pool when frames stay free.
var dataPool sync.Pool

// newData returns zeroed data for a frame's first write: recycled if any
// is pooled (clear_page), else new.
func newData() *pageData {
	if d, _ := dataPool.Get().(*pageData); d != nil {
		// Exclusively ours: nobody may load it since the free that
		// pooled it (see dataPool), so a plain clear will do, where 512
		// atomic stores would cost several times as much. An assignment,
		// not clear() through unsafe: the race detector instruments it.
		*d = pageData{}
		return d
	}
	return new(pageData)
}

func checkSpan(off, n int) error {
	if off < 0 || n < 0 || off > PageSize || n > PageSize-off {
		return ErrInvalid
	}
	return nil
}
