package physmem

import (
	"encoding/binary"
	"errors"
	"maps"
	"slices"
	"testing"

	"pgregory.net/rapid"
)

// allocModel checks the allocator against a model of who holds what.
type allocModel struct {
	a     *Allocator
	refs  map[PFN]int32  // allocated frames and their reference counts
	words map[PFN]uint64 // last value stored at offset 0 of each allocated frame
}

func (m *allocModel) allocated(t *rapid.T) *Frame {
	if len(m.refs) == 0 {
		t.Skip("nothing allocated")
	}
	p := rapid.SampledFrom(slices.Sorted(maps.Keys(m.refs))).Draw(t, "pfn")
	f, _ := m.a.Frame(p)
	return f
}

func (m *allocModel) Alloc(t *rapid.T) { m.alloc(t, m.a.Alloc) }

// AllocOn draws a CPU, sometimes one without a cache: the model is the
// same, since a frame cached anywhere is free and must be found.
func (m *allocModel) AllocOn(t *rapid.T) {
	cpu := rapid.IntRange(-1, modelCPUs).Draw(t, "cpu")
	m.alloc(t, func() (*Frame, error) { return m.a.AllocOn(cpu) })
}

func (m *allocModel) DrainCPUCaches(t *rapid.T) { m.a.DrainCPUCaches() }

// modelCPUs is how many CPU caches the model's allocator has.
const modelCPUs = 2

func (m *allocModel) alloc(t *rapid.T, alloc func() (*Frame, error)) {
	f, err := alloc()
	if len(m.refs) == m.a.Frames() {
		if !errors.Is(err, ErrNoMem) {
			t.Fatalf("alloc with RAM full: %v", err)
		}
		return
	}
	if err != nil {
		t.Fatalf("alloc: %v", err)
	}
	if _, dup := m.refs[f.PFN()]; dup {
		t.Fatalf("pfn %d handed out twice", f.PFN())
	}
	m.refs[f.PFN()] = 1
	m.words[f.PFN()] = 0
}

// AllocHuge must succeed exactly when some aligned block is wholly free.
func (m *allocModel) AllocHuge(t *rapid.T) {
	possible := false
	for b := 0; b+HugeFrames <= m.a.Frames() && !possible; b += HugeFrames {
		possible = true
		for p := b; p < b+HugeFrames; p++ {
			if _, held := m.refs[PFN(p)]; held {
				possible = false
				break
			}
		}
	}
	f, err := m.a.AllocHuge()
	if !possible {
		if !errors.Is(err, ErrNoMem) {
			t.Fatalf("huge alloc with no free block: %v", err)
		}
		return
	}
	if err != nil {
		t.Fatalf("huge alloc with a free block: %v", err)
	}
	if f.PFN()%HugeFrames != 0 {
		t.Fatalf("huge block at unaligned pfn %d", f.PFN())
	}
	for p := f.PFN(); p < f.PFN()+HugeFrames; p++ {
		if _, dup := m.refs[p]; dup {
			t.Fatalf("pfn %d handed out twice", p)
		}
		m.refs[p] = 1
		m.words[p] = 0
	}
}

// PutBlock drops every frame of an allocated block at once, as a zapped
// huge mapping does.
func (m *allocModel) PutBlock(t *rapid.T) {
	var heads []PFN
	for p := range m.refs {
		if p%HugeFrames == 0 && int(p)+HugeFrames <= m.a.Frames() {
			heads = append(heads, p)
		}
	}
	if len(heads) == 0 {
		t.Skip("no block head allocated")
	}
	slices.Sort(heads)
	head := rapid.SampledFrom(heads).Draw(t, "head")
	for p := head; p < head+HugeFrames; p++ {
		if m.refs[p] != 1 {
			continue
		}
		f, _ := m.a.Frame(p)
		if err := m.a.Put(f); err != nil {
			t.Fatal(err)
		}
		delete(m.refs, p)
		delete(m.words, p)
	}
}

func (m *allocModel) Get(t *rapid.T) {
	f := m.allocated(t)
	if err := m.a.Get(f); err != nil {
		t.Fatal(err)
	}
	m.refs[f.PFN()]++
}

func (m *allocModel) Put(t *rapid.T) {
	f := m.allocated(t)
	gen := f.Gen()
	if err := m.a.Put(f); err != nil {
		t.Fatal(err)
	}
	m.refs[f.PFN()]--
	if m.refs[f.PFN()] == 0 {
		delete(m.refs, f.PFN())
		delete(m.words, f.PFN())
		if f.Gen() != gen+1 {
			t.Fatalf("generation not bumped on free")
		}
	}
}

func (m *allocModel) PutFree(t *rapid.T) {
	p := PFN(rapid.IntRange(0, m.a.Frames()-1).Draw(t, "pfn"))
	if _, held := m.refs[p]; held {
		t.Skip("frame is allocated")
	}
	f, _ := m.a.Frame(p)
	if err := m.a.Put(f); !errors.Is(err, ErrFreed) {
		t.Fatalf("put of free frame: %v", err)
	}
}

