package gomm_test

import (
	"encoding/binary"
	"maps"
	"slices"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/internal/testmain"
	"pgregory.net/rapid"
)

// The huge-page model: processes forked from each other map, write,
// protect, zap and unmap arbitrary page ranges of a window of two huge
// pages, with THP always on, while reclaim, KSM and migration run. Every
// range edge that cuts a huge page splits it, every fork shares whole
// leaves, every write to a shared one copies a page: the model is each
// process's contents, checked after every step with the reverse maps
// and the checker.

const (
	thpWindow = 0x4000_0000
	thpPages  = 2 * 512
)

type thpPage struct {
	val uint64
	ro  bool
}

type thpProc struct {
	mm    *gomm.MM
	pages map[uint64]thpPage // mapped pages by address
}

type thpModel struct {
	m       *gomm.Machine
	procs   []*thpProc
	nextVal uint64
	injectionTally
}

func (s *thpModel) proc(t *rapid.T) *thpProc {
	return s.procs[rapid.IntRange(0, len(s.procs)-1).Draw(t, "proc")]
}

// span draws a range of the window, often huge-page aligned or a whole
// huge page, often cutting one.
func (s *thpModel) span(t *rapid.T) (uint64, uint64) {
	var lo, n int
	switch rapid.IntRange(0, 2).Draw(t, "shape") {
	case 0: // whole huge pages
		lo = 512 * rapid.IntRange(0, 1).Draw(t, "huge")
		n = 512 * rapid.IntRange(1, (thpPages-lo)/512).Draw(t, "huges")
	case 1: // a few pages anywhere
		lo = rapid.IntRange(0, thpPages-1).Draw(t, "page")
		n = rapid.IntRange(1, min(8, thpPages-lo)).Draw(t, "pages")
	default:
		lo = rapid.IntRange(0, thpPages-1).Draw(t, "page")
		n = rapid.IntRange(1, thpPages-lo).Draw(t, "pages")
	}
	return thpWindow + uint64(lo)*page, uint64(n)
}

func (p *thpProc) allMapped(addr, n uint64) bool {
	for i := range n {
		if _, ok := p.pages[addr+i*page]; !ok {
			return false
		}
	}
	return true
}

func (s *thpModel) Mmap(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	_, err := p.mm.Mmap(addr, n*page, rw, anon|gomm.MapFixed)
	expect(t, "mmap", err, nil)
	for i := range n {
		p.pages[addr+i*page] = thpPage{}
	}
}

func (s *thpModel) Munmap(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	expect(t, "munmap", p.mm.Munmap(addr, n*page), nil)
	for i := range n {
		delete(p.pages, addr+i*page)
	}
}

func (s *thpModel) Mprotect(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	ro := rapid.Bool().Draw(t, "readonly")
	prot := rw
	if ro {
		prot = gomm.ProtRead
	}
	err := p.mm.Mprotect(addr, n*page, prot)
	if !p.allMapped(addr, n) {
		expect(t, "mprotect of a hole", err, gomm.ErrNoMem)
		return
	}
	expect(t, "mprotect", err, nil)
	for i := range n {
		pg := p.pages[addr+i*page]
		pg.ro = ro
		p.pages[addr+i*page] = pg
	}
}

func (s *thpModel) DontNeed(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	err := p.mm.Madvise(addr, n*page, gomm.MadvDontNeed)
	if !p.allMapped(addr, n) {
		expect(t, "madvise of a hole", err, gomm.ErrNoMem)
		return
	}
	expect(t, "madvise(DONTNEED)", err, nil)
	for i := range n {
		pg := p.pages[addr+i*page]
		pg.val = 0
		p.pages[addr+i*page] = pg
	}
}

func (s *thpModel) Write(t *rapid.T) {
	p := s.proc(t)
	addr, _ := s.span(t)
	s.nextVal++
	v := s.nextVal<<8 | 0xa5
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_, err := p.mm.WriteAt(b[:], addr)
	if s.failed(err) {
		return
	}
	pg, ok := p.pages[addr]
	if !ok || pg.ro {
		expect(t, "write", err, gomm.ErrFault)
		return
	}
	expect(t, "write", err, nil)
	pg.val = v
	p.pages[addr] = pg
}

func (s *thpModel) Fork(t *rapid.T) {
	if len(s.procs) >= 3 {
		t.Skip("enough processes")
	}
	p := s.proc(t)
	child, err := p.mm.Fork()
	if s.failed(err) {
		return
	}
	expect(t, "fork", err, nil)
	s.procs = append(s.procs, &thpProc{mm: child, pages: maps.Clone(p.pages)})
}

