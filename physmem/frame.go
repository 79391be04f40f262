package physmem

import (
	"fmt"
	"sync/atomic"

	"github.com/gomm-dev/gomm/locks"
)

// PageSize is the size of a frame's data.
const PageSize = 4096

// words is PageSize in 64-bit words.
const words = PageSize / 8

// PFN is a page frame number: the index of a frame in its Allocator.
type PFN uint64

// Flags are a frame's page flags (enum pageflags).
type Flags uint32

// Page flags. The page lock and its waiters bit live in the same word but
// are managed by Lock/TryLock/Unlock only.
const (
	FlagAnon       Flags = 1 << iota // anonymous memory (PageAnon)
	FlagDirty                        // contents differ from backing store (PG_dirty)
	FlagReferenced                   // accessed since last aged (PG_referenced)
	FlagSwapBacked                   // backed by swap, not a file (PG_swapbacked)
	FlagKSM                          // a KSM stable page (PageKsm)
	FlagUptodate                     // contents valid (PG_uptodate)
	FlagWriteback                    // being written back (PG_writeback)
	FlagSwapCache                    // in the swap cache; Private holds the swap entry (PG_swapcache)
	FlagLRU                          // on an LRU list (PG_lru)
	FlagActive                       // on the active LRU (PG_active)
	FlagMlocked                      // mlocked, not reclaimable (PG_mlocked)
	FlagHWPoison                     // hardware-poisoned (PG_hwpoison)
	FlagPinned                       // has a long-term pin (FOLL_PIN accounting)
	// FlagLRUPending: queued on a CPU's LRU-add batch, not on a list
	// yet. The kernel's batch holds a reference instead; gomm's free
	// path takes a queued frame off its batch, so queueing a frame
	// changes neither its reference count nor when it is freed.
	FlagLRUPending

	// flagDeviceFree marks a device-private frame its driver owns: freed
	// and released, not yet handed out again. Managed by DeviceRegion.
	flagDeviceFree Flags = 1 << 29
	flagLocked     Flags = 1 << 30 // PG_locked: managed by Lock/Unlock
	flagWaiters    Flags = 1 << 31 // PG_waiters: somebody sleeps on the page lock

	// publicFlags are the flags SetFlags and ClearFlags may change.
	publicFlags = flagDeviceFree - 1
)

var flagNames = []string{"anon", "dirty", "referenced", "swapbacked", "ksm", "uptodate",
	"writeback", "swapcache", "lru", "active", "mlocked", "hwpoison", "pinned", "lru-pending"}

func (f Flags) String() string {
	if f == 0 {
		return "none"
	}
	s := ""
	for i, n := range flagNames {
		if f&(1<<i) != 0 {
			if s != "" {
				s += "|"
			}
			s += n
		}
	}
	if f&flagLocked != 0 {
		if s != "" {
			s += "|"
		}
		s += "locked"
	}
	return s
}

// Mapping is what a frame's mapping slot points at: an anon_vma or an
// address_space, as the rmap layer defines them. physmem only stores it.
type Mapping interface {
	// IsAnon reports whether the mapping is an anon_vma (PageAnon).
	IsAnon() bool
}

// pageData is a frame's memory, as 64-bit words accessed atomically:
// simulated CPUs, DMA and the MM touch frames concurrently, as hardware
// does, and must do so without tripping the race detector. On amd64 an
// atomic load is a plain MOV.
type pageData [words]atomic.Uint64

// poisonData is what a freed frame's data reads as until it is allocated
// again. Writes to it are refused with ErrFreed; it is never modified
// after init.
var poisonData = func() *pageData {
	p := new(pageData)
	for i := range p {
		p[i].Store(PoisonWord)
	}
	return p
}()

// PoisonWord is the value every word of a freed frame reads as
// (PAGE_POISON, byte 0x6b as in the kernel's slab poison).
const PoisonWord = 0x6b6b6b6b6b6b6b6b

// Frame is one physical page (struct page / folio of order 0).
//
// Without data a Frame is 64 bytes; its 4 KiB of data is allocated on the
// first write. The page lock is a bit in the flag word with waiters parked
// on a hashed wait table, as in the kernel, so it costs no space.
type Frame struct {
	pfn      uint32
	gen      atomic.Uint32            // bumped on every free
	refcount atomic.Int32             // 0 = free
	mapcount atomic.Int32             // page-table mappings of this frame
	flags    atomic.Uint32            // Flags
	device   uint32                   // 1 for a device-private frame; set before the frame is published, never changed
	data     atomic.Pointer[pageData] // nil (zero page) until first write; poisonData while free

	// mapping and index are the rmap's: which anon_vma or address_space
	// the frame belongs to and its page offset there. Protected by the
	// page lock, even on a frame not yet mapped: code that holds a stale
	// frame number (a migration request, a KSM node) takes a speculative
	// reference and reads them under the lock.
	mapping Mapping
	index   uint64
	// private holds the swap entry of a swap-cache frame (folio->swap).
	// Protected by the page lock.
	private uint64
}

// IsDevicePrivate reports whether the frame is device-private memory
// (is_device_private_page): it belongs to a DeviceRegion, not to RAM,
// and the CPU cannot map it.
func (f *Frame) IsDevicePrivate() bool { return f.device != 0 }

// PFN returns the frame number.
func (f *Frame) PFN() PFN { return PFN(f.pfn) }

// Gen returns the frame's generation: it changes every time the frame is
// freed, so (PFN, Gen) names one lifetime of a frame.
func (f *Frame) Gen() uint32 { return f.gen.Load() }

