package main

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/tlb"
)

// The process model. A process is single-threaded: only the CPU that took
// it from the run queue touches its model, so the model needs no lock.
// What processes share (files, shared anonymous memory) is a sharedObj,
// whose lock is held across an access and the model's update, so the
// value a read must see is always known. Each page's first word carries
// the value; every value written is unique in the run.

const filePages = 256 // pages of each of the run's shared files

// sharedObj is the model of memory that several mappings see: a file, or
// shared anonymous memory (which is a file of its own).
type sharedObj struct {
	mu   sync.Mutex // held across an access to the memory and the update of vals
	file *gomm.File // nil for shared anonymous memory
	vals []uint64   // first word of each page; protected by mu
}

func newFileObj(m *gomm.Machine, pages int) (*sharedObj, error) {
	f, err := m.NewFile(uint64(pages) * gomm.PageSize)
	if err != nil {
		return nil, err
	}
	return &sharedObj{file: f, vals: make([]uint64, pages)}, nil
}

type regionKind uint8

const (
	anonPrivate regionKind = iota
	anonShared
	fileShared
	filePrivate
)

var regionKindNames = [...]string{"private anonymous", "shared anonymous", "shared file", "private file"}

// region is one mapping a process made and tracks.
type region struct {
	start, pages uint64
	kind         regionKind
	obj          *sharedObj // shared and file regions
	off          uint64     // first page's index in obj
	vals         []uint64   // private pages' values (private file: once copied)
	copied       []bool     // private file: the page has its own copy
	readOnly     bool
	locked       bool
}

func (r *region) end() uint64 { return r.start + r.pages*gomm.PageSize }

func (r *region) clone() *region {
	c := *r
	c.vals = slices.Clone(r.vals)
	c.copied = slices.Clone(r.copied)
	c.locked = false // mlock is not inherited
	return &c
}

// proc is one process: an MM, the task its CPU runs, and the model of
// the memory it made.
type proc struct {
	id      int
	mm      *gomm.MM
	task    *tlb.Task
	w       *world
	rng     *rand.Rand
	regions []*region
	pins    int // devices and agents keeping it alive; protected by w.mu
	running atomic.Bool

	devMu   sync.Mutex    // protects devices
	devices []*attachment // devices attached to the process's memory
}

func (p *proc) forkRegions() []*region {
	rs := make([]*region, len(p.regions))
	for i, r := range p.regions {
		rs[i] = r.clone()
	}
	return rs
}

// runSlice runs up to n operations of p on cpu; false means p exited.
func (p *proc) runSlice(cpu *tlb.CPU, n int) bool {
	for range n {
		if p.w.done() {
			return true
		}
		if !p.step(cpu) {
			return false
		}
	}
	return true
}

// step runs one operation drawn by weight; false means the process exited.
func (p *proc) step(cpu *tlb.CPU) bool {
	w := p.w
	d := p.rng.IntN(1000)
	switch {
	case len(p.regions) == 0 || d < 30:
		p.mmap()
	case d < 100:
		p.fill(cpu)
	case d < 600:
		p.access(cpu)
	case d < 680:
		p.syscallIO()
	case d < 720:
		p.fileWrite()
	case d < 760:
		p.munmap()
	case d < 800:
		p.mprotect()
	case d < 840:
		p.madvise()
	case d < 870:
		p.mremap()
	case d < 885:
		p.mlock()
	case d < 940:
		p.deviceChurn()
	case d < 970:
		if w.liveProcs() < 2*w.cfg.Procs {
			p.fork()
		}
	default:
		if w.liveProcs() > w.cfg.Procs && w.retire(p) {
			w.ops[opExit].Add(1)
			return false
		}
	}
	return true
}

// allowed counts an operation and reports whether its error is one the
// run allows: nil, running out of memory (injected or real), or one of
// also. Anything else fails the run.
func (p *proc) allowed(op opKind, err error, also ...error) bool {
	p.w.ops[op].Add(1)
	if err == nil {
		return true
	}
	if errors.Is(err, gomm.ErrNoMem) {
		p.w.noMem[op].Add(1)
		return false
	}
	for _, e := range also {
		if errors.Is(err, e) {
			return false
		}
	}
	p.w.fail("process %d: %v: unexpected error: %v", p.id, op, err)
	return false
}

func (p *proc) pick() (*region, uint64) {
	r := p.regions[p.rng.IntN(len(p.regions))]
	return r, uint64(p.rng.IntN(int(r.pages)))
}

