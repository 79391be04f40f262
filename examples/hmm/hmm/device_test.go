package hmm

import (
	"bytes"
	"encoding/binary"
	"github.com/gomm-dev/gomm/internal/testmain"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/tlb"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	rw    = gomm.ProtRead | gomm.ProtWrite
	anon  = gomm.MapPrivate | gomm.MapAnonymous
	base  = uint64(0x1000_0000)
	words = PageSize / 8 // 64-bit words in a page
)

// world is one test's machine, process and device, with the checker on.
type world struct {
	t   *testing.T
	m   *gomm.Machine
	mm  *gomm.MM
	dev *Device
	mi  *Mirror

	expectViolations bool // a test that switches a fix off
}

func newWorld(t *testing.T, frames int) *world {
	t.Helper()
	m, err := gomm.NewMachine(gomm.Config{Frames: frames, SwapSlots: frames, Check: true})
	require.NoError(t, err)
	w := &world{t: t, m: m, mm: m.NewMM()}
	w.dev, err = NewDevice(m, 256)
	require.NoError(t, err)
	w.mi, err = w.dev.Open(w.mm)
	require.NoError(t, err)
	t.Cleanup(func() { w.finish(w.mm) })
	return w
}

// finish checks the reverse map and that the checker saw nothing, then
// closes the mirror and lets the process go.
func (w *world) finish(mms ...*gomm.MM) {
	w.t.Helper()
	assert.NoError(w.t, w.m.CheckRmap(mms...))
	if vs, n := w.m.Violations(); !w.expectViolations {
		assert.Zero(w.t, n, "checker violations: %v", vs)
	}
	assert.NoError(w.t, w.mi.Close())
	for _, mm := range mms {
		_ = mm.Exit()
	}
	assert.Zero(w.t, w.dev.Pagemap().InUse(), "device pages outlive every mapping of them")
}

func (w *world) mmap(pages int, prot gomm.Prot, flags gomm.MapFlags) uint64 {
	w.t.Helper()
	a, err := w.mm.Mmap(base, uint64(pages)*PageSize, prot, flags|gomm.MapFixed)
	require.NoError(w.t, err)
	return a
}

// fill writes word i of the range as value(i) from the CPU side.
func fill(t *testing.T, mm *gomm.MM, addr uint64, pages int, value func(i int) uint64) {
	t.Helper()
	buf := make([]byte, pages*PageSize)
	for i := range pages * words {
		binary.LittleEndian.PutUint64(buf[i*8:], value(i))
	}
	_, err := mm.WriteAt(buf, addr)
	require.NoError(t, err)
}

// expect checks word i of buf is value(i).
func expect(t *testing.T, buf []byte, value func(i int) uint64, msg string) {
	t.Helper()
	for i := range len(buf) / 8 {
		if got := binary.LittleEndian.Uint64(buf[i*8:]); got != value(i) {
			t.Fatalf("%s: word %d is %#x, want %#x", msg, i, got, value(i))
		}
	}
}

func cpuRead(t *testing.T, mm *gomm.MM, addr uint64, pages int) []byte {
	t.Helper()
	buf := make([]byte, pages*PageSize)
	_, err := mm.ReadAt(buf, addr)
	require.NoError(t, err)
	return buf
}

func devRead(t *testing.T, mi *Mirror, addr uint64, pages int) []byte {
	t.Helper()
	buf := make([]byte, pages*PageSize)
	require.NoError(t, mi.Read(addr, buf))
	return buf
}

func ident(i int) uint64 { return uint64(i) }

