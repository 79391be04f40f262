package mmugather

import (
	"fmt"

	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
)

// ZapStats counts what a Zap cleared.
type ZapStats struct {
	Present int // present 4 KiB entries cleared (frames queued unless Special)
	Huge    int // 2 MiB leaves cleared
	Other   int // non-present entries (swap, migration, device) cleared
	Frames  int // frame references queued for release, device entries' too
}

// Zap clears every entry of [start, end) (page-aligned) into the gather
// (zap_page_range_single / unmap_page_range): under each PTE table's lock
// it clears the entries atomically, takes each mapped frame's mapcount
// down, records the entry and queues the frame, whose reference is dropped
// only by Flush, after the TLBs are flushed. A device-private or
// device-exclusive entry is in no TLB: its frame's reference is dropped
// as soon as the walk lets go of the page-table locks, not held until
// the gather flushes (zap_nonpresent_ptes puts it at once), or a fault
// migrating that page back would find it referenced for as long as the
// rest of the teardown takes. Special entries (the zero page, PFN maps)
// have no reference to drop. A huge leaf the range only partly covers is
// split first.
//
// When the batch fills, Zap drops the lock, flushes, and goes on where it
// stopped, as the kernel's zap loop does.
func (g *Gather) Zap(start, end uint64) (ZapStats, error) {
	var st ZapStats
	table := g.ctx.Table()
	var err error
	var unmapped []*physmem.Frame // device entries' frames: no TLB to flush first
	for start < end {
		resume := end
		full := false
		rerr := table.Range(start, end, pagetable.RangeFuncs{
			PTEs: func(pt pagetable.PTETable, first, last int) bool {
				// The run's cleared entries are recorded once, as one
				// range, when the loop ends (tlb_remove_tlb_entry per
				// entry only widens the same range).
				lo, hi := uint64(0), uint64(0)
				// Entries below warmed have had their frames warmed; the
				// entries after i are not cleared yet, so still name them.
				warmed := min(first+warmPTEs, last)
				warmFrames(g, pt, first, warmed)
				for i, old := range pt.GetAndClearRange(first, last) {
					if i+1 >= warmed {
						next := min(i+1+warmPTEs, last)
						warmFrames(g, pt, i+1, next)
						warmed = next
					}
					if hi == 0 {
						lo = pt.VA(i)
					}
					hi = pt.VA(i + 1)
					if old.IsPresent() {
						st.Present++
					} else {
						st.Other++
					}
					// A device-private or device-exclusive entry maps its
					// frame like a present one, though no TLB holds it.
					pfn, maps := old.MappedFrame()
					if !maps {
						if !old.IsPresent() && g.nonPresent != nil {
							g.nonPresent(old)
						}
						continue
					}
					f, ferr := g.frame(pfn)
					if ferr != nil {
						err = ferr
						continue
					}
					f.DecMapCount()
					st.Frames++
					if !old.IsPresent() {
						unmapped = append(unmapped, f)
						continue
					}
					if g.RemovePage(f) {
						full, resume = true, pt.VA(i+1)
						break
					}
				}
				if hi != 0 {
					g.track(lo, hi, pagetable.PageShift)
				}
				return !full
			},
			PMD: func(s pagetable.PMDSlot) bool {
				if s.Base() < start || s.Base()+pagetable.HugeSize > end {
					if s.Get().IsHuge() {
						if serr := s.Split(); serr != nil {
							err = serr
							return false
						}
					}
					return true // Range goes on into the split table
				}
				cur := s.Get()
				if cur.IsPresent() && cur&pagetable.Special == 0 {
					// Every frame must exist before the leaf goes, or the
					// zap would stop half-way through its 512 frames.
					if _, ferr := g.frame(cur.PFN() + pagetable.Entries - 1); ferr != nil {
						err = ferr
						return false
					}
				}
				old := s.GetAndClear()
				g.RemovePMD(s.Base())
				if !old.IsPresent() {
					st.Other++
					return true
				}
				st.Huge++
				if old&pagetable.Special != 0 {
					return true
				}
				for i := range uint64(pagetable.Entries) {
					f, _ := g.frame(old.PFN() + i) // checked above; A/D changes keep the PFN
					f.DecMapCount()
					st.Frames++
					g.RemovePage(f)
				}
				if len(g.pages) >= BatchPages {
					full, resume = true, s.Base()+pagetable.HugeSize
					return false
				}
				return true
			},
		})
		for i, f := range unmapped {
			if perr := g.ram.Put(f); perr != nil && err == nil {
				err = fmt.Errorf("mmugather: freeing frames: %w", perr)
			}
			unmapped[i] = nil
			g.freedPags++
		}
		unmapped = unmapped[:0]
		if rerr != nil {
			return st, rerr
		}
		if err != nil {
			return st, err
		}
		if !full {
			break
		}
		if ferr := g.Flush(); ferr != nil {
			return st, ferr
		}
		start = resume
	}
	return st, nil
}

func (g *Gather) frame(pfn uint64) (*physmem.Frame, error) {
	f, err := g.ram.Frame(physmem.PFN(pfn))
	if err != nil {
		return nil, fmt.Errorf("mmugather: zap found pfn %#x outside RAM: %w", pfn, err)
	}
	return f, nil
}

// warmPTEs is how many entries ahead Zap warms the frames they map.
const warmPTEs = 16

// warmFrames warms the frames entries [i, end) of pt map (physmem.Warm),
// before Zap's locked map count decrements on them.
func warmFrames(g *Gather, pt pagetable.PTETable, i, end int) {
	var fs [warmPTEs]*physmem.Frame
	n := 0
	for ; i < end; i++ {
		if pfn, maps := pt.Get(i).MappedFrame(); maps {
			if f, err := g.frame(pfn); err == nil {
				fs[n] = f
				n++
			}
		}
	}
	physmem.Warm(fs[:n])
}
