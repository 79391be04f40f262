package gomm

import (
	"fmt"
	"sync"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
)

// swapDevice is the machine's one swap area (a swap_info_struct) and its
// swap cache. Each slot counts the page-table entries that name it
// (swap_map) and may have a frame in the swap cache; a slot is free when
// neither is left. Slot 0 is never handed out, as in Linux, so a zero
// offset is never a live slot.
type swapDevice struct {
	ram *physmem.Allocator

	mu     sync.Mutex
	count  []int32                   // entries naming each slot; protected by mu
	data   [][]byte                  // what was written to each slot; protected by mu
	cache  map[uint64]*physmem.Frame // the swap cache: each holds a reference; protected by mu
	free   []uint64                  // protected by mu
	outs   uint64                    // pages written; protected by mu
	ins    uint64                    // pages read; protected by mu
	orphan []uint64                  // slots whose last entry went while cached; protected by mu
	spare  [][]byte                  // page buffers of freed slots, for the next write; protected by mu
}

func newSwapDevice(ram *physmem.Allocator, slots int) *swapDevice {
	d := &swapDevice{ram: ram, count: make([]int32, slots+1), data: make([][]byte, slots+1), cache: map[uint64]*physmem.Frame{}}
	for s := slots; s >= 1; s-- {
		d.free = append(d.free, uint64(s))
	}
	return d
}

// SwapStats are the swap device's counters.
type SwapStats struct {
	Slots  int    // size of the device
	Used   int    // slots holding a page or named by an entry
	Cached int    // frames in the swap cache
	Outs   uint64 // pages written out
	Ins    uint64 // pages read in
}

func (d *swapDevice) stats() SwapStats {
	if d == nil {
		return SwapStats{}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return SwapStats{Slots: len(d.count) - 1, Used: len(d.count) - 1 - len(d.free), Cached: len(d.cache), Outs: d.outs, Ins: d.ins}
}

// addToCache gives the locked anonymous frame f a new slot and puts it in
// the swap cache (add_to_swap); false when the device is full.
func (d *swapDevice) addToCache(f *physmem.Frame) bool {
	if d == nil {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	n := len(d.free)
	if n == 0 {
		return false
	}
	slot := d.free[n-1]
	d.free = d.free[:n-1]
	_ = d.ram.Get(f) // the caller holds one: cannot fail
	d.cache[slot] = f
	f.SetPrivate(slot)
	f.SetFlags(physmem.FlagSwapCache)
	return true
}

// Dup counts one more entry naming slot (swap_duplicate).
func (d *swapDevice) Dup(slot uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if slot == 0 || slot >= uint64(len(d.count)) || (d.count[slot] == 0 && d.cache[slot] == nil) {
		return fmt.Errorf("gomm: swap slot %d is not in use: %w", slot, ErrInvalid)
	}
	d.count[slot]++
	return nil
}

// putEntry drops the reference of one entry naming slot (swap_free). A
// slot nothing names any more and with no cached frame is freed; one
// whose frame is still cached is remembered, for dropOrphans to free.
func (d *swapDevice) putEntry(slot uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if slot == 0 || slot >= uint64(len(d.count)) || d.count[slot] <= 0 {
		return
	}
	d.count[slot]--
	if d.count[slot] > 0 {
		return
	}
	if d.cache[slot] != nil {
		d.orphan = append(d.orphan, slot)
		return
	}
	d.releaseLocked(slot)
}

func (d *swapDevice) releaseLocked(slot uint64) {
	if buf := d.data[slot]; buf != nil {
		d.spare = append(d.spare, buf)
	}
	d.data[slot] = nil
	d.free = append(d.free, slot)
}

// entries returns how many entries name slot.
func (d *swapDevice) entries(slot uint64) int32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.count[slot]
}

// lookup returns the swap cache's frame for slot with a reference, or nil
// (swap_cache_get_folio). Check it is still cached under its page lock.
func (d *swapDevice) lookup(slot uint64) *physmem.Frame {
	d.mu.Lock()
	defer d.mu.Unlock()
	f := d.cache[slot]
	if f == nil || !d.ram.TryGet(f) {
		return nil
	}
	return f
}

// insert puts the new, locked frame f in the swap cache for slot (a
// swap-in's swapcache folio); false if another got there first.
func (d *swapDevice) insert(slot uint64, f *physmem.Frame) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cache[slot] != nil || d.count[slot] == 0 {
		return false
	}
	_ = d.ram.Get(f)
	d.cache[slot] = f
	f.SetPrivate(slot)
	f.SetFlags(physmem.FlagSwapCache)
	return true
}

