package gomm_test

import (
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"testing"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/errno"
	"github.com/gomm-dev/gomm/notifier"
	"github.com/gomm-dev/gomm/pagetable"
	"github.com/gomm-dev/gomm/physmem"
)

// typed reports whether err is one of the errno values.
func typed(err error) bool {
	_, ok := errno.Of(err)
	return ok
}

// A fuzz program is a run of steps, each an operation byte and three
// 64-bit arguments.
const fuzzStepSize = 25

// fuzzStep encodes one step, for seeds.
func fuzzStep(op byte, a, b, c uint64) []byte {
	buf := make([]byte, fuzzStepSize)
	buf[0] = op
	binary.LittleEndian.PutUint64(buf[1:], a)
	binary.LittleEndian.PutUint64(buf[9:], b)
	binary.LittleEndian.PutUint64(buf[17:], c)
	return buf
}

// nextFuzzStep decodes the first step of prog (at least fuzzStepSize
// bytes) and returns the rest.
func nextFuzzStep(prog []byte) (op byte, a, b, c uint64, rest []byte) {
	return prog[0], binary.LittleEndian.Uint64(prog[1:]), binary.LittleEndian.Uint64(prog[9:]),
		binary.LittleEndian.Uint64(prog[17:]), prog[fuzzStepSize:]
}

