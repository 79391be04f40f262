package gomm

import (
	"sync"

	"github.com/gomm-dev/gomm/physmem"
)

// lru is the machine's page LRU (struct lruvec, one node, anonymous and
// file pages together): an active and an inactive list, linked through
// arrays indexed by frame number so that adding, removing and rotating
// allocate nothing. A frame is on at most one list; its LRU flag says
// so, and changes with the list membership under mu, so that an add
// racing an isolation cannot leave a listed frame unflagged (which the
// free hook would then leave on its list). The lists hold no references:
// a frame leaves its list when it is freed (the allocator's free hook),
// and reclaim takes a reference before it looks at one.
//
// A fault on a CPU does not take mu for its new page: addOn queues it on
// the CPU's batch (the per-CPU lru_add folio_batch), and the batch joins
// the lists under one acquisition of mu when it is full or drained. A
// queued frame is flagged FlagLRUPending; a free takes it off its batch
// (the free hook), so a batch never puts a free frame on a list. Reclaim
// and Stats drain every batch first.
//
// Lock order: a batch's mu, then the lists' mu.
type lru struct {
	ram     *physmem.Allocator
	batches []lruBatch // one per CPU; fixed at creation
	mu      sync.Mutex
	links   []lruLink // by pfn; protected by mu
	head    [3]uint32 // pfn+1 of each list's first frame, 0 when empty; protected by mu
	tail    [3]uint32 // pfn+1 of each list's last frame; protected by mu
	n       [3]int    // frames on each list; protected by mu
}

// lruLink is a frame's place on the lists (the kernel's folio->lru):
// together, so that linking a frame in or out misses the cache once,
// not once per field.
type lruLink struct {
	next, prev uint32 // pfn+1 of the neighbours toward the tail and the head, 0 at the ends
	on         uint8  // which list the frame is on (lruNone, lruInactive, lruActive)
}

const (
	lruNone uint8 = iota
	lruInactive
	lruActive
)

func newLRU(ram *physmem.Allocator, cpus int) *lru {
	n := ram.Frames()
	return &lru{ram: ram, batches: make([]lruBatch, cpus), links: make([]lruLink, n)}
}

// lruBatchSize is how many frames a CPU queues before they join the
// lists (the kernel's folio_batch holds 31).
const lruBatchSize = 31

// lruBatch is one CPU's frames waiting to join the lists.
type lruBatch struct {
	mu     sync.Mutex
	n      int                       // protected by mu
	frames [lruBatchSize]queuedFrame // frames[:n] are queued; protected by mu
	// The batches are an array: the padding keeps each CPU's lock off
	// the cache lines of its neighbours'.
	_ [64]byte
}

type queuedFrame struct {
	f      *physmem.Frame
	active bool
}

// addOn is add for a fault on the given CPU: f is queued on the CPU's
// batch, which joins the lists when it is full. A cpu without a batch
// adds at once.
func (l *lru) addOn(cpu int, f *physmem.Frame, active bool) {
	if cpu < 0 || cpu >= len(l.batches) {
		l.add(f, active)
		return
	}
	b := &l.batches[cpu]
	b.mu.Lock()
	// Active is set now, as the kernel sets PG_active before the batch
	// moves the folio to the list it names: a migration of the frame
	// before the batch drains keeps the new frame active too.
	pending := physmem.FlagLRUPending
	if active {
		pending |= physmem.FlagActive
	}
	f.SetFlags(pending)
	b.frames[b.n] = queuedFrame{f: f, active: active}
	if b.n++; b.n == lruBatchSize {
		l.drainLocked(b)
	}
	b.mu.Unlock()
}

// drainLocked moves a batch's frames onto the lists; a frame mlocked
// meanwhile is unevictable and stays off. None is listed already: addOn
// queues new frames, and add leaves queued ones to their batch. Called
// with b.mu held.
func (l *lru) drainLocked(b *lruBatch) {
	if b.n == 0 {
		return
	}
	// The frames were last touched a batch of faults ago, and their
	// lines may have left the nearest caches since: fetch them all at
	// once before the lock, rather than one miss after another under it.
	for _, q := range b.frames[:b.n] {
		q.f.Flags()
	}
	l.mu.Lock()
	for _, q := range b.frames[:b.n] {
		if q.f.Has(physmem.FlagMlocked) {
			q.f.ClearFlags(physmem.FlagLRUPending | physmem.FlagActive)
			continue
		}
		which := lruInactive
		if q.active {
			which = lruActive
		}
		l.pushLocked(uint32(q.f.PFN()), which)
		// Listed and unqueued in one step: the free hook, which looks
		// at the flags without mu, sees one or the other.
		q.f.ChangeFlags(physmem.FlagLRUPending, physmem.FlagLRU)
	}
	l.mu.Unlock()
	clear(b.frames[:b.n])
	b.n = 0
}

