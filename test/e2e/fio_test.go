package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// fioRuntime is each fio job's measured run time in seconds (fio adds one
// second of ramp).
const fioRuntime = 5

// fioResult is one fio job on one back end: fio's figures, the requests
// the guest sent and the back end's host CPU time over the job.
type fioResult struct {
	*proto.FioJob
	// CPUSeconds is the back end's utime+stime, all threads, from the
	// guest's start line of the job to its end line.
	CPUSeconds float64 `json:"cpu_s"`
	// WindowSeconds is the wall time between those two lines.
	WindowSeconds float64 `json:"window_s"`
}

// cpuPerMReq returns CPU-seconds per million requests the back end
// served (the guest block layer's count, one per virtio request).
func (r fioResult) cpuPerMReq() float64 {
	if n := r.Block.Requests(); n > 0 {
		return r.CPUSeconds / float64(n) * 1e6
	}
	return 0
}

// ios returns the number of the job's I/Os (of its block size) the window's
// bytes make: fio's requests, whichever way the guest split them into
// virtio requests (its limits depend on the back end's seg_max and
// max size).
func (r fioResult) ios() float64 {
	bs := int64(4 << 10)
	switch strings.ToLower(r.BS) {
	case "4k":
	case "1m":
		bs = 1 << 20
	default:
		return 0
	}
	return float64((r.Block.ReadSectors+r.Block.WriteSectors)*512) / float64(bs)
}

// cpuPerMIO returns CPU-seconds per million fio I/Os, the figure that
// compares back ends whatever the size of their virtio requests.
func (r fioResult) cpuPerMIO() float64 {
	if n := r.ios(); n > 0 {
		return r.CPUSeconds / n * 1e6
	}
	return 0
}

// fioRun is one back end's fio figures.
type fioRun struct {
	Backend string       `json:"backend"`
	Boot    string       `json:"boot"`
	Jobs    []*fioResult `json:"jobs"`
}

// cpuWindow samples a back end's CPU time when the guest reports the start
// and the end of each fio job (events "start" and "end"), and with
// $VHOSTDM_E2E_FIO_PERF profiles the back end over each job.
type cpuWindow struct {
	p       *harness.Process
	backend string
	disk    string // the guest's name of the back end's disk (vda, ...)
	perfDir string // "": no profiles

	mu    sync.Mutex
	start map[string]sample
	span  map[string][2]sample
	errs  []error
	perf  *exec.Cmd   // the running profile, nil if none
	perfs []*exec.Cmd // stopped profiles, to wait for
}

type sample struct {
	cpu time.Duration
	at  time.Duration // since QEMU started
}

// onEvent is the VM's OnEvent hook; it runs on the console reader.
func (w *cpuWindow) onEvent(ev harness.Event) {
	if ev.Kind != harness.EventResult || ev.Result == nil || ev.Result.Step != proto.StepFio || ev.Result.Fio == nil ||
		ev.Result.Disk != w.disk {
		return
	}
	cpu, err := w.p.CPUTime()
	w.mu.Lock()
	defer w.mu.Unlock()
	name := ev.Result.Fio.Name
	if err != nil {
		w.errs = append(w.errs, fmt.Errorf("job %s: %w", name, err))
		return
	}
	s := sample{cpu: cpu, at: ev.At}
	switch ev.Result.Event {
	case "start":
		w.start[name] = s
		w.startPerf(name)
	case "end":
		w.stopPerf()
		if s0, ok := w.start[name]; ok {
			w.span[name] = [2]sample{s0, s}
		} else {
			w.errs = append(w.errs, fmt.Errorf("job %s: end line without a start line", name))
		}
	}
}

// startPerf starts `perf record` on the back end for one job: CPU samples
// with call graphs (frame pointers) and every system call's entry without.
func (w *cpuWindow) startPerf(job string) {
	if w.perfDir == "" {
		return
	}
	out := filepath.Join(w.perfDir, w.backend+"-"+job+".perf.data")
	cmd := exec.Command("perf", "record", "-q", "-o", out, "-p", fmt.Sprint(w.p.Pid()),
		"-e", "cpu-clock/call-graph=fp/", "-e", "raw_syscalls:sys_enter/call-graph=no/")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		w.errs = append(w.errs, fmt.Errorf("%s (%s=%s; perf is in the Debian package linux-perf): %w",
			cmd, fioPerfEnv, w.perfDir, err))
		return
	}
	w.perf = cmd
}

// stopPerf stops the running profile without waiting for perf to write it.
func (w *cpuWindow) stopPerf() {
	if w.perf != nil {
		w.perf.Process.Signal(os.Interrupt)
		w.perfs = append(w.perfs, w.perf)
		w.perf = nil
	}
}