func (m *allocModel) Store(t *rapid.T) {
	f := m.allocated(t)
	v := rapid.Uint64().Draw(t, "v")
	if err := f.Store64(0, v); err != nil {
		t.Fatal(err)
	}
	m.words[f.PFN()] = v
}

func (m *allocModel) Check(t *rapid.T) {
	// Every frame the bitmap calls free has an entry on the stack.
	onStack := map[uint32]bool{}
	for _, pfn := range m.a.free {
		if m.a.freeBits[pfn/64]&(1<<(pfn%64)) != 0 {
			onStack[pfn] = true
		}
	}
	if len(onStack) != m.a.nfree {
		t.Fatalf("%d free frames on the stack, %d in the bitmap", len(onStack), m.a.nfree)
	}
	st := m.a.Stats()
	if st.Free != m.a.Frames()-len(m.refs) {
		t.Fatalf("free %d, model says %d", st.Free, m.a.Frames()-len(m.refs))
	}
	for p, want := range m.refs {
		f, _ := m.a.Frame(p)
		if got := f.RefCount(); got != want {
			t.Fatalf("pfn %d ref %d, model %d", p, got, want)
		}
		if got, _ := f.Load64(0); got != m.words[p] {
			t.Fatalf("pfn %d word %#x, model %#x", p, got, m.words[p])
		}
	}
}

func TestAllocatorStateMachine(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		frames := rapid.IntRange(1, 8).Draw(t, "frames")
		if rapid.Bool().Draw(t, "huge") {
			frames = rapid.IntRange(HugeFrames-1, 3*HugeFrames+7).Draw(t, "hugeFrames")
		}
		a, err := New(frames, CPUCaches(modelCPUs))
		if err != nil {
			t.Fatal(err)
		}
		t.Repeat(rapid.StateMachineActions(&allocModel{a: a, refs: map[PFN]int32{}, words: map[PFN]uint64{}}))
	})
}

// FuzzFrameIO drives ReadAt, WriteAt, Load64 and Store64 with arbitrary
// offsets and lengths against a byte-slice model: no panic, ErrInvalid for
// every out-of-range span, and nothing changed by a refused call.
func FuzzFrameIO(f *testing.F) {
	f.Add([]byte{0, 0, 0, 5, 1, 2, 3, 4, 5})
	f.Add([]byte{1, 0x0f, 0xff, 0x10})
	f.Add([]byte{2, 0x10, 0x00, 9, 3, 0x0f, 0xf8})
	f.Fuzz(func(t *testing.T, prog []byte) {
		a, _ := New(1)
		fr, _ := a.Alloc()
		model := make([]byte, PageSize)
		for len(prog) >= 4 {
			op := prog[0] % 4
			off := int(int16(binary.BigEndian.Uint16(prog[1:3])))
			n := int(prog[3])
			prog = prog[4:]
			valid := off >= 0 && off+n <= PageSize
			switch op {
			case 0: // write n bytes taken from the program
				data := make([]byte, n)
				copy(data, prog)
				_, err := fr.WriteAt(data, off)
				if valid != (err == nil) || (!valid && !errors.Is(err, ErrInvalid)) {
					t.Fatalf("WriteAt(%d bytes, %d): %v", n, off, err)
				}
				if valid {
					copy(model[off:], data)
				}
			case 1:
				buf := make([]byte, n)
				_, err := fr.ReadAt(buf, off)
				if valid != (err == nil) || (!valid && !errors.Is(err, ErrInvalid)) {
					t.Fatalf("ReadAt(%d bytes, %d): %v", n, off, err)
				}
				if valid && string(buf) != string(model[off:off+n]) {
					t.Fatalf("ReadAt(%d, %d) mismatch", n, off)
				}
			case 2:
				v := uint64(n) * 0x0101010101010101
				err := fr.Store64(off, v)
				ok := off >= 0 && off < PageSize && off%8 == 0
				if ok != (err == nil) || (!ok && !errors.Is(err, ErrInvalid)) {
					t.Fatalf("Store64(%d): %v", off, err)
				}
				if ok {
					binary.LittleEndian.PutUint64(model[off:], v)
				}
			case 3:
				v, err := fr.Load64(off)
				ok := off >= 0 && off < PageSize && off%8 == 0
				if ok != (err == nil) || (!ok && !errors.Is(err, ErrInvalid)) {
					t.Fatalf("Load64(%d): %v", off, err)
				}
				if ok && v != binary.LittleEndian.Uint64(model[off:]) {
					t.Fatalf("Load64(%d) = %#x", off, v)
				}
			}
		}
		all := make([]byte, PageSize)
		if _, err := fr.ReadAt(all, 0); err != nil || string(all) != string(model) {
			t.Fatalf("final contents differ: %v", err)
		}
	})
}
