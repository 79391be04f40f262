package iommu

import (
	"context"
	"io"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/examples/internal/devtlb"
	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const rw = gomm.ProtRead | gomm.ProtWrite

func bind(t *testing.T, mode Mode, pages int) (*gomm.Machine, *gomm.MM, *Device, uint64) {
	t.Helper()
	m, err := gomm.NewMachine(gomm.Config{Frames: 512, SwapSlots: 512, Check: true})
	require.NoError(t, err)
	mm := m.NewMM()
	a, err := mm.Mmap(0x1000_0000, uint64(pages)*PageSize, rw, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
	require.NoError(t, err)
	dev, err := Bind(context.Background(), m, mm, 8, mode)
	require.NoError(t, err)
	return m, mm, dev, a
}

func TestBindRejectsBadArguments(t *testing.T) {
	m, err := gomm.NewMachine(gomm.Config{Frames: 64})
	require.NoError(t, err)
	mm := m.NewMM()
	_, err = Bind(context.Background(), m, mm, 0, ModeSecondaryTLBs)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = Bind(context.Background(), m, mm, 4, Mode(9))
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	require.NoError(t, mm.Exit())
}

// DMA faults pages in with page requests, caches translations, sees the
// CPU's data, and is refused where the process has no access.
func TestDMAThroughTheCPUPageTable(t *testing.T) {
	m, mm, dev, a := bind(t, ModeSecondaryTLBs, 16)
	require.NoError(t, dev.Write64(a+8, 42))
	var b [8]byte
	_, err := mm.ReadAt(b[:], a+8)
	require.NoError(t, err)
	assert.Equal(t, byte(42), b[0], "the CPU sees the DMA write")
	v, err := dev.Read64(a + 8)
	require.NoError(t, err)
	assert.Equal(t, uint64(42), v)
	st := dev.Stats()
	assert.EqualValues(t, 1, st.PageRequests)
	assert.EqualValues(t, 1, st.Hits)

	// The IOTLB holds at most 8 translations.
	for p := range uint64(16) {
		require.NoError(t, dev.Write64(a+p*PageSize, p))
	}
	dev.mu.Lock()
	assert.LessOrEqual(t, dev.iotlb.Len(), 8)
	dev.mu.Unlock()

	require.NoError(t, mm.Mprotect(a, PageSize, gomm.ProtRead))
	assert.ErrorIs(t, dev.Write64(a, 1), ErrDMA, "read-only for the device too")
	_, err = dev.Read64(0x7000_0000)
	assert.ErrorIs(t, err, ErrDMA, "no mapping")
	assert.ErrorIs(t, dev.Write64(a+1, 1), gomm.ErrInvalid)

	require.NoError(t, mm.Munmap(a, 16*PageSize))
	_, err = dev.Read64(a + PageSize)
	assert.ErrorIs(t, err, ErrDMA)
	require.NoError(t, dev.Unbind())
	require.NoError(t, mm.Exit())
	_, n := m.Violations()
	assert.Zero(t, n)
}

// The demo's scenario, per mode: the correct flush point keeps the
// checker quiet and every DMA read right; flushing at start or at end is
// caught.
func TestFlushPoints(t *testing.T) {
	cfg := DemoConfig{Pages: 32, Rounds: testmain.Iterations(200, 60)}
	for _, mode := range []Mode{ModeSecondaryTLBs, ModeFlushAtStart, ModeFlushAtEnd} {
		t.Run(mode.String(), func(t *testing.T) {
			mr, err := runMode(mode, cfg)
			require.NoError(t, err)
			if mode == ModeSecondaryTLBs {
				assert.Zero(t, mr.Violations, mr.First)
				assert.Positive(t, mr.Checked)
				assert.Positive(t, mr.Device.Flushes)
				return
			}
			assert.Positive(t, mr.Violations, "the checker must catch %v", mode)
			assert.Contains(t, mr.First, "frame freed while cached")
		})
	}
}

func TestDemo(t *testing.T) {
	rep, err := RunDemo(io.Discard, DemoConfig{Pages: 16, Rounds: testmain.Iterations(100, 40)})
	require.NoError(t, err)
	require.Len(t, rep.Modes, 3)
}

// TestNoDMAAfterRelease: once the MM's release ran, the device's PASID
// blocks DMA. Before the fix a DMA in the window between release and
// exit's zap walked the still-present entry into the IOTLB, exit then
// freed the frame telling nobody (the subscription is dead after
// release), and the checker caught the IOTLB holding it.
func TestNoDMAAfterRelease(t *testing.T) {
	m, mm, dev, a := bind(t, ModeSecondaryTLBs, 4)
	require.NoError(t, dev.Write64(a, 7))
	stall := devtlb.NewStallRelease()
	_, err := mm.RegisterNotifier(context.Background(), stall)
	require.NoError(t, err)
	exited := make(chan error)
	go func() { exited <- mm.Exit() }()
	<-stall.Reached
	_, err = dev.Read64(a)
	assert.ErrorIs(t, err, ErrDMA, "DMA after release is refused")
	assert.ErrorIs(t, err, gomm.ErrClosed)
	close(stall.Resume)
	require.NoError(t, <-exited)
	require.NoError(t, dev.Unbind())
	v, n := m.Violations()
	assert.Zero(t, n, "%v", v)
}