// waitPerf waits for the profiles to be written.
func (w *cpuWindow) waitPerf(t *testing.T) {
	w.stopPerf()
	for _, c := range w.perfs {
		err := c.Wait()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGINT {
				err = nil // how perf record ends when told to
			}
		}
		if err != nil {
			t.Logf("%s: %v", c, err)
		}
	}
	if w.perfDir != "" {
		t.Logf("%s: perf profiles of each job in %s/%s-*.perf.data", w.backend, w.perfDir, w.backend)
	}
}

// fioPerfEnv names the environment variable that, set to a directory,
// makes TestFioVhostdmVsQSD record a perf profile of each back end over
// each fio job there (which perturbs the CPU figures it reports).
const fioPerfEnv = "VHOSTDM_E2E_FIO_PERF"

// newCPUWindow returns the CPU window of back end p serving the guest's
// disk.
func newCPUWindow(p *harness.Process, backend, disk string) *cpuWindow {
	return &cpuWindow{p: p, backend: backend, disk: disk, perfDir: os.Getenv(fioPerfEnv),
		start: map[string]sample{}, span: map[string][2]sample{}}
}

// fioSteps returns the guest steps that run each fio job on every disk in
// turn, the order of the disks alternating from job to job (ABBA), so that
// drift in the machine's load falls on every back end alike; then the
// verify step on each disk.
func fioSteps(disks []string) []string {
	var steps []string
	for i, spec := range proto.FioJobs {
		for k := range disks {
			d := disks[k]
			if i%2 == 1 {
				d = disks[len(disks)-1-k]
			}
			steps = append(steps, proto.StepFio+"/"+spec.Name+"@"+d)
		}
	}
	for _, d := range disks {
		steps = append(steps, proto.StepVerify+"@"+d)
	}
	return steps
}

// runFio boots one guest with a disk per back end (the windows' disks, in
// order), runs the fio jobs interleaved and the verify step (seed) on each
// disk, and returns every back end's jobs with its CPU time over each.
func runFio(t *testing.T, e *harness.Env, ws []*cpuWindow, disks []harness.Disk, seed uint64) []fioRun {
	t.Helper()
	var names []string
	for _, w := range ws {
		names = append(names, w.disk)
	}
	params := seedParams(seed, fioCoverage, fioMaxBlocks)
	params[proto.ParamFioRuntime] = fmt.Sprint(fioRuntime)
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disks,
		Steps:  fioSteps(names),
		Fio:    true,
		Params: params,
		OnEvent: func(ev harness.Event) {
			for _, w := range ws {
				w.onEvent(ev)
			}
		},
	})
	var runs []fioRun
	for _, w := range ws {
		runs = append(runs, w.collect(t, run))
	}
	return runs
}

// collect returns the back end's jobs from the guest's results with its
// CPU time over each, and checks them (checkFioJob).
func (w *cpuWindow) collect(t *testing.T, run *harness.Run) fioRun {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.waitPerf(t)
	for _, err := range w.errs {
		t.Errorf("%s: CPU time of %s: %v", w.backend, w.p.Name, err)
	}
	fr := fioRun{Backend: w.backend, Boot: run.BootTime.Round(time.Millisecond).String()}
	for _, r := range run.Results {
		if r.Step != proto.StepFio || r.Fio == nil || r.Disk != w.disk {
			continue
		}
		j := &fioResult{FioJob: r.Fio}
		if s, ok := w.span[j.Name]; ok {
			j.CPUSeconds = (s[1].cpu - s[0].cpu).Seconds()
			j.WindowSeconds = (s[1].at - s[0].at).Seconds()
		} else {
			t.Errorf("%s: job %s: no CPU window (start and end lines)", w.backend, j.Name)
		}
		checkFioJob(t, w.backend, j, time.Duration(r.MS)*time.Millisecond)
		fr.Jobs = append(fr.Jobs, j)
	}
	if len(fr.Jobs) != len(proto.FioJobs) {
		t.Errorf("%s: %d fio jobs reported on %s, want %d", w.backend, len(fr.Jobs), w.disk, len(proto.FioJobs))
	}
	return fr
}

