package pagetable

import (
	"fmt"
	"sync/atomic"

	"github.com/gomm-dev/gomm/locks"
)

// Access is the kind of memory access a walk is for.
type Access uint8

// Access bits; a plain read is zero.
const (
	AccessRead  Access = 0
	AccessWrite Access = 1 << 0
	AccessUser  Access = 1 << 1 // from user mode: needs User in the leaf
	AccessExec  Access = 1 << 2 // instruction fetch: needs NoExec clear
)

func (a Access) String() string {
	s := "read"
	if a&AccessExec != 0 {
		s = "exec"
	}
	if a&AccessWrite != 0 {
		s = "write"
	}
	if a&AccessUser != 0 {
		s = "user " + s
	}
	return s
}

// Fault says why a walk did not produce a translation.
type Fault uint8

// Faults.
const (
	FaultNone         Fault = iota
	FaultNotPresent         // no present leaf: none, swap or migration entry
	FaultProtection         // a present leaf that forbids the access
	FaultPoisoned           // the walk read a freed, poisoned table: a bug
	FaultNonCanonical       // the address is outside the 48-bit space
)

func (f Fault) String() string {
	switch f {
	case FaultNone:
		return "none"
	case FaultNotPresent:
		return "not present"
	case FaultProtection:
		return "protection"
	case FaultPoisoned:
		return "poisoned table"
	case FaultNonCanonical:
		return "non-canonical address"
	}
	return fmt.Sprintf("Fault(%d)", uint8(f))
}

// Translation is the result of a walk.
type Translation struct {
	// PTE is the leaf as the walk left it (with the Accessed and Dirty
	// bits it set), or the entry that faulted.
	PTE PTE
	// Level is the leaf's level, or where the walk stopped.
	Level Level
	// PFN is the 4 KiB frame va translates to (for a 2 MiB leaf, the
	// leaf's frame plus va's offset in it). Valid when Fault is FaultNone.
	PFN uint64
	// Fault is FaultNone on success.
	Fault Fault
}

// Err returns nil for a successful walk, else a *WalkError.
func (tr Translation) Err(va uint64, acc Access) error {
	if tr.Fault == FaultNone {
		return nil
	}
	return &WalkError{VA: va, Access: acc, Level: tr.Level, Fault: tr.Fault, PTE: tr.PTE}
}

// WalkError describes a failed walk, like a page-fault error code.
type WalkError struct {
	VA     uint64
	Access Access
	Level  Level
	Fault  Fault
	PTE    PTE
}

func (e *WalkError) Error() string {
	return fmt.Sprintf("pagetable: %v at %#x: %v fault at %v level (entry %v)", e.Access, e.VA, e.Fault, e.Level, e.PTE)
}

// Walk translates va for an access the way the x86 hardware walker does:
// atomic loads only, no locks; on success it sets Accessed (and Dirty for
// a write) in the leaf by compare-and-swap, retrying if the entry changed
// underneath. The PTE lock is never taken, so Walk runs concurrently with
// every locked operation; whatever it caches must be flushed by the
// caller's TLB protocol. To run concurrently with FreeEmpty on the same
// range it must be inside LocklessBegin/LocklessEnd.
//
// Permissions are checked on the leaf only: upper-level entries are
// always fully permissive, as Linux makes them.
func (t *Table) Walk(va uint64, acc Access) Translation {
	if !canonical(va) {
		return Translation{Level: LevelPGD, Fault: FaultNonCanonical}
	}
	for {
		if tr, done := t.walkOnce(va, acc); done {
			return tr
		}
		// The leaf changed under the Accessed/Dirty update: start over
		// from the root, as x86 hardware does, since the entry may have
		// moved (a huge leaf split into a new table).
	}
}

