package gomm_test

import (
	"github.com/gomm-dev/gomm/internal/testmain"
	"testing"
	"time"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/physmem"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// ksmSetup maps n mergeable pages in each of two MMs and fills page i
// of both with the same word.
func ksmSetup(t *testing.T, m *gomm.Machine, n int) (a, b *gomm.MM, va uint64) {
	t.Helper()
	a, b = m.NewMM(), m.NewMM()
	for _, mm := range []*gomm.MM{a, b} {
		addr, err := mm.Mmap(0x1000_0000, uint64(n)*page, rw, anon|gomm.MapFixed)
		require.NoError(t, err)
		require.NoError(t, mm.Madvise(addr, uint64(n)*page, gomm.MadvMergeable))
		fillPages(t, mm, addr, n, 500)
		va = addr
	}
	return a, b, va
}

func TestKSMMergeCOWAndUnmerge(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	a, b, va := ksmSetup(t, m, 8)
	require.True(t, a.VMAs()[0].Mergeable)
	m.KSMScan(1000) // first looks record checksums
	st := m.KSMScan(1000)
	assert.Equal(t, 8, st.PagesShared)
	assert.Equal(t, 8, st.PagesSharing)
	assert.Positive(t, st.FullScans)
	assert.Equal(t, frameAt(t, m, a, va).PFN(), frameAt(t, m, b, va).PFN(), "one frame for both")
	assert.True(t, frameAt(t, m, a, va).Has(physmem.FlagKSM))
	require.NoError(t, m.CheckRmap(a, b))
	checkPages(t, a, va, 8, 500)

	writeWord(t, a, va, 1) // breaks COW
	assert.Equal(t, uint64(1), readWord(t, a, va))
	assert.Equal(t, uint64(500), readWord(t, b, va), "the other mapping keeps the merged page")
	assert.NotEqual(t, frameAt(t, m, a, va).PFN(), frameAt(t, m, b, va).PFN())
	require.NoError(t, m.CheckRmap(a, b))

	require.NoError(t, b.Madvise(va, 8*page, gomm.MadvUnmergeable))
	assert.False(t, frameAt(t, m, b, va+page).Has(physmem.FlagKSM), "unmerge gives private copies back")
	checkPages(t, b, va, 8, 500)
	require.NoError(t, m.CheckRmap(a, b))
	st = m.KSMStats()
	assert.Equal(t, 7, st.PagesShared, "a still maps seven KSM pages")
	assert.Zero(t, st.PagesSharing)

	// Unmerge after MADV_DONTNEED: nothing left to unmerge, no error.
	require.NoError(t, a.Madvise(va, 8*page, gomm.MadvDontNeed))
	require.NoError(t, a.Madvise(va, 8*page, gomm.MadvUnmergeable))
	assert.Zero(t, m.KSMStats().PagesShared)
	require.NoError(t, a.Exit())
	require.NoError(t, b.Exit())
}

func TestKSMSkipsVolatileAndDifferentPages(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	a, b, va := ksmSetup(t, m, 4)
	writeWord(t, b, va+3*page, 9) // differs from a's
	const pass = 8                // one look at each present page
	m.KSMScan(pass)
	writeWord(t, a, va, 77) // changes between the looks: volatile
	writeWord(t, b, va, 77)
	st := m.KSMScan(pass)
	assert.Equal(t, 2, st.PagesShared, "pages 1 and 2 only")
	assert.Positive(t, st.PagesVolatile)
	st = m.KSMScan(pass)
	assert.Equal(t, 3, st.PagesShared, "page 0 settled and merged on the next pass")
	require.NoError(t, m.CheckRmap(a, b))
	require.NoError(t, a.Exit())
	require.NoError(t, b.Exit())
}

func TestKSMPageReclaimedAndForked(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 1024, SwapSlots: 256})
	a, b, va := ksmSetup(t, m, 4)
	m.KSMScan(1000)
	m.KSMScan(1000)
	c, err := a.Fork()
	require.NoError(t, err)
	require.NoError(t, m.CheckRmap(a, b, c), "the child's mapping of the KSM page is found")
	for range 3 {
		m.Reclaim(1000)
	}
	assert.Zero(t, a.RSS())
	checkPages(t, c, va, 4, 500)
	checkPages(t, b, va, 4, 500)
	require.NoError(t, m.CheckRmap(a, b, c))
	for _, mm := range []*gomm.MM{a, b, c} {
		require.NoError(t, mm.Exit())
	}
}