func TestBadInput(t *testing.T) {
	w := newWorld(t, 256)
	_, err := NewDevice(nil, 4)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = NewDevice(w.m, 0)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	_, err = w.dev.Open(w.mm)
	assert.ErrorIs(t, err, gomm.ErrExist, "one mirror per process and device")
	for _, r := range [][2]uint64{{base + 1, PageSize}, {base, 0}, {base, PageSize + 1}, {gomm.TaskSize, PageSize}, {^uint64(0) &^ (PageSize - 1), 2 * PageSize}} {
		_, err = w.mi.MigrateToDevice(r[0], r[1])
		assert.ErrorIs(t, err, gomm.ErrInvalid, "%#x", r)
		_, err = w.mi.MigrateToSystem(r[0], r[1])
		assert.ErrorIs(t, err, gomm.ErrInvalid, "%#x", r)
		assert.ErrorIs(t, w.mi.MakeExclusive(r[0], r[1]), gomm.ErrInvalid, "%#x", r)
		_, err = w.mi.Snapshot(r[0], r[1])
		assert.ErrorIs(t, err, gomm.ErrInvalid, "%#x", r)
		_, err = w.mi.ExclusivePages(r[0], r[1])
		assert.ErrorIs(t, err, gomm.ErrInvalid, "%#x", r)
	}
	_, err = w.mi.AtomicAdd(base+3, 1)
	assert.ErrorIs(t, err, gomm.ErrInvalid)
	assert.ErrorIs(t, w.mi.Read(gomm.TaskSize-8, make([]byte, 16)), gomm.ErrFault)
	assert.ErrorIs(t, w.mi.Read(base, make([]byte, 8)), gomm.ErrFault, "nothing mapped")
	assert.Zero(t, w.mi.Mapped())
}

// anon_read, anon_read_prot.
func TestAnonRead(t *testing.T) {
	w := newWorld(t, 256)
	a := w.mmap(8, rw, anon)
	fill(t, w.mm, a, 8, ident)
	expect(t, devRead(t, w.mi, a, 8), ident, "the device reads what the CPU wrote")
	assert.Equal(t, 8, w.mi.Mapped())

	// Unaligned, spanning pages.
	buf := make([]byte, 24)
	require.NoError(t, w.mi.Read(a+PageSize-8, buf))
	assert.Equal(t, uint64(words-1), binary.LittleEndian.Uint64(buf))
	assert.Equal(t, uint64(words), binary.LittleEndian.Uint64(buf[8:]))

	require.NoError(t, w.mm.Mprotect(a, 8*PageSize, gomm.ProtNone))
	assert.Zero(t, w.mi.Mapped(), "the mprotect invalidation emptied the mirror")
	assert.ErrorIs(t, w.mi.Read(a, make([]byte, 8)), gomm.ErrFault, "PROT_NONE: no device read either")
}

// anon_write, anon_write_prot.
func TestAnonWrite(t *testing.T) {
	w := newWorld(t, 256)
	a := w.mmap(8, gomm.ProtRead, anon)
	neg := func(i int) uint64 { return uint64(-i) }
	buf := make([]byte, 8*PageSize)
	for i := range 8 * words {
		binary.LittleEndian.PutUint64(buf[i*8:], neg(i))
	}
	expect(t, devRead(t, w.mi, a, 8), func(int) uint64 { return 0 }, "zero pages read")
	assert.ErrorIs(t, w.mi.Write(a, buf), gomm.ErrPerm, "read-only: the device may not write")
	expect(t, cpuRead(t, w.mm, a, 8), func(int) uint64 { return 0 }, "and wrote nothing")

	require.NoError(t, w.mm.Mprotect(a, 8*PageSize, rw))
	require.NoError(t, w.mi.Write(a, buf))
	expect(t, cpuRead(t, w.mm, a, 8), neg, "the CPU sees what the device wrote")
}