// walkOnce is one walk from the root; done is false if it must be redone.
func (t *Table) walkOnce(va uint64, acc Access) (tr Translation, done bool) {
	pud := t.pgd.next[pgdIndex(va)].Load()
	if pud == nil {
		return Translation{Level: LevelPGD, Fault: FaultNotPresent}, true
	}
	pmd := pud.next[pudIndex(va)].Load()
	if pmd == nil {
		return Translation{Level: LevelPUD, Fault: FaultNotPresent}, true
	}
	i := pmdIndex(va)
	if e := pmd.entries[i].Load(); e != 0 {
		tr, done := t.walkLeaf(&pmd.entries[i], PTE(e), acc, LevelPMD)
		if done && tr.Fault == FaultNone {
			tr.PFN += uint64(pteIndex(va))
		}
		return tr, done
	}
	page := pmd.next[i].Load()
	if page == nil {
		// The leaf may have been split between the two loads.
		return Translation{Level: LevelPMD, Fault: FaultNotPresent}, pmd.entries[i].Load() == 0
	}
	j := pteIndex(va)
	return t.walkLeaf(&page[j], PTE(page[j].Load()), acc, LevelPTE)
}

// walkLeaf checks one leaf and sets its Accessed (and Dirty) bits; done
// is false if the entry changed before the update could land.
func (t *Table) walkLeaf(slot *atomic.Uint64, e PTE, acc Access, level Level) (Translation, bool) {
	if !e.IsPresent() {
		if e == PoisonPTE {
			t.notePoison()
			return Translation{PTE: e, Level: level, Fault: FaultPoisoned}, true
		}
		return Translation{PTE: e, Level: level, Fault: FaultNotPresent}, true
	}
	if (acc&AccessWrite != 0 && e&Write == 0) ||
		(acc&AccessUser != 0 && e&User == 0) ||
		(acc&AccessExec != 0 && e&NoExec != 0) {
		return Translation{PTE: e, Level: level, Fault: FaultProtection}, true
	}
	need := Accessed
	if acc&AccessWrite != 0 {
		need |= Dirty
	}
	if e&need == need {
		return Translation{PTE: e, Level: level, PFN: e.PFN()}, true
	}
	if !slot.CompareAndSwap(uint64(e), uint64(e|need)) {
		return Translation{}, false
	}
	e |= need
	return Translation{PTE: e, Level: level, PFN: e.PFN()}, true
}

// Lookup returns the leaf entry that maps va, or the non-present entry in
// its place, and its level: a lockless snapshot (ptep_get), changing
// nothing. An unpopulated address returns none at the level where the
// walk ended; a non-canonical one returns none at LevelPGD.
func (t *Table) Lookup(va uint64) (PTE, Level) {
	if !canonical(va) {
		return 0, LevelPGD
	}
	pud := t.pgd.next[pgdIndex(va)].Load()
	if pud == nil {
		return 0, LevelPGD
	}
	pmd := pud.next[pudIndex(va)].Load()
	if pmd == nil {
		return 0, LevelPUD
	}
	i := pmdIndex(va)
	if e := PTE(pmd.entries[i].Load()); e != 0 {
		if e == PoisonPTE {
			t.notePoison()
		}
		return e, LevelPMD
	}
	page := pmd.next[i].Load()
	if page == nil {
		return 0, LevelPMD
	}
	e := PTE(page[pteIndex(va)].Load())
	if e == PoisonPTE {
		t.notePoison()
	}
	return e, LevelPTE
}

// WalkerToken is returned by LocklessBegin.
type WalkerToken = locks.SRCUToken

// LocklessBegin opens a section in which Walk and Lookup may run
// concurrently with FreeEmpty on the same range (GUP-fast's
// local_irq_save). Tables freed after it began are not poisoned before
// the matching LocklessEnd.
func (t *Table) LocklessBegin() WalkerToken { return t.walkers.ReadLock() }

// LocklessEnd closes a section opened by LocklessBegin.
func (t *Table) LocklessEnd(tok WalkerToken) { t.walkers.ReadUnlock(tok) }

// SyncWalkers waits until every lockless section that began before the
// call has ended (tlb_remove_table_sync_one): afterwards no walker can be
// reading a table unlinked before the call.
func (t *Table) SyncWalkers() { t.walkers.Synchronize() }
