package gomm_test

import (
	"context"
	"errors"
	"github.com/gomm-dev/gomm/internal/testmain"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func frameAt(t *testing.T, m *gomm.Machine, mm *gomm.MM, va uint64) *physmem.Frame {
	t.Helper()
	e, _ := mm.Table().Lookup(va)
	require.True(t, e.IsPresent(), "%#x not mapped", va)
	f, err := m.RAM().Frame(physmem.PFN(e.PFNAt(va)))
	require.NoError(t, err)
	return f
}

func TestForkCopyOnWrite(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 2})
	parent := m.NewMM()
	rw := gomm.ProtRead | gomm.ProtWrite
	addr, err := parent.Mmap(0x1000_0000, 4*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	pc, cc := m.CPU(0), m.CPU(1)
	pc.Switch(parent.NewTask("parent"))
	require.NoError(t, pc.Store64(addr, 1))
	require.NoError(t, pc.Store64(addr+page, 2))
	_, err = pc.Load64(addr + 2*page) // the zero page
	require.NoError(t, err)

	log := &rangeLog{mm: parent}
	_, err = parent.RegisterNotifier(context.Background(), log)
	require.NoError(t, err)

	child, err := parent.Fork()
	require.NoError(t, err)
	assert.Equal(t, parent.VMAs(), child.VMAs())
	assert.Equal(t, int64(2), child.RSS())
	shared := frameAt(t, m, parent, addr)
	assert.Same(t, shared, frameAt(t, m, child, addr), "the page is shared")
	assert.Equal(t, int32(2), shared.MapCount())
	assert.Equal(t, int32(2), shared.RefCount())
	e, _ := parent.Table().Lookup(addr)
	assert.False(t, e.IsWritable(), "write-protected in the parent")
	assert.Contains(t, log.take(), "start protection-page present=true")

	cc.Switch(child.NewTask("child"))
	v, err := cc.Load64(addr)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), v, "the child sees the parent's data")

	require.NoError(t, cc.Store64(addr, 100)) // the child copies
	assert.NotSame(t, shared, frameAt(t, m, child, addr))
	assert.Equal(t, int32(1), shared.MapCount())
	v, _ = pc.Load64(addr)
	assert.Equal(t, uint64(1), v, "the parent keeps its data")

	require.NoError(t, pc.Store64(addr, 7)) // the parent is now the only mapping: reuse
	assert.Same(t, shared, frameAt(t, m, parent, addr), "reused, not copied")
	v, _ = cc.Load64(addr)
	assert.Equal(t, uint64(100), v)

	require.NoError(t, pc.Store64(addr+page, 20)) // parent copies the second page
	v, _ = cc.Load64(addr + page)
	assert.Equal(t, uint64(2), v)
	v, _ = cc.Load64(addr + 2*page)
	assert.Zero(t, v)

	cc.Switch(tlbIdle())
	require.NoError(t, child.Exit())
	v, _ = pc.Load64(addr + page)
	assert.Equal(t, uint64(20), v)
	pc.Switch(tlbIdle())
	require.NoError(t, parent.Exit())
	assert.Equal(t, 8191, m.RAM().Stats().Free, "every frame but the zero page is back")
}

// TestForkTree: a chain of forks five deep; every process keeps what it
// wrote and sees its ancestors' pages until it writes its own.
func TestForkTree(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	addr, err := mm.Mmap(0x1000_0000, page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapFixed)
	require.NoError(t, err)
	_, err = mm.WriteAt(le64(1), addr)
	require.NoError(t, err)
	chain := []*gomm.MM{mm}
	for range 5 {
		c, err := chain[len(chain)-1].Fork()
		require.NoError(t, err)
		chain = append(chain, c)
	}
	assert.Equal(t, int32(6), frameAt(t, m, mm, addr).MapCount())
	for i, p := range chain {
		if i%2 == 1 {
			_, err := p.WriteAt(le64(uint64(100+i)), addr)
			require.NoError(t, err)
		}
	}
	for i, p := range chain {
		buf := make([]byte, 8)
		_, err := p.ReadAt(buf, addr)
		require.NoError(t, err)
		want := uint64(1)
		if i%2 == 1 {
			want = uint64(100 + i)
		}
		assert.Equal(t, le64(want), buf, "process %d", i)
	}
	for _, p := range chain {
		require.NoError(t, p.Exit())
	}
	assert.Equal(t, m.RAM().Frames()-1, m.RAM().Stats().Free)
}

// TestForkWhileCPUsWrite: a parent's threads keep writing while it forks
// again and again: each child sees, for every page, a value some thread
// wrote there, and the checker sees no writable translation survive the
// write-protection.
func TestForkWhileCPUsWrite(t *testing.T) {
	const pages = 16
	m := newMachine(t, gomm.Config{CPUs: 2, Frames: 8192})
	parent := m.NewMM()
	addr, err := parent.Mmap(0x1000_0000, pages*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)
	var stop atomic.Bool
	var wg sync.WaitGroup
	for _, cpu := range m.CPUs() {
		wg.Go(func() {
			cpu.Switch(parent.NewTask("t"))
			defer cpu.Switch(tlbIdle())
			for i := uint64(1); !stop.Load(); i++ {
				if err := cpu.Store64(addr+(i%pages)*page+uint64(cpu.ID())*8, i); err != nil && !errors.Is(err, gomm.ErrFault) {
					t.Error(err)
					return
				}
			}
		})
	}
	for range testmain.Iterations(40, 10) {
		child, err := parent.Fork()
		require.NoError(t, err)
		buf := make([]byte, 8)
		for i := range uint64(pages) {
			_, err := child.ReadAt(buf, addr+i*page)
			require.NoError(t, err)
			require.NotEqual(t, le64(physmem.PoisonWord), buf)
		}
		require.NoError(t, child.Exit())
	}
	stop.Store(true)
	wg.Wait()
	require.NoError(t, parent.Exit())
	assert.Equal(t, 8191, m.RAM().Stats().Free)
}

func TestForkOfExitedMM(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	require.NoError(t, mm.Exit())
	_, err := mm.Fork()
	assert.ErrorIs(t, err, gomm.ErrClosed)
}

var _ notifier.MM = (*gomm.MM)(nil)
