// Package testrig builds small machines for the tests of the layers below
// the MM: RAM, simulated CPUs, the checker wired to the allocator's free
// hook, and toy address spaces that map and unmap pages the way an MM
// would. It has no kernel counterpart.
package testrig

import (
	"sync"
	"testing"

	"github.com/gomm-dev/gomm/internal/check"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/tlb"
	"github.com/stretchr/testify/require"
)

// Rig is a machine without an MM layer: RAM, CPUs, a checker wired to
// the allocator's free hook, and helpers to map and unmap pages the way
// an MM would.
type Rig struct {
	T   testing.TB
	RAM *physmem.Allocator
	Chk *check.Checker
	Sys *tlb.System
}

// New returns a rig with the given CPUs and 4096 frames of RAM.
func New(t testing.TB, cpus int, mode tlb.LazyMode) *Rig {
	t.Helper()
	return NewWithFrames(t, cpus, mode, 4096)
}

// NewWithFrames is New with frames frames of RAM.
func NewWithFrames(t testing.TB, cpus int, mode tlb.LazyMode, frames int) *Rig {
	t.Helper()
	ram, err := physmem.New(frames)
	require.NoError(t, err)
	chk := check.New()
	ram.OnFree(func(f *physmem.Frame) { chk.FrameFreed(uint64(f.PFN())) })
	sys, err := tlb.NewSystem(tlb.Config{CPUs: cpus, Lazy: mode, RAM: ram, Checker: chk})
	require.NoError(t, err)
	return &Rig{T: t, RAM: ram, Chk: chk, Sys: sys}
}

// Violations returns the checker's findings.
func (r *Rig) Violations() []check.Violation {
	v, _ := r.Chk.Violations()
	return v
}

// Space is a toy mm: a page table whose faults allocate a zeroed frame
// and map it writable.
type Space struct {
	R     *Rig
	Table *pagetable.Table
	Ctx   *tlb.Context
	mu    sync.Mutex // serialises map changes, as mmap_lock would
	Freed bool       // set when the context's last mm_count reference goes
}

// NewSpace returns an empty address space.
func (r *Rig) NewSpace() *Space {
	s := &Space{R: r, Table: pagetable.New(pagetable.Options{})}
	s.Ctx = r.Sys.NewContext(s.Table, s, func() { s.Freed = true })
	return s
}

// HandleFault implements tlb.FaultHandler: demand-zero, writable.
func (s *Space) HandleFault(va uint64, acc pagetable.Access) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	page := va &^ (pagetable.PageSize - 1)
	if e, _ := s.Table.Lookup(page); e.IsPresent() {
		if acc&pagetable.AccessWrite != 0 && !e.IsWritable() {
			return tlb.ErrFault
		}
		return nil // another CPU won the race
	}
	f, err := s.R.RAM.Alloc()
	if err != nil {
		return err
	}
	f.IncMapCount()
	return s.Table.Map(page, pagetable.NewPTE(uint64(f.PFN()), pagetable.Write|pagetable.User))
}

// MapPage maps va to a new frame filled with fill, counting the mapping,
// and returns it.
func (s *Space) MapPage(va uint64, bits pagetable.PTE, fill uint64) *physmem.Frame {
	s.R.T.Helper()
	f, err := s.R.RAM.Alloc()
	require.NoError(s.R.T, err)
	require.NoError(s.R.T, f.Store64(0, fill))
	f.IncMapCount()
	require.NoError(s.R.T, s.Table.Map(va, pagetable.NewPTE(uint64(f.PFN()), bits)))
	return f
}

// UnmapPage clears va, optionally flushes, and frees the frame: the order
// an MM must keep.
func (s *Space) UnmapPage(va uint64, flush bool) {
	s.R.T.Helper()
	s.mu.Lock()
	old, err := s.Table.Unmap(va)
	s.mu.Unlock()
	require.NoError(s.R.T, err)
	if !old.IsPresent() {
		return
	}
	if flush {
		s.R.Sys.FlushRange(s.Ctx, va, va+pagetable.PageSize, pagetable.PageShift, false)
	}
	f, err := s.R.RAM.Frame(physmem.PFN(old.PFN()))
	require.NoError(s.R.T, err)
	f.DecMapCount()
	require.NoError(s.R.T, s.R.RAM.Put(f))
}

// RWU is a user read-write leaf.
const RWU = pagetable.Write | pagetable.User
