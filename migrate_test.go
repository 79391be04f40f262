package gomm_test

import (
	"github.com/gomm-dev/gomm/internal/testmain"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// migrateWatcher records the migrations it is told of, and which owner
// they carried.
type migrateWatcher struct {
	mu     sync.Mutex
	owners []any
}

func (w *migrateWatcher) InvalidateRangeStart(r *notifier.Range) error {
	if r.Event == notifier.EventMigrate {
		w.mu.Lock()
		w.owners = append(w.owners, r.Owner)
		w.mu.Unlock()
	}
	return nil
}

func (w *migrateWatcher) InvalidateRangeEnd(*notifier.Range) {}

// TestMigratePageSharedByForkTree: a page shared by a chain of five
// forked processes moves, and every process maps the new frame with the
// same contents.
func TestMigratePageSharedByForkTree(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	root := m.NewMM()
	addr, err := root.Mmap(0x1000_0000, 2*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	writeWord(t, root, addr, 0xfeed)
	tree := []*gomm.MM{root}
	for range 5 {
		child, err := tree[len(tree)-1].Fork()
		require.NoError(t, err)
		tree = append(tree, child)
	}
	w := &migrateWatcher{}
	_, err = tree[3].RegisterNotifier(t.Context(), w)
	require.NoError(t, err)
	old := frameAt(t, m, root, addr).PFN()
	owner := "test"
	newPFN, err := m.Migrate(uint64(old), owner)
	require.NoError(t, err)
	assert.NotEqual(t, uint64(old), newPFN)
	for i, mm := range tree {
		assert.Equal(t, newPFN, uint64(frameAt(t, m, mm, addr).PFN()), "process %d", i)
		assert.Equal(t, uint64(0xfeed), readWord(t, mm, addr), "process %d", i)
	}
	assert.Equal(t, []any{owner}, w.owners, "the subscriber saw the migration and its owner")
	require.NoError(t, m.CheckRmap(tree...))
	assert.True(t, m.RAM().Stats().Free > 0)

	// Writes after the move copy as before.
	writeWord(t, tree[2], addr, 1)
	assert.Equal(t, uint64(0xfeed), readWord(t, tree[1], addr))
	require.NoError(t, m.CheckRmap(tree...))

	n, err := tree[5].MovePages([]uint64{addr, addr + page, 0x9000_0000})
	assert.Equal(t, 1, n)
	assert.ErrorIs(t, err, gomm.ErrFault, "the unfaulted and the unmapped page cannot move")
	_, err = m.Migrate(m.ZeroPFN(), nil)
	assert.ErrorIs(t, err, gomm.ErrBusy)
	for _, mm := range tree {
		require.NoError(t, mm.Exit())
	}
}

func TestMigrateFilePage(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	f, err := m.NewFile(page)
	require.NoError(t, err)
	a, b := m.NewMM(), m.NewMM()
	va, err := a.MmapFile(0, page, rw, gomm.MapShared, f, 0)
	require.NoError(t, err)
	vb, err := b.MmapFile(0, page, gomm.ProtRead, gomm.MapShared, f, 0)
	require.NoError(t, err)
	writeWord(t, a, va, 5)
	assert.Equal(t, uint64(5), readWord(t, b, vb))
	moved, err := a.MovePages([]uint64{va})
	require.NoError(t, err)
	assert.Equal(t, 1, moved)
	assert.Equal(t, frameAt(t, m, a, va).PFN(), frameAt(t, m, b, vb).PFN())
	writeWord(t, a, va, 6)
	assert.Equal(t, uint64(6), readWord(t, b, vb))
	buf := make([]byte, 1)
	_, err = f.ReadAt(buf, 0)
	require.NoError(t, err)
	assert.Equal(t, byte(6), buf[0], "the page cache holds the new frame")
	require.NoError(t, m.CheckRmap(a, b))
	require.NoError(t, a.Exit())
	require.NoError(t, b.Exit())
}

// TestCPUsWriteWhileMigrationRuns: CPUs keep writing and checking their
// pages while another goroutine migrates them over and over; faults on
// migration entries wait, nothing is lost, the checker stays quiet.
func TestCPUsWriteWhileMigrationRuns(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 2, TLBEntries: 16})
	mm := m.NewMM()
	const pages = 16
	addr, err := mm.Mmap(0, 2*pages*page, rw, anon|gomm.MapPopulate)
	require.NoError(t, err)
	dev := newMirror(t, m, mm, addr, 2*pages*page)
	var migrated atomic.Int64
	writeWhile(t, m, mm, addr, pages, testmain.Iterations(400, 80),
		func(r, i int) uint64 { return uint64(r<<16 | i) },
		func(r int) error {
			va := addr + uint64(r%(2*pages))*page
			if n, _ := mm.MovePages([]uint64{va}); n == 1 {
				migrated.Add(1)
			}
			_, err := dev.access(va, false, 0)
			return err
		},
		func() bool { return migrated.Load() > 0 })
	assert.Positive(t, migrated.Load())
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, dev.close())
	require.NoError(t, mm.Exit())
}
