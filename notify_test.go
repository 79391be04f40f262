package gomm_test

import (
	"context"
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

// rangeLog records each start and end with the state of the first page
// of the range at that moment.
type rangeLog struct {
	mm   *gomm.MM
	mu   sync.Mutex
	log  []string
	open map[*notifier.Range]bool
	bad  []string
}

func (l *rangeLog) present(r *notifier.Range) bool {
	e, _ := l.mm.Table().Lookup(r.Start)
	return e.IsPresent()
}

func (l *rangeLog) InvalidateRangeStart(r *notifier.Range) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open == nil {
		l.open = map[*notifier.Range]bool{}
	}
	l.open[r] = true
	if !l.mm.MmapLocked() {
		l.bad = append(l.bad, "start without mmap_lock: "+r.String())
	}
	l.log = append(l.log, fmt.Sprintf("start %v present=%v", r.Event, l.present(r)))
	return nil
}

func (l *rangeLog) InvalidateRangeEnd(r *notifier.Range) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.open[r] {
		l.bad = append(l.bad, "end without start: "+r.String())
	}
	delete(l.open, r)
	if !l.mm.MmapLocked() {
		l.bad = append(l.bad, "end without mmap_lock: "+r.String())
	}
	l.log = append(l.log, fmt.Sprintf("end %v present=%v", r.Event, l.present(r)))
}

func (l *rangeLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.log
	l.log = nil
	return out
}

func TestEveryPathNotifiesWithItsEvent(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	rw := gomm.ProtRead | gomm.ProtWrite
	addr, err := mm.Mmap(0x1000_0000, 4*page, rw, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)
	log := &rangeLog{mm: mm}
	_, err = mm.RegisterNotifier(context.Background(), log)
	require.NoError(t, err)

	require.NoError(t, mm.Mprotect(addr, page, gomm.ProtRead))
	assert.Equal(t, []string{"start protection-vma present=true", "end protection-vma present=true"}, log.take())
	require.NoError(t, mm.Mprotect(addr, page, rw))
	assert.Empty(t, log.take(), "an upgrade changes no entry")

	require.NoError(t, mm.Madvise(addr, 2*page, gomm.MadvDontNeed))
	assert.Equal(t, []string{"start clear present=true", "end clear present=false"}, log.take(),
		"start comes while the pages are still mapped, end after they are gone")

	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("t"))
	_, err = cpu.Load64(addr) // maps the zero page
	require.NoError(t, err)
	assert.Empty(t, log.take(), "filling a hole needs no invalidation")
	require.NoError(t, cpu.Store64(addr, 1)) // copy-on-write from the zero page
	assert.Equal(t, []string{"start clear present=true", "end clear present=true"}, log.take())

	moved, err := mm.Mremap(addr, 4*page, 8*page, gomm.MremapMayMove|gomm.MremapFixed, 0x2000_0000)
	require.NoError(t, err)
	got := log.take()
	require.NotEmpty(t, got)
	assert.Equal(t, "start unmap present=true", got[0], "the move tells about the old range first")

	require.NoError(t, mm.Munmap(moved, 8*page))
	assert.Equal(t, []string{"start unmap present=true", "end unmap present=false"}, log.take())
	cpu.Switch(tlbIdle())
	require.NoError(t, mm.Exit())
	assert.Empty(t, log.bad)
}

// tlbProbe is a device that walks the page table itself. When told to
// invalidate, the CPU TLBs must already be flushed and the frames not yet
// freed: the 2014 rule.
type tlbProbe struct {
	m      *gomm.Machine
	frames []*physmem.Frame
	calls  atomic.Int32
	mu     sync.Mutex
	bad    []string
}

func (p *tlbProbe) InvalidateSecondaryTLBs(_ notifier.MM, start, end uint64) {
	p.calls.Add(1)
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.frames {
		if f.IsFree() {
			p.bad = append(p.bad, "frame already freed: "+f.String())
		}
		for _, c := range p.m.CPUs() {
			if d, ok := c.CachedPFN(uint64(f.PFN())); ok {
				p.bad = append(p.bad, "CPU TLB still caches it: "+d)
			}
		}
	}
}

func TestSecondaryTLBsBetweenCPUFlushAndFree(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 2})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 8*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapPopulate)
	require.NoError(t, err)
	probe := &tlbProbe{m: m}
	for i := range uint64(8) {
		e, _ := mm.Table().Lookup(addr + i*page)
		f, err := m.RAM().Frame(physmem.PFN(e.PFN()))
		require.NoError(t, err)
		probe.frames = append(probe.frames, f)
	}
	for _, c := range m.CPUs() {
		c.Switch(mm.NewTask("t"))
		for i := range uint64(8) {
			require.NoError(t, c.Store64(addr+i*page, i))
		}
	}
	_, err = mm.RegisterNotifier(context.Background(), probe)
	require.NoError(t, err)
	require.NoError(t, mm.Munmap(addr, 8*page))
	assert.Positive(t, probe.calls.Load())
	assert.Empty(t, probe.bad)
	for _, f := range probe.frames {
		assert.True(t, f.IsFree())
	}
	for _, c := range m.CPUs() {
		c.Switch(tlbIdle())
	}
	require.NoError(t, mm.Exit())
}

