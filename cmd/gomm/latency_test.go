package main

import (
	"math/rand/v2"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestHistogramBuckets(t *testing.T) {
	for ns := int64(0); ns < 1<<20; ns += 1 + ns/7 {
		b := histBucket(ns)
		assert.LessOrEqual(t, histLow(b), ns, "bucket %d of %d", b, ns)
		assert.Greater(t, histLow(b+1), ns, "bucket %d of %d", b, ns)
	}
	assert.Equal(t, histBuckets-1, histBucket(1<<62), "beyond the range: the last bucket")
}

// TestHistogramPercentiles checks the percentiles against the exact ones
// of a heavy-tailed sample, within the buckets' 1/16 resolution.
func TestHistogramPercentiles(t *testing.T) {
	var h latencyHistogram
	rng := rand.New(rand.NewPCG(1, 2))
	var all []time.Duration
	for range 100000 {
		d := time.Duration(rng.ExpFloat64() * float64(time.Microsecond))
		if rng.IntN(100) == 0 {
			d *= 1000
		}
		all = append(all, d)
		h.record(d)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	s := h.summary()
	assert.Equal(t, uint64(len(all)), s.Count)
	assert.Equal(t, all[len(all)-1], s.Max)
	for _, q := range []struct {
		got time.Duration
		p   float64
	}{{s.P50, 0.50}, {s.P90, 0.90}, {s.P99, 0.99}} {
		want := all[int(q.p*float64(len(all)))-1]
		assert.InEpsilon(t, float64(want), float64(q.got), 1.0/16, "p%.0f", q.p*100)
	}
	var empty latencyHistogram
	assert.Equal(t, latencySummary{}, empty.summary())
}
