// Command gomm is gomm's main job: a stress run of the whole MM with every
// example driver attached and the invariant checker on (the default), and
// a runner for the example drivers' demos.
//
//	gomm [stress] [-duration 20s] [-cpus 4] [-procs 8] [-ram 64] [-seed N]
//	              [-drivers kvm,gru,iommu,xpmem,hmm] [-inject 0.001] [-json]
//	gomm demo NAME
//	gomm help
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// errUsage is a command line that could not be understood; the message
// has been printed.
var errUsage = errors.New("usage")

// run is the whole command, for tests: it returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := "stress"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "stress":
		err = stressCommand(ctx, args, stdout, stderr)
	case "demo":
		err = demoCommand(args, stdout, stderr)
	case "help", "-h", "-help", "--help":
		usage(stdout)
		return 0
	default:
		fmt.Fprintf(stderr, "gomm: unknown command %q\n\n", cmd)
		usage(stderr)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintln(stderr, "gomm:", err)
		return 1
	}
}

func usage(w io.Writer) {
	fmt.Fprint(w, `gomm: the Linux MM core in user space, under load.

Commands:
  gomm [stress] [flags]   processes that fork, exit, map, fault, write and verify,
                          protect, advise, remap and unmap memory, while reclaim,
                          KSM and migration run and every example driver works on
                          their memory; the invariant checker is on throughout.
                          Exit status 1 on any checker violation or wrong data.
                          'gomm stress -h' lists the flags.
  gomm demo NAME          run an example driver's demo; NAME is one of:
`)
	for _, d := range demos {
		fmt.Fprintf(w, "                            %-6s %s\n", d.name, d.about)
	}
	fmt.Fprint(w, `  gomm help               this text
`)
}

// demo is an example driver's demo.
type demo struct {
	name, about string
	run         func(w io.Writer) error
}

func demoCommand(args []string, stdout, stderr io.Writer) error {
	if len(args) != 1 {
		fmt.Fprintln(stderr, "usage: gomm demo NAME")
		usage(stderr)
		return errUsage
	}
	i := slices.IndexFunc(demos, func(d demo) bool { return d.name == args[0] })
	if i < 0 {
		fmt.Fprintf(stderr, "gomm: no demo %q\n\n", args[0])
		usage(stderr)
		return errUsage
	}
	return demos[i].run(stdout)
}
