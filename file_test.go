package gomm_test

import (
	"io"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/tlb"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSharedFileMappingReachesTheFileAndOtherProcesses(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	f, err := m.NewFile(4 * page)
	require.NoError(t, err)
	a, b := m.NewMM(), m.NewMM()
	va, err := a.MmapFile(0, 4*page, rw, gomm.MapShared, f, 0)
	require.NoError(t, err)
	vb, err := b.MmapFile(0, 2*page, gomm.ProtRead, gomm.MapShared, f, 2*page)
	require.NoError(t, err)

	writeWord(t, a, va+2*page, 42)
	assert.Equal(t, uint64(42), readWord(t, b, vb), "b maps the file's third page first")
	buf := make([]byte, 8)
	_, err = f.ReadAt(buf, 2*page)
	require.NoError(t, err)
	assert.Equal(t, byte(42), buf[0], "the write reached the file")
	_, err = f.WriteAt([]byte{7}, 3*page)
	require.NoError(t, err)
	assert.Equal(t, uint64(7), readWord(t, a, va+3*page))
	assert.Equal(t, uint64(7), readWord(t, b, vb+page))
	require.NoError(t, m.CheckRmap(a, b))

	_, err = f.ReadAt(buf, 4*page-4)
	assert.ErrorIs(t, err, io.EOF)
	require.NoError(t, a.Exit())
	require.NoError(t, b.Exit())
}

func TestPrivateFileMappingCopiesOnWrite(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	f, err := m.NewFile(2 * page)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte{5}, 0)
	require.NoError(t, err)
	mm := m.NewMM()
	va, err := mm.MmapFile(0, 2*page, rw, gomm.MapPrivate, f, 0)
	require.NoError(t, err)
	assert.Equal(t, uint64(5), readWord(t, mm, va))
	writeWord(t, mm, va, 6)
	assert.Equal(t, uint64(6), readWord(t, mm, va))
	buf := make([]byte, 1)
	_, err = f.ReadAt(buf, 0)
	require.NoError(t, err)
	assert.Equal(t, byte(5), buf[0], "a private write does not reach the file")
	writeWord(t, mm, va+page, 9) // a write fault on an empty entry copies too
	_, err = f.ReadAt(buf, page)
	require.NoError(t, err)
	assert.Zero(t, buf[0])
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Exit())
}

func TestTruncateUnmapsEveryMapping(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	f, err := m.NewFile(4 * page)
	require.NoError(t, err)
	a, b := m.NewMM(), m.NewMM()
	va, err := a.MmapFile(0, 4*page, rw, gomm.MapShared, f, 0)
	require.NoError(t, err)
	vb, err := b.MmapFile(0, 4*page, rw, gomm.MapPrivate, f, 0)
	require.NoError(t, err)
	dev := newMirror(t, m, a, va, 4*page)
	cpu := m.CPU(0)
	cpu.Switch(a.NewTask("t"))
	for i := range uint64(4) {
		require.NoError(t, cpu.Store64(va+i*page, i+1))
		assert.Equal(t, i+1, readWord(t, b, vb+i*page))
		_, err := dev.access(va+i*page, false, 0)
		require.NoError(t, err)
	}
	writeWord(t, b, vb+3*page, 99) // a private copy past the new end

	require.NoError(t, f.Truncate(page+1))
	assert.Equal(t, uint64(1), readWord(t, a, va))
	assert.Equal(t, uint64(2), readWord(t, a, va+page), "the page holding the new end stays")
	_, err = cpu.Load64(va + 2*page)
	assert.ErrorIs(t, err, gomm.ErrFault, "SIGBUS past the end")
	_, err = b.ReadAt(make([]byte, 8), vb+3*page)
	assert.ErrorIs(t, err, gomm.ErrFault, "private copies go too")
	_, err = dev.access(va+3*page, false, 0)
	assert.ErrorIs(t, err, gomm.ErrFault, "the device lost its mapping")
	assert.Equal(t, 2, f.CachedPages())
	require.NoError(t, m.CheckRmap(a, b))

	require.NoError(t, f.Truncate(4*page))
	assert.Zero(t, readWord(t, a, va+3*page), "grown back: zeros")
	cpu.Switch(tlb.NewKernelThread("idle"))
	require.NoError(t, dev.close())
	require.NoError(t, a.Exit())
	require.NoError(t, b.Exit())
}

