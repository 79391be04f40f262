package main

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const sample = `goos: linux
BenchmarkLookupSeq/gomm-2     1000   4.0 ns/op   4.0 ns/page   0 B/op   0 allocs/op
BenchmarkLookupSeq/gomm-2     1000   6.0 ns/op   6.0 ns/page   0 B/op   0 allocs/op
BenchmarkLookupSeq/gomm-2     1000   5.0 ns/op   5.0 ns/page   0 B/op   0 allocs/op
BenchmarkLookupSeq/gvisor-2   1000  20.0 ns/op  20.0 ns/page   0 B/op   0 allocs/op
BenchmarkLookupSeq/map-2      1000  60.0 ns/op  60.0 ns/page   0 B/op   0 allocs/op
BenchmarkTableMemory/gomm-2      5   1 ns/op   2097152 table-bytes/GiB
BenchmarkTableMemory/gvisor-2    5   1 ns/op   1048576 table-bytes/GiB
BenchmarkOther-2              1000   1.0 ns/op
PASS
`

func TestParseAndPrint(t *testing.T) {
	s, err := parse(strings.NewReader(sample))
	require.NoError(t, err)
	assert.Equal(t, []float64{4, 6, 5}, s["LookupSeq"]["gomm"]["ns/page"])
	assert.NotContains(t, s, "Other", "a benchmark without an implementation name is not compared")

	var out strings.Builder
	print(&out, s)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 4, out.String()) // header, LookupSeq ns/page and allocs/op, TableMemory bytes
	assert.Regexp(t, `LookupSeq\s+ns/page\s+5\.00\s+20\.00\s+60\.00\s+0\.25x`, out.String(), "medians and their ratio")
	assert.Regexp(t, `TableMemory\s+table-bytes/GiB\s+2\.00Mi\s+1\.00Mi\s+-\s+2\.00x`, out.String())
}

func TestParseRejectsBadValues(t *testing.T) {
	_, err := parse(strings.NewReader("BenchmarkMap/gomm-2 10 x ns/op\n"))
	assert.Error(t, err)
}

func TestMedian(t *testing.T) {
	tests := []struct {
		in   []float64
		want float64
		ok   bool
	}{
		{nil, 0, false},
		{[]float64{3}, 3, true},
		{[]float64{4, 1, 3}, 3, true},
		{[]float64{4, 1, 3, 2}, 2.5, true},
	}
	for _, tt := range tests {
		got, ok := median(tt.in)
		assert.Equal(t, tt.ok, ok)
		assert.Equal(t, tt.want, got)
	}
}