func (p *proc) mmap() {
	if len(p.regions) >= 12 {
		return
	}
	w := p.w
	kind := regionKind(p.rng.IntN(4))
	pages := uint64(16 << p.rng.IntN(5)) // 16 .. 256
	r := &region{kind: kind, pages: pages}
	flags := gomm.MapPrivate
	if p.rng.IntN(8) == 0 && kind != filePrivate {
		// (Populating a writable private file mapping copies every page,
		// as Linux does; the model would not know which.)
		flags |= gomm.MapPopulate
	}
	var addr uint64
	var err error
	switch kind {
	case anonPrivate:
		if p.rng.IntN(4) == 0 {
			r.pages = 1024 // room for huge pages
		}
		addr, err = p.mm.Mmap(0, r.pages*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, flags|gomm.MapAnonymous)
		r.vals = make([]uint64, r.pages)
	case anonShared:
		addr, err = p.mm.Mmap(0, r.pages*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, gomm.MapShared|gomm.MapAnonymous)
		r.obj = &sharedObj{vals: make([]uint64, r.pages)}
	default:
		r.obj = w.files[p.rng.IntN(len(w.files))]
		r.off = uint64(p.rng.IntN(filePages - int(pages) + 1))
		if kind == fileShared {
			flags = gomm.MapShared
		} else {
			r.vals, r.copied = make([]uint64, pages), make([]bool, pages)
		}
		addr, err = p.mm.MmapFile(0, pages*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, flags, r.obj.file, r.off*gomm.PageSize)
	}
	if !p.allowed(opMmap, err) {
		return
	}
	r.start = addr
	p.regions = append(p.regions, r)
	if kind == anonPrivate {
		switch p.rng.IntN(4) {
		case 0:
			p.allowed(opMadvise, p.mm.Madvise(addr, r.pages*gomm.PageSize, gomm.MadvHugePage))
		case 1:
			p.allowed(opMadvise, p.mm.Madvise(addr, r.pages*gomm.PageSize, gomm.MadvMergeable))
		}
	}
}

// expect returns what page i of r must read as. Shared pages need r.obj.mu held.
func (r *region) expect(i uint64) uint64 {
	switch {
	case r.kind == anonPrivate || r.kind == filePrivate && r.copied[i]:
		return r.vals[i]
	}
	return r.obj.vals[r.off+i]
}

// set records that page i of r now holds v. Shared pages need r.obj.mu held.
func (r *region) set(i, v uint64) {
	switch r.kind {
	case anonPrivate:
		r.vals[i] = v
	case filePrivate:
		r.vals[i], r.copied[i] = v, true
	default:
		r.obj.vals[r.off+i] = v
	}
}

func (r *region) lockShared() func() {
	if r.obj == nil {
		return func() {}
	}
	r.obj.mu.Lock()
	return r.obj.mu.Unlock
}

// access loads or stores through the CPU, its TLB and the fault handler.
func (p *proc) access(cpu *tlb.CPU) {
	r, i := p.pick()
	va := r.start + i*gomm.PageSize
	unlock := r.lockShared()
	defer unlock()
	if p.rng.IntN(2) == 0 {
		v := p.w.value()
		err := cpu.Store64(va, v)
		if r.readOnly {
			if !errors.Is(err, gomm.ErrFault) {
				p.w.fail("process %d: store to read-only %s page %#x: %v, want a fault", p.id, regionKindNames[r.kind], va, err)
			}
			p.w.ops[opStore].Add(1)
			return
		}
		if p.allowed(opStore, err) {
			r.set(i, v)
		}
		return
	}
	got, err := cpu.Load64(va)
	if p.allowed(opLoad, err) {
		p.verify(r, i, got, "load")
	}
}

func (p *proc) verify(r *region, i, got uint64, how string) {
	p.w.checks.Add(1)
	if want := r.expect(i); got != want {
		p.w.fail("process %d (mm %d): %s of %s page %#x (page %d of [%#x, %#x)) read %#x, want %#x",
			p.id, p.mm.ID(), how, regionKindNames[r.kind], r.start+i*gomm.PageSize, i, r.start, r.end(), got, want)
	}
}

// fill stores to every page of a region through the CPU (a memset): the
// working set grows until reclaim has to swap.
func (p *proc) fill(cpu *tlb.CPU) {
	r, _ := p.pick()
	if r.readOnly {
		return
	}
	unlock := r.lockShared()
	defer unlock()
	for i := range r.pages {
		v := p.w.value()
		if !p.allowed(opStore, cpu.Store64(r.start+i*gomm.PageSize, v)) {
			return
		}
		r.set(i, v)
	}
}

// syscallIO reads or writes through MM.ReadAt/WriteAt (process_vm_readv
// and friends: GUP, not the CPU).
func (p *proc) syscallIO() {
	r, i := p.pick()
	va := r.start + i*gomm.PageSize
	unlock := r.lockShared()
	defer unlock()
	var b [8]byte
	if p.rng.IntN(2) == 0 {
		v := p.w.value()
		putWord(b[:], v)
		_, err := p.mm.WriteAt(b[:], va)
		if r.readOnly {
			// A debugger's write (FOLL_FORCE) would go through; ours is
			// process_vm_writev, which honours the protection.
			if !errors.Is(err, gomm.ErrFault) {
				p.w.fail("process %d: WriteAt to read-only %#x: %v, want a fault", p.id, va, err)
			}
			p.w.ops[opSyscallIO].Add(1)
			return
		}
		if p.allowed(opSyscallIO, err) {
			r.set(i, v)
		}
		return
	}
	_, err := p.mm.ReadAt(b[:], va)
	if p.allowed(opSyscallIO, err) {
		p.verify(r, i, word(b[:]), "ReadAt")
	}
}

