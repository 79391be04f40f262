package gomm_test

import (
	"encoding/binary"
	"errors"
	"maps"
	"slices"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/tlb"
	"pgregory.net/rapid"
)

// window is where the model's fixed-address operations land, so they
// overlap each other often.
const (
	window      = 0x1000_0000
	windowPages = 48
)

type pageState struct {
	prot gomm.Prot
	val  uint64 // the word at offset 0
}

// mmModel checks an MM against a model of its pages: which are mapped,
// with what protection and what first word. Two CPUs run the MM's task,
// so a stale TLB entry on either shows as a wrong value.
type mmModel struct {
	m     *gomm.Machine
	mm    *gomm.MM
	cpus  []*tlb.CPU
	pages map[uint64]pageState
}

func (s *mmModel) drawRange(t *rapid.T) (uint64, uint64) {
	lo := rapid.IntRange(0, windowPages-1).Draw(t, "page")
	n := rapid.IntRange(1, windowPages-lo).Draw(t, "pages")
	return window + uint64(lo)*page, uint64(n)
}

func drawProt(t *rapid.T) gomm.Prot {
	return rapid.SampledFrom([]gomm.Prot{gomm.ProtNone, gomm.ProtRead, gomm.ProtRead | gomm.ProtWrite, gomm.ProtRead | gomm.ProtExec}).Draw(t, "prot")
}

func (s *mmModel) mapped(addr, n uint64) bool {
	for i := range n {
		if _, ok := s.pages[addr+i*page]; !ok {
			return false
		}
	}
	return true
}

func expect(t *rapid.T, op string, err, want error) {
	t.Helper()
	if (want == nil) != (err == nil) || (want != nil && !errors.Is(err, want)) {
		t.Fatalf("%s: got %v, want %v", op, err, want)
	}
}

func (s *mmModel) MmapFixed(t *rapid.T) {
	addr, n := s.drawRange(t)
	prot := drawProt(t)
	populate := rapid.Bool().Draw(t, "populate")
	flags := anon | gomm.MapFixed
	if populate {
		flags |= gomm.MapPopulate
	}
	got, err := s.mm.Mmap(addr, n*page, prot, flags)
	expect(t, "mmap fixed", err, nil)
	if got != addr {
		t.Fatalf("mmap fixed at %#x returned %#x", addr, got)
	}
	for i := range n {
		s.pages[addr+i*page] = pageState{prot: prot}
	}
}

func (s *mmModel) MmapAnywhere(t *rapid.T) {
	n := uint64(rapid.IntRange(1, 8).Draw(t, "pages"))
	got, err := s.mm.Mmap(0, n*page, gomm.ProtRead|gomm.ProtWrite, anon)
	expect(t, "mmap", err, nil)
	for i := range n {
		if _, taken := s.pages[got+i*page]; taken {
			t.Fatalf("mmap placed a mapping over page %#x", got+i*page)
		}
		s.pages[got+i*page] = pageState{prot: gomm.ProtRead | gomm.ProtWrite}
	}
}

func (s *mmModel) Munmap(t *rapid.T) {
	addr, n := s.drawRange(t)
	expect(t, "munmap", s.mm.Munmap(addr, n*page), nil)
	for i := range n {
		delete(s.pages, addr+i*page)
	}
}

func (s *mmModel) Mprotect(t *rapid.T) {
	addr, n := s.drawRange(t)
	prot := drawProt(t)
	err := s.mm.Mprotect(addr, n*page, prot)
	if !s.mapped(addr, n) {
		expect(t, "mprotect over a hole", err, gomm.ErrNoMem)
		return
	}
	expect(t, "mprotect", err, nil)
	for i := range n {
		p := s.pages[addr+i*page]
		p.prot = prot
		s.pages[addr+i*page] = p
	}
}

