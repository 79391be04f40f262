package gomm_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/tlb"
	"pgregory.net/rapid"
)

// The processes model, the state machine over the whole public API:
// several address spaces forked from each other map private anonymous
// memory and one file, shared or private, write and read it (through
// ReadAt/WriteAt, through a CPU's TLB and fault handler, through the
// file), unmap, protect, zap and lock it, migrate it to device memory
// (the CPU's next access brings it back), subscribe and unsubscribe to
// its invalidations, and exit, while reclaim, KSM, migration and
// truncation run between their accesses. The model is every process's
// memory contents and protections; after every step each mapped page
// must read as the model says, the reverse maps must be consistent,
// every subscriber must have seen each invalidation's start and end,
// and the checker must be quiet. Run again with fault injection, every
// operation either does what the model says or fails with ErrNoMem
// having changed nothing.

const (
	pmWindow = 0x2000_0000
	pmPages  = 12 // window pages per process
	pmFile   = 8  // file pages
)

type pmKind uint8

const (
	pmAnon     pmKind = iota // private anonymous: val
	pmShared                 // shared file page idx: the file's value
	pmPrivFile               // private file page idx: the file's value until copied, then val
)

type pmPage struct {
	kind   pmKind
	idx    uint64
	copied bool
	val    uint64
	ro     bool // mprotected read-only
}

type pmProc struct {
	mm           *gomm.MM
	task         *tlb.Task
	pages        map[uint64]pmPage // by address
	sub          *pairing          // a subscriber checking start/end pairing, or nil
	subscription *notifier.Subscription
}

// pairing is a subscriber that checks every invalidate_range_end has
// its start, and that none is left open when the MM is quiet.
type pairing struct {
	mu   sync.Mutex
	open map[*notifier.Range]int
	bad  error
}

func (p *pairing) InvalidateRangeStart(r *notifier.Range) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.open[r]++
	return nil
}

func (p *pairing) InvalidateRangeEnd(r *notifier.Range) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.open[r] == 0 && p.bad == nil {
		p.bad = fmt.Errorf("end of %v without its start", r)
	}
	if p.open[r]--; p.open[r] <= 0 {
		delete(p.open, r)
	}
}

func (p *pairing) check() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bad == nil && len(p.open) > 0 {
		return fmt.Errorf("%d invalidations started and never ended", len(p.open))
	}
	return p.bad
}

type procsModel struct {
	m        *gomm.Machine
	dev      *fuzzDevice // device-private memory pages migrate to
	file     *gomm.File
	fileVals [pmFile]uint64
	fileSize uint64 // in pages
	procs    []*pmProc
	nextVal  uint64
	injectionTally
}

// injectionTally is a model's view of fault injection: with allocations
// failing at random (Config.Inject), an operation may fail with ErrNoMem,
// and must then have changed nothing the model tracks.
type injectionTally struct {
	injecting bool
	noMem     int // operations that failed with ErrNoMem
}

// failed reports whether err is an out-of-memory failure the injection
// explains; the caller then leaves the model as it was.
func (s *injectionTally) failed(err error) bool {
	if s.injecting && errors.Is(err, gomm.ErrNoMem) {
		s.noMem++
		return true
	}
	return false
}

func (s *procsModel) proc(t *rapid.T) *pmProc {
	return s.procs[rapid.IntRange(0, len(s.procs)-1).Draw(t, "proc")]
}

func (s *procsModel) span(t *rapid.T) (uint64, uint64) {
	lo := rapid.IntRange(0, pmPages-1).Draw(t, "page")
	n := rapid.IntRange(1, min(4, pmPages-lo)).Draw(t, "pages")
	return pmWindow + uint64(lo)*page, uint64(n)
}

func (s *procsModel) val() uint64 { s.nextVal++; return s.nextVal<<8 | 0x5a }

// read is what the model says va of p reads as; ok false means a fault.
func (s *procsModel) read(p *pmProc, va uint64) (uint64, bool) {
	pg, mapped := p.pages[va]
	switch {
	case !mapped:
		return 0, false
	case pg.kind == pmAnon:
		return pg.val, true
	case pg.idx >= s.fileSize:
		return 0, false // SIGBUS past the end, private copies included
	case pg.kind == pmPrivFile && pg.copied:
		return pg.val, true
	}
	return s.fileVals[pg.idx], true
}

func (s *procsModel) MmapAnon(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	_, err := p.mm.Mmap(addr, n*page, rw, anon|gomm.MapFixed)
	expect(t, "mmap anon", err, nil)
	for i := range n {
		p.pages[addr+i*page] = pmPage{kind: pmAnon}
	}
	if rapid.Bool().Draw(t, "mergeable") {
		expect(t, "madvise mergeable", p.mm.Madvise(addr, n*page, gomm.MadvMergeable), nil)
	}
}

