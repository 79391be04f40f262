package physmem

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/gomm-dev/gomm/errno"
)

// Errors returned by physmem. ErrInvalid and ErrNoMem are the shared errno
// values.
var (
	ErrInvalid = errno.ErrInvalid
	ErrNoMem   = errno.ErrNoMem
	ErrBusy    = errno.ErrBusy
	// ErrFreed: the frame is free. Returned by Get and Put on a free frame
	// (use after free, double free) and by writes to one; the frame is left
	// as it was.
	ErrFreed = errors.New("physmem: frame is free")
	// ErrBadState: the last reference was dropped while the frame was
	// still mapped or locked (the kernel's "Bad page state"). The frame is
	// kept out of circulation, as the kernel does; the error says the
	// caller's accounting is wrong.
	ErrBadState = errors.New("physmem: frame freed in a bad state")
)

// MaxFrames is the largest RAM an Allocator can manage, in frames
// (16 TiB): PFNs are stored in 32 bits to keep Frame at 64 bytes.
const MaxFrames = math.MaxUint32

// FreeHook is called for every frame as it is freed: after its last
// reference is dropped, before its data is poisoned and before it can be
// allocated again. The frame still has its flags and mapping. Hooks run on
// the freeing goroutine and must not take locks the freer may hold.
type FreeHook func(f *Frame)

// BatchFreeHook is a FreeHook for the frames one PutBatch frees, called
// once for all of them, so that a hook that takes a lock takes it once
// per batch (as release_pages holds the lruvec lock across a batch). fs
// is the allocator's: it must not be kept after the call.
type BatchFreeHook func(fs []*Frame)

type hookEntry struct {
	id    uint64
	fn    FreeHook
	batch BatchFreeHook // nil: fn is called for each frame of a batch
}

// Stats are an allocator's counters. Every field is a count since New.
type Stats struct {
	Frames   int    // RAM size, in frames
	Free     int    // frames free now: on the free list or in a CPU cache
	Allocs   uint64 // successful allocations
	Frees    uint64 // frames freed (last reference dropped)
	Failures uint64 // allocations refused for lack of frames
	// Huge allocations (AllocHuge) made and refused for lack of a free
	// aligned block.
	HugeAllocs, HugeFailures uint64
	BadPuts                  uint64 // Get or Put on a free frame
	BadStates                uint64 // frames freed while mapped or locked
}

// chunkShift sizes the chunks in which frames are created: 16384 frames
// (1 MiB of Frame structs, 64 MiB of RAM) at a time, when first needed, so
// that a machine with a large RAM costs memory only for the part it uses.
const (
	chunkShift = 14
	chunkSize  = 1 << chunkShift
)

// frameChunk is up to chunkSize frames: the last chunk of a small
// machine holds only the frames it has.
type frameChunk []Frame

// Allocator is the machine's physical memory: a fixed number of frames
// (mm/page_alloc.c, with one zone, order-0 pages and aligned
// blocks of HugeFrames). The Frame
// structs themselves (the memmap) are created a chunk at a time on first
// use.
//
// Alloc, Get, TryGet and Put are safe for concurrent use.
type Allocator struct {
	nframes int
	chunks  []atomic.Pointer[frameChunk] // created on first use, under mu

	// The frames on the free list are those below fresh whose bit is set
	// in freeBits (the free frames in CPU caches are off it). The stack
	// free holds their PFNs, most recently freed on top; it may also
	// hold stale PFNs (frames AllocHuge took without popping them), which
	// Alloc skips and compactFree drops.
	mu         sync.Mutex
	free       []uint32 // PFNs of freed frames, a LIFO stack; protected by mu
	fresh      int      // frames below this PFN have been handed out once; protected by mu
	freeBits   []uint64 // a bit per PFN below fresh: free; protected by mu
	blockFree  []uint16 // free frames per HugeFrames block below fresh; protected by mu
	nfree      int      // bits set in freeBits; protected by mu
	fullBlocks int      // blocks whose every frame is free; protected by mu
	// Counted under mu, which every allocation and RAM free takes anyway,
	// rather than in atomics of their own: another line that every CPU
	// allocating or freeing would write.
	allocs, frees, hugeAllocs uint64 // protected by mu

	hookMu sync.Mutex                  // serialises OnFree registration
	hooks  atomic.Pointer[[]hookEntry] // copy-on-write; read on every free
	hookID uint64                      // protected by hookMu

	// regions are the device-private regions, in PFN order above RAM;
	// copy-on-write, appended under mu.
	regions atomic.Pointer[[]*DeviceRegion]

	failures, badPuts, badStates, hugeFailures atomic.Uint64

	caches []cpuCache // one per CPU (CPUCaches); fixed by New
}

