package notifier

import (
	"fmt"

	"github.com/gomm-dev/gomm/errno"
)

// Errors.
var (
	ErrInvalid = errno.ErrInvalid // a subscriber that implements nothing, or start/end with secondary TLBs
	ErrAgain   = errno.ErrAgain   // a non-blockable invalidation could not proceed
	ErrClosed  = errno.ErrClosed  // the mm has gone through release
)

// MM is what callbacks are told about the address space: its identity.
// A *gomm.MM is one; drivers that need more assert to it.
type MM interface {
	ID() uint64
}

// Event says why translations of a range change (enum
// mmu_notifier_event), so a driver can tell an unmap from a protection
// change.
type Event uint8

// Events.
const (
	// EventUnmap: the range is unmapped (munmap, mremap's old range,
	// exit's teardown); the VMA goes away.
	EventUnmap Event = iota
	// EventClear: pages are cleared but the VMA stays (MADV_DONTNEED,
	// reclaim, truncate, a copy-on-write replacing a page).
	EventClear
	// EventProtectionVMA: the VMA's protection changes (mprotect).
	EventProtectionVMA
	// EventProtectionPage: one page's protection changes (write-protect
	// for writeback, KSM).
	EventProtectionPage
	// EventSoftDirty: soft-dirty tracking write-protects the range.
	EventSoftDirty
	// EventRelease: the mm is being torn down (exit).
	EventRelease
	// EventMigrate: pages migrate to other frames.
	EventMigrate
	// EventExclusive: a device takes exclusive access to the range.
	EventExclusive
)

var eventNames = [...]string{"unmap", "clear", "protection-vma", "protection-page", "soft-dirty", "release", "migrate", "exclusive"}

func (e Event) String() string {
	if int(e) < len(eventNames) {
		return eventNames[e]
	}
	return fmt.Sprintf("Event(%d)", uint8(e))
}

// Flags qualify a Range.
type Flags uint8

// Range flags.
const (
	// Blockable: the invalidation may sleep (MMU_NOTIFIER_RANGE_BLOCKABLE).
	// Without it, a start callback must not sleep and may fail with
	// ErrAgain.
	Blockable Flags = 1 << iota
)

// Range is one invalidation (struct mmu_notifier_range): the addresses
// [Start, End) of MM whose translations are about to change, why, and
// whether callbacks may sleep. It carries the subscribers its start
// reached, so that exactly those are ended.
type Range struct {
	MM    MM
	Start uint64
	End   uint64 // exclusive
	Event Event
	Flags Flags
	// Owner identifies who causes the change, so a driver can skip
	// invalidations it caused itself (for device-private migration).
	Owner any

	started   []*Subscription // subscribers whose start ran; set by InvalidateRangeStart
	active    bool            // between a successful start and its end
	ivCounted bool            // counted among the mm's active interval invalidations
}

// NewRange describes an invalidation of [start, end) of mm.
func NewRange(mm MM, start, end uint64, ev Event, flags Flags) *Range {
	return &Range{MM: mm, Start: start, End: end, Event: ev, Flags: flags}
}

// Blockable reports whether callbacks may sleep.
func (r *Range) Blockable() bool { return r.Flags&Blockable != 0 }

func (r *Range) String() string {
	return fmt.Sprintf("%v [%#x, %#x) blockable=%v", r.Event, r.Start, r.End, r.Blockable())
}