func (s *procsModel) MmapFile(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	off := uint64(rapid.IntRange(0, pmFile-int(n)).Draw(t, "off"))
	shared := rapid.Bool().Draw(t, "shared")
	flags, kind := gomm.MapPrivate|gomm.MapFixed, pmPrivFile
	if shared {
		flags, kind = gomm.MapShared|gomm.MapFixed, pmShared
	}
	_, err := p.mm.MmapFile(addr, n*page, rw, flags, s.file, off*page)
	expect(t, "mmap file", err, nil)
	for i := range n {
		p.pages[addr+i*page] = pmPage{kind: kind, idx: off + i}
	}
}

func (s *procsModel) Munmap(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	expect(t, "munmap", p.mm.Munmap(addr, n*page), nil)
	for i := range n {
		delete(p.pages, addr+i*page)
	}
}

func (s *procsModel) Write(t *rapid.T) {
	p := s.proc(t)
	addr, _ := s.span(t)
	v := s.val()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_, err := p.mm.WriteAt(b[:], addr)
	if s.failed(err) {
		return
	}
	if _, ok := s.read(p, addr); !ok || p.pages[addr].ro {
		expect(t, "write", err, gomm.ErrFault)
		return
	}
	expect(t, "write", err, nil)
	pg := p.pages[addr]
	switch pg.kind {
	case pmShared:
		s.fileVals[pg.idx] = v
	default:
		pg.val, pg.copied = v, true
		p.pages[addr] = pg
	}
}

func (s *procsModel) FileWrite(t *rapid.T) {
	idx := uint64(rapid.IntRange(0, pmFile-1).Draw(t, "idx"))
	v := s.val()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_, err := s.file.WriteAt(b[:], int64(idx*page))
	if s.failed(err) {
		return
	}
	expect(t, "file write", err, nil)
	if idx >= s.fileSize { // the write grows the file; the gap reads as zeros
		for i := s.fileSize; i < idx; i++ {
			s.fileVals[i] = 0
		}
		s.fileSize = idx + 1
	}
	s.fileVals[idx] = v
}

func (s *procsModel) Truncate(t *rapid.T) {
	size := uint64(rapid.IntRange(0, pmFile).Draw(t, "size"))
	expect(t, "truncate", s.file.Truncate(size*page), nil)
	for i := size; i < pmFile; i++ {
		s.fileVals[i] = 0
	}
	if size < s.fileSize {
		// Private copies past the new end are unmapped too: if the file
		// grows back, they show the file again.
		for _, p := range s.procs {
			for va, pg := range p.pages {
				if pg.kind == pmPrivFile && pg.idx >= size {
					pg.copied, pg.val = false, 0
					p.pages[va] = pg
				}
			}
		}
	}
	s.fileSize = size
}

func (s *procsModel) Fork(t *rapid.T) {
	if len(s.procs) >= 4 {
		t.Skip("enough processes")
	}
	p := s.proc(t)
	child, err := p.mm.Fork()
	if s.failed(err) {
		return
	}
	expect(t, "fork", err, nil)
	c := &pmProc{mm: child, task: child.NewTask("child"), pages: map[uint64]pmPage{}}
	for va, pg := range p.pages {
		c.pages[va] = pg
	}
	s.procs = append(s.procs, c)
}

func (s *procsModel) Exit(t *rapid.T) {
	if len(s.procs) < 2 {
		t.Skip("the last process stays")
	}
	i := rapid.IntRange(0, len(s.procs)-1).Draw(t, "exit")
	if sub := s.procs[i].sub; sub != nil {
		if err := sub.check(); err != nil {
			t.Fatal(err)
		}
	}
	expect(t, "exit", s.procs[i].mm.Exit(), nil)
	s.procs = append(s.procs[:i], s.procs[i+1:]...)
}

func (s *procsModel) Reclaim(t *rapid.T) {
	s.m.Reclaim(rapid.IntRange(1, 64).Draw(t, "n"))
}

func (s *procsModel) KSMScan(t *rapid.T) {
	s.m.KSMScan(rapid.IntRange(1, 64).Draw(t, "n"))
}

func (s *procsModel) Migrate(t *rapid.T) {
	p := s.proc(t)
	addr, _ := s.span(t)
	_, _ = p.mm.MovePages([]uint64{addr}) // busy or unmapped pages stay
}

