package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
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

// TestBenchThink: with --think each request slot waits after every
// completion, so the run makes at most iodepth requests per think time
// (and, against a zero device, about that many); a negative or too long
// think time is refused.
func TestBenchThink(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "zero.sock")
	cfg := writeConfig(t, dir, fmt.Sprintf(benchConfig, sock))
	startChild(t, cfg, sock)
	var out, errb bytes.Buffer
	if code := run([]string{"bench", "--socket", sock, "--duration", "1s", "--iodepth", "2", "--think", "20ms", "--json"}, &out, &errb); code != 0 {
		t.Fatalf("bench --think 20ms: exit %d: %s", code, errb.String())
	}
	var res benchResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatalf("bench result %q: %v", out.String(), err)
	}
	// 2 slots, each at most one request per 20 ms: 100 a second at most
	// (and the first request of each without a wait).
	if res.ThinkUS != 20000 || res.Ops < 20 || res.Ops > 102 || res.Errors != 0 {
		t.Fatalf("%d requests in %.2f s with think %d µs, %d errors: want 20 to 102", res.Ops, res.DurationS, res.ThinkUS, res.Errors)
	}
	for _, bad := range []string{"-1ms", "1s"} {
		if code := run([]string{"bench", "--socket", sock, "--duration", "1s", "--think", bad}, &out, &errb); code == 0 {
			t.Errorf("bench --think %s --duration 1s accepted", bad)
		}
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

// TestBenchPair: `vhostdm bench --pair` drives two exports of one back end
// (a real child process) in turns: each gets its share of slices and of
// measured time, and the server's CPU time during its slices. Options that
// only make sense with --pair are refused without it.
func TestBenchPair(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	cfg := writeConfig(t, dir, fmt.Sprintf(benchConfig, a)+fmt.Sprintf(`
[[device]]
name = "zero2"
table = "0 2097152 zero"

[[export]]
id = "zero2"
device = "zero2"
socket = %q
`, b))
	ch := startChild(t, cfg, a, b)
	var out, errb bytes.Buffer
	args := []string{"bench", "--socket", a, "--pair", b, "--duration", "600ms", "--slice", "100ms", "--iodepth", "8",
		"--cpu-pid", fmt.Sprint(ch.cmd.Process.Pid), "--json"}
	if code := run(args, &out, &errb); code != 0 {
		t.Fatalf("bench --pair: exit %d: %s", code, errb.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("bench --pair printed %d lines, want one per back end:\n%s", len(lines), out.String())
	}
	var cpu float64
	for i, sock := range []string{a, b} {
		var res benchResult
		if err := json.Unmarshal([]byte(lines[i]), &res); err != nil {
			t.Fatalf("line %d %q: %v", i+1, lines[i], err)
		}
		// 600 ms in turns of 100 ms: 6 slices each, each lasting at
		// least its 100 ms (more on a loaded machine, and while the
		// requests in flight complete).
		if res.Socket != sock || res.Slices != 6 || len(res.SliceIOPS) != 6 || len(res.SliceS) != 6 || res.DurationS < 0.6 || res.DurationS > 3 || res.Ops == 0 || res.Errors != 0 {
			t.Errorf("%s: socket %q, %d slices (%d IOPS figures, %d lengths), %.3f s, %d ops, %d errors; want 6 slices, 600 ms in all", sock, res.Socket, res.Slices, len(res.SliceIOPS), len(res.SliceS), res.DurationS, res.Ops, res.Errors)
		}
		var sum float64
		for j, sec := range res.SliceS {
			if sec < 0.1 || res.SliceIOPS[j] <= 0 {
				t.Errorf("%s: slice %d: %.6f s at %.0f IOPS; want at least 100 ms with requests", sock, j, sec, res.SliceIOPS[j])
			}
			sum += sec
		}
		if math.Abs(sum-res.DurationS) > 0.002 {
			t.Errorf("%s: slices last %.6f s in all, the result says %.3f s", sock, sum, res.DurationS)
		}
		cpu += res.ServerCPUS
	}
	if cpu <= 0 {
		t.Errorf("no server CPU time measured over the slices")
	}
	for _, bad := range [][]string{
		{"bench", "--socket", a, "--slice", "100ms"},
		{"bench", "--socket", a, "--cpu-pid", "1"},
		{"bench", "--socket", a, "--pair", b, "--slice", "0s"},
		{"bench", "--socket", a, "--pair", b, "--duration", "1s", "--slice", "2s"},
	} {
		if code := run(bad, &out, &errb); code == 0 {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestBenchReportTable1000: the report compares row 5's 1000-line and
// one-line tables in every run (the ratio of the sums of each one's
// slices, IOPS and CPU per request) and over all runs, says whether every
// run is within 3%, and fails the goal when one run is not; the control
// pair of two one-line tables is compared the same way.
func TestBenchReportTable1000(t *testing.T) {
	report := func(thousand, control []float64) (benchReportOut, string) {
		t.Helper()
		var lines []string
		add := func(run int, server string, iops, cpu float64) {
			// 5 s of slices: ops = iops*5, server CPU over them.
			r := benchResult{RW: "randread", BS: 4096, IODepth: 32, Queues: 1, DurationS: 5, Ops: uint64(iops * 5), IOPS: iops,
				Slices: 20, ServerCPUS: cpu * 5}
			b, _ := json.Marshal(taggedResult{Row: "5", Server: server, Run: run, Result: r, Load1: 1})
			lines = append(lines, string(b))
		}
		for i, iops := range thousand {
			add(i+1, "vhostdm", 100000, 0.6)
			add(i+1, "vhostdm-1000", iops, 0.6*iops/100000*1.01)
		}
		for i, iops := range control {
			add(i+1, "vhostdm-ctl", 100000, 0.6)
			add(i+1, "vhostdm-ctl2", iops, 0.6*iops/100000)
		}
		path := filepath.Join(t.TempDir(), "results.jsonl")
		if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		var js, text bytes.Buffer
		if err := benchReport(path, "", true, &js); err != nil {
			t.Fatal(err)
		}
		if err := benchReport(path, "", false, &text); err != nil {
			t.Fatal(err)
		}
		var rep benchReportOut
		if err := json.Unmarshal(js.Bytes(), &rep); err != nil {
			t.Fatal(err)
		}
		return rep, text.String()
	}
	rep, text := report([]float64{99000, 101000, 98000}, []float64{100000, 100500, 99000})
	c := rep.Table1000
	if c == nil || len(c.Runs) != 3 || c.Within == nil || !*c.Within {
		t.Fatalf("three runs within 3%%: %+v", c)
	}
	for i, want := range []float64{0.99, 1.01, 0.98} {
		pr := c.Runs[i]
		if pr.Run != i+1 || !pr.Paired || pr.IOPS != want || pr.CPU != 1.01 {
			t.Errorf("run %d: %+v, want IOPS ratio %.2f, CPU ratio 1.01, paired", i+1, pr, want)
		}
	}
	// The ratio of the sums: (99000+101000+98000)/3 over 100000.
	if c.IOPS != 0.993 || c.CPU != 1.01 {
		t.Errorf("all runs: IOPS ratio %v, CPU ratio %v; want 0.993 and 1.01", c.IOPS, c.CPU)
	}
	if rep.Control == nil || rep.Control.IOPS != 0.998 || len(rep.Control.Runs) != 3 {
		t.Errorf("control: %+v, want 3 runs, IOPS ratio 0.998", rep.Control)
	}
	for _, want := range []string{
		"row 5: 1000-line table / one-line table IOPS = 0.990 (run 1, paired), CPU per request = 1.010 (6.06 / 6.00 CPU-s/M req)",
		"row 5: 1000-line table / one-line table IOPS = 0.993 (all runs, ratio of the sums), CPU per request = 1.010",
		"row 5 control: a second one-line table / one-line table IOPS = 1.005 (run 2, paired)",
		"within 3% of 1 (0.97 to 1.03): met\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("report lacks %q:\n%s", want, text)
		}
	}
	// One run below 0.97 (or above 1.03) misses the goal, whatever the
	// others and the sums say; a control outside 3% is pointed out.
	for _, runs := range [][]float64{{100000, 96000, 100000}, {100000, 104000, 100000}} {
		rep, text = report(runs, []float64{100000, 95000})
		if rep.Table1000.Within == nil || *rep.Table1000.Within || !strings.Contains(text, "(0.97 to 1.03): MISSED (the control pair") {
			t.Errorf("runs %v: the goal is not missed, or the control not pointed out:\n%s", runs, text)
		}
	}
}

// TestBenchRPOSample: --rpo-qmp samples query-repagent over one QMP
// connection during the run and reports the largest RPO; a socket that
// does not answer query-repagent with an RPO fails the run before it
// starts, and the flags are checked.
func TestBenchRPOSample(t *testing.T) {
	dir := t.TempDir()
	_, addr := startTestHub(t, filepath.Join(dir, "store"))
	os.WriteFile(filepath.Join(dir, "root.img"), reptest.Pattern(1, 4<<20), 0o600)
	path := writeConfig(t, dir, fmt.Sprintf(reloadRepConfig, addr, "protect = true\n"))
	serveInProcess(t, path)
	sock, qmpSock := filepath.Join(dir, "root.sock"), filepath.Join(dir, "qmp.sock")

	var out, errb bytes.Buffer
	start := time.Now()
	if code := run([]string{"bench", "--socket", sock, "--rw", "randwrite", "--iodepth", "8", "--duration", "600ms",
		"--rpo-qmp", qmpSock, "--rpo-interval", "50ms", "--json"}, &out, &errb); code != 0 {
		t.Fatalf("bench --rpo-qmp: exit %d: %s", code, errb.String())
	}
	elapsed := time.Since(start)
	var res benchResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatalf("bench result %q: %v", out.String(), err)
	}
	// One sample at the start and one per 50 ms until the run ends (its
	// 600 ms and the connection's set-up); a loaded machine may delay
	// ticks (a late tick is not repeated).
	if res.MaxRPOS == nil {
		t.Fatalf("no max_rpo_s in %s", out.String())
	}
	if most := int(elapsed/(50*time.Millisecond)) + 1; res.RPOSamples < 4 || res.RPOSamples > most {
		t.Fatalf("max_rpo_s %v from %d samples in %v: want 4 to %d samples", *res.MaxRPOS, res.RPOSamples, elapsed, most)
	}
	if r := *res.MaxRPOS; r < 0 || r > 5 || math.IsNaN(r) {
		t.Fatalf("max_rpo_s %v with the hub on loopback", r)
	}
	if res.Ops == 0 || res.Errors != 0 {
		t.Fatalf("%d writes, %d errors", res.Ops, res.Errors)
	}

	// A socket that is not vhostdm's QMP fails the run, and so do flags
	// that do not go together.
	for name, args := range map[string][]string{
		"not qmp":             {"--rpo-qmp", sock},
		"no socket":           {"--rpo-qmp", filepath.Join(dir, "none.sock")},
		"interval alone":      {"--rpo-interval", "1s"},
		"interval too short":  {"--rpo-qmp", qmpSock, "--rpo-interval", "1us"},
		"with --pair":         {"--rpo-qmp", qmpSock, "--pair", sock},
		"interval > duration": {"--rpo-qmp", qmpSock, "--rpo-interval", "2s"},
	} {
		out.Reset()
		errb.Reset()
		args = append([]string{"bench", "--socket", sock, "--rw", "randwrite", "--duration", "1s"}, args...)
		if code := run(args, &out, &errb); code == 0 {
			t.Errorf("%s: bench %q succeeded", name, args)
		} else if !strings.Contains(errb.String(), "--rpo") && !strings.Contains(errb.String(), "--pair") {
			t.Errorf("%s: error %q does not name the flag", name, errb.String())
		}
		if out.Len() != 0 {
			t.Errorf("%s: a failed run printed a result: %s", name, out.String())
		}
	}
}

// TestBenchPairSameBlocks: reseeded alike, the request slots of two
// benches pick the same blocks, slot by slot, so that the two back ends of
// a --pair run read the same offsets in consecutive slices; another seed
// picks others.
func TestBenchPairSameBlocks(t *testing.T) {
	picks := func(seed uint64) [][]uint64 {
		b := &bench{rw: "randread", bs: 4096, iodepth: 4, queues: 2, blocks: 1 << 20}
		b.makeSlots(func(int) ([]byte, error) { return nil, nil })
		b.reseed(seed)
		var out [][]uint64
		for _, qs := range b.slots {
			for _, s := range qs {
				var blks []uint64
				for range 16 {
					blks = append(blks, b.pick(s))
				}
				out = append(out, blks)
			}
		}
		return out
	}
	a, b, other := picks(7), picks(7), picks(8)
	if len(a) != 8 || fmt.Sprint(a) != fmt.Sprint(b) {
		t.Errorf("two benches reseeded alike picked different blocks:\n%v\n%v", a, b)
	}
	if fmt.Sprint(a[0]) == fmt.Sprint(a[1]) || fmt.Sprint(a[0]) == fmt.Sprint(a[4]) {
		t.Errorf("two slots picked the same blocks: %v", a)
	}
	if fmt.Sprint(a) == fmt.Sprint(other) {
		t.Errorf("seeds 7 and 8 picked the same blocks")
	}
}

// TestBenchReportQuartets: with each slice's IOPS and length, a paired
// run's ratio is the median over its quartets of slices (A B B A) of the
// quartet's IOPS ratio, so that a quartet that other tenants of the
// machine disturbed does not move it, while the ratio of the sums is still
// reported; the comparison is symmetric (swapping the two servers inverts
// it).
func TestBenchReportQuartets(t *testing.T) {
	report := func(first, second string, a, b []float64) pairComparison {
		t.Helper()
		var lines []string
		add := func(server string, iops []float64) {
			r := benchResult{RW: "randread", BS: 4096, IODepth: 32, Queues: 1, Slices: len(iops)}
			for _, v := range iops {
				r.SliceIOPS = append(r.SliceIOPS, v)
				r.SliceS = append(r.SliceS, 0.01)
				r.Ops += uint64(v * 0.01)
				r.DurationS += 0.01
			}
			r.IOPS = float64(r.Ops) / r.DurationS
			js, _ := json.Marshal(taggedResult{Row: "5", Server: server, Run: 1, Result: r, Load1: 1})
			lines = append(lines, string(js))
		}
		add(first, a)
		add(second, b)
		path := filepath.Join(t.TempDir(), "results.jsonl")
		if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		var js bytes.Buffer
		if err := benchReport(path, "", true, &js); err != nil {
			t.Fatal(err)
		}
		var rep benchReportOut
		if err := json.Unmarshal(js.Bytes(), &rep); err != nil {
			t.Fatal(err)
		}
		if rep.Control == nil || len(rep.Control.Runs) != 1 {
			t.Fatalf("no control comparison: %+v", rep.Control)
		}
		return *rep.Control
	}
	// Five quartets (10 slices each): the second server at 1.01 of the
	// first in four, the third quartet's second half hit by another
	// tenant (the first server's slice at a fifth of its rate).
	a := []float64{100000, 100000, 100000, 100000, 100000, 20000, 100000, 100000, 100000, 100000}
	b := []float64{101000, 101000, 101000, 101000, 101000, 101000, 101000, 101000, 101000, 101000}
	c := report("vhostdm-ctl", "vhostdm-ctl2", a, b)
	pr := c.Runs[0]
	if pr.Quartets != 5 || pr.IOPS != 1.01 || !pr.Paired || c.IOPS != 1.01 || c.Quartets != 5 {
		t.Errorf("run %+v, all runs %+v; want the median of 5 quartets, 1.01", pr, c)
	}
	if want := ratio(1010000/10, 920000/10); pr.IOPSSums != want || c.IOPSSums != want {
		t.Errorf("ratio of the sums %v (all runs %v), want %v", pr.IOPSSums, c.IOPSSums, want)
	}
	if inv := report("vhostdm-ctl2", "vhostdm-ctl", a, b).Runs[0]; inv.IOPS != ratio(1, 1.01) {
		t.Errorf("swapped: %+v, want IOPS %v", inv, ratio(1, 1.01))
	}
	// Slices that do not form whole quartets (odd, or unequal counts):
	// the ratio of the sums.
	if pr := report("vhostdm-ctl", "vhostdm-ctl2", a[:9], b[:9]).Runs[0]; pr.Quartets != 0 || pr.IOPS != pr.IOPSSums {
		t.Errorf("odd slices: %+v, want the ratio of the sums", pr)
	}
}
