package physmem

import (
	"fmt"
	"slices"
	"sync"
)

// Option configures an Allocator made by New.
type Option func(*Allocator) error

// MaxCPUCaches is the most per-CPU frame caches an allocator may have.
const MaxCPUCaches = 4096

// CPUCaches gives the allocator a frame cache for each of n CPUs (struct
// per_cpu_pages), used by AllocOn: a CPU takes frames from its own cache,
// which it refills from the free list cpuCacheBatch frames at a time, so
// that CPUs allocating at once take the free list's lock once per batch
// instead of once per frame, and each mostly touches a cache line of its
// own. Frees go to the free list, not to a cache.
func CPUCaches(n int) Option {
	return func(a *Allocator) error {
		if n < 0 || n > MaxCPUCaches {
			return fmt.Errorf("physmem: %d CPU caches: %w", n, ErrInvalid)
		}
		a.caches = make([]cpuCache, n)
		return nil
	}
}

// cpuCacheBatch is how many frames a CPU cache takes from the free list
// when it is empty (pcp->batch).
const cpuCacheBatch = 32

// cpuCache is one CPU's cache of free frames. Its frames are free (no
// references, data poisoned) but off the free list: only AllocOn for its
// CPU hands them out, and a drain puts them back.
type cpuCache struct {
	mu     sync.Mutex
	pfns   []uint32 // free frames, the next to hand out last; protected by mu
	allocs uint64   // frames handed out from this cache; protected by mu
	// The caches are an array: without the padding, two CPUs' locks
	// could share a cache line, and each allocation would take it from
	// the other CPU.
	_ [64 - 8 - 24 - 8]byte
}

// AllocOn is Alloc for code running on the given CPU: the frame comes
// from that CPU's cache (see CPUCaches). A cpu without a cache (negative,
// or beyond the allocator's caches) allocates as Alloc does. When both
// the cache and the free list are empty, every CPU's cache is drained
// before ErrNoMem is returned, so a frame free anywhere is found.
func (a *Allocator) AllocOn(cpu int) (*Frame, error) {
	if cpu < 0 || cpu >= len(a.caches) {
		return a.Alloc()
	}
	c := &a.caches[cpu]
	c.mu.Lock()
	if len(c.pfns) == 0 && !a.refill(c) {
		c.mu.Unlock()
		return a.Alloc() // which drains the other CPUs' caches
	}
	pfn := c.pfns[len(c.pfns)-1]
	c.pfns = c.pfns[:len(c.pfns)-1]
	c.allocs++
	c.mu.Unlock()
	return a.handOut(pfn), nil
}

// refill moves up to cpuCacheBatch free frames from the free list to c,
// reporting whether it found any. Called with c.mu held.
func (a *Allocator) refill(c *cpuCache) bool {
	if c.pfns == nil {
		c.pfns = make([]uint32, 0, cpuCacheBatch)
	}
	a.mu.Lock()
	for len(c.pfns) < cpuCacheBatch {
		pfn, ok := a.takeLocked()
		if !ok {
			break
		}
		c.pfns = append(c.pfns, pfn)
	}
	a.mu.Unlock()
	// Taken newest first: hand the newest out first, while its frame
	// may still be in a cache.
	slices.Reverse(c.pfns)
	return len(c.pfns) > 0
}

// DrainCPUCaches returns the frames of every CPU cache to the free list
// (drain_all_pages). The allocator does it itself before failing an
// allocation; callers that need the free list whole may do it too.
func (a *Allocator) DrainCPUCaches() { a.withEveryLock(a.drainCachesLocked) }

// withEveryLock runs fn with every CPU cache's lock and mu held, in
// that order: nothing can allocate, refill or drain meanwhile.
func (a *Allocator) withEveryLock(fn func()) {
	a.lockCaches()
	a.mu.Lock()
	fn()
	a.mu.Unlock()
	a.unlockCaches()
}

// drainCachesLocked moves every cached frame to the free list. Called
// with every cache's lock and mu held.
func (a *Allocator) drainCachesLocked() {
	for i := range a.caches {
		c := &a.caches[i]
		for _, pfn := range c.pfns {
			a.pushFree(pfn)
		}
		c.pfns = c.pfns[:0]
	}
}

// testHookDrained, if set, runs when a failing allocation has drained
// the CPU caches and not yet taken its frame: tests let another CPU try
// to refill there.
var testHookDrained func()

// cachesCompleteABlockLocked reports whether the cached frames would
// make some aligned block wholly free. Called with every cache's lock
// and mu held.
func (a *Allocator) cachesCompleteABlockLocked() bool {
	// The block fresh is in counts its never-used frames as free, as
	// allocHugeLocked does.
	freshBlock, neverUsed := uint32(a.fresh/HugeFrames), 0
	if base := a.fresh &^ (HugeFrames - 1); base < a.fresh && base+HugeFrames <= a.nframes {
		neverUsed = base + HugeFrames - a.fresh
	}
	cached := map[uint32]int{}
	for i := range a.caches {
		for _, pfn := range a.caches[i].pfns {
			b := pfn / HugeFrames
			free := int(a.blockFree[b]) + cached[b] + 1
			if b == freshBlock {
				free += neverUsed
			}
			if cached[b]++; free == HugeFrames {
				return true
			}
		}
	}
	return false
}

// lockCaches takes every CPU cache's lock, in order, for a consistent
// count of the free frames; unlockCaches releases them.
func (a *Allocator) lockCaches() (cached int, allocs uint64) {
	for i := range a.caches {
		c := &a.caches[i]
		c.mu.Lock()
		cached += len(c.pfns)
		allocs += c.allocs
	}
	return cached, allocs
}

func (a *Allocator) unlockCaches() {
	for i := range a.caches {
		a.caches[i].mu.Unlock()
	}
}