// spanMapped reports whether every page of [addr, addr+n pages) is
// mapped in p, and whether any is a private file page.
func (p *pmProc) spanMapped(addr, n uint64) (all, privFile bool) {
	for i := range n {
		pg, ok := p.pages[addr+i*page]
		if !ok {
			return false, privFile
		}
		privFile = privFile || pg.kind == pmPrivFile
	}
	return true, privFile
}

func (s *procsModel) Mprotect(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	ro := rapid.Bool().Draw(t, "readonly")
	prot := rw
	if ro {
		prot = gomm.ProtRead
	}
	err := p.mm.Mprotect(addr, n*page, prot)
	if all, _ := p.spanMapped(addr, n); !all {
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

// DontNeed: anonymous pages read zero again, private file pages show
// the file again, shared pages stay in the file.
func (s *procsModel) DontNeed(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	err := p.mm.Madvise(addr, n*page, gomm.MadvDontNeed)
	if all, _ := p.spanMapped(addr, n); !all {
		expect(t, "madvise of a hole", err, gomm.ErrNoMem)
		return
	}
	expect(t, "madvise(DONTNEED)", err, nil)
	for i := range n {
		pg := p.pages[addr+i*page]
		pg.val, pg.copied = 0, false
		p.pages[addr+i*page] = pg
	}
}

// Mlock populates and locks; contents do not change. (A writable
// private file page would be copied by the populate, so spans with one
// are left out.)
func (s *procsModel) Mlock(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	all, privFile := p.spanMapped(addr, n)
	if privFile {
		t.Skip("a private file page")
	}
	if rapid.Bool().Draw(t, "unlock") {
		err := p.mm.Munlock(addr, n*page)
		if !all {
			expect(t, "munlock of a hole", err, gomm.ErrNoMem)
			return
		}
		expect(t, "munlock", err, nil)
		return
	}
	err := p.mm.Mlock(addr, n*page)
	switch {
	case !all:
		expect(t, "mlock of a hole", err, gomm.ErrNoMem)
	case s.injecting && errors.Is(err, gomm.ErrAgain):
		s.noMem++ // some page could not be faulted in: locked all the same
	default:
		// Past the end of a truncated file, the populate faults: mlock
		// says ENOMEM, as Linux does.
		if err != nil && !errors.Is(err, gomm.ErrNoMem) {
			t.Fatalf("mlock: %v", err)
		}
	}
}

// CPUAccess loads or stores through a CPU's TLB and the fault handler.
func (s *procsModel) CPUAccess(t *rapid.T) {
	p := s.proc(t)
	addr, _ := s.span(t)
	cpu := s.m.CPU(0)
	cpu.Switch(p.task)
	defer cpu.Switch(tlbIdle())
	want, ok := s.read(p, addr)
	if rapid.Bool().Draw(t, "store") {
		v := s.val()
		err := cpu.Store64(addr, v)
		if s.failed(err) {
			return
		}
		if !ok || p.pages[addr].ro {
			expect(t, "store", err, gomm.ErrFault)
			return
		}
		expect(t, "store", err, nil)
		pg := p.pages[addr]
		if pg.kind == pmShared {
			s.fileVals[pg.idx] = v
		} else {
			pg.val, pg.copied = v, true
			p.pages[addr] = pg
		}
		return
	}
	got, err := cpu.Load64(addr)
	if s.failed(err) {
		return
	}
	if !ok {
		expect(t, "load", err, gomm.ErrFault)
		return
	}
	expect(t, "load", err, nil)
	if got != want {
		t.Fatalf("load of %#x: %#x, model %#x", addr, got, want)
	}
}

// ToDevice migrates a span's private anonymous pages into device
// memory; the next CPU access brings them back. Contents do not change.
func (s *procsModel) ToDevice(t *rapid.T) {
	p := s.proc(t)
	addr, n := s.span(t)
	if rapid.Bool().Draw(t, "one page") {
		n = 1 // inside one mapping for sure
	}
	_, err := p.mm.MigrateVMA(&gomm.MigrateVMA{Start: addr, End: addr + n*page, Select: gomm.MigrateSelectSystem,
		AllocDst: s.dev.alloc, Owner: s.dev.owner})
	// ErrInvalid: the span is not inside one mapping; ErrBusy: some pages
	// stayed (shared, file-backed, not present); ErrNoMem: the device or
	// RAM is full.
	if err != nil && !errors.Is(err, gomm.ErrInvalid) && !errors.Is(err, gomm.ErrBusy) && !errors.Is(err, gomm.ErrNoMem) {
		t.Fatalf("migrate to device: %v", err)
	}
}

// Subscribe registers or unregisters a subscriber that checks the
// pairing of every invalidation the model's operations make.
func (s *procsModel) Subscribe(t *rapid.T) {
	p := s.proc(t)
	if p.sub != nil {
		if err := p.sub.check(); err != nil {
			t.Fatal(err)
		}
		expect(t, "unregister", p.mm.UnregisterNotifier(p.subscription), nil)
		p.sub, p.subscription = nil, nil
		return
	}
	sub := &pairing{open: map[*notifier.Range]int{}}
	x, err := p.mm.RegisterNotifier(context.Background(), sub)
	expect(t, "register", err, nil)
	p.sub, p.subscription = sub, x
}

func (s *procsModel) Check(t *rapid.T) {
	for pi, p := range s.procs {
		for i := range uint64(pmPages) {
			va := pmWindow + i*page
			want, ok := s.read(p, va)
			var b [8]byte
			_, err := p.mm.ReadAt(b[:], va)
			if s.failed(err) {
				continue
			}
			if !ok {
				if err == nil {
					t.Fatalf("proc %d read of %#x succeeded, model says fault", pi, va)
				}
				continue
			}
			if err != nil {
				t.Fatalf("proc %d read of %#x: %v", pi, va, err)
			}
			if got := binary.LittleEndian.Uint64(b[:]); got != want {
				t.Fatalf("proc %d at %#x: %#x, model %#x (%+v)", pi, va, got, want, p.pages[va])
			}
		}
	}
	mms := make([]*gomm.MM, len(s.procs))
	for i, p := range s.procs {
		mms[i] = p.mm
	}
	if err := s.m.CheckRmap(mms...); err != nil {
		t.Fatal(err)
	}
	for pi, p := range s.procs {
		if p.sub != nil {
			if err := p.sub.check(); err != nil {
				t.Fatalf("proc %d's subscriber: %v", pi, err)
			}
		}
	}
	if v, n := s.m.Violations(); n > 0 {
		t.Fatalf("checker: %v", v[0])
	}
}

func TestProcessesStateMachine(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) { runProcessesModel(t, gomm.Injection{}) })
}