func (s *thpModel) Exit(t *rapid.T) {
	if len(s.procs) < 2 {
		t.Skip("the last process stays")
	}
	i := rapid.IntRange(0, len(s.procs)-1).Draw(t, "exit")
	expect(t, "exit", s.procs[i].mm.Exit(), nil)
	s.procs = slices.Delete(s.procs, i, i+1)
}

func (s *thpModel) Reclaim(t *rapid.T) {
	s.m.Reclaim(rapid.IntRange(1, 200).Draw(t, "n"))
}

func (s *thpModel) KSMScan(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	if p.allMapped(addr, n) {
		expect(t, "madvise(MERGEABLE)", p.mm.Madvise(addr, n*page, gomm.MadvMergeable), nil)
	}
	s.m.KSMScan(rapid.IntRange(1, 200).Draw(t, "n"))
}

func (s *thpModel) Migrate(t *rapid.T) {
	p := s.proc(t)
	addr, _ := s.span(t)
	_, _ = p.mm.MovePages([]uint64{addr}) // busy or unmapped pages stay
}

// Check reads every page written and a sample of the rest.
func (s *thpModel) Check(t *rapid.T) {
	for pi, p := range s.procs {
		for _, va := range slices.Sorted(maps.Keys(p.pages)) {
			if pg := p.pages[va]; pg.val != 0 || va%(64*page) == 0 {
				s.expectRead(t, pi, p, va)
			}
		}
		for i := uint64(0); i < thpPages; i += 97 {
			s.expectRead(t, pi, p, thpWindow+i*page)
		}
	}
	mms := make([]*gomm.MM, len(s.procs))
	for i, p := range s.procs {
		mms[i] = p.mm
	}
	if err := s.m.CheckRmap(mms...); err != nil {
		t.Fatal(err)
	}
	if v, n := s.m.Violations(); n > 0 {
		t.Fatalf("checker: %v", v[0])
	}
}

func (s *thpModel) expectRead(t *rapid.T, pi int, p *thpProc, va uint64) {
	var b [8]byte
	_, err := p.mm.ReadAt(b[:], va)
	if s.failed(err) {
		return
	}
	pg, ok := p.pages[va]
	if !ok {
		if err == nil {
			t.Fatalf("proc %d read of unmapped %#x succeeded", pi, va)
		}
		return
	}
	if err != nil {
		t.Fatalf("proc %d read of %#x: %v", pi, va, err)
	}
	if got := binary.LittleEndian.Uint64(b[:]); got != pg.val {
		t.Fatalf("proc %d at %#x: %#x, model %#x", pi, va, got, pg.val)
	}
}

func TestTHPStateMachine(t *testing.T) {
	// Its lock paths are the unit tests', run with lockdep; here lockdep's
	// stack capture per lock would cost 80% of the time.
	testmain.WithoutLockdep(t)
	rapid.Check(t, func(t *rapid.T) { runTHPModel(t, gomm.Injection{}) })
}

// TestTHPStateMachineUnderInjection runs the huge-page model with
// allocations failing: huge faults fall back, a fork copying a huge leaf
// runs out of page tables, splits and copies fail half way.
func TestTHPStateMachineUnderInjection(t *testing.T) {
	testmain.WithoutLockdep(t)
	var noMem int
	rapid.Check(t, func(t *rapid.T) {
		noMem += runTHPModel(t, gomm.Injection{
			Rate: rapid.SampledFrom([]float64{0.02, 0.1, 0.3}).Draw(t, "rate"),
			Seed: rapid.Uint64().Draw(t, "seed"),
		})
	})
	if noMem == 0 {
		t.Fatal("no operation failed: the injection did not reach the model's operations")
	}
	t.Logf("%d operations failed with ErrNoMem", noMem)
}

func runTHPModel(t *rapid.T, inj gomm.Injection) (noMem int) {
	{
		const frames = 4096
		m, err := gomm.NewMachine(gomm.Config{CPUs: 1, Frames: frames, SwapSlots: 8192, THP: gomm.THPAlways, Check: true, Inject: inj})
		if err != nil {
			t.Fatal(err)
		}
		s := &thpModel{m: m, procs: []*thpProc{{mm: m.NewMM(), pages: map[uint64]thpPage{}}},
			injectionTally: injectionTally{injecting: inj.Rate > 0}}
		t.Repeat(rapid.StateMachineActions(s))
		if m.Stats().THP.FaultAlloc == 0 {
			t.Log("no huge page in this run")
		}
		for _, p := range s.procs {
			if err := p.mm.Exit(); err != nil {
				t.Fatal(err)
			}
		}
		if st := m.Stats(); st.RAM.Free != frames-1 || st.Swap.Used != 0 || st.AnonVMAs != 0 {
			t.Fatalf("after every exit: %d frames free, %d swap slots used, %d anon_vmas live", st.RAM.Free, st.Swap.Used, st.AnonVMAs)
		}
		return s.noMem
	}
}
