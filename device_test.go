package gomm_test

import (
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type nopPagemap struct{}

func (nopPagemap) PageFree(uint64)                        {}
func (nopPagemap) MigrateToRAM(f *gomm.DeviceFault) error { return nil }

func TestDeviceMemoryBadInput(t *testing.T) {
	m, err := gomm.NewMachine(gomm.Config{Frames: 64, Check: true})
	require.NoError(t, err)
	owner := new(int)
	_, err = m.AddDevicePagemap(4, nil, nopPagemap{})
	assert.ErrorIs(t, err, gomm.ErrInvalid, "no owner")
	_, err = m.AddDevicePagemap(4, []int{1}, nopPagemap{})
	assert.ErrorIs(t, err, gomm.ErrInvalid, "an owner that cannot be compared")
	_, err = m.AddDevicePagemap(4, owner, nil)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = m.AddDevicePagemap(0, owner, nopPagemap{})
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	p, err := m.AddDevicePagemap(4, owner, nopPagemap{})
	require.NoError(t, err)
	_, err = p.InitPage(p.First() + 4)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	f, err := p.InitPage(p.First())
	require.NoError(t, err)
	_, err = p.InitPage(p.First())
	assert.ErrorIs(t, err, gomm.ErrBusy)
	require.NoError(t, m.RAM().Put(f))

	mm := m.NewMM()
	defer func() { require.NoError(t, mm.Exit()) }()
	a, err := mm.Mmap(0x1000_0000, 4*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
	require.NoError(t, err)
	for _, mv := range []gomm.MigrateVMA{
		{Start: a + 1, End: a + gomm.PageSize, Select: gomm.MigrateSelectSystem},
		{Start: a, End: a, Select: gomm.MigrateSelectSystem},
		{Start: a, End: a + gomm.PageSize},
		{Start: a, End: a + gomm.PageSize, Select: 4},
		{Start: a, End: a + gomm.PageSize, Select: gomm.MigrateSelectSystem, Owner: []int{}},
		{Start: a, End: a + 5*gomm.PageSize, Select: gomm.MigrateSelectSystem},
		{Start: gomm.TaskSize, End: gomm.TaskSize + gomm.PageSize, Select: gomm.MigrateSelectSystem},
	} {
		n, err := mm.MigrateVMA(&mv)
		assert.ErrorIs(t, err, gomm.ErrInvalid, "%+v", mv)
		assert.Zero(t, n)
	}
	n, err := mm.MigrateVMA(&gomm.MigrateVMA{Start: a, End: a + 4*gomm.PageSize, Select: gomm.MigrateSelectSystem})
	require.NoError(t, err)
	assert.Zero(t, n, "nothing mapped, nothing moved")

	mapped := func(uint64) error { return nil }
	assert.ErrorIs(t, mm.MakeDeviceExclusive(a+8, owner, mapped), gomm.ErrInvalid)
	assert.ErrorIs(t, mm.MakeDeviceExclusive(a, owner, nil), gomm.ErrInvalid)
	assert.ErrorIs(t, mm.MakeDeviceExclusive(a, []int{}, mapped), gomm.ErrInvalid)
	assert.ErrorIs(t, mm.MakeDeviceExclusive(0x2000_0000, owner, mapped), gomm.ErrFault)
	require.NoError(t, mm.Mprotect(a, gomm.PageSize, gomm.ProtRead))
	assert.ErrorIs(t, mm.MakeDeviceExclusive(a, owner, mapped), gomm.ErrPerm)
	require.NoError(t, m.CheckRmap(mm))
}

// A device page's entry is a mapping like a present one: fork counts it
// twice, munmap drops both, and its free reaches the driver.
func TestDevicePrivateEntryLifetime(t *testing.T) {
	m, err := gomm.NewMachine(gomm.Config{Frames: 64, Check: true})
	require.NoError(t, err)
	freed := make(chan uint64, 4)
	owner := new(int)
	p, err := m.AddDevicePagemap(4, owner, freeRecorder(freed))
	require.NoError(t, err)
	mm := m.NewMM()
	a, err := mm.Mmap(0x1000_0000, gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
	require.NoError(t, err)
	_, err = mm.WriteAt([]byte("device"), a)
	require.NoError(t, err)
	n, err := mm.MigrateVMA(&gomm.MigrateVMA{Start: a, End: a + gomm.PageSize, Owner: owner, Select: gomm.MigrateSelectSystem,
		AllocDst: func(uint64, *physmem.Frame) (*physmem.Frame, error) { return p.InitPage(p.First()) }})
	require.NoError(t, err)
	require.Equal(t, 1, n)
	assert.Equal(t, int64(1), mm.RSS(), "a device page counts in RSS, as in Linux")
	child, err := mm.Fork()
	require.NoError(t, err)
	require.NoError(t, m.CheckRmap(mm, child))
	f, err := m.RAM().Frame(0 + physmem.PFN(p.First()))
	require.NoError(t, err)
	assert.Equal(t, int32(2), f.MapCount())
	mappers, err := m.Mappers(p.First())
	require.NoError(t, err)
	assert.Len(t, mappers, 2, "both device entries are mappings of the page")
	require.NoError(t, child.Exit())
	assert.Equal(t, int32(1), f.MapCount())
	require.NoError(t, mm.Munmap(a, gomm.PageSize))
	select {
	case pfn := <-freed:
		assert.Equal(t, p.First(), pfn, "the last put hands the page back to its driver")
	default:
		t.Error("munmap did not free the device page")
	}
	assert.Zero(t, p.InUse())
	assert.Zero(t, mm.RSS())
	require.NoError(t, mm.Exit())
	_, nv := m.Violations()
	assert.Zero(t, nv)
}

type freeRecorder chan uint64

func (r freeRecorder) PageFree(pfn uint64)                  { r <- pfn }
func (freeRecorder) MigrateToRAM(f *gomm.DeviceFault) error { return nil }