type releaseProbe struct {
	frames []*physmem.Frame
	calls  int
	freed  int // frames already free when Release ran
}

func (p *releaseProbe) Release(notifier.MM) {
	p.calls++
	for _, f := range p.frames {
		if f.IsFree() {
			p.freed++
		}
	}
}

func TestReleaseComesBeforeAnyFree(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 4*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapPopulate)
	require.NoError(t, err)
	p := &releaseProbe{}
	for i := range uint64(4) {
		e, _ := mm.Table().Lookup(addr + i*page)
		f, _ := m.RAM().Frame(physmem.PFN(e.PFN()))
		p.frames = append(p.frames, f)
	}
	s, err := mm.RegisterNotifier(context.Background(), p)
	require.NoError(t, err)
	require.NoError(t, mm.Exit())
	assert.Equal(t, 1, p.calls)
	assert.Zero(t, p.freed)
	require.NoError(t, mm.UnregisterNotifier(s), "unregister after teardown is allowed")
	assert.Equal(t, 1, p.calls, "and does not release twice")
	_, err = mm.RegisterNotifier(context.Background(), p)
	assert.ErrorIs(t, err, gomm.ErrClosed)
}

type wellNested struct {
	mu   sync.Mutex
	open map[*notifier.Range]bool
	bad  atomic.Int32
	n    atomic.Int32
}

func (w *wellNested) InvalidateRangeStart(r *notifier.Range) error {
	w.mu.Lock()
	if w.open[r] {
		w.bad.Add(1)
	}
	w.open[r] = true
	w.mu.Unlock()
	w.n.Add(1)
	return nil
}

func (w *wellNested) InvalidateRangeEnd(r *notifier.Range) {
	w.mu.Lock()
	if !w.open[r] {
		w.bad.Add(1) // an end without its start
	}
	delete(w.open, r)
	w.mu.Unlock()
}

// TestRegistrationRacesAnUnmapStorm: subscribers come and go while CPUs
// store and other goroutines munmap, remap and madvise: every subscriber
// sees only ends of starts it saw.
func TestRegistrationRacesAnUnmapStorm(t *testing.T) {
	const pages = 32
	rw := gomm.ProtRead | gomm.ProtWrite
	m := newMachine(t, gomm.Config{CPUs: 2, Frames: 4096})
	mm := m.NewMM()
	base, err := mm.Mmap(0x1000_0000, pages*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	var stop atomic.Bool
	var wg sync.WaitGroup
	for _, cpu := range m.CPUs() {
		wg.Go(func() {
			cpu.Switch(mm.NewTask("t"))
			defer cpu.Switch(tlbIdle())
			for i := uint64(0); !stop.Load(); i++ {
				err := cpu.Store64(base+(i%pages)*page, i)
				if err != nil && !errors.Is(err, gomm.ErrFault) {
					t.Error(err)
					return
				}
			}
		})
	}
	for w := range 2 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			for !stop.Load() {
				lo := rng.Uint64N(pages)
				n := 1 + rng.Uint64N(pages-lo)
				if rng.IntN(2) == 0 {
					_ = mm.Madvise(base+lo*page, n*page, gomm.MadvDontNeed)
				} else if mm.Munmap(base+lo*page, n*page) == nil {
					_, _ = mm.Mmap(base+lo*page, n*page, rw, anon|gomm.MapFixed)
				}
				runtime.Gosched()
			}
		})
	}
	// Register and unregister until enough rounds have run and some
	// subscriber has seen an invalidation, so the race really happened.
	seen := int32(0)
	var subs []*wellNested
	for i := 0; i < testmain.Iterations(100, 20) || seen == 0; i++ {
		w := &wellNested{open: map[*notifier.Range]bool{}}
		s, err := mm.RegisterNotifier(context.Background(), w)
		require.NoError(t, err)
		runtime.Gosched()
		require.NoError(t, mm.UnregisterNotifier(s))
		seen += w.n.Load() // no start reaches it once unregistered
		subs = append(subs, w)
	}
	stop.Store(true)
	wg.Wait()
	for _, w := range subs {
		assert.Zero(t, w.bad.Load(), "an end without its start")
	}
	require.NoError(t, mm.Exit())
}

type refuser struct{ refuse atomic.Bool }

func (r *refuser) InvalidateRangeStart(rg *notifier.Range) error {
	if !rg.Blockable() && r.refuse.Load() {
		return gomm.ErrAgain
	}
	return nil
}
func (r *refuser) InvalidateRangeEnd(*notifier.Range) {}