// RefCount returns the reference count (page_ref_count); 0 means free.
func (f *Frame) RefCount() int32 { return f.refcount.Load() }

// MapCount returns how many page-table entries map the frame
// (page_mapcount).
func (f *Frame) MapCount() int32 { return f.mapcount.Load() }

// IncMapCount adds a mapping and returns the new count.
func (f *Frame) IncMapCount() int32 { return f.mapcount.Add(1) }

// DecMapCount removes a mapping and returns the new count.
func (f *Frame) DecMapCount() int32 { return f.mapcount.Add(-1) }

// Flags returns the public flags.
func (f *Frame) Flags() Flags { return Flags(f.flags.Load()) & publicFlags }

// Has reports whether every flag in want is set.
func (f *Frame) Has(want Flags) bool { return Flags(f.flags.Load())&want == want }

// SetFlags sets flags atomically. The lock bits cannot be set this way.
func (f *Frame) SetFlags(set Flags) { f.flags.Or(uint32(set & publicFlags)) }

// ClearFlags clears flags atomically.
func (f *Frame) ClearFlags(clear Flags) { f.flags.And(^uint32(clear & publicFlags)) }

// ChangeFlags clears some flags and sets others in one atomic step, so
// that nobody sees the frame with both or neither, and returns the flags
// as they were.
func (f *Frame) ChangeFlags(clear, set Flags) (old Flags) {
	clear, set = clear&publicFlags, set&publicFlags
	for {
		o := f.flags.Load()
		if f.flags.CompareAndSwap(o, o&^uint32(clear)|uint32(set)) {
			return Flags(o) & publicFlags
		}
	}
}

// TestAndSetFlag sets flag and reports whether it was already set.
func (f *Frame) TestAndSetFlag(flag Flags) bool {
	return Flags(f.flags.Or(uint32(flag&publicFlags)))&flag != 0
}

// TestAndClearFlag clears flag and reports whether it was set.
func (f *Frame) TestAndClearFlag(flag Flags) bool {
	return Flags(f.flags.And(^uint32(flag&publicFlags)))&flag != 0
}

// Mapping returns the rmap owner and page offset. The caller holds the
// page lock or otherwise owns the frame exclusively.
func (f *Frame) Mapping() (m Mapping, index uint64) { return f.mapping, f.index }

// SetMapping sets the rmap owner and page offset, under the page lock or
// before the frame is visible to anybody else.
func (f *Frame) SetMapping(m Mapping, index uint64) { f.mapping, f.index = m, index }

// Private returns the private word (the swap entry of a swap-cache frame),
// under the page lock.
func (f *Frame) Private() uint64 { return f.private }

// SetPrivate sets the private word, under the page lock.
func (f *Frame) SetPrivate(v uint64) { f.private = v }

// IsFree reports whether the frame is on the free list.
func (f *Frame) IsFree() bool { return f.refcount.Load() == 0 }

func (f *Frame) String() string {
	return fmt.Sprintf("pfn %#x gen %d ref %d map %d [%s]", f.pfn, f.Gen(), f.RefCount(), f.MapCount(), f.Flags())
}

// Lock takes the page lock (folio_lock), sleeping while another holder has
// it. The page lock ranks after mmap_lock and before the rmap locks.
func (f *Frame) Lock() {
	locks.TrackAcquire(f, locks.ClassPageLock, false)
	if f.tryLock() {
		return
	}
	q := waitQueueOf(f)
	q.mu.Lock()
	for {
		// Announce ourselves before the last try: an unlock that comes
		// after the try fails will see the waiters bit and wake us.
		f.flags.Or(uint32(flagWaiters))
		if f.tryLock() {
			break
		}
		q.cond.Wait()
	}
	q.mu.Unlock()
}

// TryLock takes the page lock if it is free (folio_trylock). Unlike Lock
// it may be called under a page-table lock.
func (f *Frame) TryLock() bool {
	if !f.tryLock() {
		return false
	}
	locks.TrackTryAcquire(f, locks.ClassPageLock, false)
	return true
}

// Unlock releases the page lock (folio_unlock) and wakes its waiters.
func (f *Frame) Unlock() {
	locks.TrackRelease(f)
	old := Flags(f.flags.And(^uint32(flagLocked)))
	if old&flagLocked == 0 {
		panic("physmem: Unlock of unlocked frame " + f.String())
	}
	// A waiter sets the waiters bit before its last failed try, and that
	// try precedes this And in the word's order: old shows every sleeper.
	if old&flagWaiters == 0 {
		return
	}
	q := waitQueueOf(f)
	q.mu.Lock()
	// Waiters set the bit again before they sleep, so clearing it here
	// cannot lose one: anybody still waiting holds q.mu until Wait.
	f.flags.And(^uint32(flagWaiters))
	q.cond.Broadcast()
	q.mu.Unlock()
}

// WaitUnlocked sleeps until the page lock is free, without taking it
// (folio_wait_locked): how a fault on a migration entry waits for the
// migration, holding no reference the migration would have to wait out.
// The frame may be freed meanwhile; that only wakes the waiter.
func (f *Frame) WaitUnlocked() {
	if !f.IsLocked() {
		return
	}
	q := waitQueueOf(f)
	q.mu.Lock()
	for {
		f.flags.Or(uint32(flagWaiters))
		if !f.IsLocked() {
			break
		}
		q.cond.Wait()
	}
	q.mu.Unlock()
}

// IsLocked reports whether the page lock is held.
func (f *Frame) IsLocked() bool { return Flags(f.flags.Load())&flagLocked != 0 }

func (f *Frame) tryLock() bool {
	return Flags(f.flags.Or(uint32(flagLocked)))&flagLocked == 0
}