// checkFioJob checks what must hold whatever the machine's speed: the job
// did I/O, the guest's block layer sent at least the requests fio counted
// (fio leaves out its ramp second), the window spans the job (at least
// its run time, at most the guest's wall time of the job plus the
// console's lag), and the back end used CPU in it.
func checkFioJob(t *testing.T, backend string, j *fioResult, wall time.Duration) {
	t.Helper()
	ios := j.IOPS * j.RuntimeS
	sent := j.Block.Reads
	if strings.Contains(j.RW, "write") {
		sent = j.Block.Writes
	}
	switch {
	case j.IOPS <= 0 || j.BWKiBps <= 0:
		t.Errorf("%s: job %s: %.0f IOPS, %d KiB/s", backend, j.Name, j.IOPS, j.BWKiBps)
	case float64(sent) < 0.95*ios:
		t.Errorf("%s: job %s: the guest's block layer sent %d %s requests in the job's window, fio counted %.0f I/Os",
			backend, j.Name, sent, j.RW, ios)
	case j.WindowSeconds < j.RuntimeS || j.WindowSeconds > (wall+5*time.Second).Seconds():
		t.Errorf("%s: job %s: CPU window %.2f s does not match the job (%.2f s of fio, %v in the guest)",
			backend, j.Name, j.WindowSeconds, j.RuntimeS, wall)
	case j.Block.Interrupts <= 0:
		t.Errorf("%s: job %s: the guest counted no interrupts from the disk for %d requests", backend, j.Name, j.Block.Requests())
	case j.CPUSeconds <= 0:
		t.Errorf("%s: job %s: the back end used no CPU time (%.2f s) for %d requests", backend, j.Name, j.CPUSeconds, j.Block.Requests())
	}
}

// The verify step after the fio jobs writes this much of the disk
// (percent, longest extent in 4 KiB blocks); the host checks it.
const fioCoverage, fioMaxBlocks = 5, 64

