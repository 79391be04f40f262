package physmem

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDeviceRegionLifetime(t *testing.T) {
	a := newAlloc(t, 1000)
	var mu sync.Mutex
	var released []PFN
	r, err := a.AddDeviceRegion(4, nil, func(f *Frame) {
		mu.Lock()
		released = append(released, f.PFN())
		mu.Unlock()
	})
	require.NoError(t, err)
	assert.Equal(t, PFN(1024), r.First(), "above RAM, block aligned")
	assert.Equal(t, 4, r.Len())

	f, err := a.Frame(r.First() + 2)
	require.NoError(t, err)
	g, err := r.Frame(2)
	require.NoError(t, err)
	assert.Same(t, g, f, "the allocator finds device frames by PFN")
	assert.Same(t, r, a.DeviceRegionOf(f.PFN()))
	assert.Nil(t, a.DeviceRegionOf(3), "RAM")
	assert.True(t, f.IsDevicePrivate())
	assert.True(t, f.IsFree())

	var hooked []PFN
	var initDuringFree error
	defer a.OnFree(func(f *Frame) {
		hooked = append(hooked, f.PFN())
		initDuringFree = r.Init(f)
	})()

	require.NoError(t, r.Init(f))
	assert.ErrorIs(t, r.Init(f), ErrBusy, "handed out twice")
	assert.Equal(t, 1, r.InUse())
	assert.True(t, f.IsZero())
	require.NoError(t, f.Store64(0, 42))
	f.SetFlags(FlagAnon)
	before := a.Stats()

	require.NoError(t, a.Put(f))
	assert.Equal(t, []PFN{r.First() + 2}, released, "released to the owner")
	assert.Equal(t, []PFN{r.First() + 2}, hooked, "after the free hooks, like any frame")
	assert.ErrorIs(t, initDuringFree, ErrBusy, "not handed out while it is being freed")
	assert.Equal(t, Flags(0), f.Flags())
	v, _ := f.Load64(0)
	assert.Equal(t, uint64(PoisonWord), v)
	assert.Equal(t, 0, r.InUse())
	after := a.Stats()
	assert.Equal(t, before.Free, after.Free, "not RAM: the free list is untouched")
	assert.Equal(t, before.Frees, after.Frees)
	assert.ErrorIs(t, a.Put(f), ErrFreed)

	require.NoError(t, r.Init(f), "the owner hands it out again")
	assert.True(t, f.IsZero())
	require.NoError(t, a.Put(f))
}

func TestDeviceRegionBadInput(t *testing.T) {
	a := newAlloc(t, 10)
	_, err := a.AddDeviceRegion(0, nil, func(*Frame) {})
	assert.ErrorIs(t, err, ErrInvalid)
	_, err = a.AddDeviceRegion(1, nil, nil)
	assert.ErrorIs(t, err, ErrInvalid)
	_, err = a.AddDeviceRegion(MaxFrames, nil, func(*Frame) {})
	assert.ErrorIs(t, err, ErrNoMem)

	r1, err := a.AddDeviceRegion(3, nil, func(*Frame) {})
	require.NoError(t, err)
	r2, err := a.AddDeviceRegion(600, nil, func(*Frame) {})
	require.NoError(t, err)
	assert.Equal(t, r1.First()+HugeFrames, r2.First())
	for _, pfn := range []PFN{r1.First() + 3, r2.First() - 1, r2.First() + 600} {
		_, err := a.Frame(pfn)
		assert.ErrorIs(t, err, ErrInvalid, "pfn %#x is in no region", pfn)
	}
	f, _ := a.Frame(r2.First() + 599)
	assert.True(t, f.IsDevicePrivate())
	assert.ErrorIs(t, r1.Init(f), ErrInvalid, "another region's frame")
	ram, _ := a.Alloc()
	assert.False(t, ram.IsDevicePrivate())
	assert.ErrorIs(t, r1.Init(ram), ErrInvalid)
	_, err = r1.Frame(3)
	assert.ErrorIs(t, err, ErrInvalid)
}
