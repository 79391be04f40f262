package gomm

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/gomm-dev/gomm/rmap"
)

// ErrInconsistent is what CheckRmap finds wrong.
var ErrInconsistent = errors.New("gomm: reverse map inconsistent")

type place struct {
	space *space
	va    uint64
}

// CheckRmap verifies the reverse maps of the given MMs, which must be
// every live MM of the machine, against their page tables (the
// kernel's CONFIG_DEBUG_VM checks, made exhaustive): each frame's map
// count equals the entries that map it (a huge leaf maps each of its
// 512 frames once, and holds a deposited table for its split); a walk from each mapped frame
// finds every place that maps it; every page-cache frame mapped is
// still cached; each swap slot's count equals the entries that name
// it; and no migration entry is left. Call it when nothing else runs on the machine; it returns every
// problem found, joined, each wrapping ErrInconsistent.
func (m *Machine) CheckRmap(mms ...*MM) error {
	maps_ := map[uint64][]place{}
	slots := map[uint64]int32{}
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{ErrInconsistent}, args...)...))
	}
	for _, mm := range mms {
		mm.mmapLock.RLock()
		for v := range mm.vmas.all {
			_ = mm.table.Range(v.Start, v.End, pagetable.RangeFuncs{
				PMD: func(s pagetable.PMDSlot) bool {
					e := s.Get()
					if !e.IsHuge() || e&pagetable.Special != 0 {
						return true
					}
					if !s.HasDeposit() {
						bad("mm %d: huge leaf at %#x without a deposited table", mm.ID(), s.Base())
					}
					for i := range uint64(pagetable.Entries) {
						va := s.Base() + i*PageSize
						maps_[e.PFN()+i] = append(maps_[e.PFN()+i], place{mm.space(), va})
					}
					return true
				},
				PTEs: func(pt pagetable.PTETable, first, last int) bool {
					for i := first; i < last; i++ {
						e := pt.Get(i)
						switch pfn, ok := e.MappedFrame(); {
						case ok:
							maps_[pfn] = append(maps_[pfn], place{mm.space(), pt.VA(i)})
						case e.IsMigration():
							// Quiescent: every migration has finished
							// and taken its entries out.
							bad("mm %d: migration entry at %#x left behind (%v)", mm.ID(), pt.VA(i), e)
						default:
							if s, ok := e.Swap(); ok {
								slots[s.Offset]++
							}
						}
					}
					return true
				},
			})
		}
		mm.mmapLock.RUnlock()
	}
	for _, pfn := range slices.Sorted(maps.Keys(maps_)) {
		places := maps_[pfn]
		f, err := m.ram.Frame(physmem.PFN(pfn))
		if err != nil {
			bad("pfn %#x mapped at %#x: %v", pfn, places[0].va, err)
			continue
		}
		if got := f.MapCount(); got != int32(len(places)) {
			bad("%v: map count %d, %d entries map it", f, got, len(places))
		}
		if f.RefCount() < int32(len(places)) {
			bad("%v: %d references for %d entries", f, f.RefCount(), len(places))
		}
		f.Lock()
		mapping, _ := f.Mapping()
		if file, ok := mapping.(*rmap.File); ok && !file.Cached(f) {
			bad("%v: mapped but no longer in its file's cache", f)
		}
		if mapping == nil {
			bad("%v: mapped without a mapping", f)
		}
		found := map[place]bool{}
		rmap.Walk(f, &rmap.Control{Visit: func(v *rmap.VMA, addr uint64) bool {
			if s, ok := v.Space.(*space); ok {
				found[place{s, addr}] = true
			}
			return true
		}})
		f.Unlock()
		for _, p := range places {
			if !found[p] {
				bad("%v: mapped at %#x of mm %d, which its reverse map does not reach", f, p.va, p.space.ID())
			}
		}
	}
	if d := m.swap; d != nil {
		d.mu.Lock()
		for slot := 1; slot < len(d.count); slot++ {
			if got, want := d.count[slot], slots[uint64(slot)]; got != want {
				bad("swap slot %d: count %d, %d entries name it", slot, got, want)
			}
		}
		d.mu.Unlock()
	}
	return errors.Join(errs...)
}
