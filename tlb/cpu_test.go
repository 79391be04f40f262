package tlb_test

import (
	"testing"

	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/internal/check"
	"github.com/gomm-dev/gomm/internal/testrig"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/tlb"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNewSystemValidates(t *testing.T) {
	ram, _ := physmem.New(16)
	tests := []struct {
		name string
		cfg  tlb.Config
	}{
		{"no CPUs", tlb.Config{CPUs: 0, RAM: ram}},
		{"too many CPUs", tlb.Config{CPUs: 257, RAM: ram}},
		{"TLB not a power of two", tlb.Config{CPUs: 1, TLBEntries: 48, RAM: ram}},
		{"TLB too small", tlb.Config{CPUs: 1, TLBEntries: 2, RAM: ram}},
		{"huge TLB negative", tlb.Config{CPUs: 1, HugeEntries: -1, RAM: ram}},
		{"bad lazy mode", tlb.Config{CPUs: 1, Lazy: 7, RAM: ram}},
		{"no RAM", tlb.Config{CPUs: 1}},
	}
	for _, tc := range tests {
		_, err := tlb.NewSystem(tc.cfg)
		assert.ErrorIs(t, err, errno.ErrInvalid, tc.name)
	}
	sys, err := tlb.NewSystem(tlb.Config{CPUs: 3, RAM: ram})
	require.NoError(t, err)
	assert.Len(t, sys.CPUs(), 3)
	assert.Equal(t, tlb.LazyRefcount, sys.LazyMode())
}

func TestTranslateHitMissAndDirty(t *testing.T) {
	r := testrig.New(t, 1, tlb.LazyRefcount)
	s := r.NewSpace()
	f := s.MapPage(0x10000, testrig.RWU, 7)
	cpu := r.Sys.CPU(0)
	cpu.Switch(tlb.NewUserTask("a", s.Ctx))

	pfn, err := cpu.Translate(0x10008, pagetable.AccessRead)
	require.NoError(t, err)
	assert.Equal(t, uint64(f.PFN()), pfn)
	_, err = cpu.Translate(0x10010, pagetable.AccessRead)
	require.NoError(t, err)
	hits, misses := cpu.Stats()
	assert.Equal(t, [2]uint64{1, 1}, [2]uint64{hits, misses}, "a miss fills, the next access hits")

	e, _ := s.Table.Lookup(0x10000)
	assert.True(t, e.IsYoung())
	assert.False(t, e.IsDirty(), "a read does not dirty")

	v, err := cpu.Load64(0x10000)
	require.NoError(t, err)
	assert.Equal(t, uint64(7), v)
	require.NoError(t, cpu.Store64(0x10000, 9))
	e, _ = s.Table.Lookup(0x10000)
	assert.True(t, e.IsDirty(), "a write through a clean entry walks again and sets Dirty")
	_, misses = cpu.Stats()
	assert.Equal(t, uint64(2), misses)
	got, _ := f.Load64(0)
	assert.Equal(t, uint64(9), got)
}

func TestAccessesFaultInAndTypedErrors(t *testing.T) {
	r := testrig.New(t, 1, tlb.LazyRefcount)
	s := r.NewSpace()
	cpu := r.Sys.CPU(0)
	_, err := cpu.Load64(0x2000)
	assert.ErrorIs(t, err, tlb.ErrFault, "the idle thread has no user mm")
	var pf *tlb.PageFault
	require.ErrorAs(t, err, &pf)
	assert.Equal(t, pagetable.FaultNotPresent, pf.Fault)

	cpu.Switch(tlb.NewUserTask("a", s.Ctx))
	require.NoError(t, cpu.Store64(0x2000, 42), "demand fault through the handler")
	v, err := cpu.Load64(0x2000)
	require.NoError(t, err)
	assert.Equal(t, uint64(42), v)
	assert.Equal(t, uint64(1), r.Sys.Stats().Faults)

	assert.ErrorIs(t, cpu.Store64(0x2001, 1), errno.ErrInvalid)
	_, err = cpu.Load64(1 << 47)
	assert.ErrorIs(t, err, tlb.ErrFault, "non-canonical")

	msg := []byte("across a page boundary")
	require.NoError(t, cpu.Write(0x3ff8, msg))
	got := make([]byte, len(msg))
	require.NoError(t, cpu.Read(0x3ff8, got))
	assert.Equal(t, msg, got)
	require.NoError(t, cpu.Store8(0x5000, 0xab))
	b, err := cpu.Load8(0x5000)
	require.NoError(t, err)
	assert.Equal(t, byte(0xab), b)
	assert.ErrorIs(t, cpu.Write(^uint64(0)-2, msg), errno.ErrInvalid)

	require.NoError(t, s.Table.Map(0x9000, pagetable.NewPTE(1, pagetable.User)))
	assert.ErrorIs(t, cpu.Store64(0x9000, 1), tlb.ErrFault, "write to a read-only page the handler refuses")
}

// faultsByCPU is a toy mm's fault handler that is told the CPU.
type faultsByCPU struct {
	*testrig.Space
	cpus []int // the CPU of each fault, in order
}

func (h *faultsByCPU) HandleFaultOn(cpu int, va uint64, acc pagetable.Access) error {
	h.cpus = append(h.cpus, cpu)
	return h.HandleFault(va, acc)
}

