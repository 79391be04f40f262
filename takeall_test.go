package gomm_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/locks"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRegisterTakesEveryRmapLockOnce: registration over an MM with a file
// mapped twice and a forked anonymous mapping split in two takes the
// file's i_mmap_rwsem, then the family's anon_vma root, each once; a
// registration that cannot get them gives up with its context and holds
// nothing.
func TestRegisterTakesEveryRmapLockOnce(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	f, err := m.NewFile(4 * page)
	require.NoError(t, err)
	mm := m.NewMM()
	_, err = mm.MmapFile(0x1000_0000, 2*page, rw, gomm.MapShared, f, 0)
	require.NoError(t, err)
	_, err = mm.MmapFile(0x2000_0000, 2*page, gomm.ProtRead, gomm.MapShared, f, 2*page)
	require.NoError(t, err)
	addr, err := mm.Mmap(0x3000_0000, 4*page, rw, anon|gomm.MapFixed|gomm.MapPopulate)
	require.NoError(t, err)
	require.NoError(t, mm.Mprotect(addr, page, gomm.ProtRead)) // two VMAs, one family
	child, err := mm.Fork()
	require.NoError(t, err)

	seen := slices.Collect(mm.RmapLocks())
	require.Len(t, seen, 4, "one per VMA: two file, two anonymous")
	assert.Same(t, seen[0], seen[1], "the file's lock, met twice")
	assert.Same(t, seen[2], seen[3], "the family's root, met twice")
	assert.Equal(t, locks.ClassIMmapRWSem, seen[0].Class(), "mappings first")
	assert.Equal(t, locks.ClassAnonVMA, seen[2].Class(), "then anon roots")

	taken, err := locks.TakeAll(context.Background(), mm.RmapLocks())
	require.NoError(t, err)
	assert.True(t, seen[0].IsWriteLocked())
	assert.True(t, seen[2].IsWriteLocked())
	taken.Drop()
	assert.False(t, seen[0].IsLocked())
	assert.False(t, seen[2].IsLocked())

	// A walker holds the anon root: registration waits for it, and gives
	// up with its context holding nothing, the file's lock included.
	held, release, done := make(chan struct{}), make(chan struct{}), make(chan struct{})
	go func() { // the walker
		defer close(done)
		seen[2].RLock()
		close(held)
		<-release
		seen[2].RUnlock()
	}()
	<-held
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err = mm.RegisterNotifier(ctx, nopInvalidator{})
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.False(t, seen[0].IsLocked(), "nothing left held")
	assert.False(t, mm.MmapLocked())
	close(release)
	<-done

	s, err := mm.RegisterNotifier(context.Background(), nopInvalidator{})
	require.NoError(t, err)
	require.NoError(t, mm.UnregisterNotifier(s))
	require.NoError(t, child.Exit())
	require.NoError(t, mm.Exit())
}

// TestCOWAfterForkOfSwappedOutPages: the selftest's COW of swapped-out
// pages: a page swapped out while shared by parent and child is copied
// on the first write of either, and the other keeps the old contents.
func TestCOWAfterForkOfSwappedOutPages(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 256, SwapSlots: 256})
	parent := m.NewMM()
	addr, err := parent.Mmap(0, 4*page, rw, anon)
	require.NoError(t, err)
	fillPages(t, parent, addr, 4, 10)
	child, err := parent.Fork()
	require.NoError(t, err)
	for range 3 {
		m.Reclaim(1000)
	}
	require.Zero(t, parent.RSS()+child.RSS(), "everything swapped out")
	writeWord(t, child, addr, 1)       // swap-in and copy in the child
	writeWord(t, parent, addr+page, 2) // and in the parent
	checkPages(t, parent, addr, 1, 10)
	assert.Equal(t, uint64(2), readWord(t, parent, addr+page))
	assert.Equal(t, uint64(1), readWord(t, child, addr))
	assert.Equal(t, uint64(11), readWord(t, child, addr+page))
	assert.NotEqual(t, frameAt(t, m, parent, addr).PFN(), frameAt(t, m, child, addr).PFN())
	require.NoError(t, m.CheckRmap(parent, child))
	require.NoError(t, child.Exit())
	require.NoError(t, parent.Exit())
	assert.Zero(t, m.Stats().Swap.Used)
}
