package gomm_test

import (
	"encoding/binary"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const rw = gomm.ProtRead | gomm.ProtWrite

// mappers returns the (mm, address) places the frame at va of mm is
// mapped, as its reverse map finds them.
func mappers(t *testing.T, m *gomm.Machine, mm *gomm.MM, va uint64) map[*gomm.MM]uint64 {
	t.Helper()
	ms, err := m.Mappers(uint64(frameAt(t, m, mm, va).PFN()))
	require.NoError(t, err)
	out := map[*gomm.MM]uint64{}
	for _, p := range ms {
		out[p.MM] = p.Addr
	}
	return out
}

func writeWord(t *testing.T, mm *gomm.MM, va, v uint64) {
	t.Helper()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_, err := mm.WriteAt(b[:], va)
	require.NoError(t, err)
}

func readWord(t *testing.T, mm *gomm.MM, va uint64) uint64 {
	t.Helper()
	var b [8]byte
	_, err := mm.ReadAt(b[:], va)
	require.NoError(t, err)
	return binary.LittleEndian.Uint64(b[:])
}

func TestForkRmapFindsEveryProcess(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	parent := m.NewMM()
	addr, err := parent.Mmap(0x1000_0000, 4*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	for i := range uint64(4) {
		writeWord(t, parent, addr+i*page, 100+i)
	}
	child, err := parent.Fork()
	require.NoError(t, err)
	grandchild, err := child.Fork()
	require.NoError(t, err)
	all := []*gomm.MM{parent, child, grandchild}
	require.NoError(t, m.CheckRmap(all...))

	assert.Equal(t, map[*gomm.MM]uint64{parent: addr, child: addr, grandchild: addr}, mappers(t, m, parent, addr),
		"a page the parent had at fork is found from every process")

	writeWord(t, child, addr, 7) // the child copies page 0
	assert.Equal(t, map[*gomm.MM]uint64{child: addr}, mappers(t, m, child, addr),
		"the copy is found only from its writer")
	assert.Equal(t, map[*gomm.MM]uint64{parent: addr, grandchild: addr}, mappers(t, m, parent, addr))
	require.NoError(t, m.CheckRmap(all...))

	// mremap carries the pages' reverse map along.
	moved, err := grandchild.Mremap(addr, 4*page, 4*page, gomm.MremapMayMove|gomm.MremapFixed, 0x3000_0000)
	require.NoError(t, err)
	assert.Equal(t, map[*gomm.MM]uint64{parent: addr, grandchild: moved}, mappers(t, m, parent, addr))
	assert.Equal(t, uint64(100), readWord(t, grandchild, moved))
	require.NoError(t, m.CheckRmap(all...))

	for _, mm := range all {
		require.NoError(t, mm.Exit())
	}
	assert.Zero(t, m.Stats().AnonVMAs, "every anon_vma freed with the last VMA")
}

// TestForkAndExitThousandTimes: a process that forks and exits a
// thousand generations over keeps a bounded anon_vma chain.
func TestForkAndExitThousandTimes(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	cur := m.NewMM()
	addr, err := cur.Mmap(0x1000_0000, 2*page, rw, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)
	for gen := range 1000 {
		next, err := cur.Fork()
		require.NoError(t, err)
		require.NoError(t, cur.Exit())
		cur = next
		writeWord(t, cur, addr, uint64(gen)) // every generation copies on write
		require.LessOrEqual(t, m.Stats().AnonVMAs, int64(3), "generation %d", gen)
	}
	require.NoError(t, m.CheckRmap(cur))
	require.NoError(t, cur.Exit())
	assert.Zero(t, m.Stats().AnonVMAs)
}

func TestSplitAndMergeKeepTheReverseMap(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	addr, err := mm.Mmap(0x1000_0000, 8*page, rw, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)
	require.NoError(t, mm.Mprotect(addr+2*page, 2*page, gomm.ProtRead))
	require.Len(t, mm.VMAs(), 3)
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Mprotect(addr+2*page, 2*page, rw))
	require.Len(t, mm.VMAs(), 1, "pieces of one anon_vma merge back")
	require.NoError(t, m.CheckRmap(mm))
	assert.Equal(t, int64(1), m.Stats().AnonVMAs)
	// An unfaulted mapping next to a faulted one takes its anon_vma on
	// the first fault, so the two can merge.
	_, err = mm.Mmap(addr+8*page, 2*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	writeWord(t, mm, addr+8*page, 1)
	assert.Equal(t, int64(1), m.Stats().AnonVMAs)
	require.Len(t, mm.VMAs(), 1)
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Exit())
}