// FuzzSyscalls drives every MM entry point, and the file, reclaim, KSM
// and migration ones, with arbitrary arguments: no panic, only errno
// errors, an address space unchanged by any call that fails, consistent
// reverse maps, and a silent checker.
func FuzzSyscalls(f *testing.F) {
	f.Add(fuzzStep(0, 0x10000000, 0x3000, 0x22_0003))
	f.Add(append(fuzzStep(0, 0, 0x2000, 0x8022_0003), fuzzStep(2, 0x10000000, 0x1000, 1)...))
	f.Add(append(fuzzStep(0, 0x10000000, 0x4000, 0x32_0003), fuzzStep(4, 0x10000000, 0x4000, 0x1_0000_2000)...))
	f.Add(fuzzStep(5, 0x7fff_ffff_0000, 0x2000000, 0))
	f.Add(append(fuzzStep(0, 0x10000000, 0x3000, 0x22_0003), fuzzStep(5, 0x10001000, 2, 1)...))
	f.Add(append(fuzzStep(9, 0x10000000, 0x3000, 0x11_0003), fuzzStep(12, 0x2000, 9, 0)...))
	f.Add(append(append(fuzzStep(0, 0x10000000, 0x4000, 0x8032_0003), fuzzStep(3, 0x10000000, 0x4000, 12)...), fuzzStep(13, 0, 64, 1)...))
	f.Add(append(fuzzStep(0, 0x10000000, 0x4000, 0x8032_0003), fuzzStep(11, 0x10000000, 0, 0)...))
	f.Add(slices.Concat(fuzzStep(16, 7, 64, 1), fuzzStep(0, 0x10000000, 0x4000, 0x8032_0003), fuzzStep(15, 0, 0, 0), fuzzStep(17, 0x10000000, 1, 0)))
	f.Add(slices.Concat(fuzzStep(14, 0x10000000, 0x4000, 0), fuzzStep(18, 0x3000, 0x2000, 0x1800)))
	f.Fuzz(func(t *testing.T, prog []byte) {
		m, err := gomm.NewMachine(gomm.Config{CPUs: 1, Frames: 256, SwapSlots: 64, Check: true})
		if err != nil {
			t.Fatal(err)
		}
		file, err := m.NewFile(8 * gomm.PageSize)
		if err != nil {
			t.Fatal(err)
		}
		mm := m.NewMM()
		cpu := m.CPU(0)
		cpu.Switch(mm.NewTask("fuzz"))
		for len(prog) >= fuzzStepSize {
			var op byte
			var a, b, c uint64
			op, a, b, c, prog = nextFuzzStep(prog)
			op %= 19
			before, rss := mm.VMAs(), mm.RSS()
			var err error
			mutates := true
			switch op {
			case 0:
				_, err = mm.Mmap(a, b, gomm.Prot(c), gomm.MapFlags(c>>8))
			case 1:
				err = mm.Munmap(a, b)
			case 2:
				err = mm.Mprotect(a, b, gomm.Prot(c))
			case 3:
				err = mm.Madvise(a, b, gomm.Advice(int32(c)))
			case 4:
				_, err = mm.Mremap(a, b, c&0xffff_ffff_ffff, gomm.MremapFlags(c>>48), a^c)
			case 5:
				mutates = false
				if c&1 == 0 {
					err = mm.HandleFault(a, pagetable.Access(b&7))
				} else {
					// Any CPU number: one the machine lacks counts as none.
					err = mm.HandleFaultOn(int(int64(c)>>1), a, pagetable.Access(b&7))
				}
			case 6:
				mutates = false
				buf := make([]byte, b%9000)
				_, err = mm.ReadAt(buf, a)
			case 7:
				mutates = false
				_, err = mm.WriteAt(make([]byte, b%9000), a)
			case 8:
				mutates = false
				if b&1 == 0 {
					_, err = cpu.Load64(a)
				} else {
					err = cpu.Store64(a, c)
				}
			case 9:
				_, err = mm.MmapFile(a, b, gomm.Prot(c), gomm.MapFlags(c>>8)&^gomm.MapAnonymous, file, c>>32)
			case 10:
				mutates = false // a failing populate leaves the flag set, as in Linux
				if c&1 == 0 {
					err = mm.Mlock(a, b)
				} else {
					err = mm.Munlock(a, b)
				}
			case 11:
				mutates = false
				_, err = mm.MovePages([]uint64{a, b})
			case 12:
				mutates = false
				switch c % 3 {
				case 0:
					err = file.Truncate(b % (64 * gomm.PageSize))
				case 1:
					_, err = file.WriteAt(make([]byte, b%9000), int64(a%(1<<20)))
				default:
					_, err = file.ReadAt(make([]byte, b%9000), int64(a))
					if errors.Is(err, io.EOF) {
						err = nil
					}
				}
			case 13:
				mutates = false
				if c&1 == 0 {
					m.Reclaim(int(b % 512))
				} else {
					m.KSMScan(int(b % 512))
				}
			case 14:
				mutates = false
				var in *notifier.Interval
				if in, err = mm.InsertInterval(a, b, nopInterval{}); err == nil {
					err = in.Remove()
				}
			case 15:
				mutates = false
				var child *gomm.MM
				if child, err = mm.Fork(); err == nil {
					if cerr := m.CheckRmap(mm, child); cerr != nil {
						t.Fatal(cerr)
					}
					if xerr := child.Exit(); xerr != nil {
						t.Fatal(xerr)
					}
				}
			case 16:
				mutates = false
				err = m.SetInjection(gomm.Injection{Rate: float64(b%256) / 256, Sites: gomm.InjectSite(a), Seed: c})
			case 17:
				mutates = false
				var pg *physmem.Frame
				if pg, err = mm.GetUserPage(a, b&1 != 0); err == nil {
					err = m.RAM().Put(pg)
				}
			case 18:
				mutates = false
				var nf *gomm.File
				if nf, err = m.NewFile(a); err == nil {
					_, err = nf.WriteAt(make([]byte, b%9000), int64(c%(1<<20)))
					if terr := nf.Truncate(0); terr != nil {
						t.Fatal(terr)
					}
				}
			}
			if err == nil {
				continue
			}
			if !typed(err) {
				t.Fatalf("op %d(%#x, %#x, %#x): untyped error %v", op, a, b, c, err)
			}
			if mutates && (!slices.Equal(before, mm.VMAs()) || rss != mm.RSS()) {
				t.Fatalf("op %d(%#x, %#x, %#x) failed (%v) but changed the address space", op, a, b, c, err)
			}
		}
		_ = m.SetInjection(gomm.Injection{})
		if err := m.CheckRmap(mm); err != nil {
			t.Fatal(err)
		}
		cpu.Switch(tlbIdle())
		if err := mm.Exit(); err != nil {
			t.Fatal(err)
		}
		if err := file.Truncate(0); err != nil {
			t.Fatal(err)
		}
		if free := m.RAM().Stats().Free; free != 255 {
			t.Fatalf("%d frames free after exit", free)
		}
		if v, n := m.Violations(); n > 0 {
			t.Fatalf("checker: %v", v[0])
		}
	})
}
