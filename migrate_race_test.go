package gomm_test

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// migrationEntriesIn returns the addresses of [start, end) where mm's
// page table holds a migration entry.
func migrationEntriesIn(mm *gomm.MM, start, end uint64) []uint64 {
	var out []uint64
	for va := start; va < end; va += page {
		if e, _ := mm.Table().Lookup(va); e.IsMigration() {
			out = append(out, va)
		}
	}
	return out
}

// migrateAgainstVMAChanges runs change(r) for rounds rounds while
// another goroutine moves the pages other maps at [va, va+n pages) over
// and over, through other's MovePages (so not under the mmap_lock of the
// MM change works on). After each round, with no migration in flight,
// check(r) lists the migration entries left behind: every migration
// must have removed all of its own.
func migrateAgainstVMAChanges(t *testing.T, other *gomm.MM, va uint64, n, rounds int,
	change func(r int), check func(r int) []uint64) {
	t.Helper()
	var quiet sync.RWMutex // held for write: no migration in flight
	var stop atomic.Bool
	var moved atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; !stop.Load(); i++ {
			quiet.RLock()
			k, _ := other.MovePages([]uint64{va + uint64(i%n)*page})
			quiet.RUnlock()
			moved.Add(int64(k))
		}
	})
	defer wg.Wait()
	defer stop.Store(true)
	for r := range rounds {
		change(r)
		var left []uint64
		func() {
			quiet.Lock()
			defer quiet.Unlock()
			left = check(r)
		}()
		require.Empty(t, left, "round %d: migration entries left behind", r)
	}
	stop.Store(true)
	wg.Wait()
	assert.Positive(t, moved.Load(), "the migrations raced")
}

// TestSplitOfSharedFileMappingWhileMigrating: mprotect splits a shared
// file mapping while another process migrates the file's pages. The
// tail VMA must be in the file's i_mmap before the head stops covering
// its range, or remove_migration_ptes misses the tail's entries.
func TestSplitOfSharedFileMappingWhileMigrating(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	const n = 8
	f, err := m.NewFile(n * page)
	require.NoError(t, err)
	a, b := m.NewMM(), m.NewMM()
	vb, err := b.MmapFile(0, n*page, rw, gomm.MapShared|gomm.MapPopulate, f, 0)
	require.NoError(t, err)
	const va = 0x1000_0000
	migrateAgainstVMAChanges(t, b, vb, n, testmain.Iterations(1000, 200),
		func(int) {
			_, err := a.MmapFile(va, n*page, rw, gomm.MapShared|gomm.MapFixed|gomm.MapPopulate, f, 0)
			require.NoError(t, err)
			require.NoError(t, a.Mprotect(va+n/2*page, n/2*page, gomm.ProtRead))
		},
		func(int) []uint64 {
			left := migrationEntriesIn(a, va, va+n*page)
			require.NoError(t, a.Munmap(va, n*page))
			return left
		})
	require.NoError(t, m.CheckRmap(a, b))
	require.NoError(t, a.Exit())
	require.NoError(t, b.Exit())
}

// TestForkWhileMigrating: a process forks while another process that
// shares its pages migrates them. A migration entry copied to the child
// must not be in flight, in neither table, while the migration restores
// the entries it can find.
func TestForkWhileMigrating(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flags gomm.MapFlags
	}{
		{"shared", gomm.MapShared | gomm.MapAnonymous},
		{"private", anon},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMachine(t, gomm.Config{CPUs: 1})
			const n = 8
			const va = 0x1000_0000
			a := m.NewMM()
			_, err := a.Mmap(va, n*page, rw, tc.flags|gomm.MapFixed|gomm.MapPopulate)
			require.NoError(t, err)
			b, err := a.Fork() // maps the same frames: its MovePages moves a's
			require.NoError(t, err)
			var child *gomm.MM
			migrateAgainstVMAChanges(t, b, va, n, testmain.Iterations(1000, 200),
				func(int) {
					child, err = a.Fork()
					require.NoError(t, err)
				},
				func(int) []uint64 {
					left := append(migrationEntriesIn(child, va, va+n*page), migrationEntriesIn(a, va, va+n*page)...)
					require.NoError(t, child.Exit())
					return left
				})
			require.NoError(t, m.CheckRmap(a, b))
			require.NoError(t, a.Exit())
			require.NoError(t, b.Exit())
		})
	}
}
