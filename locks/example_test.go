//lint:file-ignore SA2001 empty critical sections are the point: these tests exercise lock acquisition itself.

package locks_test

import (
	"context"
	"fmt"
	"slices"

	"github.com/gomm-dev/gomm/locks"
)

// The mmap_lock pattern: take it for write to change the address space,
// then downgrade to keep readers out of nothing but further writers.
func ExampleRWSem() {
	var mmapLock locks.RWSem
	mmapLock.Init(locks.ClassMmapLock)

	mmapLock.Lock()
	fmt.Println("write locked:", mmapLock.IsWriteLocked())
	mmapLock.DowngradeWrite()
	fmt.Println("reader may join:", mmapLock.TryRLock())
	mmapLock.RUnlock()
	mmapLock.RUnlock()
	fmt.Println("locked:", mmapLock.IsLocked())
	// Output:
	// write locked: true
	// reader may join: true
	// locked: false
}

// Readers walk a published object under SRCU; the updater unpublishes it
// and waits a grace period before it may free it.
func ExampleSRCU() {
	var srcu locks.SRCU
	tok := srcu.ReadLock()
	// ... use objects found through the protected list, may sleep ...
	srcu.ReadUnlock(tok)

	srcu.Synchronize() // no reader that began before this can still run
	fmt.Println("grace periods:", srcu.GracePeriods())
	// Output: grace periods: 1
}

// mm_take_all_locks: every mapping and anon_vma lock of an mm, each once,
// in a fixed class order, without sorting.
func ExampleTakeAll() {
	fileA, fileB, anon := new(locks.RWSem), new(locks.RWSem), new(locks.RWSem)
	fileA.Init(locks.ClassIMmapRWSem)
	fileB.Init(locks.ClassIMmapRWSem)
	anon.Init(locks.ClassAnonVMA)
	// Three VMAs map fileA, one maps fileB; all share one anon_vma root.
	mappings := slices.Values([]*locks.RWSem{fileA, fileB, fileA, fileA})
	anonRoots := slices.Values([]*locks.RWSem{anon, anon, anon, anon})

	taken, err := locks.TakeAll(context.Background(), mappings, anonRoots)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("locks held:", taken.Len())
	taken.Drop()
	fmt.Println("fileA still locked:", fileA.IsLocked())
	// Output:
	// locks held: 3
	// fileA still locked: false
}

// The lock-order checker catches a ptlock held while taking mmap_lock.
func ExampleEnableLockdep() {
	if !locks.LockdepEnabled() {
		locks.EnableLockdep()
		defer locks.DisableLockdep()
	}
	defer locks.ClearLockdepViolations()

	var mmapLock locks.RWSem
	mmapLock.Init(locks.ClassMmapLock)
	var ptl locks.SpinLock
	ptl.Init(locks.ClassPTLock)

	ptl.Lock()
	if mmapLock.TryRLock() { // a trylock cannot deadlock: no report
		mmapLock.RUnlock()
	}
	ptl.Unlock()

	ptl.Lock()
	mmapLock.RLock() // can deadlock against a faulting thread: reported
	mmapLock.RUnlock()
	ptl.Unlock()

	v, _ := locks.LockdepViolations()
	for _, x := range v {
		fmt.Printf("%s: %s held, %s taken\n", x.Kind, x.Held.Class.Name(), x.Acquiring.Class.Name())
	}
	// Output: lock order inversion: ptlock held, mmap_lock taken
}