func (s *mmModel) DontNeed(t *rapid.T) {
	addr, n := s.drawRange(t)
	err := s.mm.Madvise(addr, n*page, gomm.MadvDontNeed)
	if !s.mapped(addr, n) {
		expect(t, "madvise over a hole", err, gomm.ErrNoMem)
		return
	}
	expect(t, "madvise", err, nil)
	for i := range n {
		p := s.pages[addr+i*page]
		p.val = 0
		s.pages[addr+i*page] = p
	}
}

// vmaOf returns the run of equally protected pages around addr: the VMA
// the kernel would have, since equal neighbours always merge.
func (s *mmModel) vmaOf(addr uint64) (start, end uint64, ok bool) {
	p, ok := s.pages[addr]
	if !ok {
		return 0, 0, false
	}
	start, end = addr, addr+page
	for q, ok := s.pages[start-page]; ok && q.prot == p.prot; q, ok = s.pages[start-page] {
		start -= page
	}
	for q, ok := s.pages[end]; ok && q.prot == p.prot; q, ok = s.pages[end] {
		end += page
	}
	return start, end, true
}

func (s *mmModel) Mremap(t *rapid.T) {
	addr, oldN := s.drawRange(t)
	newN := uint64(rapid.IntRange(1, windowPages).Draw(t, "new pages"))
	mayMove := rapid.Bool().Draw(t, "may move")
	var flags gomm.MremapFlags
	if mayMove {
		flags = gomm.MremapMayMove
	}
	got, err := s.mm.Mremap(addr, oldN*page, newN*page, flags, 0)
	_, vEnd, ok := s.vmaOf(addr)
	if !ok || vEnd < addr+oldN*page {
		expect(t, "mremap of no single mapping", err, gomm.ErrFault)
		return
	}
	old := make([]pageState, oldN)
	for i := range oldN {
		old[i] = s.pages[addr+i*page]
	}
	prot := old[0].prot
	switch {
	case newN <= oldN:
		expect(t, "mremap shrink", err, nil)
		for i := newN; i < oldN; i++ {
			delete(s.pages, addr+i*page)
		}
		return
	case vEnd == addr+oldN*page && s.free(addr+oldN*page, newN-oldN):
		expect(t, "mremap grow in place", err, nil)
		if got != addr {
			t.Fatalf("grew to %#x", got)
		}
		for i := oldN; i < newN; i++ {
			s.pages[addr+i*page] = pageState{prot: prot}
		}
		return
	case !mayMove:
		expect(t, "mremap blocked", err, gomm.ErrNoMem)
		return
	}
	expect(t, "mremap move", err, nil)
	for i := range oldN {
		delete(s.pages, addr+i*page)
	}
	if !s.free(got, newN) {
		t.Fatalf("moved over existing pages at %#x", got)
	}
	for i := range newN {
		st := pageState{prot: prot}
		if i < oldN {
			st = old[i]
		}
		s.pages[got+i*page] = st
	}
}

func (s *mmModel) free(addr, n uint64) bool {
	for i := range n {
		if _, ok := s.pages[addr+i*page]; ok {
			return false
		}
	}
	return true
}

func (s *mmModel) somePage(t *rapid.T) uint64 {
	if len(s.pages) == 0 || rapid.IntRange(0, 4).Draw(t, "unmapped") == 0 {
		a, _ := s.drawRange(t)
		return a
	}
	return rapid.SampledFrom(slices.Sorted(maps.Keys(s.pages))).Draw(t, "mapped page")
}

func (s *mmModel) Store(t *rapid.T) {
	va := s.somePage(t)
	cpu := rapid.SampledFrom(s.cpus).Draw(t, "cpu")
	v := rapid.Uint64Range(1, 1<<40).Draw(t, "value")
	err := cpu.Store64(va, v)
	p, ok := s.pages[va]
	if !ok || p.prot&gomm.ProtWrite == 0 {
		expect(t, "store", err, gomm.ErrFault)
		return
	}
	expect(t, "store", err, nil)
	p.val = v
	s.pages[va] = p
}

