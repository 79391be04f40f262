package hmm

import (
	"errors"
	"fmt"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/physmem"
)

// checkRange validates a page-aligned [addr, addr+length) of at most
// gomm.MaxRangeFaultPages pages: each operation works page by page, and
// a range of the whole address space would take hours (the fuzzer found
// it).
func checkRange(op string, addr, length uint64) (uint64, error) {
	end := addr + length
	if addr%PageSize != 0 || length == 0 || length%PageSize != 0 || end < addr || end > gomm.TaskSize ||
		length/PageSize > gomm.MaxRangeFaultPages {
		return 0, fmt.Errorf("hmm: %s [%#x, +%#x): %w", op, addr, length, gomm.ErrInvalid)
	}
	return end, nil
}

// MigrateToDevice moves the private anonymous pages of [addr,
// addr+length) into device memory (HMM_DMIRROR_MIGRATE_TO_DEV), mapping
// each in the mirror as it lands. Pages that cannot move (not mapped,
// shared, KSM, in the swap cache) stay; if any did, the error wraps
// ErrBusy and says how many moved.
func (mi *Mirror) MigrateToDevice(addr, length uint64) (int, error) {
	end, err := checkRange("migrate to device", addr, length)
	if err != nil {
		return 0, err
	}
	a := &gomm.MigrateVMA{Select: gomm.MigrateSelectSystem,
		AllocDst: func(uint64, *physmem.Frame) (*physmem.Frame, error) { return mi.dev.allocPage() },
	}
	n, err := mi.migrate(addr, end, a, func(op *ownOp) {
		a.Migrated = func(p gomm.MigratedPage) {
			mi.mu.Lock()
			if !mi.in.ReadRetry(op.seq) { // covers invalidated: whatever sets it also sets the seq
				mi.setLocked(p.Addr/PageSize, entry{pfn: uint64(p.Dst.PFN()), write: p.Writable})
			}
			mi.mu.Unlock()
		}
	})
	mi.dev.stats.toDevice.Add(uint64(n))
	return n, err
}

// MigrateToSystem moves this process's pages in the device's memory in
// [addr, addr+length) back to RAM (HMM_DMIRROR_MIGRATE_TO_SYS); the
// device faults them in again when it next touches them.
func (mi *Mirror) MigrateToSystem(addr, length uint64) (int, error) {
	end, err := checkRange("migrate to system", addr, length)
	if err != nil {
		return 0, err
	}
	n, err := mi.migrate(addr, end, &gomm.MigrateVMA{PagemapOwner: mi.dev, Select: gomm.MigrateSelectDevicePrivate}, nil)
	mi.dev.stats.toRAM.Add(uint64(n))
	return n, err
}

// migrate runs a over [start, end), one mapping at a time as
// migrate_vma requires, each as an operation of the mirror's own;
// prepare, if set, fits a to the operation.
func (mi *Mirror) migrate(start, end uint64, a *gomm.MigrateVMA, prepare func(*ownOp)) (int, error) {
	moved, want := 0, 0
	for _, v := range mi.mm.VMAs() {
		s, e := max(start, v.Start), min(end, v.End)
		if s >= e {
			continue
		}
		want += int((e - s) / PageSize)
		op := mi.beginOwn(s, e)
		a.Start, a.End, a.Owner = s, e, op
		if prepare != nil {
			prepare(op)
		}
		n, err := mi.mm.MigrateVMA(a)
		mi.endOwn(op)
		moved += n
		if err != nil {
			return moved, err
		}
	}
	if moved < int((end-start)/PageSize) {
		return moved, fmt.Errorf("hmm: migrate [%#x, %#x): %d of %d pages moved (%d mapped): %w",
			start, end, moved, (end-start)/PageSize, want, gomm.ErrBusy)
	}
	return moved, nil
}

// MakeExclusive gives the device exclusive, atomic access to the pages
// of [addr, addr+length) (HMM_DMIRROR_EXCLUSIVE): each is claimed with
// MakeDeviceExclusive and mapped in the mirror as atomic while the page
// is still locked, so a CPU taking it back waits for the mapping and
// then revokes it. A claim that another invalidation of the page
// overtook (MADV_DONTNEED, which does not take the page lock) is made
// again.
func (mi *Mirror) MakeExclusive(addr, length uint64) error {
	end, err := checkRange("make exclusive", addr, length)
	if err != nil {
		return err
	}
	for va := addr; va < end; va += PageSize {
		if err := mi.claim(va); err != nil {
			return err
		}
	}
	return nil
}

func (mi *Mirror) claim(va uint64) error {
	for range 16 {
		installed := false
		op := mi.beginOwn(va, va+PageSize)
		err := mi.mm.MakeDeviceExclusive(va, op, func(pfn uint64) error {
			if mi.beforeMap != nil {
				mi.beforeMap(va)
			}
			mi.mu.Lock()
			defer mi.mu.Unlock()
			if op.invalidated && !mi.noClaimCheck {
				return nil
			}
			mi.setLocked(va/PageSize, entry{pfn: pfn, write: true, atomic: true})
			installed = true
			return nil
		})
		mi.endOwn(op)
		if err != nil {
			return err
		}
		if installed {
			mi.dev.stats.exclusive.Add(1)
			return nil
		}
		mi.dev.stats.retries.Add(1)
	}
	return fmt.Errorf("hmm: make exclusive at %#x: invalidated every time: %w", va, gomm.ErrAgain)
}

