package gomm

import (
	"testing"

	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// toRAMPagemap is a driver whose MigrateToRAM migrates the faulting page
// back, as dmirror_devmem_fault does.
type toRAMPagemap struct{ owner any }

func (toRAMPagemap) PageFree(uint64) {}
func (p toRAMPagemap) MigrateToRAM(f *DeviceFault) error {
	_, err := f.Migrate(&MigrateVMA{Start: f.Addr, End: f.Addr + PageSize, PagemapOwner: p.owner, Select: MigrateSelectDevicePrivate})
	return err
}

// A fork child's mapping of a device page is zapped (its exit, a
// MADV_DONTNEED) and, before that gather finishes, the parent's CPU
// touches the page. The zap must not hold the page's reference until the
// gather's TLB flush: no TLB holds a device entry, and the kernel's
// zap_nonpresent_ptes drops it at once. Held, it makes every migration
// back to RAM fail its refcount freeze, and the fault gave up with EFAULT
// after maxDeviceFaults tries (the stress run's "device memory's driver
// does not give the page back").
func TestDeviceFaultDuringUnflushedZapOfForkedMapping(t *testing.T) {
	m, err := NewMachine(Config{Frames: 256, Check: true})
	require.NoError(t, err)
	owner := new(int)
	pm, err := m.AddDevicePagemap(4, owner, toRAMPagemap{owner})
	require.NoError(t, err)
	parent := m.NewMM()
	a, err := parent.Mmap(0x1000_0000, PageSize, ProtRead|ProtWrite, MapPrivate|MapAnonymous|MapFixed)
	require.NoError(t, err)
	_, err = parent.WriteAt([]byte{42}, a)
	require.NoError(t, err)
	n, err := parent.MigrateVMA(&MigrateVMA{Start: a, End: a + PageSize, Select: MigrateSelectSystem,
		AllocDst: func(uint64, *physmem.Frame) (*physmem.Frame, error) { return pm.InitPage(pm.First()) }})
	require.NoError(t, err)
	require.Equal(t, 1, n)
	child, err := parent.Fork()
	require.NoError(t, err)

	// The child's zap, on a goroutine of its own, stopped before its
	// gather finishes.
	zapped, finish, done := make(chan error), make(chan struct{}), make(chan error)
	go func() {
		child.mmapLock.RLock()
		defer child.mmapLock.RUnlock()
		r := child.invalidateStart(a, a+PageSize, notifier.EventClear)
		defer child.invalidateEnd(r)
		g := newGather(child)
		_, err := g.Zap(a, a+PageSize)
		zapped <- err
		<-finish
		done <- g.Finish()
	}()
	require.NoError(t, <-zapped)
	buf := make([]byte, 1)
	_, err = parent.ReadAt(buf, a)
	assert.NoError(t, err, "CPU fault on the device page")
	assert.Equal(t, byte(42), buf[0])
	close(finish)
	require.NoError(t, <-done)

	assert.Zero(t, pm.InUse(), "the device page went back to RAM")
	assert.NoError(t, m.CheckRmap(parent, child))
	require.NoError(t, child.Exit())
	require.NoError(t, parent.Exit())
	v, n := m.Violations()
	assert.Zero(t, n, "%v", v)
}