// drainAll moves every CPU's batch onto the lists (lru_add_drain_all).
func (l *lru) drainAll() {
	for i := range l.batches {
		b := &l.batches[i]
		b.mu.Lock()
		l.drainLocked(b)
		b.mu.Unlock()
	}
}

// unqueue takes a frame being freed off whichever batch holds it. The
// frame has no references, so nobody queues it again meanwhile; if a
// drain moved it to a list first, it is flagged FlagLRU by the time
// unqueue returns, for the caller to take it off.
func (l *lru) unqueue(f *physmem.Frame) {
	for i := range l.batches {
		b := &l.batches[i]
		b.mu.Lock()
		for j := range b.n {
			if b.frames[j].f == f {
				b.n--
				b.frames[j] = b.frames[b.n]
				b.frames[b.n] = queuedFrame{}
				f.ClearFlags(physmem.FlagLRUPending)
				b.mu.Unlock()
				return
			}
		}
		b.mu.Unlock()
	}
}

// freed is the allocator's free hook: a frame being freed leaves its
// batch and its list.
func (l *lru) freed(f *physmem.Frame) {
	if f.Has(physmem.FlagLRUPending) {
		l.unqueue(f)
	}
	if f.Has(physmem.FlagLRU) {
		l.del(f)
	}
}

// add puts f at the head of a list, if it is on none (folio_add_lru). A
// frame queued on a CPU's batch is left to the batch: listed now, it
// could be isolated and then listed again by the drain while isolated.
func (l *lru) add(f *physmem.Frame, active bool) {
	which := lruInactive
	if active {
		which = lruActive
	}
	pfn := uint32(f.PFN())
	l.mu.Lock()
	defer l.mu.Unlock()
	// The drain clears FlagLRUPending under mu, so this test and the
	// drain's listing cannot interleave.
	if l.links[pfn].on != lruNone || f.Has(physmem.FlagLRUPending) {
		return
	}
	l.pushLocked(pfn, which)
	f.SetFlags(physmem.FlagLRU)
	if active {
		f.SetFlags(physmem.FlagActive)
	}
}

func (l *lru) pushLocked(pfn uint32, which uint8) {
	l.links[pfn] = lruLink{next: l.head[which], on: which}
	if h := l.head[which]; h != 0 {
		l.links[h-1].prev = pfn + 1
	} else {
		l.tail[which] = pfn + 1
	}
	l.head[which] = pfn + 1
	l.n[which]++
}

func (l *lru) unlinkLocked(f *physmem.Frame) {
	pfn := uint32(f.PFN())
	which := l.links[pfn].on
	if which == lruNone {
		return
	}
	p, n := l.links[pfn].prev, l.links[pfn].next
	if p != 0 {
		l.links[p-1].next = n
	} else {
		l.head[which] = n
	}
	if n != 0 {
		l.links[n-1].prev = p
	} else {
		l.tail[which] = p
	}
	l.links[pfn] = lruLink{}
	l.n[which]--
	f.ClearFlags(physmem.FlagLRU | physmem.FlagActive)
}

// del takes f off its list (folio_isolate_lru without the reference, or
// the free path's removal).
func (l *lru) del(f *physmem.Frame) {
	l.mu.Lock()
	l.unlinkLocked(f)
	l.mu.Unlock()
}

// delFreed takes the frames of a batch being freed off their lists,
// under one acquisition of mu (release_pages holds the lruvec lock across
// a batch): the allocator's batch free hook.
func (l *lru) delFreed(fs []*physmem.Frame) {
	for _, f := range fs {
		if f.Has(physmem.FlagLRUPending) {
			l.unqueue(f)
		}
	}
	locked := false
	for _, f := range fs {
		if !f.Has(physmem.FlagLRU) {
			continue
		}
		if !locked {
			l.mu.Lock()
			locked = true
		}
		l.unlinkLocked(f)
	}
	if locked {
		l.mu.Unlock()
	}
}

// isolateTail takes the frame at the tail of the inactive list off it,
// refilling the inactive list from the active one's tail when empty
// (shrink_active_list's deactivation). pfn+1, or 0 when both are empty.
func (l *lru) isolateTail() uint32 {
	l.mu.Lock()
	defer l.mu.Unlock()
	t := l.tail[lruInactive]
	if t == 0 {
		if t = l.tail[lruActive]; t == 0 {
			return 0
		}
	}
	f, _ := l.ram.Frame(physmem.PFN(t - 1)) // the lists are sized to RAM: cannot fail
	l.unlinkLocked(f)
	return t
}

// lens returns the lists' lengths.
func (l *lru) lens() (inactive, active int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n[lruInactive], l.n[lruActive]
}
