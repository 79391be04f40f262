package gomm_test

import (
	"errors"
	"fmt"
	"github.com/gomm-dev/gomm/internal/testmain"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// hmmMirror is the example driver (device, in driver_example_test.go)
// with writes and two test switches added: a device page table filled
// through RangeFault with the interval-notifier retry loop and emptied by
// the notifier, registered with the checker, so a frame freed while the
// device still maps it is a violation.
type hmmMirror struct {
	*device
	m *gomm.Machine

	afterFault func() // if set, runs once between RangeFault and the install
	skipRetry  bool   // the bug: install without ReadRetry
}

func newMirror(t *testing.T, m *gomm.Machine, mm *gomm.MM, start, length uint64) *hmmMirror {
	d := &hmmMirror{device: &device{mm: mm, pt: map[uint64]gomm.PFN{}}, m: m}
	in, err := mm.InsertInterval(start, length, d)
	require.NoError(t, err)
	d.in = in
	t.Cleanup(m.RegisterCache(d))
	return d
}

// close detaches the device: no more invalidations reach it, so it must
// forget everything it mapped (forgetting to is what the checker catches).
func (d *hmmMirror) close() error {
	if err := d.in.Remove(); err != nil {
		return err
	}
	d.mu.Lock()
	clear(d.pt)
	d.mu.Unlock()
	return nil
}

// access reads or writes the word at va the way the device does: through
// its own page table, faulting through RangeFault when it misses.
func (d *hmmMirror) access(va uint64, write bool, v uint64) (uint64, error) {
	page := va &^ (page - 1)
	for range 1000 {
		d.mu.Lock()
		if p, ok := d.pt[page]; ok && (!write || p.Flags&gomm.PFNWrite != 0) {
			f, err := d.m.RAM().Frame(physmem.PFN(p.PFN))
			if err == nil {
				if write {
					err = f.Store64(int(va-page), v)
				} else {
					v, err = f.Load64(int(va - page))
				}
			}
			d.mu.Unlock()
			return v, err
		}
		d.mu.Unlock()
		seq := d.in.ReadBegin()
		r := &gomm.HMMRange{Interval: d.in, NotifierSeq: seq, Start: page, End: page + gomm.PageSize, Fault: true, FaultWrite: write}
		err := d.mm.RangeFault(r)
		if errors.Is(err, gomm.ErrBusy) {
			continue
		}
		if err != nil {
			return 0, err
		}
		if hook := d.afterFault; hook != nil {
			d.afterFault = nil
			hook()
		}
		d.mu.Lock()
		if d.skipRetry || !d.in.ReadRetry(seq) {
			d.pt[page] = r.PFNs[0]
		}
		d.mu.Unlock()
	}
	return 0, errors.New("mirror: no progress")
}

func TestMirrorAnonReadWrite(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	addr, err := mm.Mmap(0x1000_0000, 4*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapFixed)
	require.NoError(t, err)
	d := newMirror(t, m, mm, addr, 4*page)
	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("t"))
	require.NoError(t, cpu.Store64(addr+8, 77))
	v, err := d.access(addr+8, false, 0)
	require.NoError(t, err)
	assert.Equal(t, uint64(77), v, "anon_read: the device sees what the CPU wrote")

	_, err = d.access(addr+page, true, 99)
	require.NoError(t, err)
	v, err = cpu.Load64(addr + page)
	require.NoError(t, err)
	assert.Equal(t, uint64(99), v, "anon_write: the CPU sees what the device wrote")

	require.NoError(t, mm.Mprotect(addr, 4*page, gomm.ProtRead))
	_, err = d.access(addr+page, true, 1)
	assert.ErrorIs(t, err, gomm.ErrPerm, "anon_write_prot: a write to a read-only range is refused (EPERM)")
	v, err = d.access(addr+page, false, 0)
	require.NoError(t, err)
	assert.Equal(t, uint64(99), v)

	r := &gomm.HMMRange{Interval: d.in, Start: addr, End: addr + 4*page}
	r.NotifierSeq = d.in.ReadBegin()
	require.NoError(t, mm.RangeFault(r), "a snapshot without faulting")
	assert.Equal(t, gomm.PFNValid, r.PFNs[1].Flags, "read-only now")
	assert.Zero(t, r.PFNs[2].Flags, "never touched")
	for _, bad := range [][2]uint64{
		{addr + 1, addr + page},    // unaligned
		{addr, addr},               // empty
		{addr - page, addr + page}, // starts before the interval: its invalidations would go unseen
		{addr, addr + 5*page},      // ends after it
	} {
		assert.ErrorIs(t, mm.RangeFault(&gomm.HMMRange{Interval: d.in, Start: bad[0], End: bad[1]}), gomm.ErrInvalid, "%#x", bad)
	}
	all, err := mm.InsertInterval(0, gomm.TaskSize, nopInterval{})
	require.NoError(t, err)
	huge := &gomm.HMMRange{Interval: all, Start: 0, End: (gomm.MaxRangeFaultPages + 1) * page}
	assert.ErrorIs(t, mm.RangeFault(huge), gomm.ErrInvalid, "more than MaxRangeFaultPages: found by the fuzzer as a 200 GiB allocation")
	assert.Nil(t, huge.PFNs)
	require.NoError(t, all.Remove())
	cpu.Switch(tlbIdle())
	require.NoError(t, mm.Exit())
}

