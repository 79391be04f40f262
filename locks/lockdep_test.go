//lint:file-ignore SA2001 empty critical sections are the point: these tests exercise lock acquisition itself.

package locks

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestLockdepReportsOrderInversionWithBothSites(t *testing.T) {
	var mmap RWSem
	mmap.Init(ClassMmapLock)
	var ptl SpinLock
	ptl.Init(ClassPTLock)

	ptl.Lock()
	mmap.RLock() // against the order: mmap_lock must come first
	mmap.RUnlock()
	ptl.Unlock()

	v := expectViolations(t)
	require.Len(t, v, 1)
	assert.Equal(t, OrderInversion, v[0].Kind)
	assert.Same(t, ClassPTLock, v[0].Held.Class)
	assert.Same(t, ClassMmapLock, v[0].Acquiring.Class)
	assert.True(t, v[0].Acquiring.Shared)
	assert.Contains(t, v[0].Held.Stack, "TestLockdepReportsOrderInversionWithBothSites", "the held lock's site")
	assert.Contains(t, v[0].Acquiring.Stack, "lockdep_test.go", "the acquiring site")
	assert.NotContains(t, firstLine(v[0].Acquiring.Stack), "locks.(*RWSem)", "sites start at the caller, not in the lock")
	assert.Contains(t, v[0].String(), "lock order inversion")
}

func firstLine(s string) string { l, _, _ := strings.Cut(s, "\n"); return l }

func TestLockdepRules(t *testing.T) {
	tests := []struct {
		name string
		run  func()
		want []ViolationKind
	}{
		{"declared order", func() {
			var a, b RWSem
			var c SpinLock
			a.Init(ClassMmapLock)
			b.Init(ClassAnonVMA)
			c.Init(ClassPTLock)
			a.Lock()
			b.RLock()
			c.Lock()
			c.Unlock()
			b.RUnlock()
			a.Unlock()
		}, nil},
		{"recursive read", func() {
			var a RWSem
			a.Init(ClassMmapLock)
			a.RLock()
			a.RLock()
			a.RUnlock()
			a.RUnlock()
		}, []ViolationKind{Recursion}},
		{"same class without annotation", func() {
			var a, b SpinLock
			a.Init(ClassPTLock)
			b.Init(ClassPTLock)
			a.Lock()
			b.Lock()
			b.Unlock()
			a.Unlock()
		}, []ViolationKind{SameClassNesting}},
		{"same class nested subclass", func() {
			var a, b SpinLock
			a.Init(ClassPTLock)
			b.Init(ClassPTLock)
			a.Lock()
			b.LockNested(1)
			b.Unlock()
			a.Unlock()
		}, nil},
		{"subclass order inverted", func() {
			var a, b SpinLock
			a.Init(ClassPTLock)
			b.Init(ClassPTLock)
			a.LockNested(1)
			b.Lock()
			b.Unlock()
			a.Unlock()
		}, []ViolationKind{OrderInversion}},
		{"trylock is never an inversion", func() {
			var a RWSem
			var b SpinLock
			a.Init(ClassMmapLock)
			b.Init(ClassPTLock)
			b.Lock()
			if a.TryLock() {
				a.Unlock()
			}
			b.Unlock()
		}, nil},
		{"unclassed locks only check recursion", func() {
			var a, b SpinLock
			b.Init(ClassPTLock)
			b.Lock()
			a.Lock()
			a.Unlock()
			b.Unlock()
		}, nil},
		{"downgrade keeps the hold", func() {
			var a RWSem
			var b SpinLock
			a.Init(ClassMmapLock)
			b.Init(ClassPTLock)
			a.Lock()
			a.DowngradeWrite()
			b.Lock()
			b.Unlock()
			a.RUnlock()
		}, nil},
		{"take-all under mmap_lock in order", func() {
			var mm RWSem
			mm.Init(ClassMmapLock)
			maps := newSems(2, ClassIMmapRWSem)
			anons := newSems(3, ClassAnonVMA)
			mm.Lock()
			tk, err := TakeAll(context.Background(), slices.Values(maps), slices.Values(anons))
			if err == nil {
				tk.Drop()
			}
			mm.Unlock()
		}, nil},
		{"take-all in the wrong order", func() {
			maps := newSems(1, ClassIMmapRWSem)
			anons := newSems(1, ClassAnonVMA)
			tk, err := TakeAll(context.Background(), slices.Values(anons), slices.Values(maps))
			if err == nil {
				tk.Drop()
			}
		}, []ViolationKind{OrderInversion}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.run()
			var kinds []ViolationKind
			for _, v := range expectViolations(t) {
				kinds = append(kinds, v.Kind)
			}
			assert.Equal(t, tc.want, kinds)
		})
	}
}

func TestLockdepHandlerAndOff(t *testing.T) {
	var seen []Violation
	prev := SetLockdepHandler(func(v Violation) { seen = append(seen, v) })
	defer func() { SetLockdepHandler(prev) }()

	var a, b SpinLock
	a.Init(ClassPTLock)
	b.Init(ClassPageTableLock)
	a.Lock()
	b.Lock()
	b.Unlock()
	a.Unlock()
	require.Len(t, seen, 1)
	assert.Len(t, expectViolations(t), 1)

	DisableLockdep()
	assert.False(t, LockdepEnabled())
	a.Lock()
	b.Lock()
	b.Unlock()
	a.Unlock()
	EnableLockdep()
	assert.Len(t, seen, 1, "nothing is checked while the checker is off")
	assert.Empty(t, expectViolations(t))
}

func TestLockdepTrackHooksForForeignLocks(t *testing.T) {
	key := new(int)
	TrackAcquire(key, ClassPageLock, false)
	assert.True(t, LockdepHolds(key))
	var ptl SpinLock
	ptl.Init(ClassPTLock)
	ptl.Lock()
	TrackTryAcquire(new(int), ClassPageLock, false) // trylock_page under the ptl is fine
	ptl.Unlock()
	TrackRelease(key)
	assert.False(t, LockdepHolds(key))
	assert.Empty(t, expectViolations(t))
}

func TestViolationKindString(t *testing.T) {
	assert.Equal(t, "recursive locking", Recursion.String())
	assert.Equal(t, "ViolationKind(9)", ViolationKind(9).String())
	assert.Equal(t, "<unclassed>", (*Class)(nil).Name())
	assert.Equal(t, "ptlock(rank 600)", ClassPTLock.String())
}
