package gomm_test

import (
	"fmt"

	"github.com/gomm-dev/gomm"
	"github.com/gomm-dev/gomm/tlb"
)

// A program on a simulated CPU: map memory, store and load through the
// CPU's TLB (taking demand faults), unmap it, and let the checker confirm
// that no TLB kept a translation of a freed frame.
func Example() {
	m, err := gomm.NewMachine(gomm.Config{CPUs: 2, Frames: 4096, Check: true})
	if err != nil {
		panic(err)
	}
	mm := m.NewMM()
	addr, _ := mm.Mmap(0, 16*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, gomm.MapPrivate|gomm.MapAnonymous)

	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("main"))
	for i := range uint64(16) {
		_ = cpu.Store64(addr+i*gomm.PageSize, i*i)
	}
	v, _ := cpu.Load64(addr + 5*gomm.PageSize)
	fmt.Println("loaded", v, "rss", mm.RSS(), "faults", mm.Faults())

	_ = mm.Munmap(addr, 16*gomm.PageSize)
	_, err = cpu.Load64(addr)
	fmt.Println("after munmap:", err != nil)

	cpu.Switch(tlb.NewKernelThread("idle"))
	_ = mm.Exit()
	_, violations := m.Violations()
	fmt.Println("checks run:", m.Stats().Checks > 0, "violations:", violations)
	// Output:
	// loaded 25 rss 16 faults 16
	// after munmap: true
	// checks run: true violations: 0
}

// mprotect to read-only takes the write right away from every CPU's TLB
// before it returns.
func ExampleMM_Mprotect() {
	m, _ := gomm.NewMachine(gomm.Config{CPUs: 2, Frames: 1024, Check: true})
	mm := m.NewMM()
	addr, _ := mm.Mmap(0, gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, gomm.MapPrivate|gomm.MapAnonymous)
	for _, cpu := range m.CPUs() {
		cpu.Switch(mm.NewTask("thread"))
		_ = cpu.Store64(addr, 1)
	}
	_ = mm.Mprotect(addr, gomm.PageSize, gomm.ProtRead)
	err := m.CPU(1).Store64(addr, 2)
	fmt.Println(err != nil, m.Stats().TLB.IPIs)
	// Output: true 2
}

// A shared file mapping: a CPU's store reaches the file, Sync writes it
// back (write-protecting the mapping first), and truncation unmaps it.
func ExampleMachine_NewFile() {
	m, _ := gomm.NewMachine(gomm.Config{CPUs: 1, Frames: 1024, Check: true})
	f, _ := m.NewFile(4 * gomm.PageSize)
	mm := m.NewMM()
	va, _ := mm.MmapFile(0, 4*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, gomm.MapShared, f, 0)
	cpu := m.CPU(0)
	cpu.Switch(mm.NewTask("main"))
	_ = cpu.Store8(va+gomm.PageSize, 'x')
	buf := make([]byte, 1)
	_, _ = f.ReadAt(buf, gomm.PageSize)
	written, _ := f.Sync()
	_ = f.Truncate(0)
	_, err := cpu.Load8(va + gomm.PageSize)
	fmt.Println(string(buf), written, err != nil)
	cpu.Switch(tlb.NewKernelThread("idle"))
	_ = mm.Exit()
	// Output: x 1 true
}

// Memory pressure: an address space four times the size of RAM, kept in
// swap by the reclaim that allocation runs when RAM is full.
func ExampleMachine_Reclaim() {
	m, _ := gomm.NewMachine(gomm.Config{CPUs: 1, Frames: 256, SwapSlots: 1024})
	mm := m.NewMM()
	addr, _ := mm.Mmap(0, 1024*gomm.PageSize, gomm.ProtRead|gomm.ProtWrite, gomm.MapPrivate|gomm.MapAnonymous)
	for i := range uint64(1000) {
		_, _ = mm.WriteAt([]byte{byte(i)}, addr+i*gomm.PageSize)
	}
	buf := make([]byte, 1)
	_, _ = mm.ReadAt(buf, addr+7*gomm.PageSize)
	st := m.Stats()
	fmt.Println(buf[0], st.Reclaim.SwappedOut > 700, mm.RSS() < 256)
	_ = mm.Exit()
	// Output: 7 true true
}
