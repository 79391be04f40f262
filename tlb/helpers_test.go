package tlb_test

import (
	"errors"
	"sync"
	"testing"

	"github.com/gomm-dev/gomm/internal/check"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/tlb"
	"github.com/stretchr/testify/require"
)

// rig is a machine without an MM layer: RAM, CPUs, a checker wired to
// the allocator's free hook, and helpers to map and unmap pages the way
// an MM would.
type rig struct {
	t   testing.TB
	ram *physmem.Allocator
	chk *check.Checker
	sys *tlb.System
}

func newRig(t testing.TB, cpus int, mode tlb.LazyMode) *rig {
	t.Helper()
	ram, err := physmem.New(4096)
	require.NoError(t, err)
	chk := check.New()
	ram.OnFree(func(f *physmem.Frame) { chk.FrameFreed(uint64(f.PFN())) })
	sys, err := tlb.NewSystem(tlb.Config{CPUs: cpus, Lazy: mode, RAM: ram, Checker: chk})
	require.NoError(t, err)
	return &rig{t: t, ram: ram, chk: chk, sys: sys}
}

// violations returns the checker's findings.
func (r *rig) violations() []check.Violation {
	v, _ := r.chk.Violations()
	return v
}

// space is a toy mm: a page table whose faults allocate a zeroed frame
// and map it writable.
type space struct {
	r     *rig
	table *pagetable.Table
	ctx   *tlb.Context
	mu    sync.Mutex // serialises map changes, as mmap_lock would
	freed bool
}

func (r *rig) newSpace() *space {
	s := &space{r: r, table: pagetable.New(pagetable.Options{})}
	s.ctx = r.sys.NewContext(s.table, s, func() { s.freed = true })
	return s
}

func (s *space) HandleFault(va uint64, acc pagetable.Access) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	page := va &^ (pagetable.PageSize - 1)
	if e, _ := s.table.Lookup(page); e.IsPresent() {
		if acc&pagetable.AccessWrite != 0 && !e.IsWritable() {
			return tlb.ErrFault
		}
		return nil // another CPU won the race
	}
	f, err := s.r.ram.Alloc()
	if err != nil {
		return err
	}
	return s.table.Map(page, pagetable.NewPTE(uint64(f.PFN()), pagetable.Write|pagetable.User))
}

// mapPage maps va to a new frame filled with fill and returns it.
func (s *space) mapPage(va uint64, bits pagetable.PTE, fill uint64) *physmem.Frame {
	s.r.t.Helper()
	f, err := s.r.ram.Alloc()
	require.NoError(s.r.t, err)
	require.NoError(s.r.t, f.Store64(0, fill))
	require.NoError(s.r.t, s.table.Map(va, pagetable.NewPTE(uint64(f.PFN()), bits)))
	return f
}

// unmapPage clears va, optionally flushes, and frees the frame: the order
// an MM must keep.
func (s *space) unmapPage(va uint64, flush bool) {
	s.r.t.Helper()
	s.mu.Lock()
	old, err := s.table.Unmap(va)
	s.mu.Unlock()
	require.NoError(s.r.t, err)
	if !old.IsPresent() {
		return
	}
	if flush {
		s.r.sys.FlushRange(s.ctx, va, va+pagetable.PageSize, pagetable.PageShift, false)
	}
	f, err := s.r.ram.Frame(physmem.PFN(old.PFN()))
	require.NoError(s.r.t, err)
	if err := s.r.ram.Put(f); err != nil && !errors.Is(err, physmem.ErrBadState) {
		require.NoError(s.r.t, err)
	}
}

const rwu = pagetable.Write | pagetable.User
