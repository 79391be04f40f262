package main

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/gomm-dev/gomm/internal/testmain"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) { testmain.Run(m) }

func TestHelpAndUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args     []string
		status   int
		inStdout string
		inStderr string
	}{
		{[]string{"help"}, 0, "gomm demo NAME", ""},
		{[]string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{[]string{"demo"}, 2, "", "usage: gomm demo NAME"},
		{[]string{"demo", "nope"}, 2, "", `no demo "nope"`},
		{[]string{"stress", "-duration", "0s"}, 2, "", "-duration must be positive"},
		{[]string{"-cpus", "0"}, 2, "", "-cpus must be 1 to 64"},
		{[]string{"stress", "-drivers", "kvm,nvme"}, 2, "", `unknown driver "nvme"`},
		{[]string{"stress", "-inject", "2"}, 2, "", "-inject must be 0 to 0.5"},
		{[]string{"stress", "-ram", "1"}, 2, "", "-ram must be 16 to 4096"},
		{[]string{"stress", "extra"}, 2, "", `unexpected argument "extra"`},
		{[]string{"stress", "-h"}, 2, "", "-duration"},
	} {
		var out, errOut bytes.Buffer
		status := run(context.Background(), tc.args, &out, &errOut)
		assert.Equal(t, tc.status, status, "%q: %s", tc.args, errOut.String())
		assert.Contains(t, out.String(), tc.inStdout, "%q", tc.args)
		assert.Contains(t, errOut.String(), tc.inStderr, "%q", tc.args)
	}
}

func TestParseStressFlags(t *testing.T) {
	cfg, err := parseStressFlags([]string{"-drivers", "hmm, kvm,hmm", "-seed", "7", "-inject", "0"}, &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, []string{"hmm", "kvm"}, cfg.Drivers)
	assert.Equal(t, uint64(7), cfg.Seed)
	assert.Zero(t, cfg.Inject)
	cfg, err = parseStressFlags([]string{"-drivers", "none"}, &bytes.Buffer{})
	require.NoError(t, err)
	assert.Empty(t, cfg.Drivers)
	assert.NotZero(t, cfg.Seed, "a seed is picked and reported")
	assert.Equal(t, 20*time.Second, cfg.Duration)
}

func TestDemoRuns(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a whole demo")
	}
	var out, errOut bytes.Buffer
	require.Equal(t, 0, run(context.Background(), []string{"demo", "hmm"}, &out, &errOut), errOut.String())
	assert.Contains(t, out.String(), "violations")
}

// TestStressPasses is the main job, short: every driver, injection on,
// a verdict of PASS with work of every kind done and checked.
func TestStressPasses(t *testing.T) {
	cfg := stressConfig{Duration: 3 * time.Second, CPUs: 2, Procs: 4, RAMMiB: 16, Seed: 1,
		Drivers: driverNames, Inject: 0.002}
	rep, err := stress(context.Background(), cfg, &lineProgress{w: &bytes.Buffer{}})
	require.NoError(t, err)
	var table bytes.Buffer
	rep.writeTable(&table)
	require.True(t, rep.Passed, table.String())
	assert.Zero(t, rep.Violations)
	assert.Positive(t, rep.ContentChecks)
	assert.Positive(t, rep.InvariantChecks)
	assert.Positive(t, rep.Injected.Total(), "injection was on")
	for _, o := range rep.Ops {
		switch o.Kind {
		case "load", "store", "mmap", "munmap", "fork", "exit":
			assert.Positive(t, o.Count, o.Kind)
		}
	}
	for _, d := range rep.Devices {
		assert.Positive(t, d.Attaches, d.Driver)
		assert.Positive(t, d.Checks, d.Driver)
	}
	assert.Positive(t, rep.NotifierCalls["invalidate_range_start"])
	assert.Len(t, rep.Latency, len(driverNames), "every driver's invalidations were timed: %+v", rep.Latency)

	var js bytes.Buffer
	require.NoError(t, rep.writeJSON(&js))
	var back map[string]any
	require.NoError(t, json.Unmarshal(js.Bytes(), &back))
	assert.Equal(t, true, back["passed"])
	assert.Contains(t, table.String(), "PASS")
}

// TestStressReportsAFailure: a failure recorded during the run (here a
// planted one) makes the verdict FAIL and is printed in full.
func TestStressReportsAFailure(t *testing.T) {
	cfg := stressConfig{Duration: time.Second, CPUs: 1, Procs: 2, RAMMiB: 16, Seed: 2}
	w, err := newWorld(context.Background(), cfg)
	require.NoError(t, err)
	w.fail("planted failure\nwith context")
	rep, err := w.run(&lineProgress{w: &bytes.Buffer{}})
	require.NoError(t, err)
	assert.False(t, rep.Passed)
	assert.Equal(t, "FAIL: planted failure", rep.Verdict)
	var out bytes.Buffer
	rep.writeTable(&out)
	assert.Contains(t, out.String(), "first failure, in full:\nplanted failure\nwith context")
}