// TestCPUFaultHandlerIsToldTheCPU: a handler that implements
// CPUFaultHandler gets every fault through HandleFaultOn, with the
// faulting CPU's number.
func TestCPUFaultHandlerIsToldTheCPU(t *testing.T) {
	r := testrig.New(t, 3, tlb.LazyRefcount)
	h := &faultsByCPU{Space: r.NewSpace()}
	ctx := r.Sys.NewContext(h.Table, h, nil)
	for _, id := range []int{2, 0} {
		cpu := r.Sys.CPU(id)
		cpu.Switch(tlb.NewUserTask("t", ctx))
		require.NoError(t, cpu.Store64(0x1000*uint64(id+1), 1))
		_, err := cpu.Load64(0x1000 * uint64(id+1)) // a TLB hit: no fault
		require.NoError(t, err)
	}
	assert.Equal(t, []int{2, 0}, h.cpus)
}

func TestProtectionUpgradeNeedsNoFlush(t *testing.T) {
	r := testrig.New(t, 1, tlb.LazyRefcount)
	s := r.NewSpace()
	s.MapPage(0x4000, pagetable.User, 1)
	cpu := r.Sys.CPU(0)
	cpu.Switch(tlb.NewUserTask("a", s.Ctx))
	_, err := cpu.Load64(0x4000)
	require.NoError(t, err)
	pt, _, _ := s.Table.LockPTE(0x4000)
	i := pt.Index(0x4000)
	pt.Set(i, pt.Get(i).With(pagetable.Write))
	pt.Unlock()
	require.NoError(t, cpu.Store64(0x4000, 5), "the stale read-only entry is dropped and the walk finds the new right")
}

func TestHugeEntries(t *testing.T) {
	r := testrig.New(t, 1, tlb.LazyRefcount)
	s := r.NewSpace()
	require.NoError(t, s.Table.MapHuge(0x20_0000, pagetable.NewPTE(512, testrig.RWU)))
	cpu := r.Sys.CPU(0)
	cpu.Switch(tlb.NewUserTask("a", s.Ctx))
	pfn, err := cpu.Translate(0x20_3000, pagetable.AccessRead)
	require.NoError(t, err)
	assert.Equal(t, uint64(515), pfn)
	pfn, err = cpu.Translate(0x3f_f000, pagetable.AccessRead)
	require.NoError(t, err)
	assert.Equal(t, uint64(1023), pfn)
	hits, misses := cpu.Stats()
	assert.Equal(t, [2]uint64{1, 1}, [2]uint64{hits, misses}, "one 2 MiB entry serves the whole leaf")
	d, ok := cpu.CachedPFN(700)
	assert.True(t, ok, "the checker sees frames inside a huge entry")
	assert.Contains(t, d, "pfn 0x200")
}

// TestCheckerCatchesAMissingFlush: freeing a frame a TLB still maps is the
// bug the whole project exists to catch; the checker must see it, and
// must stay quiet when the flush is done.
func TestCheckerCatchesAMissingFlush(t *testing.T) {
	for _, flush := range []bool{true, false} {
		r := testrig.New(t, 2, tlb.LazyRefcount)
		s := r.NewSpace()
		s.MapPage(0x1000, testrig.RWU, 1)
		for _, cpu := range r.Sys.CPUs() {
			cpu.Switch(tlb.NewUserTask("t", s.Ctx))
			_, err := cpu.Load64(0x1000)
			require.NoError(t, err)
		}
		s.UnmapPage(0x1000, flush)
		v := r.Violations()
		if flush {
			assert.Empty(t, v)
			continue
		}
		require.Len(t, v, 2, "both CPUs still cache the frame")
		assert.Equal(t, check.FreedFrameCached, v[0].Kind)
		assert.Contains(t, v[0].String(), "va 0x1000")
	}
}

func TestStaleTranslationsAfterDowngrade(t *testing.T) {
	r := testrig.New(t, 1, tlb.LazyRefcount)
	s := r.NewSpace()
	s.MapPage(0x1000, testrig.RWU, 1)
	s.MapPage(0x2000, testrig.RWU, 1)
	cpu := r.Sys.CPU(0)
	cpu.Switch(tlb.NewUserTask("t", s.Ctx))
	require.NoError(t, cpu.Store64(0x1000, 1))
	_, err := cpu.Load64(0x2000)
	require.NoError(t, err)

	since := r.Chk.BeginDowngrade()
	// Write-protect both pages but "forget" the flush.
	pt, _, _ := s.Table.LockPTE(0x1000)
	pt.WriteProtect(1)
	pt.WriteProtect(2)
	pt.Unlock()
	r.Chk.EndDowngrade("mprotect", s.Ctx.ID(), 0x1000, 0x3000, since, true)
	v := r.Violations()
	require.Len(t, v, 1, "only the entry cached writable allows the revoked access")
	assert.Equal(t, check.StaleAfterDowngrade, v[0].Kind)
	assert.Contains(t, v[0].Detail, "va 0x1000")

	r.Sys.FlushRange(s.Ctx, 0x1000, 0x3000, pagetable.PageShift, false)
	since = r.Chk.BeginDowngrade()
	r.Chk.EndDowngrade("mprotect", s.Ctx.ID(), 0x1000, 0x3000, since, true)
	assert.Len(t, r.Violations(), 1, "after the flush nothing is stale")

	_, err = cpu.Load64(0x2000) // refilled after the downgrade began: not stale
	require.NoError(t, err)
	r.Chk.EndDowngrade("munmap", s.Ctx.ID(), 0x1000, 0x3000, since, false)
	assert.Len(t, r.Violations(), 1)
}