// TestProcessesStateMachineUnderInjection is the same model with frame,
// swap-slot and page-table allocations failing at random: every
// operation either does what the model says or fails with ErrNoMem having
// changed nothing, the reverse maps stay consistent after every step,
// and nothing leaks.
func TestProcessesStateMachineUnderInjection(t *testing.T) {
	var noMem int
	rapid.Check(t, func(t *rapid.T) {
		noMem += runProcessesModel(t, gomm.Injection{
			Rate: rapid.SampledFrom([]float64{0.02, 0.1, 0.3}).Draw(t, "rate"),
			Seed: rapid.Uint64().Draw(t, "seed"),
		})
	})
	if noMem == 0 {
		t.Fatal("no operation failed: the injection did not reach the model's operations")
	}
	t.Logf("%d operations failed with ErrNoMem", noMem)
}

func runProcessesModel(t *rapid.T, inj gomm.Injection) (noMem int) {
	{
		m, err := gomm.NewMachine(gomm.Config{CPUs: 1, Frames: 96, SwapSlots: 256, Check: true, Inject: inj})
		if err != nil {
			t.Fatal(err)
		}
		f, err := m.NewFile(pmFile * page)
		if err != nil {
			t.Fatal(err)
		}
		dev := &fuzzDevice{owner: new(int)}
		if dev.pm, err = m.AddDevicePagemap(16, dev.owner, dev); err != nil {
			t.Fatal(err)
		}
		for i := range uint64(16) {
			dev.free = append(dev.free, dev.pm.First()+i)
		}
		first := m.NewMM()
		s := &procsModel{m: m, dev: dev, file: f, fileSize: pmFile,
			procs:          []*pmProc{{mm: first, task: first.NewTask("first"), pages: map[uint64]pmPage{}}},
			injectionTally: injectionTally{injecting: inj.Rate > 0}}
		t.Repeat(rapid.StateMachineActions(s))
		for _, p := range s.procs {
			if err := p.mm.Exit(); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Truncate(0); err != nil {
			t.Fatal(err)
		}
		if n := dev.pm.InUse(); n != 0 {
			t.Fatalf("%d device pages in use after every exit", n)
		}
		st := m.Stats()
		if st.Swap.Used != 0 || st.AnonVMAs != 0 {
			t.Fatalf("after every exit: %d swap slots used, %d anon_vmas live", st.Swap.Used, st.AnonVMAs)
		}
		if free := st.RAM.Free; free != 95 {
			t.Fatal(fmt.Sprintf("%d frames free after every exit, want 95", free))
		}
		return s.noMem
	}
}