// anon_write_child and anon_write_child_shared.
func TestForkChildWrites(t *testing.T) {
	for _, shared := range []bool{false, true} {
		name := "private"
		if shared {
			name = "shared"
		}
		t.Run(name, func(t *testing.T) {
			w := newWorld(t, 512)
			flags := anon
			if shared {
				flags = gomm.MapShared | gomm.MapAnonymous
			}
			a := w.mmap(4, rw, flags)
			fill(t, w.mm, a, 4, ident)
			expect(t, devRead(t, w.mi, a, 4), ident, "parent's device")

			child, err := w.mm.Fork()
			require.NoError(t, err)
			cmi, err := w.dev.Open(child)
			require.NoError(t, err)
			expect(t, devRead(t, cmi, a, 4), ident, "the child's device sees the parent's data")
			neg := func(i int) uint64 { return uint64(-i) }
			buf := make([]byte, 4*PageSize)
			for i := range 4 * words {
				binary.LittleEndian.PutUint64(buf[i*8:], neg(i))
			}
			require.NoError(t, cmi.Write(a, buf))
			expect(t, cpuRead(t, child, a, 4), neg, "the child sees its device's writes")
			if shared {
				expect(t, cpuRead(t, w.mm, a, 4), neg, "shared: so does the parent")
				expect(t, devRead(t, w.mi, a, 4), neg, "and the parent's device")
			} else {
				expect(t, cpuRead(t, w.mm, a, 4), ident, "private: the parent keeps its copy")
				expect(t, devRead(t, w.mi, a, 4), ident, "and so does the parent's device")
			}
			require.NoError(t, w.m.CheckRmap(w.mm, child))
			require.NoError(t, cmi.Close())
			require.NoError(t, child.Exit())
		})
	}
}

// file_read, file_write.
func TestFileReadWrite(t *testing.T) {
	w := newWorld(t, 256)
	f, err := w.m.NewFile(4 * PageSize)
	require.NoError(t, err)
	data := make([]byte, 4*PageSize)
	for i := range 4 * words {
		binary.LittleEndian.PutUint64(data[i*8:], uint64(i)*3)
	}
	_, err = f.WriteAt(data, 0)
	require.NoError(t, err)
	a, err := w.mm.MmapFile(base, 4*PageSize, rw, gomm.MapShared|gomm.MapFixed, f, 0)
	require.NoError(t, err)
	expect(t, devRead(t, w.mi, a, 4), func(i int) uint64 { return uint64(i) * 3 }, "the device reads the file")

	for i := range 4 * words {
		binary.LittleEndian.PutUint64(data[i*8:], uint64(i)*5)
	}
	require.NoError(t, w.mi.Write(a, data))
	got := make([]byte, 4*PageSize)
	_, err = f.ReadAt(got, 0)
	require.NoError(t, err)
	expect(t, got, func(i int) uint64 { return uint64(i) * 5 }, "the device's writes reach the file")
}

// migrate, migrate_fault.
func TestMigrateAndFaultBack(t *testing.T) {
	w := newWorld(t, 256)
	a := w.mmap(16, rw, anon)
	fill(t, w.mm, a, 16, ident)
	n, err := w.mi.MigrateToDevice(a, 16*PageSize)
	require.NoError(t, err)
	assert.Equal(t, 16, n)
	st := w.dev.Stats()
	assert.Equal(t, 16, st.DevicePagesUse)
	assert.Equal(t, uint64(16), st.OwnSkipped, "the device's own migration does not empty its mirror")
	assert.Equal(t, 16, w.mi.Mapped(), "it maps the pages where they landed")
	snap, err := w.mi.Snapshot(a, 16*PageSize)
	require.NoError(t, err)
	for i, p := range snap {
		assert.Equal(t, ProtDevicePrivateLocal|ProtWrite, p, "page %d", i)
	}
	faultsBefore := w.dev.Stats().Faults
	expect(t, devRead(t, w.mi, a, 16), ident, "the device reads its own memory")
	assert.Equal(t, faultsBefore, w.dev.Stats().Faults, "without faulting")

	expect(t, cpuRead(t, w.mm, a, 16), ident, "the CPU faults the pages back")
	st = w.dev.Stats()
	assert.Equal(t, uint64(16), st.CPUFaults)
	assert.Equal(t, uint64(16), st.ToRAM)
	assert.Zero(t, st.DevicePagesUse, "device pages were freed back to the device")
	snap, err = w.mi.Snapshot(a, 16*PageSize)
	require.NoError(t, err)
	for i, p := range snap {
		assert.Equal(t, ProtWrite, p, "page %d is back in RAM", i)
	}
	expect(t, devRead(t, w.mi, a, 16), ident, "and the device faults them in from RAM")
}

