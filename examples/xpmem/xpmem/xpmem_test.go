package xpmem

import (
	"context"
	"io"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const rw = gomm.ProtRead | gomm.ProtWrite

func export(t *testing.T, pages int) (*gomm.Machine, *gomm.MM, *Segment, uint64) {
	t.Helper()
	m, err := gomm.NewMachine(gomm.Config{Frames: 512, SwapSlots: 512, Check: true})
	require.NoError(t, err)
	mm := m.NewMM()
	base, err := mm.Mmap(0x1000_0000, uint64(pages)*PageSize, rw, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
	require.NoError(t, err)
	seg, err := Export(context.Background(), m, mm, base, uint64(pages)*PageSize, NewLink(0))
	require.NoError(t, err)
	return m, mm, seg, base
}

func TestExportRejectsBadRanges(t *testing.T) {
	m, err := gomm.NewMachine(gomm.Config{Frames: 64})
	require.NoError(t, err)
	mm := m.NewMM()
	for _, r := range [][2]uint64{{1, PageSize}, {0, 0}, {0, 100}, {gomm.TaskSize, PageSize}} {
		_, err := Export(context.Background(), m, mm, r[0], r[1], NewLink(0))
		assert.ErrorIs(t, err, gomm.ErrInvalid, "%#x", r)
	}
	require.NoError(t, mm.Exit())
}

// The importer reads what the exporter wrote; an munmap on the exporter
// reaches it before any frame is freed; bad offsets are refused.
func TestImporterFollowsExporter(t *testing.T) {
	m, mm, seg, base := export(t, 8)
	_, err := mm.WriteAt(le64(77), base+PageSize)
	require.NoError(t, err)
	v, err := seg.Read64(PageSize)
	require.NoError(t, err)
	assert.Equal(t, uint64(77), v)
	_, err = seg.Read64(3)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = seg.Read64(8 * PageSize)
	assert.ErrorIs(t, err, gomm.ErrInvalid)

	require.NoError(t, mm.Munmap(base, 8*PageSize))
	_, err = seg.Read64(PageSize)
	assert.ErrorIs(t, err, gomm.ErrFault, "the exporter's fault answer carries its error")
	assert.Positive(t, seg.Stats().Invalidations)
	require.NoError(t, seg.Close())
	_, err = seg.Read64(0)
	assert.ErrorIs(t, err, ErrClosed)
	require.NoError(t, mm.Exit())
	_, n := m.Violations()
	assert.Zero(t, n)
}

// A non-blockable invalidation (the OOM reaper) cannot message the
// importer and wait: it is refused with ErrAgain, and the reaper leaves
// the exported mapping alone.
func TestNonBlockableIsRefused(t *testing.T) {
	m, mm, seg, base := export(t, 4)
	_, err := mm.WriteAt(le64(5), base)
	require.NoError(t, err)
	_, err = seg.Read64(0)
	require.NoError(t, err)
	_, _ = mm.Reap()
	assert.Positive(t, seg.Stats().Refused)
	v, err := seg.Read64(0)
	require.NoError(t, err)
	assert.Equal(t, uint64(5), v, "the reaper skipped the exported range")
	require.NoError(t, seg.Close())
	require.NoError(t, mm.Exit())
	_, n := m.Violations()
	assert.Zero(t, n)
}

// churn reads through the importer while the exporter unmaps and
// remaps the segment for rounds rounds (with the check off, until the
// checker catches something).
func churn(t *testing.T, noGenCheck bool, rounds int) *gomm.Machine {
	const pages = 4
	m, mm, seg, base := export(t, pages)
	seg.noGenCheck = noGenCheck
	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; !stop.Load(); i++ {
			_, _ = seg.Read64(uint64(i%pages) * PageSize)
		}
	})
	for r := 0; r < rounds; r++ {
		require.NoError(t, mm.Munmap(base, pages*PageSize))
		_, err := mm.Mmap(base, pages*PageSize, rw, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
		require.NoError(t, err)
		for p := range uint64(pages) {
			_, err := mm.WriteAt(le64(p), base+p*PageSize) // real frames, not the zero page
			require.NoError(t, err)
		}
		if _, n := m.Violations(); noGenCheck && n > 0 {
			break
		}
	}
	stop.Store(true)
	wg.Wait()
	require.NoError(t, seg.Close())
	require.NoError(t, mm.Exit())
	return m
}

// The fault/invalidate race, run many times: the checker stays quiet.
func TestFaultAnswerRacesInvalidation(t *testing.T) {
	m := churn(t, false, testmain.Iterations(2000, 300))
	v, n := m.Violations()
	assert.Zero(t, n, "%v", v)
}

// Without discarding stale answers the importer maps a frame the
// exporter has unmapped, and the checker catches it when it is freed.
func TestFaultAnswerRaceWithoutCheckIsCaught(t *testing.T) {
	m := churn(t, true, 20000)
	_, n := m.Violations()
	assert.Positive(t, n)
}

func TestDemo(t *testing.T) {
	rep, err := RunDemo(io.Discard, DemoConfig{Pages: 16, Rounds: testmain.Iterations(150, 40)})
	require.NoError(t, err)
	assert.Zero(t, rep.Violations)
	assert.Positive(t, rep.Verified)
	assert.Positive(t, rep.Segment.Invalidations)
}