func (s *mmModel) Load(t *rapid.T) {
	va := s.somePage(t)
	cpu := rapid.SampledFrom(s.cpus).Draw(t, "cpu")
	v, err := cpu.Load64(va)
	p, ok := s.pages[va]
	if !ok || p.prot == gomm.ProtNone {
		expect(t, "load", err, gomm.ErrFault)
		return
	}
	expect(t, "load", err, nil)
	if v != p.val {
		t.Fatalf("load %#x on cpu%d = %#x, model %#x", va, cpu.ID(), v, p.val)
	}
}

func (s *mmModel) ReadWriteAt(t *rapid.T) {
	va := s.somePage(t)
	p, ok := s.pages[va]
	var buf [8]byte
	if rapid.Bool().Draw(t, "write") {
		v := rapid.Uint64Range(1, 1<<40).Draw(t, "value")
		binary.LittleEndian.PutUint64(buf[:], v)
		_, err := s.mm.WriteAt(buf[:], va)
		if !ok || p.prot&gomm.ProtWrite == 0 {
			expect(t, "WriteAt", err, gomm.ErrFault)
			return
		}
		expect(t, "WriteAt", err, nil)
		p.val = v
		s.pages[va] = p
		return
	}
	_, err := s.mm.ReadAt(buf[:], va)
	if !ok || p.prot == gomm.ProtNone {
		expect(t, "ReadAt", err, gomm.ErrFault)
		return
	}
	expect(t, "ReadAt", err, nil)
	if got := binary.LittleEndian.Uint64(buf[:]); got != p.val {
		t.Fatalf("ReadAt %#x = %#x, model %#x", va, got, p.val)
	}
}

func (s *mmModel) Check(t *rapid.T) {
	// The VMAs must cover exactly the model's pages with their
	// protections. How they are cut is the MM's business: neighbours
	// with different anon_vmas or page offsets (after an mremap) stay
	// apart, as in Linux.
	got := map[uint64]gomm.Prot{}
	var last uint64
	for _, v := range s.mm.VMAs() {
		if v.Start < last || v.End <= v.Start {
			t.Fatalf("VMAs out of order or empty: %v", s.mm.VMAs())
		}
		last = v.End
		for a := v.Start; a < v.End; a += page {
			got[a] = v.Prot
		}
	}
	want := map[uint64]gomm.Prot{}
	for a, p := range s.pages {
		want[a] = p.prot
	}
	if !maps.Equal(got, want) {
		t.Fatalf("VMAs %v do not cover the model's pages %v", s.mm.VMAs(), want)
	}
	if rss := s.mm.RSS(); rss < 0 || rss > int64(len(s.pages)) {
		t.Fatalf("RSS %d with %d pages mapped", rss, len(s.pages))
	}
	if v, n := s.m.Violations(); n > 0 {
		t.Fatalf("checker: %v", v[0])
	}
}

func TestMMStateMachine(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		m, err := gomm.NewMachine(gomm.Config{CPUs: 2, Frames: 1024, Check: true, TLBEntries: 8})
		if err != nil {
			t.Fatal(err)
		}
		mm := m.NewMM()
		s := &mmModel{m: m, mm: mm, cpus: m.CPUs(), pages: map[uint64]pageState{}}
		for _, c := range s.cpus {
			c.Switch(mm.NewTask("t"))
		}
		t.Repeat(rapid.StateMachineActions(s))
		for _, c := range s.cpus {
			c.Switch(tlb.NewKernelThread("idle"))
		}
		if err := mm.Exit(); err != nil {
			t.Fatal(err)
		}
		if free := m.RAM().Stats().Free; free != 1023 {
			t.Fatalf("%d frames free after exit, want 1023", free)
		}
		if v, n := m.Violations(); n > 0 {
			t.Fatalf("checker: %v", v[0])
		}
	})
}