// fileWrite writes a file through File.WriteAt (write(2)): every shared
// mapping of the page sees it, private ones until they copied it.
func (p *proc) fileWrite() {
	obj := p.w.files[p.rng.IntN(len(p.w.files))]
	i := uint64(p.rng.IntN(filePages))
	obj.mu.Lock()
	defer obj.mu.Unlock()
	v := p.w.value()
	var b [8]byte
	putWord(b[:], v)
	_, err := obj.file.WriteAt(b[:], int64(i*gomm.PageSize))
	if p.allowed(opFileWrite, err) {
		obj.vals[i] = v
	}
}

func (p *proc) munmap() {
	k := p.rng.IntN(len(p.regions))
	r := p.regions[k]
	if r.pages > 16 && p.rng.IntN(2) == 0 {
		// Unmap the tail half: the VMA is cut.
		keep := r.pages / 2
		if p.allowed(opMunmap, p.mm.Munmap(r.start+keep*gomm.PageSize, (r.pages-keep)*gomm.PageSize)) {
			r.pages = keep
			if r.vals != nil {
				r.vals = r.vals[:keep]
			}
			if r.copied != nil {
				r.copied = r.copied[:keep]
			}
		}
		return
	}
	if p.allowed(opMunmap, p.mm.Munmap(r.start, r.pages*gomm.PageSize)) {
		p.regions = slices.Delete(p.regions, k, k+1)
	}
}

func (p *proc) mprotect() {
	r, _ := p.pick()
	prot := gomm.ProtRead | gomm.ProtWrite
	if !r.readOnly {
		prot = gomm.ProtRead
	}
	if p.allowed(opMprotect, p.mm.Mprotect(r.start, r.pages*gomm.PageSize, prot)) {
		r.readOnly = !r.readOnly
	}
}

func (p *proc) madvise() {
	r, _ := p.pick()
	switch p.rng.IntN(3) {
	case 0, 1:
		// MADV_DONTNEED: private pages go (anonymous ones read zero,
		// private file pages show the file again); shared pages stay in
		// their file.
		unlock := r.lockShared()
		defer unlock()
		if !p.allowed(opMadvise, p.mm.Madvise(r.start, r.pages*gomm.PageSize, gomm.MadvDontNeed)) {
			return
		}
		switch r.kind {
		case anonPrivate:
			clear(r.vals)
		case filePrivate:
			clear(r.vals)
			clear(r.copied)
		}
	default:
		advice := gomm.MadvMergeable
		if p.rng.IntN(2) == 0 {
			advice = gomm.MadvUnmergeable
		}
		if r.kind == anonPrivate {
			p.allowed(opMadvise, p.mm.Madvise(r.start, r.pages*gomm.PageSize, advice))
		}
	}
}

// mremap grows a private anonymous region, moving it if it must, or
// shrinks it.
func (p *proc) mremap() {
	r, _ := p.pick()
	if r.kind != anonPrivate {
		return
	}
	newPages := r.pages + uint64(16<<p.rng.IntN(3))
	if r.pages > 32 && p.rng.IntN(3) == 0 {
		newPages = r.pages / 2
	}
	addr, err := p.mm.Mremap(r.start, r.pages*gomm.PageSize, newPages*gomm.PageSize, gomm.MremapMayMove, 0)
	if !p.allowed(opMremap, err) {
		return
	}
	r.start = addr
	if newPages > r.pages {
		r.vals = append(r.vals, make([]uint64, newPages-r.pages)...)
	} else {
		r.vals = r.vals[:newPages]
	}
	r.pages = newPages
}

func (p *proc) mlock() {
	r, _ := p.pick()
	if r.locked {
		if p.allowed(opMlock, p.mm.Munlock(r.start, r.pages*gomm.PageSize)) {
			r.locked = false
		}
		return
	}
	if r.pages > 64 || r.kind == filePrivate {
		// Locked memory stays small: reclaim must have room. A private
		// file mapping is left alone: mlock copies each page of it on
		// write fault, and after a partial failure the model could not
		// tell which.
		return
	}
	// ErrAgain: some page could not be faulted in (mlock's ENOMEM); the
	// range is locked all the same.
	err := p.mm.Mlock(r.start, r.pages*gomm.PageSize)
	if p.allowed(opMlock, err, gomm.ErrAgain) || errors.Is(err, gomm.ErrAgain) {
		r.locked = true
	}
}

func (p *proc) fork() {
	child, err := p.mm.Fork()
	if !p.allowed(opFork, err) {
		return
	}
	p.w.spawn(child, p)
}

// value returns a value nobody wrote before.
func (w *world) value() uint64 {
	return w.ops[opValue].Add(1)<<8 | 0xa5
}

func putWord(b []byte, v uint64) {
	for i := range 8 {
		b[i] = byte(v >> (8 * i))
	}
}

func word(b []byte) uint64 {
	var v uint64
	for i := range 8 {
		v |= uint64(b[i]) << (8 * i)
	}
	return v
}

func (p *proc) String() string { return fmt.Sprintf("process %d", p.id) }
