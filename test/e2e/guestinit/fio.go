//go:build linux

package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// fioPath is where the harness puts fio; fioLibPath lists, one per line,
// the directories of the shared libraries it copied along.
const (
	fioPath    = "/usr/bin/fio"
	fioLibPath = "/etc/vhostdm/fio-ld-path"
)

// stepFio runs the fio job named job, or if job is empty those named by
// the fiojobs parameter (default all of proto.FioJobs), on the disk, one
// result per job.
func stepFio(disk string, p params, job string, start time.Time) []proto.Result {
	fail := func(err error) []proto.Result {
		return []proto.Result{{Step: proto.StepFio, Disk: disk, Error: err.Error(), MS: since(start)}}
	}
	if _, err := os.Stat(fioPath); err != nil {
		return fail(fmt.Errorf("fio is not in the initramfs (the harness adds it for the fio step): %w", err))
	}
	env := append(os.Environ(), "LD_LIBRARY_PATH="+strings.Join(readLines(fioLibPath), ":"))
	engine := "psync"
	if out, err := runCmd(env, fioPath, "--enghelp"); err == nil && strings.Contains(out, "libaio") {
		engine = "libaio"
	}
	runtime := p.int(proto.ParamFioRuntime, 5)
	wanted := splitList(p.str(proto.ParamFioJobs, ""))
	if job != "" {
		wanted = []string{job}
	}
	var rs []proto.Result
	if ms := p.int(proto.ParamIRQChurn, 0); ms > 0 {
		stop := make(chan struct{})
		done := make(chan map[string]int64, 1)
		go func() { done <- churnIRQs(time.Duration(ms)*time.Millisecond, stop) }()
		defer func() {
			close(stop)
			v := <-done
			if len(rs) > 0 {
				rs[len(rs)-1].Values = v
			}
		}()
	}
	for _, spec := range proto.FioJobs {
		if len(wanted) > 0 && !contains(wanted, spec.Name) {
			continue
		}
		t := time.Now()
		// The start and end events and the block statistics bracket the
		// job, so the host's view of the back end (CPU time from the
		// start line to the end line) and the requests counted here
		// cover the same run. (The results are printed after the step.)
		before, serr := blockStat(disk)
		printLine(proto.ResultMarker, proto.Result{Step: proto.StepFio, Disk: disk, Event: "start", OK: true,
			Fio: &proto.FioJob{Name: spec.Name, Engine: engine, RW: spec.RW, BS: spec.BS, IODepth: spec.IODepth}})
		job, err := runFio(env, disk, engine, spec, runtime)
		after, aerr := blockStat(disk)
		if err == nil {
			err = errors.Join(serr, aerr)
		}
		if job != nil && serr == nil && aerr == nil {
			job.Block = after.Sub(before)
		}
		r := proto.Result{Step: proto.StepFio, Disk: disk, Fio: job, MS: since(t), OK: err == nil}
		if err != nil {
			r.Error = err.Error()
		}
		ev := r
		ev.Event = "end"
		printLine(proto.ResultMarker, ev)
		rs = append(rs, r)
	}
	if len(rs) == 0 {
		return fail(fmt.Errorf("no fio job among %v", wanted))
	}
	return rs
}

// blockStat reads the request counts of a disk from /sys/block/DISK/stat
// (Documentation/block/stat.rst: reads, read merges, read sectors, read
// ticks, writes, write merges, write sectors, ..., flushes in field 16).
func blockStat(disk string) (proto.BlockStat, error) {
	var b proto.BlockStat
	raw, err := os.ReadFile("/sys/block/" + disk + "/stat")
	if err != nil {
		return b, fmt.Errorf("block statistics: %w", err)
	}
	f := strings.Fields(string(raw))
	if len(f) < 11 {
		return b, fmt.Errorf("block statistics of %s: %d fields, want at least 11", disk, len(f))
	}
	n := func(i int) int64 {
		if i >= len(f) {
			return 0 // kernels before 5.5 count no flushes
		}
		v, perr := strconv.ParseInt(f[i], 10, 64)
		if perr != nil && err == nil {
			err = fmt.Errorf("block statistics of %s: field %d: %w", disk, i+1, perr)
		}
		return v
	}
	b = proto.BlockStat{Reads: n(0), ReadSectors: n(2), Writes: n(4), WriteSectors: n(6), Flushes: n(15)}
	if err != nil {
		return b, err
	}
	b.Interrupts, err = diskInterrupts(disk)
	return b, err
}

