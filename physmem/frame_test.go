//lint:file-ignore SA2001 empty critical sections are the point: lock-order tests.

package physmem

import (
	"bytes"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"

	"github.com/gomm-dev/gomm/locks"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestFlags(t *testing.T) {
	a := newAlloc(t, 1)
	f, _ := a.Alloc()
	f.SetFlags(FlagDirty | FlagReferenced)
	assert.True(t, f.Has(FlagDirty|FlagReferenced))
	assert.False(t, f.Has(FlagDirty|FlagKSM))
	assert.True(t, f.TestAndClearFlag(FlagReferenced))
	assert.False(t, f.TestAndClearFlag(FlagReferenced))
	assert.False(t, f.TestAndSetFlag(FlagKSM))
	assert.True(t, f.TestAndSetFlag(FlagKSM))
	f.ClearFlags(FlagKSM)
	assert.Equal(t, FlagDirty, f.Flags())
	assert.Equal(t, "dirty", f.Flags().String())
	f.SetFlags(FlagLRUPending)
	assert.Equal(t, FlagDirty|FlagLRUPending, f.ChangeFlags(FlagLRUPending, FlagLRU))
	assert.Equal(t, FlagDirty|FlagLRU, f.Flags())
	assert.Equal(t, "dirty|lru", f.Flags().String())
	f.ClearFlags(FlagLRU)

	f.SetFlags(flagLocked)
	assert.False(t, f.IsLocked(), "the lock bit is not a settable flag")
	require.True(t, f.TryLock())
	f.ClearFlags(^Flags(0))
	assert.True(t, f.IsLocked(), "nor clearable")
	f.ChangeFlags(^Flags(0), flagWaiters)
	assert.True(t, f.IsLocked(), "nor changed")
	assert.Equal(t, Flags(0), Flags(f.flags.Load())&flagWaiters)
	assert.Equal(t, Flags(0), f.Flags(), "and not among the public flags")
	f.Unlock()
	assert.Equal(t, "none", Flags(0).String())
	assert.Equal(t, "anon|swapcache|locked", (FlagAnon | FlagSwapCache | flagLocked).String())
}

func TestPageLockExcludesAndWakes(t *testing.T) {
	a := newAlloc(t, 4)
	f, _ := a.Alloc()
	var inside atomic.Int32
	var bad atomic.Int32
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 500 {
				f.Lock()
				if inside.Add(1) != 1 {
					bad.Add(1)
				}
				inside.Add(-1)
				f.Unlock()
			}
		})
	}
	wg.Wait()
	assert.Zero(t, bad.Load())
	assert.False(t, f.IsLocked())
	assert.Panics(t, f.Unlock)
}

func TestPageLockSleepsUntilUnlock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newAlloc(t, 1)
		f, _ := a.Alloc()
		f.Lock()
		assert.False(t, f.TryLock())
		var got atomic.Bool
		go func() { f.Lock(); got.Store(true); f.Unlock() }()
		synctest.Wait()
		assert.False(t, got.Load())
		f.Unlock()
		synctest.Wait()
		assert.True(t, got.Load())
	})
}

func TestPageLockOrder(t *testing.T) {
	a := newAlloc(t, 1)
	f, _ := a.Alloc()
	var ptl locks.SpinLock
	ptl.Init(locks.ClassPTLock)

	ptl.Lock()
	require.True(t, f.TryLock(), "trylock_page under the ptl is allowed")
	f.Unlock()
	ptl.Unlock()
	v, _ := locks.LockdepViolations()
	assert.Empty(t, v)

	ptl.Lock()
	f.Lock() // a sleeping lock under a spinlock: reported
	f.Unlock()
	ptl.Unlock()
	v, _ = locks.LockdepViolations()
	locks.ClearLockdepViolations()
	require.Len(t, v, 1)
	assert.Equal(t, locks.OrderInversion, v[0].Kind)
	assert.Same(t, locks.ClassPageLock, v[0].Acquiring.Class)
}

