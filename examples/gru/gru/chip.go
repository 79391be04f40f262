package gru

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/examples/internal/devtlb"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/physmem"
)

// PageSize is the device page size.
const PageSize = gomm.PageSize

const ptSpan = 512 * PageSize // what one PTE table maps

// Mode says how an invalidation flushes the TLB.
type Mode int

// Modes.
const (
	// ModePerRange flushes each invalidated range once.
	ModePerRange Mode = iota
	// ModePerPTTable flushes once per 2 MiB page-table span: a toy, for
	// comparison only.
	ModePerPTTable
)

func (m Mode) String() string {
	if m == ModePerPTTable {
		return "per page table (toy)"
	}
	return "per range"
}

// Stats are the chip's counters.
type Stats struct {
	Accesses      uint64
	Hits          uint64 // accesses whose first look-up hit
	DropIns       uint64
	Retries       uint64 // drop-ins that lost a race with an invalidation
	Waits         uint64 // misses that waited for a range to end
	Invalidations uint64 // InvalidateRangeStart calls
	Flushes       uint64 // TLB flush operations issued
}

type tlbKey struct {
	mm   uint64
	page uint64
}

type mmState struct {
	contexts    int    // open contexts; the state goes with the last
	rangeActive int    // ms_range_active
	seq         uint64 // bumped by every end
	// released: the MM's release ran; nothing may be dropped in any more,
	// since exit's zap that follows tells nobody.
	released bool
}

// Chip is one GRU chip.
type Chip struct {
	m    *gomm.Machine
	mode Mode

	mu   sync.Mutex
	wake sync.Cond           // waiters for a range to end; L is &mu
	tlb  *devtlb.TLB[tlbKey] // protected by mu
	mms  map[uint64]*mmState // per-MM range state; protected by mu
	ops  *chipOps            // the one notifier identity of the chip

	accesses, hits, dropIns, retries, waits, invalidations, flushes atomic.Uint64

	unregisterCache func()
	// afterGUP, if set (tests only), runs between a miss's page look-up
	// and its drop-in.
	afterGUP func()
}

// New returns a chip with a TLB of entries translations, registered
// with the machine's checker. Close it when its contexts are closed.
func New(m *gomm.Machine, entries int, mode Mode) (*Chip, error) {
	if entries <= 0 || mode < ModePerRange || mode > ModePerPTTable {
		return nil, fmt.Errorf("gru: chip with %d entries, %v: %w", entries, mode, gomm.ErrInvalid)
	}
	c := &Chip{m: m, mode: mode, tlb: devtlb.New[tlbKey](entries), mms: map[uint64]*mmState{}}
	c.wake.L = &c.mu
	c.ops = (*chipOps)(c)
	c.unregisterCache = m.RegisterCache(c)
	return c, nil
}

// Close takes the chip out of the checker.
func (c *Chip) Close() { c.unregisterCache() }

// Context is a user thread's GRU context on one MM.
type Context struct {
	chip *Chip
	mm   *gomm.MM
	sub  *notifier.Subscription
}

// Open attaches a context to mm, sharing the chip's subscription to mm
// with the MM's other contexts.
func (c *Chip) Open(ctx context.Context, mm *gomm.MM) (*Context, error) {
	// The MM's state exists before the subscription does, so every
	// callback finds it.
	c.mu.Lock()
	st := c.mms[mm.ID()]
	if st == nil {
		st = &mmState{}
		c.mms[mm.ID()] = st
	}
	st.contexts++
	c.mu.Unlock()
	sub, err := mm.GetNotifier(ctx, c.ops)
	if err != nil {
		c.detach(mm.ID())
		return nil, fmt.Errorf("gru: %w", err)
	}
	return &Context{chip: c, mm: mm, sub: sub}, nil
}

// Close detaches the context. The chip does not track which context
// filled an entry, so it flushes the MM's entries, and does so before
// it drops its share of the subscription: after the last put, nothing
// would tell it of an munmap freeing what it still caches. The last
// context on an MM takes the MM's state with it.
func (x *Context) Close() error {
	x.chip.flushAll(x.mm.ID())
	err := x.mm.PutNotifier(x.sub)
	x.chip.detach(x.mm.ID())
	return err
}

// detach drops a context's count on an MM's state, and the state with
// the last one (whose put ended every callback).
func (c *Chip) detach(mm uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st := c.mms[mm]; st != nil {
		if st.contexts--; st.contexts == 0 {
			delete(c.mms, mm)
		}
	}
}

// Load64 loads the word at va through the chip.
func (x *Context) Load64(va uint64) (uint64, error) {
	var v uint64
	err := x.access(va, false, func(f *physmem.Frame, off int) (err error) {
		v, err = f.Load64(off)
		return err
	})
	return v, err
}

// Store64 stores v at va through the chip.
func (x *Context) Store64(va, v uint64) error {
	return x.access(va, true, func(f *physmem.Frame, off int) error { return f.Store64(off, v) })
}