// migrate_shared.
func TestMigrateSharedIsRefused(t *testing.T) {
	w := newWorld(t, 256)
	a := w.mmap(4, rw, gomm.MapShared|gomm.MapAnonymous)
	fill(t, w.mm, a, 4, ident)
	n, err := w.mi.MigrateToDevice(a, 4*PageSize)
	assert.ErrorIs(t, err, gomm.ErrBusy)
	assert.Zero(t, n)
	assert.Zero(t, w.dev.Pagemap().InUse())
	expect(t, devRead(t, w.mi, a, 4), ident, "still readable where it was")
}

// migrate_multiple, migrate_release.
func TestMigrateMultiple(t *testing.T) {
	w := newWorld(t, 256)
	for round := range 8 {
		a := w.mmap(8, rw, anon)
		val := func(i int) uint64 { return uint64(i + round) }
		fill(t, w.mm, a, 8, val)
		n, err := w.mi.MigrateToDevice(a, 8*PageSize)
		require.NoError(t, err)
		require.Equal(t, 8, n)
		expect(t, devRead(t, w.mi, a, 8), val, "device copy")
		if round%2 == 0 {
			expect(t, cpuRead(t, w.mm, a, 4), val, "CPU faults half back")
		} else {
			n, err = w.mi.MigrateToSystem(a, 8*PageSize)
			require.NoError(t, err)
			assert.Equal(t, 8, n)
			expect(t, cpuRead(t, w.mm, a, 8), val, "explicitly migrated back")
		}
		require.NoError(t, w.mm.Munmap(a, 8*PageSize))
		assert.Zero(t, w.dev.Pagemap().InUse(), "round %d: munmap released the device pages", round)
		assert.Zero(t, w.mi.Mapped())
	}
}

// hmm2.double_map, hmm2.snapshot.
func TestTwoDevicesSnapshot(t *testing.T) {
	w := newWorld(t, 256)
	dev1, err := NewDevice(w.m, 16)
	require.NoError(t, err)
	mi1, err := dev1.Open(w.mm)
	require.NoError(t, err)
	defer func() { require.NoError(t, mi1.Close()) }()

	a := w.mmap(7, rw, anon)
	fill(t, w.mm, a, 7, ident)
	expect(t, devRead(t, w.mi, a, 7), ident, "double_map: device 0")
	expect(t, devRead(t, mi1, a, 7), ident, "double_map: device 1")

	require.NoError(t, w.mm.Mprotect(a, PageSize, gomm.ProtNone))               // page 0
	require.NoError(t, w.mm.Munmap(a+PageSize, PageSize))                       // page 1
	require.NoError(t, w.mm.Madvise(a+2*PageSize, PageSize, gomm.MadvDontNeed)) // page 2: read below maps the zero page
	_, err = w.mm.ReadAt(make([]byte, 8), a+2*PageSize)
	require.NoError(t, err)
	require.NoError(t, w.mm.Mprotect(a+2*PageSize, 2*PageSize, gomm.ProtRead)) // pages 2, 3
	_, err = w.mi.MigrateToDevice(a+5*PageSize, PageSize)                      // page 5 to device 0
	require.NoError(t, err)
	_, err = mi1.MigrateToDevice(a+6*PageSize, PageSize) // page 6 to device 1
	require.NoError(t, err)

	snap, err := w.mi.Snapshot(a, 7*PageSize)
	require.NoError(t, err)
	assert.Equal(t, []Prot{ProtError, ProtError, ProtZero | ProtRead, ProtRead, ProtWrite,
		ProtDevicePrivateLocal | ProtWrite, ProtNone}, snap)
	snap, err = mi1.Snapshot(a, 7*PageSize)
	require.NoError(t, err)
	assert.Equal(t, ProtNone, snap[5], "device 0's page, seen from device 1")
	assert.Equal(t, ProtDevicePrivateLocal|ProtWrite, snap[6])

	// Device 1 reading device 0's page faults it back to RAM.
	expect(t, devRead(t, mi1, a+5*PageSize, 1), func(i int) uint64 { return uint64(i + 5*words) }, "remote page")
	assert.Equal(t, uint64(1), w.dev.Stats().CPUFaults)
	assert.Zero(t, w.dev.Pagemap().InUse())
	require.NoError(t, w.mm.Munmap(a, 7*PageSize))
	assert.Zero(t, dev1.Pagemap().InUse())
}