// TestCPUsWriteWhileKSMScans: CPUs keep writing identical and changing
// contents while ksmd merges under them and a mirror reads them: every
// write either lands in a private copy or breaks COW, nothing is lost,
// and no TLB keeps a writable entry to a merged page.
func TestCPUsWriteWhileKSMScans(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 2, TLBEntries: 16})
	mm := m.NewMM()
	const pages = 16
	addr, err := mm.Mmap(0, 2*pages*page, rw, anon|gomm.MapPopulate)
	require.NoError(t, err)
	require.NoError(t, mm.Madvise(addr, 2*pages*page, gomm.MadvMergeable))
	dev := newMirror(t, m, mm, addr, 2*pages*page)
	stop := m.StartKSM(time.Millisecond, 64)
	writeWhile(t, m, mm, addr, pages, testmain.Iterations(300, 60),
		func(r, i int) uint64 { return uint64(r / 8) }, // the same on every page for a while: mergeable
		func(r int) error {
			m.KSMScan(2 * pages)
			_, err := dev.access(addr+uint64(r%(2*pages))*page, false, 0)
			return err
		},
		func() bool { return true })
	stop()
	stop()
	m.KSMScan(8 * pages) // the contents are settled now: they merge
	m.KSMScan(8 * pages)
	assert.Positive(t, m.KSMStats().Merges)
	require.NoError(t, m.CheckRmap(mm))
	require.NoError(t, dev.close())
	require.NoError(t, mm.Exit())
}

// A KSM page mapped at several addresses of one MM goes to swap as one
// slot; swapped back in, it is a plain anonymous page, which one
// address can map: the others get copies (ksm_might_need_to_copy), or
// the reverse map would miss them.
func TestKSMPageSwappedInAtSeveralAddresses(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1, Frames: 1024, SwapSlots: 256})
	mm := m.NewMM()
	addr, err := mm.Mmap(0x1000_0000, 4*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	require.NoError(t, mm.Madvise(addr, 4*page, gomm.MadvMergeable))
	for i := range uint64(4) {
		writeWord(t, mm, addr+i*page, 42)
	}
	m.KSMScan(100)
	m.KSMScan(100)
	require.Equal(t, 3, m.KSMStats().PagesSharing, "four addresses, one KSM page")
	for range 3 {
		m.Reclaim(1000)
	}
	require.Zero(t, mm.RSS())
	for i := range uint64(4) {
		assert.Equal(t, uint64(42), readWord(t, mm, addr+i*page))
		require.NoError(t, m.CheckRmap(mm))
	}
	require.NoError(t, mm.Exit())
}

// A page a fork shares with a parent whose VMA is not mergeable cannot
// become the KSM page (the stable node's walk would not reach the
// parent's mapping); its twin becomes it and the shared page is merged
// into that.
func TestKSMSharedWithParentIsNotTheKSMPage(t *testing.T) {
	m := newMachine(t, gomm.Config{CPUs: 1})
	parent := m.NewMM()
	addr, err := parent.Mmap(0x1000_0000, 2*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	writeWord(t, parent, addr, 42)
	child, err := parent.Fork()
	require.NoError(t, err)
	writeWord(t, child, addr+page, 42) // the twin, private to the child
	require.NoError(t, child.Madvise(addr, 2*page, gomm.MadvMergeable))
	shared := frameAt(t, m, parent, addr)
	m.KSMScan(100)
	m.KSMScan(100)
	st := m.KSMStats()
	assert.Equal(t, 1, st.PagesShared)
	assert.Equal(t, 1, st.PagesSharing)
	assert.False(t, shared.Has(physmem.FlagKSM), "the page the parent maps stays anonymous")
	assert.True(t, frameAt(t, m, child, addr).Has(physmem.FlagKSM))
	require.NoError(t, m.CheckRmap(parent, child))
	assert.Equal(t, uint64(42), readWord(t, parent, addr))
	require.NoError(t, child.Exit())
	require.NoError(t, parent.Exit())
}

// TestMremapOfMergedPages: moving a mapping unmerges its KSM pages
// first (move_vma's ksm_madvise); KSM's reverse map, which knows each
// mapping by its address, would not reach them at the new one.
func TestMremapOfMergedPages(t *testing.T) {
	m := newMachine(t, gomm.Config{Frames: 512})
	mm := m.NewMM()
	defer func() { require.NoError(t, mm.Exit()) }()
	addr, err := mm.Mmap(0x1000_0000, 8*page, rw, anon|gomm.MapFixed)
	require.NoError(t, err)
	for i := range uint64(8) {
		_, err := mm.WriteAt([]byte{9}, addr+i*page)
		require.NoError(t, err)
	}
	require.NoError(t, mm.Madvise(addr, 8*page, gomm.MadvMergeable))
	for range 4 {
		m.KSMScan(64)
	}
	require.Positive(t, m.KSMStats().PagesSharing, "merged")
	to, err := mm.Mremap(addr, 8*page, 8*page, gomm.MremapMayMove|gomm.MremapFixed, 0x2000_0000)
	require.NoError(t, err)
	require.NoError(t, m.CheckRmap(mm), "every mapping reachable at its new address")
	var b [1]byte
	_, err = mm.ReadAt(b[:], to+7*page)
	require.NoError(t, err)
	assert.Equal(t, byte(9), b[0])
	for range 4 {
		m.KSMScan(64)
	}
	assert.Positive(t, m.KSMStats().PagesSharing, "merged again at the new address")
	require.NoError(t, m.CheckRmap(mm))
}