// HugeFrames is the size of a huge allocation in frames: 512, one 2 MiB
// page (HPAGE_PMD_NR).
const HugeFrames = 512

// New returns an allocator of the given number of frames, all free.
func New(frames int, opts ...Option) (*Allocator, error) {
	if frames <= 0 || uint64(frames) > MaxFrames {
		return nil, fmt.Errorf("physmem: %d frames: %w", frames, ErrInvalid)
	}
	a := &Allocator{
		nframes: frames,
		chunks:  make([]atomic.Pointer[frameChunk], (frames+chunkSize-1)/chunkSize),
	}
	for _, opt := range opts {
		if err := opt(a); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// frame returns the Frame of a valid pfn, creating its chunk if needed.
func (a *Allocator) frame(pfn uint32) *Frame {
	c := a.chunks[pfn>>chunkShift].Load()
	if c == nil {
		c = a.makeChunk(int(pfn >> chunkShift))
	}
	return &(*c)[pfn&(chunkSize-1)]
}

func (a *Allocator) makeChunk(i int) *frameChunk {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c := a.chunks[i].Load(); c != nil {
		return c
	}
	c := make(frameChunk, min(chunkSize, a.nframes-i<<chunkShift))
	for j := range c {
		c[j].pfn = uint32(i<<chunkShift + j)
		c[j].data.Store(poisonData)
	}
	a.chunks[i].Store(&c)
	return &c
}

// Frames returns the RAM size in frames.
func (a *Allocator) Frames() int { return a.nframes }

// Frame returns the frame with the given PFN (pfn_to_page), free or not.
func (a *Allocator) Frame(pfn PFN) (*Frame, error) {
	if pfn >= PFN(a.nframes) {
		if r := a.region(pfn); r != nil {
			return &r.frames[pfn-r.first], nil
		}
		return nil, fmt.Errorf("physmem: pfn %#x beyond %d frames: %w", pfn, a.nframes, ErrInvalid)
	}
	return a.frame(uint32(pfn)), nil
}

// Alloc takes a free frame, returning it with one reference, no flags, no
// mapping and zero contents. Out of frames it returns ErrNoMem.
func (a *Allocator) Alloc() (*Frame, error) {
	a.mu.Lock()
	pfn, ok := a.takeLocked()
	if ok {
		a.allocs++
	}
	a.mu.Unlock()
	if !ok && len(a.caches) > 0 {
		// Free frames may wait in CPU caches. Drain them with every
		// cache locked, so that no refill takes them back before this
		// allocation has its frame: failing then, none is free anywhere.
		a.withEveryLock(func() {
			a.drainCachesLocked()
			if testHookDrained != nil {
				testHookDrained()
			}
			if pfn, ok = a.takeLocked(); ok {
				a.allocs++
			}
		})
	}
	if !ok {
		a.failures.Add(1)
		return nil, fmt.Errorf("physmem: all %d frames in use: %w", a.nframes, ErrNoMem)
	}
	return a.handOut(pfn), nil
}

// takeLocked takes a frame off the free list, or a never-used one.
// Called with mu held.
func (a *Allocator) takeLocked() (uint32, bool) {
	pfn, ok := a.popFree()
	if !ok && a.fresh < a.nframes {
		pfn, ok = uint32(a.fresh), true
		a.advanceFresh(a.fresh + 1)
	}
	return pfn, ok
}

// handOut readies a frame just taken off a free list for its new owner.
func (a *Allocator) handOut(pfn uint32) *Frame {
	f := a.frame(pfn)
	f.data.Store(nil)
	f.refcount.Store(1)
	return f
}

// AllocHuge takes HugeFrames free frames with consecutive PFNs, the first
// a multiple of HugeFrames (alloc_pages of HPAGE_PMD_ORDER, without
// compaction), and returns the first. Each frame is as Alloc returns it:
// one reference, no flags, zero contents; each is freed on its own by the
// Put of its last reference. Without a wholly free aligned block it
// returns ErrNoMem and takes nothing: the caller falls back to single
// frames, as a THP fault does.
func (a *Allocator) AllocHuge() (*Frame, error) {
	a.mu.Lock()
	head, ok := a.allocHugeLocked()
	a.mu.Unlock()
	if !ok && len(a.caches) > 0 {
		// Frames in CPU caches may be all a block lacks. Drain them
		// only then: a THP fault that finds no block would otherwise
		// empty every CPU's cache for nothing.
		a.withEveryLock(func() {
			if a.cachesCompleteABlockLocked() {
				a.drainCachesLocked()
				head, ok = a.allocHugeLocked()
			}
		})
	}
	if !ok {
		a.hugeFailures.Add(1)
		return nil, fmt.Errorf("physmem: no free aligned block of %d frames: %w", HugeFrames, ErrNoMem)
	}
	for pfn := head; pfn < head+HugeFrames; pfn++ {
		a.handOut(pfn)
	}
	return a.frame(head), nil
}

// allocHugeLocked takes a wholly free aligned block, counting the
// allocation. Called with mu held.
func (a *Allocator) allocHugeLocked() (uint32, bool) {
	head, ok := a.takeFullBlock()
	if !ok && a.fresh < a.nframes {
		// The block fresh is in, if its frames below fresh are all free.
		if base := a.fresh &^ (HugeFrames - 1); base < a.fresh && base+HugeFrames <= a.nframes &&
			int(a.blockFree[base/HugeFrames])+base+HugeFrames-a.fresh == HugeFrames {
			a.freeFresh(base + HugeFrames)
			head, ok = a.takeFullBlock()
		}
	}
	if !ok {
		// The first aligned block of never-used frames; those skipped to
		// reach it become free.
		if start := (a.fresh + HugeFrames - 1) &^ (HugeFrames - 1); start+HugeFrames <= a.nframes {
			a.freeFresh(start)
			a.advanceFresh(start + HugeFrames)
			head, ok = uint32(start), true
		}
	}
	if ok {
		a.allocs += HugeFrames
		a.hugeAllocs++
	}
	return head, ok
}

// popFree takes the most recently freed frame off the stack, skipping
// stale entries. Called with mu held.
func (a *Allocator) popFree() (uint32, bool) {
	for n := len(a.free); n > 0; n-- {
		pfn := a.free[n-1]
		a.free = a.free[:n-1]
		if a.freeBits[pfn/64]&(1<<(pfn%64)) != 0 {
			a.takeBit(pfn)
			return pfn, true
		}
	}
	return 0, false
}

// takeFullBlock takes every frame of a wholly free block, leaving their
// stack entries stale. Called with mu held.
func (a *Allocator) takeFullBlock() (uint32, bool) {
	if a.fullBlocks == 0 {
		return 0, false
	}
	for b, n := range a.blockFree {
		if n != HugeFrames {
			continue
		}
		head := uint32(b * HugeFrames)
		for pfn := head; pfn < head+HugeFrames; pfn++ {
			a.takeBit(pfn)
		}
		return head, true
	}
	panic("physmem: fullBlocks counts a block that is not there")
}

// pushFree puts a frame below fresh on the free stack. Called with mu
// held.
func (a *Allocator) pushFree(pfn uint32) {
	a.free = append(a.free, pfn)
	a.freeBits[pfn/64] |= 1 << (pfn % 64)
	a.nfree++
	b := pfn / HugeFrames
	if a.blockFree[b]++; a.blockFree[b] == HugeFrames {
		a.fullBlocks++
	}
	if len(a.free) > 2*a.nfree+HugeFrames {
		a.compactFree()
	}
}

func (a *Allocator) takeBit(pfn uint32) {
	a.freeBits[pfn/64] &^= 1 << (pfn % 64)
	a.nfree--
	b := pfn / HugeFrames
	if a.blockFree[b] == HugeFrames {
		a.fullBlocks--
	}
	a.blockFree[b]--
}

// compactFree drops the stale entries from the free stack, keeping the
// newest entry of each free frame in its place in the order. Called with
// mu held.
func (a *Allocator) compactFree() {
	// A new slice: walking the stack from the top while writing the kept
	// entries from the bottom of the same array would overwrite entries
	// not read yet (a free frame would lose its only entry).
	kept := make([]uint32, 0, a.nfree)
	seen := make(map[uint32]struct{}, a.nfree)
	for i := len(a.free) - 1; i >= 0; i-- {
		pfn := a.free[i]
		if a.freeBits[pfn/64]&(1<<(pfn%64)) == 0 {
			continue
		}
		if _, dup := seen[pfn]; dup {
			continue
		}
		seen[pfn] = struct{}{}
		kept = append(kept, pfn)
	}
	slices.Reverse(kept)
	a.free = kept
}

// freeFresh puts the never-used frames from fresh up to n on the free
// stack. Called with mu held.
func (a *Allocator) freeFresh(n int) {
	from := a.fresh
	a.advanceFresh(n)
	for pfn := from; pfn < n; pfn++ {
		a.pushFree(uint32(pfn))
	}
}

// advanceFresh moves fresh up to n, growing the free bitmaps to cover it.
// Called with mu held.
func (a *Allocator) advanceFresh(n int) {
	a.fresh = n
	for len(a.freeBits)*64 < n {
		a.freeBits = append(a.freeBits, 0)
	}
	for len(a.blockFree)*HugeFrames < n {
		a.blockFree = append(a.blockFree, 0)
	}
}

// Get takes another reference to a frame the caller already holds one to,
// or reaches through a mapping (get_page). Getting a free frame is refused
// with ErrFreed.
func (a *Allocator) Get(f *Frame) error {
	if !a.TryGet(f) {
		a.badPuts.Add(1)
		return fmt.Errorf("physmem: get %v: %w", f, ErrFreed)
	}
	return nil
}

// TryGet takes a reference unless the frame is free (get_page_unless_zero),
// the speculative reference lockless walkers take.
func (a *Allocator) TryGet(f *Frame) bool {
	for {
		r := f.refcount.Load()
		if r <= 0 {
			return false
		}
		if f.refcount.CompareAndSwap(r, r+1) {
			return true
		}
	}
}

// Put drops a reference (put_page). Dropping the last one frees the frame:
// the free hooks run, its data is poisoned and its generation bumped, and
// it returns to the free list. Put on a free frame is a double free or a
// put after free: it is refused with ErrFreed and changes nothing.
func (a *Allocator) Put(f *Frame) error {
	last, err := a.put(f)
	if !last {
		return err
	}
	return a.free1(f)
}

// putBatch is how many frames PutBatch frees at a time: the hooks and
// the free list lock are taken once per putBatch frees (the kernel's
// folio_batch holds 31).
const putBatch = 32

// PutBatch drops one reference to each frame of fs, as Put on each would
// (release_pages, free_pages_and_swap_cache), but frees the frames whose
// last reference it drops a batch at a time: each batch hook is called
// once per batch, and the frames return to the free list under one
// acquisition of its lock. The errors of the frames refused are joined.
// fs is PutBatch's scratch space (the frames being freed gather at its
// front), so a batch costs no allocation: its contents are unspecified
// on return.
func (a *Allocator) PutBatch(fs []*Frame) error {
	var errs []error
	// fs[start:w] holds the frames whose last reference is gone and that
	// are not freed yet; w never passes i, so no frame still to be put
	// is overwritten.
	start, w := 0, 0
	for i, f := range fs {
		if i%warmAhead == 0 {
			Warm(fs[i:min(i+warmAhead, len(fs))])
		}
		last, err := a.put(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !last {
			continue
		}
		fs[w] = f
		if w++; w-start == putBatch {
			errs = a.freeBatch(fs[start:w:w], errs)
			start = w
		}
	}
	if w > start {
		errs = a.freeBatch(fs[start:w:w], errs)
	}
	return errors.Join(errs...)
}

// warmAhead is how many frames Warm is given at a time.
const warmAhead = 16

// Warm reads a word of each frame of fs, so that their cache lines are
// fetched together: a locked read-modify-write (a reference or map count
// change) waits for the loads before it, so a loop of them over cold
// frames would otherwise take one cache miss after another. Go has no
// prefetch instruction; plain loads (an atomic load is one on amd64)
// that may all miss at once stand in for it.
func Warm(fs []*Frame) {
	for _, f := range fs {
		f.refcount.Load()
	}
}

// put drops a reference and reports whether it was the last.
func (a *Allocator) put(f *Frame) (last bool, err error) {
	for {
		r := f.refcount.Load()
		if r <= 0 {
			a.badPuts.Add(1)
			return false, fmt.Errorf("physmem: put %v: %w", f, ErrFreed)
		}
		if f.refcount.CompareAndSwap(r, r-1) {
			return r == 1, nil
		}
	}
}

func (a *Allocator) free1(f *Frame) error {
	if hooks := a.hooks.Load(); hooks != nil {
		for _, h := range *hooks {
			h.fn(f)
		}
	}
	if err := a.release(f); err != nil {
		return err
	}
	if f.device != 0 {
		return nil
	}
	a.mu.Lock()
	a.pushFree(f.pfn)
	a.frees++
	a.mu.Unlock()
	return nil
}

// freeBatch frees frames whose last reference is gone, as free1 does
// each, appending the errors to errs: the hooks see the whole batch
// before any frame is poisoned, and the RAM frames go onto the free list
// under one acquisition of mu.
func (a *Allocator) freeBatch(fs []*Frame, errs []error) []error {
	if hooks := a.hooks.Load(); hooks != nil {
		for _, h := range *hooks {
			if h.batch != nil {
				h.batch(fs)
				continue
			}
			for _, f := range fs {
				h.fn(f)
			}
		}
	}
	ram := fs[:0] // reuses fs: each frame is read before its slot is written
	for _, f := range fs {
		if err := a.release(f); err != nil {
			errs = append(errs, err)
			continue
		}
		if f.device == 0 {
			ram = append(ram, f)
		}
	}
	if len(ram) == 0 {
		return errs
	}
	a.mu.Lock()
	for _, f := range ram {
		a.pushFree(f.pfn)
	}
	a.frees += uint64(len(ram))
	a.mu.Unlock()
	return errs
}

// release does what a free does to a frame after the hooks ran, except
// putting a RAM frame on the free list: refuse a frame still mapped or
// locked, poison the data, bump the generation, clear the rest, and hand
// a device frame back to its driver.
func (a *Allocator) release(f *Frame) error {
	if f.mapcount.Load() != 0 || f.IsLocked() {
		// The kernel's bad_page: report, and keep the frame out of
		// circulation rather than hand out something still mapped, or
		// clear a lock somebody may be sleeping on.
		a.badStates.Add(1)
		return fmt.Errorf("physmem: free %v: %w; frame taken out of circulation", f, ErrBadState)
	}
	if d := f.data.Swap(poisonData); d != nil && d != poisonData {
		dataPool.Put(d)
	}
	f.gen.Add(1)
	f.flags.Store(0)
	f.mapping, f.index, f.private = nil, 0, 0
	if f.device != 0 {
		r := a.region(PFN(f.pfn))
		r.frees.Add(1)
		// Only now may Init hand it out again: not while the hooks ran
		// or the data was being poisoned.
		f.flags.Store(uint32(flagDeviceFree))
		r.release(f)
	}
	return nil
}

// OnFree registers a hook run on every frame free and returns a function
// that removes it. The checker uses it to verify that no TLB still
// translates to a frame being freed.
func (a *Allocator) OnFree(fn FreeHook) (remove func()) {
	return a.onFree(hookEntry{fn: fn})
}

// OnFreeBatch is OnFree with a hook for the frames PutBatch frees
// together: batch is called for them instead of fn for each. fn is
// still called for frames freed one at a time, by Put, and must not be
// nil.
func (a *Allocator) OnFreeBatch(fn FreeHook, batch BatchFreeHook) (remove func()) {
	return a.onFree(hookEntry{fn: fn, batch: batch})
}

func (a *Allocator) onFree(e hookEntry) (remove func()) {
	a.hookMu.Lock()
	defer a.hookMu.Unlock()
	a.hookID++
	id := a.hookID
	var next []hookEntry
	if cur := a.hooks.Load(); cur != nil {
		next = append(next, *cur...)
	}
	e.id = id
	next = append(next, e)
	a.hooks.Store(&next)
	return func() {
		a.hookMu.Lock()
		defer a.hookMu.Unlock()
		cur := a.hooks.Load()
		if cur == nil {
			return
		}
		var kept []hookEntry
		for _, h := range *cur {
			if h.id != id {
				kept = append(kept, h)
			}
		}
		a.hooks.Store(&kept)
	}
}

// Stats returns a snapshot of the allocator's counters. Free frames in
// CPU caches count as free.
func (a *Allocator) Stats() Stats {
	cached, cacheAllocs := a.lockCaches()
	a.mu.Lock()
	st := Stats{
		Frames:     a.nframes,
		Free:       a.nfree + a.nframes - a.fresh + cached,
		Allocs:     a.allocs + cacheAllocs,
		Frees:      a.frees,
		HugeAllocs: a.hugeAllocs,
	}
	a.mu.Unlock()
	a.unlockCaches()
	st.Failures = a.failures.Load()
	st.BadPuts = a.badPuts.Load()
	st.BadStates = a.badStates.Load()
	st.HugeFailures = a.hugeFailures.Load()
	return st
}

// Freeze takes the frame's references from exactly n to none
// (folio_ref_freeze), so no TryGet can succeed while its owner (reclaim,
// migration) takes it out of the page or swap cache; it fails, changing
// nothing, if anybody else holds a reference. A frozen frame is either
// thawed with Unfreeze or freed with FreeFrozen.
func (a *Allocator) Freeze(f *Frame, n int32) bool {
	return n > 0 && f.refcount.CompareAndSwap(n, 0)
}

// Unfreeze gives a frozen frame its n references back.
func (a *Allocator) Unfreeze(f *Frame, n int32) { f.refcount.Store(n) }

// FreeFrozen frees a frozen frame, as the Put of its last reference would.
func (a *Allocator) FreeFrozen(f *Frame) error { return a.free1(f) }
