package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const benchConfig = `
version = 1

[[device]]
name = "zero"
table = "0 2097152 zero"

[[export]]
id = "zero"
device = "zero"
socket = %q
`

// TestBenchBackendKilled: `vhostdm bench` against a back end that is
// killed (SIGKILL, a real child process) mid-run exits non-zero at once
// with the reason, instead of running on with requests that will never
// complete. A run against a live back end succeeds first.
func TestBenchBackendKilled(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "zero.sock")
	cfg := writeConfig(t, dir, fmt.Sprintf(benchConfig, sock))
	child := startChild(t, cfg, sock)

	var out, errb bytes.Buffer
	if code := run([]string{"bench", "--socket", sock, "--duration", "500ms", "--iodepth", "8", "--json"}, &out, &errb); code != 0 {
		t.Fatalf("bench against a live back end: exit %d: %s", code, errb.String())
	}
	var res benchResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil || res.Ops == 0 {
		t.Fatalf("bench result %q: %v", out.String(), err)
	}

	type outcome struct {
		code   int
		stderr string
		took   time.Duration
	}
	done := make(chan outcome, 1)
	start := time.Now()
	go func() {
		var o, e bytes.Buffer
		code := run([]string{"bench", "--socket", sock, "--duration", "20s", "--iodepth", "8"}, &o, &e)
		done <- outcome{code, e.String(), time.Since(start)}
	}()
	time.Sleep(time.Second)
	select {
	case o := <-done:
		t.Fatalf("bench ended before the back end was killed: exit %d: %s", o.code, o.stderr)
	default:
	}
	killed := time.Since(start)
	child.kill(t)
	select {
	case o := <-done:
		t.Logf("bench exited %d %v after the kill: %s", o.code, o.took-killed, strings.TrimSpace(o.stderr))
		if o.code == 0 {
			t.Fatalf("bench exited 0 after its back end was killed")
		}
		if !strings.Contains(o.stderr, "back end closed the vhost-user connection") {
			t.Errorf("bench's error does not say the back end went away: %q", o.stderr)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("bench still running 5 s after its back end was killed (the run is 20 s)")
	}
}

// TestBenchFsync: with --fsync N every request slot sends a FLUSH after
// each N of its writes and waits for it; flushes complete without error
// and are not counted as operations.
func TestBenchFsync(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "zero.sock")
	cfg := writeConfig(t, dir, fmt.Sprintf(benchConfig, sock)+"writable = true\n")
	startChild(t, cfg, sock)
	var out, errb bytes.Buffer
	if code := run([]string{"bench", "--socket", sock, "--rw", "write", "--duration", "300ms", "--iodepth", "4", "--fsync", "2", "--json"}, &out, &errb); code != 0 {
		t.Fatalf("bench --fsync 2: exit %d: %s", code, errb.String())
	}
	var res benchResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatalf("bench result %q: %v", out.String(), err)
	}
	// Each of the 4 slots flushed after every second write: ops/2 in
	// all, less at most one unflushed write per slot.
	if res.Ops < 8 || res.Fsync != 2 || res.Flushes > res.Ops/2 || res.Flushes+4 < res.Ops/2 || res.Errors != 0 {
		t.Fatalf("%d writes, %d flushes (fsync %d), %d errors: want a flush per 2 writes of each slot", res.Ops, res.Flushes, res.Fsync, res.Errors)
	}
	if code := run([]string{"bench", "--socket", sock, "--fsync", "-1"}, &out, &errb); code == 0 {
		t.Fatalf("bench --fsync -1 accepted")
	}
}

// TestBenchReportBestQSD: the report compares vhostdm with the best QSD
// configuration of each row, per run and over the medians, and gives the
// CPU seconds per million requests of every server and their ratio.
func TestBenchReportBestQSD(t *testing.T) {
	dir := t.TempDir()
	var lines []string
	add := func(run int, server string, iops, cpu float64) {
		r := benchResult{RW: "randread", BS: 4096, IODepth: 32, Queues: 1, DurationS: 1, Ops: uint64(iops), IOPS: iops}
		b, _ := json.Marshal(taggedResult{Row: "5", Server: server, Run: run, Result: r, CPUS: cpu, Load1: 1.5})
		lines = append(lines, string(b))
	}
	for run := 1; run <= 3; run++ {
		add(run, "vhostdm", 300000, 0.6)   // 2 CPU-s per million
		add(run, "qsd", 60000, 0.3)        // 5
		add(run, "qsd-uring", 150000, 0.6) // 4: the reference
	}
	path := filepath.Join(dir, "results.jsonl")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := benchReport(path, "", true, &out); err != nil {
		t.Fatal(err)
	}
	var rep benchReportOut
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatal(err)
	}
	var v *reportServer
	for i, s := range rep.Rows[0].Servers {
		if s.Server == "vhostdm" {
			v = &rep.Rows[0].Servers[i]
		}
		if isQSD(s.Server) && s.Ratio != nil {
			t.Errorf("%s has a ratio to QSD", s.Server)
		}
	}
	if v == nil || v.Ratio == nil {
		t.Fatalf("no vhostdm ratio in %s", out.String())
	}
	if v.Ratio.Versus != "qsd-uring" || v.Ratio.IOPS != 2 || v.Ratio.IOPSPaired != 2 || v.CPUPerMReq != 2 || v.Ratio.CPU != 0.5 {
		t.Errorf("vhostdm: %+v, ratio %+v; want versus qsd-uring, IOPS 2, paired 2, CPU 2 s/M, CPU ratio 0.5", *v, *v.Ratio)
	}
	if rep.Loaded != (1.5 > float64(rep.CPUs)) {
		t.Errorf("loaded %v with load 1.5 on %d CPUs", rep.Loaded, rep.CPUs)
	}
}

// TestBenchPacked: `vhostdm bench --packed --verify` drives a vhostdm
// export (a real child process) on packed virtqueues: every read checks
// out, and the back end's log shows the packed rings.
func TestBenchPacked(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "disk.sock")
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := writeConfig(t, dir, fmt.Sprintf(`
version = 1

[[device]]
name = "d"
table = "0 8192 linear %s 0"

[[export]]
id = "d"
device = "d"
socket = %q
num-queues = 2
writable = true
`, img, sock))
	ch := startChild(t, cfg, sock)
	var out, errb bytes.Buffer
	if code := run([]string{"bench", "--socket", sock, "--packed", "--verify", "--rw", "randrw", "--queues", "2",
		"--iodepth", "8", "--duration", "500ms", "--json"}, &out, &errb); code != 0 {
		t.Fatalf("bench --packed: exit %d: %s", code, errb.String())
	}
	var res benchResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil || res.Ops == 0 || res.Errors != 0 || res.Verify != "ok" {
		t.Fatalf("bench --packed result %q: %v", out.String(), err)
	}
	if !strings.Contains(ch.log.String(), "packed virtqueue started") {
		t.Fatalf("the back end started no packed virtqueue:\n%s", ch.log.String())
	}
}