// exclusive.
func TestExclusive(t *testing.T) {
	w := newWorld(t, 256)
	a := w.mmap(8, rw, anon)
	fill(t, w.mm, a, 8, ident)
	require.NoError(t, w.mi.MakeExclusive(a, 8*PageSize))
	n, err := w.mi.ExclusivePages(a, 8*PageSize)
	require.NoError(t, err)
	assert.Equal(t, 8, n)
	expect(t, devRead(t, w.mi, a, 8), ident, "the device reads its exclusive pages")
	for p := range 8 {
		v, err := w.mi.AtomicAdd(a+uint64(p)*PageSize, 1000)
		require.NoError(t, err)
		assert.Equal(t, uint64(p*words+1000), v)
	}
	snap, err := w.mi.Snapshot(a, 8*PageSize)
	require.NoError(t, err)
	assert.Equal(t, ProtNone, snap[0], "the CPU has no access meanwhile")

	cpu := w.m.CPU(0)
	cpu.Switch(w.mm.NewTask("t"))
	for p := range 8 {
		va := a + uint64(p)*PageSize
		v, err := cpu.Load64(va)
		require.NoError(t, err)
		require.Equal(t, uint64(p*words+1000), v, "the CPU sees the device's atomics")
		require.NoError(t, cpu.Store64(va, v+1))
	}
	n, err = w.mi.ExclusivePages(a, 8*PageSize)
	require.NoError(t, err)
	assert.Zero(t, n, "every CPU access revoked the device's claim")
	assert.Equal(t, uint64(8), w.dev.Stats().Revoked)
	v, err := w.mi.AtomicAdd(a, 1)
	require.NoError(t, err)
	assert.Equal(t, uint64(1002), v, "claimed again, and sees the CPU's write")
	cpu.Switch(tlb.NewKernelThread("idle"))
}

// exclusive_mprotect.
func TestExclusiveMprotect(t *testing.T) {
	w := newWorld(t, 256)
	a := w.mmap(4, rw, anon)
	fill(t, w.mm, a, 4, ident)
	require.NoError(t, w.mi.MakeExclusive(a, 4*PageSize))
	require.NoError(t, w.mm.Mprotect(a, 4*PageSize, gomm.ProtRead))
	n, err := w.mi.ExclusivePages(a, 4*PageSize)
	require.NoError(t, err)
	assert.Zero(t, n, "mprotect revoked the claim")
	assert.ErrorIs(t, w.mi.Write(a, make([]byte, 8)), gomm.ErrPerm, "and the device may not write any more")
	assert.ErrorIs(t, w.mi.MakeExclusive(a, PageSize), gomm.ErrPerm, "nor claim read-only memory")
	expect(t, cpuRead(t, w.mm, a, 4), ident, "contents untouched")
}

