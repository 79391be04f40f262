package physmem

import "sync"

// waitTableBits sizes the hashed table of page-lock wait queues
// (page_wait_table in mm/filemap.c): frames share queues instead of each
// carrying one, and a wake-up of a shared queue is only a spurious wake-up
// for the other frames on it.
const waitTableBits = 8

type waitQueue struct {
	mu   sync.Mutex
	cond sync.Cond
}

var waitTable = func() *[1 << waitTableBits]waitQueue {
	t := new([1 << waitTableBits]waitQueue)
	for i := range t {
		t[i].cond.L = &t[i].mu
	}
	return t
}()

func waitQueueOf(f *Frame) *waitQueue {
	return &waitTable[(f.pfn*0x9e3779b1)>>(32-waitTableBits)]
}
