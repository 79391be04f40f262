package gru

import (
	"context"
	"io"
	"runtime"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/examples/internal/devtlb"
	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func setup(t *testing.T, mode Mode) (*gomm.Machine, *Chip, *gomm.MM, uint64) {
	t.Helper()
	m, err := gomm.NewMachine(gomm.Config{Frames: 1024, Check: true})
	require.NoError(t, err)
	chip, err := New(m, 8, mode)
	require.NoError(t, err)
	t.Cleanup(chip.Close)
	t.Cleanup(func() {
		v, n := m.Violations()
		assert.Zero(t, n, "checker violations: %v", v)
	})
	mm := m.NewMM()
	a, err := mm.Mmap(0x1000_0000, 16*PageSize, rw, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
	require.NoError(t, err)
	return m, chip, mm, a
}

func TestNewRejectsBadArguments(t *testing.T) {
	m, err := gomm.NewMachine(gomm.Config{Frames: 64})
	require.NoError(t, err)
	_, err = New(m, 0, ModePerRange)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = New(m, 4, Mode(7))
	assert.ErrorIs(t, err, gomm.ErrInvalid)
}

// Contexts on one MM share the chip's one subscription (mmu_notifier_get);
// it goes away with the last of them.
func TestContextsShareOneSubscription(t *testing.T) {
	m, chip, mm, a := setup(t, ModePerRange)
	x1, err := chip.Open(context.Background(), mm)
	require.NoError(t, err)
	x2, err := chip.Open(context.Background(), mm)
	require.NoError(t, err)
	assert.Same(t, x1.sub, x2.sub)
	require.NoError(t, x1.Store64(a, 5))
	v, err := x2.Load64(a)
	require.NoError(t, err)
	assert.Equal(t, uint64(5), v)
	require.NoError(t, x1.Close())
	require.NoError(t, mm.Munmap(a, PageSize)) // x2 still hears about it
	_, err = x2.Load64(a)
	assert.ErrorIs(t, err, gomm.ErrFault)
	require.NoError(t, x2.Close())
	chip.mu.Lock()
	assert.Empty(t, chip.mms, "the last context took the MM's state with it")
	chip.mu.Unlock()
	require.NoError(t, mm.Exit())
	_, n := m.Violations()
	assert.Zero(t, n)
}

// A hit is an access whose first look-up found the translation; a miss
// that drops in and then completes is not one.
func TestHitsCountFirstLookups(t *testing.T) {
	_, chip, mm, a := setup(t, ModePerRange)
	x, err := chip.Open(context.Background(), mm)
	require.NoError(t, err)
	defer func() { require.NoError(t, x.Close()) }()
	require.NoError(t, x.Store64(a, 1))
	_, err = x.Load64(a)
	require.NoError(t, err)
	st := chip.Stats()
	assert.Equal(t, uint64(2), st.Accesses)
	assert.Equal(t, uint64(1), st.Hits)
	assert.Equal(t, uint64(1), st.DropIns)
	require.NoError(t, mm.Exit())
}

// Between InvalidateRangeStart and End no translation of the MM drops
// into the TLB: misses wait (ms_range_active), then go on.
func TestDropInsWaitForTheRangeToEnd(t *testing.T) {
	_, chip, mm, a := setup(t, ModePerRange)
	x, err := chip.Open(context.Background(), mm)
	require.NoError(t, err)
	r := notifier.NewRange(mm, a, a+PageSize, notifier.EventClear, notifier.Blockable)
	require.NoError(t, chip.ops.InvalidateRangeStart(r))
	done := make(chan error, 1)
	go func() { done <- x.Store64(a+8*PageSize, 1) }()
	// The store must be held off (waiting, or retrying its drop-in)
	// until the end; if it completes first, the test fails rather than
	// hangs.
	for st := chip.Stats(); st.Waits == 0 && st.Retries == 0; st = chip.Stats() {
		select {
		case err := <-done:
			t.Fatalf("a drop-in completed while a range was active: %v", err)
		default:
			runtime.Gosched()
		}
	}
	assert.Zero(t, chip.Stats().DropIns)
	chip.ops.InvalidateRangeEnd(r)
	require.NoError(t, <-done)
	assert.EqualValues(t, 1, chip.Stats().DropIns)
	require.NoError(t, x.Close())
	require.NoError(t, mm.Exit())
}

func TestDemo(t *testing.T) {
	rep, err := RunDemo(io.Discard, DemoConfig{Pages: 16, Rounds: testmain.Iterations(100, 30), Munmap: 64 << 20})
	require.NoError(t, err)
	assert.Zero(t, rep.Violations)
	assert.Positive(t, rep.Checked)
	require.Len(t, rep.Munmaps, 2)
	assert.EqualValues(t, 1, rep.Munmaps[0].Flushes, "one device flush per range")
	assert.EqualValues(t, 32, rep.Munmaps[1].Flushes, "the toy flushes once per 2 MiB")
}

// TestNoDropInAfterRelease: a miss that looked its page up before the
// MM's release must not drop it in after; exit's zap, which follows
// release, reaches no subscriber. Without the released check the chip
// keeps the frame exit frees, and the checker (setup's cleanup) catches
// it.
func TestNoDropInAfterRelease(t *testing.T) {
	_, chip, mm, a := setup(t, ModePerRange)
	x, err := chip.Open(context.Background(), mm)
	require.NoError(t, err)
	stall := devtlb.NewStallRelease()
	_, err = mm.RegisterNotifier(context.Background(), stall)
	require.NoError(t, err)
	exited := make(chan error, 1)
	chip.afterGUP = func() {
		chip.afterGUP = nil
		go func() { exited <- mm.Exit() }()
		<-stall.Reached
	}
	assert.ErrorIs(t, x.Store64(a, 1), gomm.ErrClosed, "the drop-in after release is refused")
	close(stall.Resume)
	require.NoError(t, <-exited)
	require.NoError(t, x.Close())
}
