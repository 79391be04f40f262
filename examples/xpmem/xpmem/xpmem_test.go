package xpmem

import (
	"context"
	"fmt"
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

// churn reads through the importer, checking every value, while the
// exporter unmaps and remaps the segment (under mmap_lock, which holds
// the exporter's look-ups off), and reclaims and migrates it (which do
// not), for rounds rounds; with a check switched off it stops at the
// checker's first catch. It returns the machine and the first wrong
// value the importer read, if any.
func churn(t *testing.T, off func(*Segment), rounds int) (*gomm.Machine, error) {
	const pages = 4
	m, mm, seg, base := export(t, pages)
	off(seg)
	fill := func() {
		for p := range uint64(pages) {
			_, err := mm.WriteAt(le64(p+1), base+p*PageSize) // real frames, not the zero page
			require.NoError(t, err)
		}
	}
	fill()
	var stop atomic.Bool
	var wrong atomic.Pointer[error]
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; !stop.Load(); i++ {
			p := uint64(i % pages)
			v, err := seg.Read64(p * PageSize)
			// Between a munmap and the refill a page reads as zero.
			if err == nil && v != p+1 && v != 0 {
				err := fmt.Errorf("importer read %#x at page %d", v, p)
				wrong.CompareAndSwap(nil, &err)
			}
		}
	})
	for r := 0; r < rounds; r++ {
		switch r % 3 {
		case 0:
			require.NoError(t, mm.Munmap(base, pages*PageSize))
			_, err := mm.Mmap(base, pages*PageSize, rw, gomm.MapPrivate|gomm.MapAnonymous|gomm.MapFixed)
			require.NoError(t, err)
			fill()
		case 1:
			m.Reclaim(pages)
		default:
			_, _ = mm.MovePages([]uint64{base + uint64(r%pages)*PageSize})
		}
		if _, n := m.Violations(); n > 0 {
			break
		}
	}
	stop.Store(true)
	wg.Wait()
	require.NoError(t, seg.Close())
	require.NoError(t, mm.Exit())
	if e := wrong.Load(); e != nil {
		return m, *e
	}
	return m, nil
}

// The fault/invalidate races, run many times: the checker stays quiet
// and the importer reads only what the exporter wrote.
func TestFaultAnswerRacesInvalidation(t *testing.T) {
	var seg *Segment
	m, wrong := churn(t, func(s *Segment) { seg = s }, testmain.Iterations(3000, 600))
	require.NoError(t, wrong)
	v, n := m.Violations()
	assert.Zero(t, n, "%v", v)
	st := seg.Stats()
	t.Logf("discarded %d, retried %d", st.Discarded, st.Retried)
	assert.Positive(t, st.Discarded+st.Retried, "the race was never run: the test proved nothing")
}

// Each check switched off lets the importer map a frame the exporter
// has unmapped, and the checker catches it when the frame is freed: the
// importer's (an answer that an invalidation overtook on the wire) and
// the exporter's (a look-up that ran while an invalidation was clearing
// the entry, after the importer had acknowledged it).
func TestFaultAnswerRacesWithoutEachCheckAreCaught(t *testing.T) {
	for name, off := range map[string]func(*Segment){
		"importer discards overtaken answers": func(s *Segment) { s.noGenCheck = true },
		"exporter redoes racing look-ups":     func(s *Segment) { s.noActiveCheck = true },
	} {
		t.Run(name, func(t *testing.T) {
			m, _ := churn(t, off, 30000)
			_, n := m.Violations()
			assert.Positive(t, n)
		})
	}
}

func TestDemo(t *testing.T) {
	rep, err := RunDemo(io.Discard, DemoConfig{Pages: 16, Rounds: testmain.Iterations(150, 40)})
	require.NoError(t, err)
	assert.Zero(t, rep.Violations)
	assert.Positive(t, rep.Verified)
	assert.Positive(t, rep.Segment.Invalidations)
}
