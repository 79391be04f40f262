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
type lru struct {
	ram  *physmem.Allocator
	mu   sync.Mutex
	next []uint32  // pfn+1 of the next frame toward the tail, 0 at the end; protected by mu
	prev []uint32  // protected by mu
	on   []uint8   // which list a frame is on (lruNone, lruInactive, lruActive); protected by mu
	head [3]uint32 // pfn+1 of each list's first frame, 0 when empty; protected by mu
	tail [3]uint32 // pfn+1 of each list's last frame; protected by mu
	n    [3]int    // frames on each list; protected by mu
}

const (
	lruNone uint8 = iota
	lruInactive
	lruActive
)

func newLRU(ram *physmem.Allocator) *lru {
	n := ram.Frames()
	return &lru{ram: ram, next: make([]uint32, n), prev: make([]uint32, n), on: make([]uint8, n)}
}

// add puts f at the head of a list, if it is on none (folio_add_lru).
func (l *lru) add(f *physmem.Frame, active bool) {
	which := lruInactive
	if active {
		which = lruActive
	}
	pfn := uint32(f.PFN())
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.on[pfn] != lruNone {
		return
	}
	l.pushLocked(pfn, which)
	f.SetFlags(physmem.FlagLRU)
	if active {
		f.SetFlags(physmem.FlagActive)
	}
}

func (l *lru) pushLocked(pfn uint32, which uint8) {
	l.on[pfn] = which
	l.prev[pfn] = 0
	l.next[pfn] = l.head[which]
	if h := l.head[which]; h != 0 {
		l.prev[h-1] = pfn + 1
	} else {
		l.tail[which] = pfn + 1
	}
	l.head[which] = pfn + 1
	l.n[which]++
}

func (l *lru) unlinkLocked(f *physmem.Frame) {
	pfn := uint32(f.PFN())
	which := l.on[pfn]
	if which == lruNone {
		return
	}
	p, n := l.prev[pfn], l.next[pfn]
	if p != 0 {
		l.next[p-1] = n
	} else {
		l.head[which] = n
	}
	if n != 0 {
		l.prev[n-1] = p
	} else {
		l.tail[which] = p
	}
	l.on[pfn] = lruNone
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