// exclusive_cow.
func TestExclusiveCOW(t *testing.T) {
	w := newWorld(t, 256)
	a := w.mmap(4, rw, anon)
	fill(t, w.mm, a, 4, ident)
	require.NoError(t, w.mi.MakeExclusive(a, 4*PageSize))
	child, err := w.mm.Fork()
	require.NoError(t, err)
	n, _ := w.mi.ExclusivePages(a, 4*PageSize)
	assert.Zero(t, n, "fork revoked the claim")
	plus := func(k uint64) func(int) uint64 { return func(i int) uint64 { return uint64(i) + k } }
	fill(t, w.mm, a, 4, plus(1))
	fill(t, child, a, 4, plus(2))
	expect(t, cpuRead(t, w.mm, a, 4), plus(1), "parent's copy")
	expect(t, cpuRead(t, child, a, 4), plus(2), "child's copy")
	expect(t, devRead(t, w.mi, a, 4), plus(1), "the parent's device")
	require.NoError(t, w.m.CheckRmap(w.mm, child))
	require.NoError(t, child.Exit())
}

// hmm_cow_in_device: fork with pages in device memory.
func TestCOWInDevice(t *testing.T) {
	w := newWorld(t, 256)
	a := w.mmap(8, rw, anon)
	fill(t, w.mm, a, 8, ident)
	_, err := w.mi.MigrateToDevice(a, 8*PageSize)
	require.NoError(t, err)
	child, err := w.mm.Fork()
	require.NoError(t, err)
	require.NoError(t, w.m.CheckRmap(w.mm, child), "fork mapped the device pages twice")
	snap, err := w.mi.Snapshot(a, 8*PageSize)
	require.NoError(t, err)
	assert.Equal(t, ProtDevicePrivateLocal|ProtRead, snap[0], "write-protected for copy-on-write")

	neg := func(i int) uint64 { return uint64(-i) }
	fill(t, w.mm, a, 8, neg) // the parent's write: back to RAM, then a copy
	expect(t, cpuRead(t, w.mm, a, 8), neg, "the parent's new copy")
	expect(t, cpuRead(t, child, a, 8), ident, "the child keeps the original")
	expect(t, devRead(t, w.mi, a, 8), neg, "the parent's device sees the parent's copy")
	require.NoError(t, w.m.CheckRmap(w.mm, child))
	require.NoError(t, child.Exit())
}

// Device memory goes away: every page comes back to RAM first.
func TestEvict(t *testing.T) {
	w := newWorld(t, 256)
	a := w.mmap(8, rw, anon)
	fill(t, w.mm, a, 8, ident)
	_, err := w.mi.MigrateToDevice(a, 8*PageSize)
	require.NoError(t, err)
	n, err := w.dev.Evict()
	require.NoError(t, err)
	assert.Equal(t, 8, n)
	assert.Zero(t, w.dev.Pagemap().InUse())
	expect(t, cpuRead(t, w.mm, a, 8), ident, "contents survive")
	assert.Zero(t, w.dev.Stats().CPUFaults, "no CPU fault was needed")
}

// anon_teardown, made concurrent: the device reads while the CPU side
// unmaps and maps again underneath, and migrates in between. The
// checker must see no device translation outlive its page. A smoke test:
// free-running, it does not reliably hit the fault/unmap window, which
// TestFaultWithoutRetryCheckIsCaught places deterministically.
func TestTeardownRace(t *testing.T) {
	w := newWorld(t, 512)
	const pages = 16
	rounds := 100
	if testing.Short() {
		rounds = 30
	}
	var stop atomic.Bool
	var reads atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, PageSize)
		for !stop.Load() {
			for p := range pages {
				// Failures are the point: the range comes and goes.
				if w.mi.Read(base+uint64(p)*PageSize, buf) == nil {
					reads.Add(1)
				}
			}
		}
	}()
	for r := range rounds {
		a := w.mmap(pages, rw, anon)
		fill(t, w.mm, a, pages, func(i int) uint64 { return uint64(i + r) })
		if r%3 == 0 {
			_, _ = w.mi.MigrateToDevice(a, pages*PageSize/2)
		}
		require.NoError(t, w.mm.Munmap(a, pages*PageSize))
	}
	stop.Store(true)
	wg.Wait()
	assert.Zero(t, w.dev.Pagemap().InUse())
	assert.NotZero(t, w.dev.Stats().Invalidations)
	assert.Positive(t, reads.Load(), "the device never read the range while it existed")
}