// TestMirrorReadRacesMunmap is anon_teardown: device reads race munmap and
// remap of the same range; each read returns the value the CPU wrote,
// zero (a fresh mapping), or a clean fault, and the checker never sees the
// device holding a freed frame. A smoke test: free-running, it does not
// reliably hit the window the retry check closes, which
// TestMirrorRetryIsWhatKeepsItSafe places deterministically.
func TestMirrorReadRacesMunmap(t *testing.T) {
	const pages = 16
	rw := gomm.ProtRead | gomm.ProtWrite
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 2048})
	mm := m.NewMM()
	base, err := mm.Mmap(0x1000_0000, pages*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	d := newMirror(t, m, mm, base, pages*page)
	fill := func(i uint64) uint64 { return 0xa000 + i }
	for i := range uint64(pages) {
		_, err := mm.WriteAt(le64(fill(i)), base+i*page)
		require.NoError(t, err)
	}
	var stop atomic.Bool
	var bad, ok, faults atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		rng := rand.New(rand.NewPCG(1, 1))
		for !stop.Load() {
			i := rng.Uint64N(pages)
			v, err := d.access(base+i*page, false, 0)
			switch {
			case errors.Is(err, gomm.ErrFault):
				faults.Add(1)
			case err != nil:
				t.Error(err)
				return
			case v == fill(i) || v == 0:
				ok.Add(1)
			default:
				bad.Add(1)
			}
		}
	})
	rng := rand.New(rand.NewPCG(2, 2))
	for range testmain.Iterations(300, 60) {
		i := rng.Uint64N(pages)
		require.NoError(t, mm.Munmap(base+i*page, page))
		runtime.Gosched()
		_, err := mm.Mmap(base+i*page, page, rw, anon|gomm.MapFixed)
		require.NoError(t, err)
		if rng.IntN(2) == 0 {
			_, err = mm.WriteAt(le64(fill(i)), base+i*page)
			require.NoError(t, err)
		}
	}
	stop.Store(true)
	wg.Wait()
	assert.Zero(t, bad.Load())
	assert.Positive(t, ok.Load())
	require.NoError(t, d.close())
	require.NoError(t, mm.Exit())
}

func le64(v uint64) []byte {
	b := make([]byte, 8)
	for i := range b {
		b[i] = byte(v >> (8 * i))
	}
	return b
}

// TestMirrorRetryIsWhatKeepsItSafe: an munmap lands between the device's
// RangeFault and its install. With ReadRetry the stale snapshot is thrown
// away; without it the device keeps a translation to a frame that is
// freed and reused, and the checker catches it when the frame is freed
// again.
func TestMirrorRetryIsWhatKeepsItSafe(t *testing.T) {
	for _, skip := range []bool{false, true} {
		t.Run(fmt.Sprintf("skipRetry=%v", skip), func(t *testing.T) {
			m, err := gomm.NewMachine(gomm.Config{CPUs: 1, Frames: 256, Check: true})
			require.NoError(t, err)
			mm := m.NewMM()
			rw := gomm.ProtRead | gomm.ProtWrite
			addr, err := mm.Mmap(0x1000_0000, page, rw, anon|gomm.MapFixed|gomm.MapPopulate)
			require.NoError(t, err)
			d := newMirror(t, m, mm, addr, page)
			d.skipRetry = skip
			other := uint64(0x2000_0000) // outside the device's interval
			d.afterFault = func() {
				require.NoError(t, mm.Munmap(addr, page)) // frees the frame just snapshotted
				_, err := mm.Mmap(other, page, rw, anon|gomm.MapFixed|gomm.MapPopulate)
				require.NoError(t, err) // the frame is reused there (LIFO)
			}
			_, err = d.access(addr, false, 0)
			if skip {
				require.NoError(t, err, "the stale snapshot is installed")
			} else {
				assert.ErrorIs(t, err, gomm.ErrFault, "the retry sees the range is gone")
			}
			// Freeing the frame from its new mapping invalidates only the
			// new range: a device still holding it is caught.
			require.NoError(t, mm.Munmap(other, page))
			_, n := m.Violations()
			if skip {
				assert.Positive(t, n, "without ReadRetry the device keeps a stale translation")
			} else {
				assert.Zero(t, n)
			}
			d.mu.Lock()
			clear(d.pt)
			d.mu.Unlock()
			require.NoError(t, d.close())
			require.NoError(t, mm.Exit())
		})
	}
}

// faultOnRelease tries to fault a page in from inside the release-event
// invalidation: the window between "devices were told to let go" and
// "pages are freed" must not hand out pages.
type faultOnRelease struct {
	mm  *gomm.MM
	in  *notifier.Interval
	err error
}

func (f *faultOnRelease) Invalidate(in *notifier.Interval, r *notifier.Range, cur uint64) bool {
	in.SetSeq(cur)
	if r.Event == notifier.EventRelease {
		hr := &gomm.HMMRange{Interval: in, NotifierSeq: cur + 1, Start: in.Start(), End: in.Start() + gomm.PageSize, Fault: true}
		f.err = f.mm.RangeFault(hr)
	}
	return true
}

func TestNoFaultAfterRelease(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 4*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapPopulate)
	require.NoError(t, err)
	f := &faultOnRelease{mm: mm}
	f.in, err = mm.InsertInterval(addr, 4*page, f)
	require.NoError(t, err)
	require.NoError(t, mm.Exit())
	assert.ErrorIs(t, f.err, gomm.ErrClosed, "once release has begun, RangeFault hands out nothing")
}

type nopInterval struct{}

func (nopInterval) Invalidate(in *notifier.Interval, _ *notifier.Range, seq uint64) bool {
	in.SetSeq(seq)
	return true
}
