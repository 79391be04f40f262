package check

import (
	"fmt"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// Stamp orders translation fills against downgrades: a cache records
// Now() when it fills an entry, and a downgrade that began at stamp s
// requires every entry of its range stamped below s to be gone at its end.
type Stamp uint64

// Cache is a translation cache the checker can inspect.
type Cache interface {
	// CacheName names the cache in reports ("cpu3 TLB", "kvm spte").
	CacheName() string
	// CachedPFN describes a translation to pfn the cache could use
	// without flushing first, if it has one.
	CachedPFN(pfn uint64) (detail string, ok bool)
}

// RangeCache is a cache that can also answer, per address space and
// range, which translations it still holds that a downgrade must have
// removed. CPU TLBs implement it.
type RangeCache interface {
	Cache
	// StaleTranslations describes every translation of [start, end) in
	// the address space space, filled before stamp before, that the cache
	// could still use: any such translation when writeOnly is false, only
	// writable ones when it is true.
	StaleTranslations(space, start, end uint64, before Stamp, writeOnly bool) []string
}

// SpaceUser is a cache that may keep an address space itself in use (a
// CPU's active_mm), not just translations of it.
type SpaceUser interface {
	Cache
	// UsesSpace describes how the cache still uses space, if it does.
	UsesSpace(space uint64) (detail string, ok bool)
}

// Kind classifies a violation.
type Kind uint8

// Violation kinds.
const (
	// FreedFrameCached: a frame was freed while a cache still translated
	// to it.
	FreedFrameCached Kind = iota + 1
	// StaleAfterDowngrade: a downgrade returned while a cache still
	// allowed the access it revoked.
	StaleAfterDowngrade
	// FreedSpaceInUse: an address space was freed while a CPU still used
	// it (lazily, as active_mm).
	FreedSpaceInUse
	// Other: a violation reported by a subsystem's own check.
	Other
)

func (k Kind) String() string {
	switch k {
	case FreedFrameCached:
		return "frame freed while cached"
	case StaleAfterDowngrade:
		return "stale translation after downgrade"
	case FreedSpaceInUse:
		return "address space freed while in use"
	case Other:
		return "invariant violated"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// Violation is one recorded breach of the invariant.
type Violation struct {
	Kind   Kind
	Op     string // what was being done: "free", "munmap", "madvise(DONTNEED)", ...
	Cache  string // which cache held on
	Space  uint64 // the address space, when there is one
	Start  uint64 // the range of the operation, when there is one
	End    uint64
	PFN    uint64 // the frame, for FreedFrameCached
	Detail string // the cache's description of the offending entry
	// Stack is where the violation was found (the goroutine freeing the
	// frame or ending the downgrade), for a report in full; String
	// leaves it out.
	Stack string
}

func (v Violation) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "check: %s: %s: %s", v.Kind, v.Op, v.Cache)
	switch v.Kind {
	case FreedFrameCached:
		fmt.Fprintf(&b, " still maps pfn %#x", v.PFN)
	case StaleAfterDowngrade:
		fmt.Fprintf(&b, " still translates mm %d [%#x, %#x)", v.Space, v.Start, v.End)
	case FreedSpaceInUse:
		fmt.Fprintf(&b, " still uses mm %d", v.Space)
	}
	if v.Detail != "" {
		fmt.Fprintf(&b, ": %s", v.Detail)
	}
	return b.String()
}

func (v Violation) Error() string { return v.String() }

// maxRecorded bounds the record; later violations are only counted.
const maxRecorded = 1000

// Checker collects caches and checks them. Its zero value is not usable;
// use New. A nil *Checker is off.
type Checker struct {
	clock  atomic.Uint64 // Stamp source
	checks atomic.Uint64 // checks run

	// caches is published copy-on-write, so every check reads it with
	// one atomic load (the allocator's free hooks are kept the same way).
	caches atomic.Pointer[[]registered] // replaced under mu

	mu         sync.Mutex
	nextID     uint64          // protected by mu
	violations []Violation     // protected by mu
	total      int             // violations found, recorded or not; protected by mu
	handler    func(Violation) // protected by mu
}

type registered struct {
	id    uint64
	cache Cache
}

// New returns a checker with no caches.
func New() *Checker {
	c := &Checker{}
	c.clock.Store(1)
	return c
}

// Register adds a cache and returns a function that removes it.
func (c *Checker) Register(cache Cache) (unregister func()) {
	if c == nil {
		return func() {}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	id := c.nextID
	next := append(slices.Clone(c.snapshot()), registered{id: id, cache: cache})
	c.caches.Store(&next)
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		next := slices.DeleteFunc(slices.Clone(c.snapshot()), func(r registered) bool { return r.id == id })
		c.caches.Store(&next)
	}
}

// SetHandler installs fn to be called with every violation as it is found
// (after it is recorded), for a test that wants to fail at once or a
// runner that prints it. It returns the previous handler.
func (c *Checker) SetHandler(fn func(Violation)) (prev func(Violation)) {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	prev, c.handler = c.handler, fn
	return prev
}

// Now returns the current stamp, for a cache filling an entry. Off, 0.
func (c *Checker) Now() Stamp {
	if c == nil {
		return 0
	}
	return Stamp(c.clock.Load())
}

// BeginDowngrade is called before a downgrade changes its first entry; the
// stamp it returns goes to EndDowngrade. Every translation filled before
// it must be gone, or lack the revoked right, by the end.
func (c *Checker) BeginDowngrade() Stamp {
	if c == nil {
		return 0
	}
	return Stamp(c.clock.Add(1))
}

// EndDowngrade checks, when a downgrade of [start, end) in space returns,
// that no range cache still holds a translation of the range filled before
// since: any translation when writeOnly is false (munmap, madvise, a
// change to PROT_NONE), writable ones when it is true (mprotect to
// read-only, write-protection).
func (c *Checker) EndDowngrade(op string, space, start, end uint64, since Stamp, writeOnly bool) {
	if c == nil {
		return
	}
	c.checks.Add(1)
	for _, reg := range c.snapshot() {
		r := reg.cache
		rc, ok := r.(RangeCache)
		if !ok {
			continue
		}
		for _, d := range rc.StaleTranslations(space, start, end, since, writeOnly) {
			c.Report(Violation{Kind: StaleAfterDowngrade, Op: op, Cache: r.CacheName(), Space: space, Start: start, End: end, Detail: d})
		}
	}
}

// FrameFreed checks that no cache still translates to pfn. Called from
// the allocator's free hook, before the frame can be reused.
func (c *Checker) FrameFreed(pfn uint64) {
	if c == nil {
		return
	}
	c.checks.Add(1)
	for _, r := range c.snapshot() {
		if d, ok := r.cache.CachedPFN(pfn); ok {
			c.Report(Violation{Kind: FreedFrameCached, Op: "free", Cache: r.cache.CacheName(), PFN: pfn, Detail: d})
		}
	}
}

// SpaceFreed checks that no cache still uses the address space space,
// which is being freed (__mmdrop).
func (c *Checker) SpaceFreed(space uint64) {
	if c == nil {
		return
	}
	c.checks.Add(1)
	for _, r := range c.snapshot() {
		if su, ok := r.cache.(SpaceUser); ok {
			if d, ok := su.UsesSpace(space); ok {
				c.Report(Violation{Kind: FreedSpaceInUse, Op: "mmdrop", Cache: r.cache.CacheName(), Space: space, Detail: d})
			}
		}
	}
}

// Report records a violation found by c or by a subsystem's own check.
func (c *Checker) Report(v Violation) {
	if c == nil {
		return
	}
	c.mu.Lock()
	c.total++
	h := c.handler
	record := len(c.violations) < maxRecorded
	c.mu.Unlock()
	if v.Stack == "" && (record || h != nil) {
		v.Stack = string(debug.Stack())
	}
	if record {
		c.mu.Lock()
		if len(c.violations) < maxRecorded {
			c.violations = append(c.violations, v)
		}
		c.mu.Unlock()
	}
	if h != nil {
		h(v)
	}
}

// Violations returns the recorded violations, oldest first, and how many
// were found in all.
func (c *Checker) Violations() (recorded []Violation, total int) {
	if c == nil {
		return nil, 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Violation(nil), c.violations...), c.total
}

// Checks returns how many checks have run.
func (c *Checker) Checks() uint64 {
	if c == nil {
		return 0
	}
	return c.checks.Load()
}

// snapshot returns the registered caches; the slice is never modified.
func (c *Checker) snapshot() []registered {
	if p := c.caches.Load(); p != nil {
		return *p
	}
	return nil
}