// The retry check is what keeps a snapshot from outliving an unmap that
// overtook it: without it the checker catches the stale translation.
func TestFaultWithoutRetryCheckIsCaught(t *testing.T) {
	for _, skip := range []bool{false, true} {
		t.Run(map[bool]string{false: "with check", true: "without"}[skip], func(t *testing.T) {
			w := newWorld(t, 256)
			w.expectViolations = skip
			a := w.mmap(1, rw, anon|gomm.MapPopulate)
			other := base + 0x100_0000
			w.mi.skipRetry = skip
			w.mi.afterFault = func() {
				w.mi.afterFault = nil
				require.NoError(t, w.mm.Munmap(a, PageSize)) // frees the frame just snapshotted
				_, err := w.mm.Mmap(other, PageSize, rw, anon|gomm.MapFixed|gomm.MapPopulate)
				require.NoError(t, err) // and it is reused there
			}
			err := w.mi.Read(a, make([]byte, 8))
			if skip {
				require.NoError(t, err, "the stale snapshot is installed")
			} else {
				assert.ErrorIs(t, err, gomm.ErrFault, "the retry sees the range is gone")
			}
			// Freeing the frame from its new mapping invalidates only that
			// range: a mirror still translating the old one to it is caught.
			require.NoError(t, w.mm.Munmap(other, PageSize))
			_, n := w.m.Violations()
			assert.Equal(t, skip, n > 0, "violations: %d", n)
		})
	}
}

// Device atomics and CPU stores on the same pages: the page moves back
// and forth between them, and no update of either side is lost.
func TestAtomicsAgainstCPU(t *testing.T) {
	w := newWorld(t, 256)
	const pages = 4
	a := w.mmap(pages, rw, anon)
	rounds := 300
	if testing.Short() {
		rounds = 60
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		cpu := w.m.CPU(0)
		cpu.Switch(w.mm.NewTask("cpu"))
		defer cpu.Switch(tlb.NewKernelThread("idle"))
		for r := range rounds {
			va := a + uint64(r%pages)*PageSize
			v, err := cpu.Load64(va)
			if !assert.NoError(t, err) {
				return
			}
			if !assert.NoError(t, cpu.Store64(va, v+1)) {
				return
			}
		}
	}()
	for r := range rounds {
		_, err := w.mi.AtomicAdd(a+uint64(r%pages)*PageSize+8, 1)
		require.NoError(t, err)
	}
	wg.Wait()
	for p := range pages {
		buf := cpuRead(t, w.mm, a+uint64(p)*PageSize, 1)
		want := uint64(rounds / pages)
		assert.Equal(t, want, binary.LittleEndian.Uint64(buf), "page %d: CPU increments", p)
		assert.Equal(t, want, binary.LittleEndian.Uint64(buf[8:]), "page %d: device atomics", p)
	}
	st := w.dev.Stats()
	t.Logf("claims %d, revoked %d", st.Exclusive, st.Revoked)
}

func TestDemo(t *testing.T) {
	var out bytes.Buffer
	rep, err := RunDemo(&out, DemoConfig{Pages: 16, Rounds: 80})
	require.NoError(t, err, out.String())
	assert.Zero(t, rep.Violations)
	assert.True(t, rep.CountersExact)
	assert.NotZero(t, rep.Device.ToDevice)
	assert.NotZero(t, rep.Device.CPUFaults)
	assert.NotZero(t, rep.Device.OwnSkipped)
	assert.Contains(t, out.String(), "checker violations")
	_, err = RunDemo(&out, DemoConfig{Pages: 1})
	assert.ErrorIs(t, err, gomm.ErrInvalid)
}

// within fails the test if fn does not return in time: the tests below
// guard against deadlocks.
func within(t *testing.T, d time.Duration, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("still running after %v: deadlocked", d)
	}
}