func (x *Context) access(va uint64, write bool, op func(*physmem.Frame, int) error) error {
	if va%8 != 0 || va >= gomm.TaskSize {
		return fmt.Errorf("gru: access at %#x: %w", va, gomm.ErrInvalid)
	}
	c := x.chip
	key := tlbKey{x.mm.ID(), va &^ (PageSize - 1)}
	for missed := false; ; missed = true {
		c.mu.Lock()
		if e, ok := c.tlb.Lookup(key); ok && (e.Writable || !write) {
			f, err := c.m.RAM().Frame(physmem.PFN(e.PFN))
			if err == nil {
				err = op(f, int(va-key.page))
			}
			c.mu.Unlock()
			if !missed {
				c.hits.Add(1)
			}
			c.accesses.Add(1)
			return err
		}
		st := c.mms[key.mm]
		for st.rangeActive > 0 {
			c.waits.Add(1)
			c.wake.Wait()
		}
		seq := st.seq
		c.mu.Unlock()

		f, err := x.mm.GetUserPage(key.page, write)
		if err != nil {
			return fmt.Errorf("gru: miss at %#x: %w", va, err)
		}
		if c.afterGUP != nil {
			c.afterGUP()
		}
		c.mu.Lock()
		released := st.released
		switch {
		case released:
		case st.rangeActive == 0 && st.seq == seq:
			c.tlb.Fill(key, devtlb.Entry{PFN: uint64(f.PFN()), Writable: write})
			c.dropIns.Add(1)
		default:
			c.retries.Add(1)
		}
		c.mu.Unlock()
		// The reference only covered the look-up; dropped outside mu,
		// since a free asks the chip (CachedPFN) whether it still maps
		// the frame.
		if err := c.m.RAM().Put(f); err != nil {
			return err
		}
		if released {
			return fmt.Errorf("gru: miss at %#x: the address space is gone: %w", va, gomm.ErrClosed)
		}
	}
}

// flush issues TLB flushes for [start, end) of an MM: one, or one per
// page-table span in the toy mode.
func (c *Chip) flush(mm, start, end uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for lo := start; lo < end; {
		hi := end
		if c.mode == ModePerPTTable {
			hi = min(end, lo&^(ptSpan-1)+ptSpan)
		}
		c.flushes.Add(1)
		c.dropRange(mm, lo, hi)
		lo = hi
	}
}

// flushAll drops every translation of an MM at once, in either mode.
func (c *Chip) flushAll(mm uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.flushes.Add(1)
	c.dropRange(mm, 0, gomm.TaskSize)
}

// dropRange removes an MM's entries in [lo, hi). Called with mu held.
func (c *Chip) dropRange(mm, lo, hi uint64) {
	c.tlb.DropIf(func(k tlbKey) bool { return k.mm == mm && k.page >= lo && k.page < hi })
}

// CacheName implements gomm.Cache.
func (c *Chip) CacheName() string { return fmt.Sprintf("GRU TLB (%v)", c.mode) }

// CachedPFN implements gomm.Cache.
func (c *Chip) CachedPFN(pfn uint64) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tlb.Index.Cached(pfn)
}

// Stats returns the chip's counters.
func (c *Chip) Stats() Stats {
	return Stats{Accesses: c.accesses.Load(), Hits: c.hits.Load(), DropIns: c.dropIns.Load(),
		Retries: c.retries.Load(), Waits: c.waits.Load(), Invalidations: c.invalidations.Load(),
		Flushes: c.flushes.Load()}
}

// chipOps is the chip's face to the notifier: one identity per chip, so
// GetNotifier shares one subscription per MM among the contexts.
type chipOps Chip

// InvalidateRangeStart flushes the range and holds off drop-ins for the
// MM until the matching end (gru_invalidate_range_start).
func (o *chipOps) InvalidateRangeStart(r *notifier.Range) error {
	c := (*Chip)(o)
	c.invalidations.Add(1)
	c.mu.Lock()
	c.mms[r.MM.ID()].rangeActive++
	c.mu.Unlock()
	c.flush(r.MM.ID(), r.Start, r.End)
	return nil
}

// InvalidateRangeEnd lets drop-ins for the MM resume
// (gru_invalidate_range_end).
func (o *chipOps) InvalidateRangeEnd(r *notifier.Range) {
	c := (*Chip)(o)
	c.mu.Lock()
	st := c.mms[r.MM.ID()]
	st.rangeActive--
	st.seq++
	c.mu.Unlock()
	c.wake.Broadcast()
}

// Release drops every translation of the exiting MM and refuses new
// ones: a miss that looked the page up before release must not drop it
// in after.
func (o *chipOps) Release(mm notifier.MM) {
	c := (*Chip)(o)
	c.mu.Lock()
	if st := c.mms[mm.ID()]; st != nil {
		st.released = true
	}
	c.mu.Unlock()
	c.flushAll(mm.ID())
}