// cached reports whether the locked frame f is still slot's cached frame.
func (d *swapDevice) cached(f *physmem.Frame) bool {
	if !f.Has(physmem.FlagSwapCache) {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cache[f.Private()] == f
}

// remove takes the locked frame f out of the swap cache
// (delete_from_swap_cache) and drops the cache's reference; its slot is
// freed if no entry names it.
func (d *swapDevice) remove(f *physmem.Frame) {
	slot := f.Private()
	d.mu.Lock()
	if d.cache[slot] != f {
		d.mu.Unlock()
		return
	}
	delete(d.cache, slot)
	f.ClearFlags(physmem.FlagSwapCache)
	f.SetPrivate(0)
	if d.count[slot] == 0 {
		d.releaseLocked(slot)
	}
	d.mu.Unlock()
	_ = d.ram.Put(f)
}

// removeFrozen is remove for reclaim, which has frozen f's references
// (the cache's among them) and frees it itself.
func (d *swapDevice) removeFrozen(f *physmem.Frame) {
	slot := f.Private()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cache[slot] != f {
		return
	}
	delete(d.cache, slot)
	if d.count[slot] == 0 {
		d.releaseLocked(slot)
	}
}

// write copies the locked frame f to its slot (swap_writepage), into
// the slot's buffer, or a freed slot's: swapping out allocates only
// while the device fills up. The copy runs under the device lock, which
// orders it against any read of the slot.
func (d *swapDevice) write(f *physmem.Frame) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	slot := f.Private()
	buf := d.data[slot]
	if buf == nil {
		if n := len(d.spare); n > 0 {
			buf, d.spare = d.spare[n-1], d.spare[:n-1]
		} else {
			buf = make([]byte, PageSize)
		}
	}
	if _, err := f.ReadAt(buf, 0); err != nil {
		d.spare = append(d.spare, buf)
		return err
	}
	d.data[slot] = buf
	d.outs++
	return nil
}

// read fills the locked frame f from slot (swap_read_folio).
func (d *swapDevice) read(slot uint64, f *physmem.Frame) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ins++
	if buf := d.data[slot]; buf != nil {
		_, err := f.WriteAt(buf, 0)
		return err
	}
	return f.Zero()
}

// dropOrphans frees the cached frames whose slots no entry names any more
// and that nothing maps (free_swap_and_cache's deferred half): called
// after a zap, outside every page-table lock.
func (d *swapDevice) dropOrphans() {
	if d == nil {
		return
	}
	d.mu.Lock()
	slots := d.orphan
	d.orphan = nil
	d.mu.Unlock()
	for _, slot := range slots {
		f := d.lookup(slot)
		if f == nil {
			continue
		}
		if f.TryLock() {
			if d.cached(f) && d.entries(slot) == 0 {
				d.remove(f) // mapped or not, the slot is of no more use
			}
			f.Unlock()
		} else {
			d.mu.Lock()
			d.orphan = append(d.orphan, slot) // the next zap tries again
			d.mu.Unlock()
		}
		_ = d.ram.Put(f)
	}
}

// zapEntry is the gathers' hook for non-present entries: a swap entry's
// slot loses a reference.
func (m *Machine) zapEntry(e pagetable.PTE) {
	if s, ok := e.Swap(); ok && s.Type == 0 && m.swap != nil {
		m.swap.putEntry(s.Offset)
	}
}

// replace puts dst in the locked frame old's place in the swap cache (a
// migration's folio_migrate_mapping); the caller gives dst the cache's
// reference.
func (d *swapDevice) replace(old, dst *physmem.Frame) bool {
	slot := old.Private()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cache[slot] != old {
		return false
	}
	d.cache[slot] = dst
	dst.SetPrivate(slot)
	dst.SetFlags(physmem.FlagSwapCache)
	return true
}
