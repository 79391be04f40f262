package main

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

// latencyHistogram counts durations in log-linear buckets: 16 buckets per
// power of two of nanoseconds, so a percentile is within 1/16 (6%) of
// the truth, from 1 ns to about 9 s; longer ones land in the last bucket.
// Recording is two atomic adds, safe from any goroutine.
type latencyHistogram struct {
	buckets [histBuckets]atomic.Uint64
	count   atomic.Uint64
	max     atomic.Int64 // ns
	sum     atomic.Int64 // ns
}

const (
	histSubBits = 4
	histSub     = 1 << histSubBits
	histBuckets = 34 * histSub
)

func histBucket(ns int64) int {
	if ns < histSub {
		return int(max(ns, 0))
	}
	exp := bits.Len64(uint64(ns)) - 1 // ns in [2^exp, 2^(exp+1))
	sub := int(ns>>(exp-histSubBits)) - histSub
	return min((exp-histSubBits+1)*histSub+sub, histBuckets-1)
}

// histLow is the smallest duration in bucket b.
func histLow(b int) int64 {
	if b < histSub {
		return int64(b)
	}
	exp := b/histSub + histSubBits - 1
	return int64(histSub+b%histSub) << (exp - histSubBits)
}

func (h *latencyHistogram) record(d time.Duration) {
	ns := int64(d)
	h.buckets[histBucket(ns)].Add(1)
	h.count.Add(1)
	h.sum.Add(ns)
	for {
		m := h.max.Load()
		if ns <= m || h.max.CompareAndSwap(m, ns) {
			return
		}
	}
}

// latencySummary is what the report shows of a histogram.
type latencySummary struct {
	Count                    uint64
	Mean, P50, P90, P99, Max time.Duration
}

func (h *latencyHistogram) summary() latencySummary {
	var counts [histBuckets]uint64
	var n uint64
	for i := range counts {
		counts[i] = h.buckets[i].Load()
		n += counts[i]
	}
	s := latencySummary{Count: n, Max: time.Duration(h.max.Load())}
	if n == 0 {
		return s
	}
	s.Mean = time.Duration(h.sum.Load() / int64(n))
	quantile := func(q float64) time.Duration {
		rank := uint64(math.Ceil(q * float64(n)))
		var seen uint64
		for b, c := range counts {
			seen += c
			if seen >= rank {
				// The bucket's midpoint, capped by the largest seen.
				lo, hi := histLow(b), histLow(b+1)
				return min(time.Duration(lo+(hi-lo)/2), s.Max)
			}
		}
		return s.Max
	}
	s.P50, s.P90, s.P99 = quantile(0.50), quantile(0.90), quantile(0.99)
	return s
}