func TestSyncCleansSharedMappings(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	f, err := m.NewFile(2 * page)
	require.NoError(t, err)
	mm := m.NewMM()
	va, err := mm.MmapFile(0, 2*page, rw, gomm.MapShared, f, 0)
	require.NoError(t, err)
	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("t"))
	defer cpu.Switch(tlb.NewKernelThread("idle"))
	require.NoError(t, cpu.Store64(va, 1))
	n, err := f.Sync()
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	e, _ := mm.Table().Lookup(va)
	assert.False(t, e.IsWritable(), "mkclean write-protected the entry")
	assert.False(t, e.IsDirty())
	n, err = f.Sync()
	require.NoError(t, err)
	assert.Zero(t, n, "nothing written since")
	require.NoError(t, cpu.Store64(va, 2)) // faults, dirties again
	n, err = f.Sync()
	require.NoError(t, err)
	assert.Equal(t, 1, n)
}

func TestFilePagesReclaimedAndReadBack(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 128})
	f, err := m.NewFile(300 * page)
	require.NoError(t, err)
	mm := m.NewMM()
	va, err := mm.MmapFile(0, 300*page, rw, gomm.MapShared, f, 0)
	require.NoError(t, err)
	fillPages(t, mm, va, 300, 3) // twice RAM: dirty pages are written back to make room
	checkPages(t, mm, va, 300, 3)
	st := m.Stats().Reclaim
	assert.Positive(t, st.WrittenBack)
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, mm.Exit())
	buf := make([]byte, 1)
	_, err = f.ReadAt(buf, 299*page)
	require.NoError(t, err)
	assert.Equal(t, byte(3+299-256), buf[0])
}

func TestSharedAnonymousMemoryIsSharedAcrossFork(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	parent := m.NewMM()
	va, err := parent.Mmap(0, 2*page, rw, gomm.MapShared|gomm.MapAnonymous)
	require.NoError(t, err)
	writeWord(t, parent, va, 1)
	child, err := parent.Fork()
	require.NoError(t, err)
	writeWord(t, child, va, 2)
	assert.Equal(t, uint64(2), readWord(t, parent, va), "shared, not copied")
	writeWord(t, child, va+page, 3)
	assert.Equal(t, uint64(3), readWord(t, parent, va+page))
	require.NoError(t, m.CheckRmap(parent, child))
	require.NoError(t, child.Exit())
	require.NoError(t, parent.Exit())
}

func TestMmapFileValidation(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	f, err := m.NewFile(page)
	require.NoError(t, err)
	mm := m.NewMM()
	_, err = mm.MmapFile(0, page, rw, gomm.MapShared, nil, 0)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = mm.MmapFile(0, page, rw, gomm.MapShared, f, 1)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = mm.MmapFile(0, page, rw, gomm.MapShared|gomm.MapAnonymous, f, 0)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = m.NewFile(1 << 60)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = f.WriteAt([]byte{1}, -1)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	assert.Empty(t, mm.VMAs())
	require.NoError(t, mm.Exit())
}

// TestSharedAnonymousMemoryIsFreedWithItsLastMapping: the memory of a
// MAP_SHARED|MAP_ANONYMOUS mapping lives as long as some mapping of it
// (fork shares it), and goes with the last.
func TestSharedAnonymousMemoryIsFreedWithItsLastMapping(t *testing.T) {
	m := newMachine(t, gomm.Config{Frames: 256})
	free := m.RAM().Stats().Free
	parent := m.NewMM()
	va, err := parent.Mmap(0, 8*page, rw, gomm.MapShared|gomm.MapAnonymous|gomm.MapPopulate)
	require.NoError(t, err)
	_, err = parent.WriteAt([]byte{42}, va+3*page)
	require.NoError(t, err)
	child, err := parent.Fork()
	require.NoError(t, err)
	require.NoError(t, parent.Munmap(va, 4*page), "part of it: the memory stays")
	require.NoError(t, parent.Exit())
	var b [1]byte
	_, err = child.ReadAt(b[:], va+3*page)
	require.NoError(t, err)
	assert.Equal(t, byte(42), b[0], "the child's mapping keeps the memory")
	require.NoError(t, m.CheckRmap(child))
	require.NoError(t, child.Exit())
	assert.Equal(t, free, m.RAM().Stats().Free, "the last mapping took the memory with it")
}
