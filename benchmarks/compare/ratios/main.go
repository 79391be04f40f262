// Command ratios reads the output of the compare benchmarks (one run,
// any -count) and prints, for every benchmark and metric, the median of
// gomm, gVisor and the Go map and the ratio gomm/gVisor.
//
//	go test -run='^$' -bench=. -benchmem -count=6 . | tee compare.txt
//	go run ./ratios compare.txt
//
// With no file it reads standard input.
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
)

// impls are the sub-benchmark names the compare benchmarks use, in the
// order the table shows them.
var impls = []string{"gomm", "gvisor", "map"}

// metrics are the units a ratio is printed for; others are ignored.
var metrics = []string{"ns/page", "table-bytes/GiB", "allocs/op"}

// samples holds every value seen: benchmark -> impl -> unit -> values.
type samples map[string]map[string]map[string][]float64

func main() {
	in := io.Reader(os.Stdin)
	if len(os.Args) > 1 {
		f, err := os.Open(os.Args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		defer f.Close()
		in = f
	}
	s, err := parse(in)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if len(s) == 0 {
		fmt.Fprintln(os.Stderr, "ratios: no compare benchmark results in the input")
		os.Exit(1)
	}
	print(os.Stdout, s)
}

// parse collects the results of lines such as
//
//	BenchmarkLookupSeq/gomm-2   1000000   5.1 ns/op   5.1 ns/page   0 B/op   0 allocs/op
func parse(r io.Reader) (samples, error) {
	s := samples{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || !strings.HasPrefix(fields[0], "Benchmark") {
			continue
		}
		name, impl, ok := strings.Cut(strings.TrimPrefix(fields[0], "Benchmark"), "/")
		if !ok {
			continue
		}
		if i := strings.LastIndexByte(impl, '-'); i >= 0 {
			impl = impl[:i] // the GOMAXPROCS suffix
		}
		if !slices.Contains(impls, impl) {
			continue
		}
		// fields[1] is the iteration count; then value-unit pairs.
		for i := 2; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				return nil, fmt.Errorf("ratios: %q: %w", sc.Text(), err)
			}
			unit := fields[i+1]
			if s[name] == nil {
				s[name] = map[string]map[string][]float64{}
			}
			if s[name][impl] == nil {
				s[name][impl] = map[string][]float64{}
			}
			s[name][impl][unit] = append(s[name][impl][unit], v)
		}
	}
	return s, sc.Err()
}

func median(v []float64) (float64, bool) {
	if len(v) == 0 {
		return 0, false
	}
	v = slices.Sorted(slices.Values(v))
	if len(v)%2 == 1 {
		return v[len(v)/2], true
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2, true
}

func print(w io.Writer, s samples) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "benchmark\tmetric\tgomm\tgvisor\tmap\tgomm/gvisor\t")
	for _, name := range slices.Sorted(func(yield func(string) bool) {
		for n := range s {
			if !yield(n) {
				return
			}
		}
	}) {
		for _, unit := range metrics {
			row := []string{name, unit}
			var med [3]float64
			var have [3]bool
			for i, impl := range impls {
				med[i], have[i] = median(s[name][impl][unit])
				if have[i] {
					row = append(row, format(med[i]))
				} else {
					row = append(row, "-")
				}
			}
			if !have[0] && !have[1] {
				continue
			}
			switch {
			case have[0] && have[1] && med[1] != 0:
				row = append(row, fmt.Sprintf("%.2fx", med[0]/med[1]))
			default:
				row = append(row, "-")
			}
			fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
		}
	}
	tw.Flush()
}

func format(v float64) string {
	switch {
	case v >= 1<<20 && v == float64(int64(v)):
		return fmt.Sprintf("%.2fMi", v/(1<<20))
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	default:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
}
