package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progress shows how a run is going: a bar on a terminal, a plain line
// every few seconds otherwise (a log, a CI job).
type progress interface {
	update(elapsed time.Duration, line string)
	finish()
}

func newProgress(w io.Writer, total time.Duration) progress {
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		bar := progressbar.NewOptions64(total.Milliseconds(),
			progressbar.OptionSetWriter(w),
			progressbar.OptionSetWidth(20),
			progressbar.OptionThrottle(200*time.Millisecond),
			progressbar.OptionSetPredictTime(false),
			progressbar.OptionSetElapsedTime(true),
			progressbar.OptionShowDescriptionAtLineEnd(),
			progressbar.OptionClearOnFinish(),
		)
		return &barProgress{bar: bar}
	}
	return &lineProgress{w: w, every: 5 * time.Second}
}

type barProgress struct{ bar *progressbar.ProgressBar }

func (p *barProgress) update(elapsed time.Duration, line string) {
	p.bar.Describe(line)
	_ = p.bar.Set64(min(elapsed.Milliseconds(), p.bar.GetMax64()))
}

func (p *barProgress) finish() { _ = p.bar.Finish() }

type lineProgress struct {
	w     io.Writer
	every time.Duration
	next  time.Duration
}

func (p *lineProgress) update(elapsed time.Duration, line string) {
	if elapsed < p.next {
		return
	}
	p.next = elapsed + p.every
	fmt.Fprintf(p.w, "%6.1fs  %s\n", elapsed.Seconds(), line)
}

func (p *lineProgress) finish() {}