// TestFioVhostdmVsQSD runs the same fio jobs (4k random read and write at
// QD16, 1 MiB sequential read and write at QD4, direct=1) in one guest
// through qemu-storage-daemon (aio=io_uring, its fastest buffered file
// mode; disk vda) and through vhostdm (vdb), each job on one disk and then
// the other (the order alternating from job to job), over two identical
// pre-filled images, with each back end's host CPU time over each job. It
// logs both sets of figures and their ratios with the machine's load (and
// writes them as JSON to $VHOSTDM_E2E_FIO_JSON or
// $TMPDIR/vhostdm-e2e-fio.json). After the jobs the guest writes a verify
// plan through each back end, which the host checks in the images.
//
// It asserts that every job ran without error, that both back ends were
// measured (CPU time and requests in every job's window) and that the
// data landed, never a speed: on a shared machine running a TCG guest the
// speeds are noise across runs; compare within one run only.
func TestFioVhostdmVsQSD(t *testing.T) {
	e := needEnv(t)
	if e.Fio == "" {
		t.Fatalf("fio not found in PATH: %s", harness.SetupHint)
	}
	const size, seed = 128 << 20, 2201
	loadBefore, err := harness.LoadAvg()
	if err != nil {
		t.Fatal(err)
	}
	dir, sd := t.TempDir(), sockDir(t)
	// Fill the images first so both back ends read allocated (and, on
	// this host, cached) data, not holes, and overwrite allocated blocks.
	// Each back end has its own copy (QSD locks its image).
	fill := make([]byte, size)
	pattern.Fill(fill, 77, 0)
	qsdImg, vdmImg := filepath.Join(dir, "qsd.img"), filepath.Join(dir, "vhostdm.img")
	for _, img := range []string{qsdImg, vdmImg} {
		if err := os.WriteFile(img, fill, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	qsdSock := filepath.Join(sd, "qsd.sock")
	qsd := startQSD(t, e, []harness.QSDExport{{ID: "e0", Image: qsdImg, Socket: qsdSock, NumQueues: 1, Writable: true, AIO: "io_uring"}}, "")
	cfg := &harness.Config{
		Devices: []harness.DeviceConfig{{Name: "fio", Table: fmt.Sprintf("0 %d linear %s 0", size/512, vdmImg)}},
		Exports: []harness.ExportConfig{{ID: "fio0", Device: "fio", Socket: filepath.Join(sd, "vdm.sock"),
			NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "fio"}},
	}
	vdm := startVhostdm(t, e, writeConfig(t, dir, cfg))
	runs := runFio(t, e,
		[]*cpuWindow{newCPUWindow(qsd, "qemu-storage-daemon", "vda"), newCPUWindow(vdm, "vhostdm", "vdb")},
		[]harness.Disk{{Socket: qsdSock, NumQueues: 1}, {Socket: cfg.Exports[0].Socket, NumQueues: 1}}, seed)
	checkNoRenotify(t, vdm)
	qsd.Stop()
	vdm.Stop()
	for _, img := range []string{qsdImg, vdmImg} {
		data, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		if len(data) != size {
			t.Errorf("%s is %d bytes after the run, want %d", img, len(data), size)
		}
		for _, err := range harness.CheckPlan(data, harness.PlanCheck{Seed: seed, Coverage: fioCoverage, MaxBlocks: fioMaxBlocks}) {
			t.Errorf("host check of the verify plan written after fio in %s: %v", filepath.Base(img), err)
		}
	}
	loadAfter, err := harness.LoadAvg()
	if err != nil {
		t.Fatal(err)
	}
	t.Log(fioReport(runs, loadBefore, loadAfter))
	out := os.Getenv("VHOSTDM_E2E_FIO_JSON")
	if out == "" {
		out = filepath.Join(os.TempDir(), "vhostdm-e2e-fio.json")
	}
	js, _ := json.MarshalIndent(map[string]any{
		"time": time.Now().UTC().Format(time.RFC3339), "load_before": loadBefore, "load_after": loadAfter, "runs": runs,
	}, "", "  ")
	if err := os.WriteFile(out, js, 0o644); err != nil {
		t.Errorf("write %s: %v", out, err)
	} else {
		t.Logf("fio figures written to %s", out)
	}
}

// fioReport formats the runs as a table and, when both back ends ran,
// the ratios vhostdm / QSD per job.
func fioReport(runs []fioRun, before, after [3]float64) string {
	var b strings.Builder
	fmt.Fprintf(&b, "fio in one TCG guest (1 vCPU, direct=1, %d s per job after 1 s ramp), a disk per back end over identical pre-filled images,\n", fioRuntime)
	fmt.Fprintf(&b, "each job on one back end then the other (order alternating); QSD with aio=io_uring.\n")
	fmt.Fprintf(&b, "Host load average %.2f %.2f %.2f before, %.2f %.2f %.2f after", before[0], before[1], before[2], after[0], after[1], after[2])
	if n := float64(runtime.NumCPU()); max(before[0], after[0]) > n {
		fmt.Fprintf(&b, " (LOADED: above the %d CPUs)", int(n))
	}
	fmt.Fprintf(&b, "; the CPUs are shared, so compare within one run only.\n")
	fmt.Fprintf(&b, "CPU s: the back end's utime+stime over the job (ramp included); requests: the guest's block-layer (virtio) requests in that window;\n")
	fmt.Fprintf(&b, "CPU s/M I/O: per million I/Os of the job's size in that window (the guest splits 1 MiB I/Os by the back end's limits).\n")
	fmt.Fprintf(&b, "irq/req: the guest's interrupts from the disk's virtio device per request in the job (the back end's calls that reached it).\n")
	fmt.Fprintf(&b, "%-20s %-13s %-7s %8s %8s %8s %8s %9s %7s %6s %6s %10s %11s %7s\n", "back end", "job", "engine", "IOPS", "MiB/s",
		"lat us", "p99 us", "requests", "KiB/req", "CPU s", "CPU %", "CPU s/Mreq", "CPU s/M I/O", "irq/req")
	for _, r := range runs {
		for _, j := range r.Jobs {
			kib := 0.0
			if n := j.Block.Requests(); n > 0 {
				kib = float64(j.Block.ReadSectors+j.Block.WriteSectors) / 2 / float64(n)
			}
			pct := 0.0
			if j.WindowSeconds > 0 {
				pct = 100 * j.CPUSeconds / j.WindowSeconds
			}
			irq := 0.0
			if n := j.Block.Requests(); n > 0 {
				irq = float64(j.Block.Interrupts) / float64(n)
			}
			fmt.Fprintf(&b, "%-20s %-13s %-7s %8.0f %8.1f %8.0f %8.0f %9d %7.1f %6.2f %6.1f %10.1f %11.1f %7.2f\n", r.Backend, j.Name, j.Engine,
				j.IOPS, float64(j.BWKiBps)/1024, j.LatMeanU, j.LatP99U, j.Block.Requests(), kib, j.CPUSeconds, pct, j.cpuPerMReq(), j.cpuPerMIO(), irq)
		}
	}
	var qsd, vdm *fioRun
	for i := range runs {
		switch runs[i].Backend {
		case "qemu-storage-daemon":
			qsd = &runs[i]
		case "vhostdm":
			vdm = &runs[i]
		}
	}
	if qsd == nil || vdm == nil {
		return b.String()
	}
	fmt.Fprintf(&b, "vhostdm / QSD (goal: IOPS >= 1, CPU s per run <= 1; the runs are timed, so CPU per I/O is the like-for-like cost):\n%-13s %8s %10s %12s %12s\n",
		"job", "IOPS", "CPU s/run", "CPU s/Mreq", "CPU s/M I/O")
	ratio := func(a, b float64) string {
		if b <= 0 {
			return "-"
		}
		return fmt.Sprintf("%.2fx", a/b)
	}
	for _, v := range vdm.Jobs {
		for _, q := range qsd.Jobs {
			if q.Name == v.Name {
				fmt.Fprintf(&b, "%-13s %8s %10s %12s %12s\n", v.Name, ratio(v.IOPS, q.IOPS), ratio(v.CPUSeconds, q.CPUSeconds),
					ratio(v.cpuPerMReq(), q.cpuPerMReq()), ratio(v.cpuPerMIO(), q.cpuPerMIO()))
			}
		}
	}
	return b.String()
}
