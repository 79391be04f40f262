package notifier_test

import (
	"fmt"

	"github.com/gomm-dev/gomm/notifier"
)

type printer struct{}

func (printer) InvalidateRangeStart(r *notifier.Range) error {
	fmt.Println("start", r)
	return nil
}
func (printer) InvalidateRangeEnd(r *notifier.Range) { fmt.Println("end", r.Event) }
func (printer) Release(notifier.MM)                  { fmt.Println("release") }

// A subscriber sees every change of the mm's translations bracketed by
// start and end, and the teardown as one release. (An MM does the
// dispatching; here the list is driven by hand.)
func Example() {
	var l notifier.List
	l.Init(fakeMM(7))
	if _, err := l.Register(printer{}); err != nil {
		panic(err)
	}
	r := notifier.NewRange(fakeMM(7), 0x1000, 0x3000, notifier.EventUnmap, notifier.Blockable)
	if err := l.InvalidateRangeStart(r); err == nil {
		// ... clear the page-table entries, flush, free ...
		l.InvalidateRangeEnd(r)
	}
	l.Release()
	// Output:
	// start unmap [0x1000, 0x3000) blockable=true
	// end unmap
	// release
}

type counter struct{ seen int }

func (c *counter) Invalidate(in *notifier.Interval, r *notifier.Range, cur uint64) bool {
	in.SetSeq(cur) // under the driver's lock, in a real driver
	c.seen++
	return true
}

// The read side of an interval notifier: a snapshot taken between
// ReadBegin and ReadRetry is good only if no invalidation came between.
func ExampleInterval_ReadRetry() {
	var l notifier.List
	l.Init(fakeMM(7))
	c := &counter{}
	in, _ := l.Insert(0x10000, 0x10000, c)

	seq := in.ReadBegin()
	fmt.Println("retry before any change:", in.ReadRetry(seq))

	r := notifier.NewRange(fakeMM(7), 0x18000, 0x19000, notifier.EventClear, notifier.Blockable)
	_ = l.InvalidateRangeStart(r)
	l.InvalidateRangeEnd(r)
	fmt.Println("retry after an intersecting invalidation:", in.ReadRetry(seq), "invalidations seen:", c.seen)
	// Output:
	// retry before any change: false
	// retry after an intersecting invalidation: true invalidations seen: 1
}
