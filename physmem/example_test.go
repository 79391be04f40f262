package physmem_test

import (
	"errors"
	"fmt"

	"github.com/gomm-dev/gomm/physmem"
)

// A frame's life: allocate, write, share, free, and what a stale holder
// sees afterwards.
func Example() {
	ram, err := physmem.New(1024) // 4 MiB of RAM
	if err != nil {
		panic(err)
	}
	ram.OnFree(func(f *physmem.Frame) { fmt.Printf("freeing pfn %d\n", f.PFN()) })

	f, _ := ram.Alloc()
	_, _ = f.WriteAt([]byte("hello"), 0)
	_ = ram.Get(f) // a second user
	_ = ram.Put(f)
	_ = ram.Put(f) // the last reference: the frame is freed

	w, _ := f.Load64(0)
	fmt.Printf("stale read: %#x\n", w)
	fmt.Println("double free refused:", errors.Is(ram.Put(f), physmem.ErrFreed))
	// Output:
	// freeing pfn 0
	// stale read: 0x6b6b6b6b6b6b6b6b
	// double free refused: true
}

// Out of frames is an error, never a panic.
func ExampleAllocator_Alloc() {
	ram, _ := physmem.New(1)
	_, _ = ram.Alloc()
	_, err := ram.Alloc()
	fmt.Println(errors.Is(err, physmem.ErrNoMem))
	// Output: true
}

// The page lock serialises rmap work on one frame.
func ExampleFrame_Lock() {
	ram, _ := physmem.New(1)
	f, _ := ram.Alloc()
	f.Lock()
	fmt.Println("locked:", f.IsLocked(), "trylock:", f.TryLock())
	f.Unlock()
	fmt.Println("locked:", f.IsLocked())
	// Output:
	// locked: true trylock: false
	// locked: false
}
