package gomm

import (
	"errors"
	"fmt"
	"math"
	"sync/atomic"
)

// Injection makes allocations fail on purpose, as the kernel's
// fail_page_alloc does, to prove that every path that can run out of
// memory says so (ErrNoMem) and leaves its MM consistent. An injected
// failure is final: it does not enter direct reclaim, so a low rate still
// reaches the error paths behind reclaim.
type Injection struct {
	// Rate is the probability, from 0 to 1, that one allocation at a
	// chosen site fails.
	Rate float64
	// Sites chooses where failures are injected; zero means every site.
	Sites InjectSite
	// Seed chooses the sequence of failures: the same seed fails the
	// same allocations when they come in the same order.
	Seed uint64
}

// InjectSite is a set of allocation sites where failures can be injected.
type InjectSite uint8

// Injection sites.
const (
	// InjectFrame fails data frames: anonymous and copy-on-write pages,
	// page-cache pages, swap-in, migration and KSM targets, huge pages
	// (a fault then falls back to 4 KiB pages).
	InjectFrame InjectSite = 1 << iota
	// InjectSwapSlot fails add_to_swap: reclaim keeps the page.
	InjectSwapSlot
	// InjectPageTable fails the frame charged for a new page table.
	InjectPageTable

	injectSites = 3
	injectAll   = InjectFrame | InjectSwapSlot | InjectPageTable
)

// InjectStats count the failures injected at each site.
type InjectStats struct {
	Frames, SwapSlots, PageTables uint64
}

// Total is the number of failures injected at all sites.
func (s InjectStats) Total() uint64 { return s.Frames + s.SwapSlots + s.PageTables }

// injector decides, allocation by allocation, whether to fail. It is
// lock-free: each decision hashes the seed with a ticket from one atomic
// counter, so concurrent allocators never serialise on it.
type injector struct {
	threshold uint64 // fail when the hash is below; fixed after construction
	sites     InjectSite
	seed      uint64
	ticket    atomic.Uint64
}

func newInjector(in Injection) (*injector, error) {
	if math.IsNaN(in.Rate) || in.Rate < 0 || in.Rate > 1 || in.Sites&^injectAll != 0 {
		return nil, fmt.Errorf("gomm: injection rate %v, sites %#x: %w", in.Rate, uint8(in.Sites), ErrInvalid)
	}
	if in.Rate == 0 {
		return nil, nil
	}
	sites := in.Sites
	if sites == 0 {
		sites = injectAll
	}
	threshold := uint64(math.MaxUint64)
	if in.Rate < 1 {
		threshold = uint64(in.Rate * (1 << 63) * 2)
	}
	return &injector{threshold: threshold, sites: sites, seed: in.Seed}, nil
}

// splitmix64 is the finaliser of SplitMix64: a bijection that spreads
// consecutive tickets over the whole 64-bit range.
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// injectCounters count injected failures per site.
type injectCounters struct {
	bySite [injectSites]atomic.Uint64
}

func (c *injectCounters) snapshot() InjectStats {
	return InjectStats{Frames: c.bySite[0].Load(), SwapSlots: c.bySite[1].Load(), PageTables: c.bySite[2].Load()}
}

// SetInjection starts, changes or (with a zero Injection) stops fault
// injection. Allocations already past their decision are not affected.
func (m *Machine) SetInjection(in Injection) error {
	inj, err := newInjector(in)
	if err != nil {
		return err
	}
	m.injector.Store(inj)
	return nil
}

// shouldFail reports whether the allocation at site is to fail, and
// counts it. One atomic load when injection is off.
func (m *Machine) shouldFail(site InjectSite) bool {
	inj := m.injector.Load()
	if inj == nil || inj.sites&site == 0 {
		return false
	}
	if splitmix64(inj.seed^splitmix64(inj.ticket.Add(1))) >= inj.threshold {
		return false
	}
	for i := range injectSites {
		if site == 1<<i {
			m.injected.bySite[i].Add(1)
		}
	}
	return true
}

// errInjectedFailure marks an injected ErrNoMem, which direct reclaim
// must not retry.
var errInjectedFailure = errors.New("injected failure")

// errInjected is what an injected failure returns.
func errInjected(what string) error {
	return fmt.Errorf("gomm: %s: %w: %w", what, errInjectedFailure, ErrNoMem)
}
