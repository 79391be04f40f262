package notifier_test

import (
	"sync"
	"testing"

	"github.com/gomm-dev/gomm/notifier"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type youngAger struct{}

func (youngAger) ClearFlushYoung(notifier.MM, uint64, uint64) bool { return true }
func (youngAger) TestYoung(notifier.MM, uint64) bool               { return false }

type intervalOps struct{}

func (intervalOps) Invalidate(in *notifier.Interval, _ *notifier.Range, seq uint64) bool {
	in.SetSeq(seq)
	return true
}

// TestTracerSeesEveryCallback checks that each callback kind is traced
// once per subscriber that implements it, with its range, and nothing for
// callbacks nobody implements.
func TestTracerSeesEveryCallback(t *testing.T) {
	var mu sync.Mutex
	var calls []notifier.Call
	l := new(notifier.List)
	l.Init(fakeMM(1))
	l.SetTracer(func(c notifier.Call) {
		mu.Lock()
		calls = append(calls, c)
		mu.Unlock()
	})
	rec, dev, age, ivo := &recorder{refuse: true}, &tlbDev{}, youngAger{}, intervalOps{}
	for _, ops := range []any{rec, dev, age} {
		_, err := l.Register(ops)
		require.NoError(t, err)
	}
	l.EnableIntervals()
	_, err := l.Insert(0x1000, 0x1000, ivo)
	require.NoError(t, err)

	r := l.StartRange(0x1000, 0x3000, notifier.EventUnmap, nil)
	l.EndRange(r)
	l.InvalidateSecondaryTLBs(0x1000, 0x2000)
	assert.True(t, l.ClearFlushYoung(0x1000, 0x2000))
	assert.False(t, l.ClearYoung(0x1000, 0x2000), "nobody implements it")
	assert.False(t, l.TestYoung(0x1000))
	refused := notifier.NewRange(fakeMM(1), 0x1000, 0x2000, notifier.EventClear, 0)
	require.ErrorIs(t, l.InvalidateRangeStart(refused), notifier.ErrAgain)
	l.Release()

	type key struct {
		sub any
		cb  notifier.Callback
	}
	got := map[key]int{}
	for _, c := range calls {
		got[key{c.Subscriber, c.Callback}]++
		assert.GreaterOrEqual(t, c.Took, 0*c.Took)
	}
	assert.Equal(t, map[key]int{
		{rec, notifier.CallInvalidateRangeStart}:    2, // the blockable one and the refused one
		{rec, notifier.CallInvalidateRangeEnd}:      1,
		{rec, notifier.CallRelease}:                 1,
		{dev, notifier.CallInvalidateSecondaryTLBs}: 1,
		{age, notifier.CallClearFlushYoung}:         1,
		{age, notifier.CallClearYoung}:              1, // asked, says no
		{age, notifier.CallTestYoung}:               1,
		{ivo, notifier.CallIntervalInvalidate}:      3, // the unmap, the refused clear, the release
	}, got)
	var refusals int
	for _, c := range calls {
		if c.Refused {
			refusals++
			assert.Equal(t, notifier.CallInvalidateRangeStart, c.Callback)
			assert.Equal(t, [2]uint64{0x1000, 0x2000}, [2]uint64{c.Start, c.End})
			assert.False(t, c.Blockable)
		}
	}
	assert.Equal(t, 1, refusals)
	assert.Equal(t, "invalidate_secondary_tlbs", notifier.CallInvalidateSecondaryTLBs.String())
}