// AtomicAdd adds delta to the 64-bit word at addr with a device atomic
// and returns the new value. It needs exclusive access to the page,
// which it claims if the mirror does not hold it: with it, no CPU can
// touch the page between the load and the store without first taking
// the page back, which waits for the mirror's lock.
func (mi *Mirror) AtomicAdd(addr, delta uint64) (uint64, error) {
	if addr%8 != 0 || addr >= gomm.TaskSize {
		return 0, fmt.Errorf("hmm: atomic at %#x: %w", addr, gomm.ErrInvalid)
	}
	page := addr &^ (PageSize - 1)
	for range 16 {
		mi.mu.Lock()
		if e, ok := mi.pt[page/PageSize]; ok && e.atomic {
			f, err := mi.dev.m.RAM().Frame(physmem.PFN(e.pfn))
			var v uint64
			if err == nil {
				v, err = f.Load64(int(addr - page))
			}
			if err == nil {
				v += delta
				err = f.Store64(int(addr-page), v)
			}
			mi.mu.Unlock()
			mi.dev.stats.atomics.Add(1)
			return v, err
		}
		mi.mu.Unlock()
		if err := mi.claim(page); err != nil {
			return 0, err
		}
	}
	return 0, fmt.Errorf("hmm: atomic at %#x: the CPU keeps taking the page back: %w", addr, gomm.ErrAgain)
}

// ExclusivePages counts the pages of [addr, addr+length) the device
// holds exclusively (HMM_DMIRROR_CHECK_EXCLUSIVE).
func (mi *Mirror) ExclusivePages(addr, length uint64) (int, error) {
	end, err := checkRange("check exclusive", addr, length)
	if err != nil {
		return 0, err
	}
	mi.mu.Lock()
	defer mi.mu.Unlock()
	n := 0
	for va := addr; va < end; va += PageSize {
		if mi.pt[va/PageSize].atomic {
			n++
		}
	}
	return n, nil
}

// Prot is one page of a snapshot, in the kernel test driver's encoding
// (HMM_DMIRROR_PROT_*).
type Prot uint8

// Snapshot values.
const (
	ProtError               Prot = 0xFF // no mapping, or an unreadable one
	ProtNone                Prot = 0x00 // nothing present the device could use
	ProtRead                Prot = 0x01
	ProtWrite               Prot = 0x02
	ProtPMD                 Prot = 0x04 // mapped by a 2 MiB leaf
	ProtZero                Prot = 0x10 // the shared zero page
	ProtDevicePrivateLocal  Prot = 0x20 // in this device's memory
	ProtDevicePrivateRemote Prot = 0x30 // in another device's memory
)

// Snapshot reports what the CPU page table maps over [addr,
// addr+length) without faulting anything (HMM_DMIRROR_SNAPSHOT).
func (mi *Mirror) Snapshot(addr, length uint64) ([]Prot, error) {
	end, err := checkRange("snapshot", addr, length)
	if err != nil {
		return nil, err
	}
	r := &gomm.HMMRange{Interval: mi.in, Start: addr, End: end, DevicePrivateOwner: mi.dev}
	for {
		r.NotifierSeq = mi.in.ReadBegin()
		err := mi.mm.RangeFault(r)
		if errors.Is(err, gomm.ErrBusy) {
			continue
		}
		if err != nil {
			return nil, err
		}
		break
	}
	out := make([]Prot, len(r.PFNs))
	for i, p := range r.PFNs {
		out[i] = mi.prot(p)
	}
	return out, nil
}

// prot encodes one snapshot entry (dmirror_mkentry).
func (mi *Mirror) prot(p gomm.PFN) Prot {
	if p.Flags&gomm.PFNError != 0 {
		return ProtError
	}
	if p.Flags&gomm.PFNValid == 0 {
		return ProtNone
	}
	var perm Prot
	f, err := mi.dev.m.RAM().Frame(physmem.PFN(p.PFN))
	switch {
	case err == nil && f.IsDevicePrivate() && mi.dev.Local(p.PFN):
		perm = ProtDevicePrivateLocal
	case err == nil && f.IsDevicePrivate():
		perm = ProtDevicePrivateRemote
	case p.Flags&gomm.PFNZero != 0:
		perm = ProtZero
	}
	if p.Flags&gomm.PFNWrite != 0 {
		perm |= ProtWrite
	} else {
		perm |= ProtRead
	}
	if p.Flags&gomm.PFNHuge != 0 {
		perm |= ProtPMD
	}
	return perm
}

// Mapped returns how many pages the mirror translates now.
func (mi *Mirror) Mapped() int {
	mi.mu.Lock()
	defer mi.mu.Unlock()
	return len(mi.pt)
}