func TestReapHonoursNonBlockableRefusals(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	addr, err := mm.Mmap(0, 8*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapPopulate)
	require.NoError(t, err)
	ref := &refuser{}
	ref.refuse.Store(true)
	_, err = mm.RegisterNotifier(context.Background(), ref)
	require.NoError(t, err)

	st, err := mm.Reap()
	assert.ErrorIs(t, err, gomm.ErrAgain)
	assert.Equal(t, gomm.ReapStats{Skipped: 1}, st)
	assert.Equal(t, int64(8), mm.RSS(), "a refused range is left alone")

	ref.refuse.Store(false)
	st, err = mm.Reap()
	require.NoError(t, err)
	assert.Equal(t, gomm.ReapStats{Reaped: 8}, st)
	assert.Zero(t, mm.RSS())
	buf := make([]byte, 8)
	_, err = mm.ReadAt(buf, addr)
	require.NoError(t, err)
	assert.Equal(t, make([]byte, 8), buf)
	require.NoError(t, mm.Exit())
}

func TestRegisterNotifierHonoursItsContext(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	mm := m.NewMM()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := mm.RegisterNotifier(ctx, &refuser{})
	assert.ErrorIs(t, err, context.Canceled)
	_, err = mm.RegisterNotifier(context.Background(), struct{}{})
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	require.NoError(t, mm.Exit())
}

// cachingDevice caches one translation and drops it on invalidation or
// release. duringRelease runs at the start of Release, standing for an
// munmap that lands while the driver unregisters.
type cachingDevice struct {
	mu            sync.Mutex
	va, pfn       uint64
	cached        bool
	duringRelease func()
}

func (d *cachingDevice) CacheName() string { return "caching device" }

func (d *cachingDevice) CachedPFN(pfn uint64) (string, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return "cached", d.cached && d.pfn == pfn
}

func (d *cachingDevice) InvalidateRangeStart(r *notifier.Range) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.va >= r.Start && d.va < r.End {
		d.cached = false
	}
	return nil
}

func (d *cachingDevice) InvalidateRangeEnd(*notifier.Range) {}

func (d *cachingDevice) Release(notifier.MM) {
	if d.duringRelease != nil {
		d.duringRelease()
	}
	d.mu.Lock()
	d.cached = false
	d.mu.Unlock()
}

// Unregister runs Release while the subscription still hears
// invalidations: an munmap landing before Release has dropped the
// device's translations must still reach it (mmu_notifier_unregister
// calls release before it unhooks). Unhooked first, the munmap frees the
// frame under the device's cache.
func TestUnregisterReleasesBeforeUnhooking(t *testing.T) {
	m := newMachine(t, gomm.Config{Frames: 64})
	mm := m.NewMM()
	a, err := mm.Mmap(0x1000_0000, page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)
	f, err := mm.GetUserPage(a, false)
	require.NoError(t, err)
	d := &cachingDevice{va: a, pfn: uint64(f.PFN()), cached: true}
	require.NoError(t, m.RAM().Put(f))
	defer m.RegisterCache(d)()
	s, err := mm.RegisterNotifier(context.Background(), d)
	require.NoError(t, err)
	d.duringRelease = func() { require.NoError(t, mm.Munmap(a, page)) }
	require.NoError(t, mm.UnregisterNotifier(s))
	vs, n := m.Violations()
	assert.Zero(t, n, "%v", vs)
	require.NoError(t, mm.Exit())
}

// mmRecorder records the MM every invalidation names.
type mmRecorder struct {
	mu  sync.Mutex
	mms []notifier.MM
}

func (r *mmRecorder) InvalidateRangeStart(rg *notifier.Range) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.mms = append(r.mms, rg.MM)
	return nil
}

func (r *mmRecorder) InvalidateRangeEnd(*notifier.Range) {}

// Invalidations from reverse-map walks (reclaim, migration) name the MM
// itself, as every other invalidation does, so a driver can find its
// state by it.
func TestRmapInvalidationsNameTheMM(t *testing.T) {
	m := newMachine(t, gomm.Config{Frames: 64, SwapSlots: 64})
	mm := m.NewMM()
	defer func() { require.NoError(t, mm.Exit()) }()
	a, err := mm.Mmap(0x1000_0000, 2*page, gomm.ProtRead|gomm.ProtWrite, anon|gomm.MapFixed)
	require.NoError(t, err)
	_, err = mm.WriteAt([]byte{1}, a)
	require.NoError(t, err)
	_, err = mm.WriteAt([]byte{2}, a+page)
	require.NoError(t, err)
	rec := &mmRecorder{}
	s, err := mm.RegisterNotifier(context.Background(), rec)
	require.NoError(t, err)
	n, err := mm.MovePages([]uint64{a})
	require.NoError(t, err)
	require.Equal(t, 1, n)
	m.Reclaim(64)
	m.Reclaim(64)
	require.NoError(t, mm.UnregisterNotifier(s))
	require.NotEmpty(t, rec.mms)
	for _, got := range rec.mms {
		assert.Same(t, mm, got)
	}
}