func TestDataReadWriteSpans(t *testing.T) {
	a := newAlloc(t, 2)
	f, _ := a.Alloc()
	model := make([]byte, PageSize)
	writes := []struct {
		off  int
		data []byte
	}{
		{0, []byte("hello")},
		{3, []byte("XYZ")},
		{4090, []byte("tail!!")},
		{8, bytes.Repeat([]byte{0xab}, 24)},
		{13, bytes.Repeat([]byte{0x5a}, 37)},
		{PageSize, nil},
	}
	for _, w := range writes {
		n, err := f.WriteAt(w.data, w.off)
		require.NoError(t, err)
		assert.Equal(t, len(w.data), n)
		copy(model[w.off:], w.data)
	}
	got := make([]byte, PageSize)
	_, err := f.ReadAt(got, 0)
	require.NoError(t, err)
	assert.Equal(t, model, got)
	for _, span := range [][2]int{{1, 9}, {4095, 1}, {7, 2}, {100, 0}} {
		buf := make([]byte, span[1])
		_, err := f.ReadAt(buf, span[0])
		require.NoError(t, err)
		assert.Equal(t, model[span[0]:span[0]+span[1]], buf)
	}
}

func TestDataRejectsBadSpans(t *testing.T) {
	a := newAlloc(t, 1)
	f, _ := a.Alloc()
	tests := []struct {
		name string
		err  error
	}{
		{"read past end", func() error { _, err := f.ReadAt(make([]byte, 2), PageSize-1); return err }()},
		{"read negative", func() error { _, err := f.ReadAt(make([]byte, 1), -1); return err }()},
		{"write past end", func() error { _, err := f.WriteAt(make([]byte, 9), PageSize-8); return err }()},
		{"load unaligned", func() error { _, err := f.Load64(4); return err }()},
		{"load beyond", func() error { _, err := f.Load64(PageSize); return err }()},
		{"store unaligned", f.Store64(1, 1)},
		{"store negative", f.Store64(-8, 1)},
	}
	for _, tc := range tests {
		assert.ErrorIs(t, tc.err, ErrInvalid, tc.name)
	}
	assert.False(t, f.HasData(), "refused writes allocate nothing")
}

func TestCopyAndZero(t *testing.T) {
	a := newAlloc(t, 3)
	src, _ := a.Alloc()
	dst, _ := a.Alloc()
	_, err := src.WriteAt([]byte("copy me"), 100)
	require.NoError(t, err)
	assert.False(t, dst.Equal(src))
	require.NoError(t, dst.CopyFrom(src))
	buf := make([]byte, 7)
	_, _ = dst.ReadAt(buf, 100)
	assert.Equal(t, "copy me", string(buf))
	assert.True(t, dst.Equal(src), "a copy is equal")

	empty, _ := a.Alloc()
	assert.False(t, empty.Equal(src))
	require.NoError(t, dst.CopyFrom(empty))
	assert.True(t, dst.IsZero(), "copying a never-written frame zeroes")
	_, _ = dst.WriteAt([]byte{0}, 9) // data allocated, all zeros
	assert.True(t, dst.Equal(empty), "zeros equal a never-written frame")
	assert.True(t, empty.Equal(dst))

	_, _ = dst.WriteAt([]byte{1}, 0)
	assert.False(t, dst.IsZero())
	require.NoError(t, dst.Zero())
	assert.True(t, dst.IsZero())

	require.NoError(t, a.Put(src))
	assert.False(t, src.Equal(src), "a freed frame equals nothing")
	assert.ErrorIs(t, dst.CopyFrom(src), ErrFreed)
	assert.ErrorIs(t, src.Zero(), ErrFreed)
}

// TestConcurrentByteWritesNeverTear has goroutines write interleaved
// single bytes of the same words, all released at once, round after
// round: the compare-and-swap merge must keep every byte.
func TestConcurrentByteWritesNeverTear(t *testing.T) {
	a := newAlloc(t, 1)
	f, _ := a.Alloc()
	buf := make([]byte, PageSize)
	for round := range 100 {
		require.NoError(t, f.Zero())
		start := make(chan struct{})
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Go(func() {
				<-start
				for off := g; off < PageSize; off += 8 {
					_, err := f.WriteAt([]byte{byte(g + 1)}, off)
					assert.NoError(t, err)
				}
			})
		}
		close(start)
		wg.Wait()
		_, _ = f.ReadAt(buf, 0)
		for off, b := range buf {
			require.Equal(t, byte(off%8+1), b, "round %d byte %d", round, off)
		}
	}
}