// diskInterrupts sums, over the CPUs, the interrupts of the virtio
// device under disk (/sys/block/DISK/device is its virtioN) in
// /proc/interrupts: its request queues' lines ("virtioN-req.0", ...).
func diskInterrupts(disk string) (int64, error) {
	dev, err := os.Readlink("/sys/block/" + disk + "/device")
	if err != nil {
		return 0, fmt.Errorf("interrupts of %s: %w", disk, err)
	}
	prefix := filepath.Base(dev) + "-"
	b, err := os.ReadFile("/proc/interrupts")
	if err != nil {
		return 0, fmt.Errorf("interrupts of %s: %w", disk, err)
	}
	var n int64
	found := false
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 || !strings.HasSuffix(f[0], ":") || !strings.HasPrefix(f[len(f)-1], prefix) {
			continue
		}
		found = true
		for _, c := range f[1:] {
			v, err := strconv.ParseInt(c, 10, 64)
			if err != nil {
				break // the counts end where the chip's name begins
			}
			n += v
		}
	}
	if !found {
		return 0, fmt.Errorf("interrupts of %s: no line for %s* in /proc/interrupts", disk, prefix)
	}
	return n, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func runCmd(env []string, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// fioOutput is the part of fio's JSON output the step reads.
type fioOutput struct {
	Jobs []struct {
		Error      int     `json:"error"`
		JobRuntime float64 `json:"job_runtime"` // ms
		Read       fioDir  `json:"read"`
		Write      fioDir  `json:"write"`
	} `json:"jobs"`
}

type fioDir struct {
	IOPS  float64 `json:"iops"`
	BW    int64   `json:"bw"` // KiB/s
	LatNS struct {
		Mean float64 `json:"mean"`
	} `json:"lat_ns"`
	ClatNS struct {
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
	TotalIOs int64 `json:"total_ios"`
}

func runFio(env []string, disk, engine string, s proto.FioSpec, runtime int64) (*proto.FioJob, error) {
	job := &proto.FioJob{Name: s.Name, Engine: engine, RW: s.RW, BS: s.BS, IODepth: s.IODepth}
	out, err := runCmd(env, fioPath,
		"--name="+s.Name, "--filename=/dev/"+disk, "--direct=1", "--thread",
		"--ioengine="+engine, "--rw="+s.RW, "--bs="+s.BS, "--iodepth="+strconv.Itoa(s.IODepth),
		"--runtime="+strconv.FormatInt(runtime, 10), "--time_based", "--ramp_time=1",
		"--randrepeat=0", "--norandommap", "--output-format=json")
	if err != nil {
		return job, err
	}
	// fio may print notes before the JSON document.
	if i := strings.Index(out, "{"); i > 0 {
		out = out[i:]
	}
	var o fioOutput
	if err := json.Unmarshal([]byte(out), &o); err != nil {
		return job, fmt.Errorf("fio output: %w", err)
	}
	if len(o.Jobs) == 0 {
		return job, fmt.Errorf("fio output has no jobs")
	}
	j := o.Jobs[0]
	d := j.Read
	if strings.Contains(s.RW, "write") {
		d = j.Write
	}
	job.IOPS = d.IOPS
	job.BWKiBps = d.BW
	job.LatMeanU = d.LatNS.Mean / 1000
	job.LatP99U = d.ClatNS.Percentile["99.000000"] / 1000
	job.Errors = j.Error
	job.RuntimeS = j.JobRuntime / 1000
	if j.Error != 0 {
		return job, fmt.Errorf("fio job %s: error %d", s.Name, j.Error)
	}
	if d.TotalIOs == 0 {
		return job, fmt.Errorf("fio job %s completed no I/O", s.Name)
	}
	return job, nil
}

// churnIRQs moves the virtio interrupts between CPUs every period until
// stop is closed (proto.ParamIRQChurn) and returns its counts. CPU 1 is
// online again when it returns.
func churnIRQs(period time.Duration, stop <-chan struct{}) map[string]int64 {
	v := map[string]int64{"irq_moves": 0, "irq_move_errors": 0, "cpu_toggles": 0, "cpu_toggle_errors": 0}
	ncpu := runtime.NumCPU()
	const cpu1 = "/sys/devices/system/cpu/cpu1/online"
	defer os.WriteFile(cpu1, []byte("1"), 0)
	t := time.NewTicker(period)
	defer t.Stop()
	for i := 0; ; i++ {
		select {
		case <-stop:
			return v
		case <-t.C:
		}
		mask := strconv.FormatInt(1<<(i%max(ncpu, 1)), 16)
		for _, irq := range virtioIRQs() {
			if err := os.WriteFile("/proc/irq/"+irq+"/smp_affinity", []byte(mask), 0); err != nil {
				v["irq_move_errors"]++
			} else {
				v["irq_moves"]++
			}
		}
		if ncpu >= 2 {
			if err := os.WriteFile(cpu1, []byte(strconv.Itoa((i+1)%2)), 0); err != nil {
				v["cpu_toggle_errors"]++
			} else {
				v["cpu_toggles"]++
			}
		}
	}
}

// virtioIRQs returns the numbers of the virtio interrupts in
// /proc/interrupts.
func virtioIRQs() []string {
	b, err := os.ReadFile("/proc/interrupts")
	if err != nil {
		return nil
	}
	var irqs []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 || !strings.Contains(l, "virtio") {
			continue
		}
		if n := strings.TrimSuffix(f[0], ":"); n != f[0] {
			if _, err := strconv.Atoi(n); err == nil {
				irqs = append(irqs, n)
			}
		}
	}
	return irqs
}