// A claim of a page in the device's own memory faults it back to RAM
// first, from inside the claim: the mirror holds no lock across a call
// into the MM, or the fault's migration would wait for the claim.
func TestClaimOfADevicePage(t *testing.T) {
	w := newWorld(t, 256)
	a := w.mmap(2, rw, anon)
	fill(t, w.mm, a, 2, ident)
	_, err := w.mi.MigrateToDevice(a, 2*PageSize)
	require.NoError(t, err)
	within(t, 10*time.Second, func() {
		v, err := w.mi.AtomicAdd(a, 1)
		assert.NoError(t, err)
		assert.Equal(t, uint64(1), v)
		assert.NoError(t, w.mi.MakeExclusive(a+PageSize, PageSize))
	})
	expect(t, cpuRead(t, w.mm, a+8, 1), func(i int) uint64 { return uint64(i + 1) }, "rest of the page")
}

// CPU faults on device pages (mmap_lock, then the driver), the device's
// own migrations (the driver, then mmap_lock) and a writer wanting
// mmap_lock, all at once: no lock order between them may close a cycle.
func TestDeviceFaultsMigrationsAndMmapTogether(t *testing.T) {
	w := newWorld(t, 1024)
	const pages = 8
	a := w.mmap(2*pages, rw, anon)
	fill(t, w.mm, a, 2*pages, ident)
	rounds := testmain.Iterations(200, 40)
	within(t, 60*time.Second, func() {
		var wg sync.WaitGroup
		wg.Go(func() { // the CPU, on the first half
			cpu := w.m.CPU(0)
			cpu.Switch(w.mm.NewTask("cpu"))
			defer cpu.Switch(tlb.NewKernelThread("idle"))
			for r := range rounds {
				va := a + uint64(r%pages)*PageSize
				v, err := cpu.Load64(va)
				if !assert.NoError(t, err) || !assert.Equal(t, uint64(r%pages*words), v) {
					return
				}
			}
		})
		wg.Go(func() { // a writer on mmap_lock, elsewhere
			for range rounds {
				b, err := w.mm.Mmap(0, PageSize, rw, anon)
				if !assert.NoError(t, err) || !assert.NoError(t, w.mm.Munmap(b, PageSize)) {
					return
				}
			}
		})
		for r := range rounds { // the device, on both halves
			_, _ = w.mi.MigrateToDevice(a, 2*pages*PageSize)
			if r%2 == 0 {
				_, _ = w.mi.MigrateToSystem(a+pages*PageSize, pages*PageSize)
			}
		}
		wg.Wait()
	})
	expect(t, cpuRead(t, w.mm, a, 2*pages), ident, "contents")
}

// A claim must not map a page another invalidation took away between
// the exclusive entry going in and the mirror mapping it: MADV_DONTNEED
// takes no page lock, so only the claim's own check sees it.
func TestClaimOvertakenByDontNeed(t *testing.T) {
	for _, noCheck := range []bool{false, true} {
		t.Run(map[bool]string{false: "with check", true: "without"}[noCheck], func(t *testing.T) {
			w := newWorld(t, 256)
			w.expectViolations = noCheck
			a := w.mmap(1, rw, anon)
			fill(t, w.mm, a, 1, ident)
			w.mi.noClaimCheck = noCheck
			w.mi.beforeMap = func(va uint64) {
				w.mi.beforeMap = nil
				// Another thread's: it shares the claim's mmap_lock read side.
				done := make(chan error)
				go func() { done <- w.mm.Madvise(va, PageSize, gomm.MadvDontNeed) }()
				require.NoError(t, <-done)
			}
			err := w.mi.MakeExclusive(a, PageSize)
			_, n := w.m.Violations()
			assert.Equal(t, noCheck, n > 0, "violations: %d", n)
			if !noCheck {
				require.NoError(t, err, "claimed again on the next try")
				exclusive, _ := w.mi.ExclusivePages(a, PageSize)
				assert.Equal(t, 1, exclusive)
			}
		})
	}
}
