package notifier

import "time"

// Callback names one kind of subscriber callback, for tracing.
type Callback uint8

// Callback kinds.
const (
	CallRelease Callback = iota
	CallInvalidateRangeStart
	CallInvalidateRangeEnd
	CallInvalidateSecondaryTLBs
	CallClearFlushYoung
	CallClearYoung
	CallTestYoung
	CallIntervalInvalidate // IntervalOps.Invalidate, or IntervalTwoPass.InvalidateStart (its finish is not timed)

	NumCallbacks = int(CallIntervalInvalidate) + 1
)

var callbackNames = [NumCallbacks]string{
	"release", "invalidate_range_start", "invalidate_range_end", "invalidate_secondary_tlbs",
	"clear_flush_young", "clear_young", "test_young", "interval_invalidate",
}

func (c Callback) String() string {
	if int(c) < NumCallbacks {
		return callbackNames[c]
	}
	return "callback?"
}

// Call is one traced callback: who was called, for what, and how long it
// took.
type Call struct {
	Subscriber any // the ops value given to Register, Get or Insert
	Callback   Callback
	Start, End uint64 // the range (for TestYoung, [addr, addr+1))
	Event      Event  // for invalidations; EventRelease for Release
	Blockable  bool
	Refused    bool // a non-blockable start failed with ErrAgain
	Took       time.Duration
}

// Tracer receives every traced call, synchronously, on the goroutine that
// made it: it must be cheap, must not block, and must not call back into
// the list. It is the mmu-notifier tracepoint a profiler hangs on.
type Tracer func(Call)

// SetTracer installs fn to see every callback of the list's subscribers
// and intervals. Call it with Init, before sharing the list. Without a
// tracer a callback costs one extra nil check.
func (l *List) SetTracer(fn Tracer) {
	l.trace = fn
	l.iv.trace = fn
}

// clock returns the time a traced callback starts; zero, at no cost,
// when nobody traces.
func clock(t Tracer) time.Time {
	if t == nil {
		return time.Time{}
	}
	return time.Now()
}

// emit reports a callback that started at t0. Callers test t first, so
// that without a tracer no Call is built.
func emit(t Tracer, t0 time.Time, c Call) {
	c.Took = time.Since(t0)
	t(c)
}
