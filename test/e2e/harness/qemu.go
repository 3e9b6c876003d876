package harness

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// Disk is one vhost-user-blk-pci device of a guest. Disks appear in the
// guest in order: vda, vdb, ...
type Disk struct {
	Socket    string
	NumQueues int // default 1
	QueueSize int // default: QEMU's
}

// VMConfig describes a guest.
type VMConfig struct {
	Disks []Disk
	// Steps are the guest steps (proto.Step*, optionally "@disk"); none
	// means an interactive shell.
	Steps []string
	// Params are further vhostdm.* kernel parameters, without the prefix.
	Params map[string]string
	CPUs   int // default 1
	MemMB  int // default 512
	Fio    bool
	// Interactive connects the console to this process's terminal and adds
	// busybox to the initramfs.
	Interactive bool
	// Console, if set, receives a copy of everything the guest prints.
	Console io.Writer
	// ExtraArgs are appended to QEMU's command line.
	ExtraArgs []string
}

// EventKind says what a guest event is.
type EventKind int

// Event kinds.
const (
	EventBegin EventKind = iota
	EventResult
	EventEnd
	EventExit // QEMU exited
)

// Event is one thing the guest reported, or QEMU's exit.
type Event struct {
	Kind   EventKind
	At     time.Duration // since QEMU started
	Begin  *proto.Begin
	Result *proto.Result
	End    *proto.End
	Err    error  // EventExit: how QEMU exited; otherwise a malformed line
	Line   string // the console line
}

// VM is a running QEMU guest.
type VM struct {
	Cmd     *exec.Cmd
	Args    []string
	Started time.Time

	mu      sync.Mutex
	console bytes.Buffer // guest console and QEMU's stderr
	events  []Event
	next    int
	notify  chan struct{} // closed and replaced on each event
	exited  chan struct{}
	exitErr error
	boot    time.Duration // QEMU start to the begin line, 0 before
	qmpPath string        // QEMU's QMP socket, for VirtioState; "" if none
}

// QEMUArgs returns QEMU's arguments for cfg with the given initrd.
func (e *Env) QEMUArgs(cfg VMConfig, initrd string) []string {
	cpus := max(cfg.CPUs, 1)
	mem := cfg.MemMB
	if mem == 0 {
		mem = 512
	}
	args := []string{
		"-accel", "tcg", "-machine", "q35", "-smp", strconv.Itoa(cpus), "-m", strconv.Itoa(mem),
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", mem),
		"-numa", "node,memdev=mem",
		"-kernel", e.Kernel, "-initrd", initrd,
		"-nographic", "-no-reboot", "-nic", "none",
	}
	reconnect := "reconnect=1"
	if e.AtLeast(9, 2) {
		reconnect = "reconnect-ms=500"
	}
	for i, d := range cfg.Disks {
		nq := max(d.NumQueues, 1)
		args = append(args, "-chardev", fmt.Sprintf("socket,id=c%d,path=%s,%s", i, d.Socket, reconnect))
		dev := fmt.Sprintf("vhost-user-blk-pci,chardev=c%d,num-queues=%d,id=disk%d", i, nq, i)
		if d.QueueSize > 0 {
			dev += fmt.Sprintf(",queue-size=%d", d.QueueSize)
		}
		args = append(args, "-device", dev)
	}
	// no_timer_check: on a loaded host the TCG guest's IO-APIC timer
	// check can miss its ticks and panic the kernel at boot ("IO-APIC +
	// timer doesn't work!"); the check proves nothing about the disks.
	app := []string{"console=ttyS0", "panic=-1", "quiet", "loglevel=4", "no_timer_check"}
	params := map[string]string{}
	for k, v := range cfg.Params {
		params[k] = v
	}
	if len(cfg.Steps) > 0 {
		params[proto.ParamTest] = strings.Join(cfg.Steps, ",")
	} else {
		params[proto.ParamTest] = proto.StepShell
	}
	if _, ok := params[proto.ParamDisks]; !ok {
		params[proto.ParamDisks] = strconv.Itoa(max(len(cfg.Disks), 1))
	}
	var keys []string
	for k := range params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		app = append(app, proto.ParamPrefix+k+"="+params[k])
	}
	args = append(args, "-append", strings.Join(app, " "))
	return append(args, cfg.ExtraArgs...)
}

// StartVM builds the initrd cfg needs and starts QEMU.
func (e *Env) StartVM(cfg VMConfig) (*VM, error) {
	var extra []Part
	if cfg.Fio {
		extra = append(extra, PartFio)
	}
	if cfg.Interactive {
		extra = append(extra, PartBusybox)
	}
	initrd, err := e.Initrd(extra...)
	if err != nil {
		return nil, err
	}
	args := e.QEMUArgs(cfg, initrd)
	vm := &VM{notify: make(chan struct{}), exited: make(chan struct{})}
	if !cfg.Interactive {
		// A QMP monitor, so that a hung guest's virtqueues can be
		// inspected from QEMU's side (VirtioState).
		if dir, err := os.MkdirTemp("", "vq"); err == nil {
			vm.qmpPath = filepath.Join(dir, "qmp")
			args = append(args, "-qmp", "unix:"+vm.qmpPath+",server=on,wait=off")
			go func() {
				<-vm.exited
				os.RemoveAll(dir)
			}()
		}
	}
	vm.Args = args
	cmd := exec.Command(e.QEMU, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out io.ReadCloser
	if cfg.Interactive {
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	} else {
		pr, pw, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		cmd.Stdout, cmd.Stderr = pw, pw
		out = pr
		defer pw.Close()
	}
	vm.Cmd = cmd
	vm.Started = time.Now()
	if err := cmd.Start(); err != nil {
		if out != nil {
			out.Close()
		}
		return nil, fmt.Errorf("start %s: %w", e.QEMU, err)
	}
	readDone := make(chan struct{})
	if out != nil {
		go func() {
			defer close(readDone)
			vm.read(out, cfg.Console)
		}()
	} else {
		close(readDone)
	}
	go func() {
		err := cmd.Wait()
		<-readDone
		vm.mu.Lock()
		vm.exitErr = err
		vm.mu.Unlock()
		vm.push(Event{Kind: EventExit, Err: err})
		close(vm.exited)
	}()
	return vm, nil
}

// read scans the console for result lines.
func (vm *VM) read(r io.ReadCloser, copyTo io.Writer) {
	defer r.Close()
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadString('\n')
		if line != "" {
			vm.mu.Lock()
			vm.console.WriteString(line)
			vm.mu.Unlock()
			if copyTo != nil {
				io.WriteString(copyTo, line)
			}
			if ev, ok := parseLine(strings.TrimRight(line, "\r\n")); ok {
				vm.push(ev)
			}
		}
		if err != nil {
			return
		}
	}
}

// parseLine finds a result marker in a console line.
func parseLine(line string) (Event, bool) {
	var ev Event
	var payload any
	var rest string
	if i := strings.Index(line, proto.BeginMarker); i >= 0 {
		ev.Kind, ev.Begin = EventBegin, &proto.Begin{}
		payload, rest = ev.Begin, line[i+len(proto.BeginMarker):]
	} else if i := strings.Index(line, proto.EndMarker); i >= 0 {
		ev.Kind, ev.End = EventEnd, &proto.End{}
		payload, rest = ev.End, line[i+len(proto.EndMarker):]
	} else if i := strings.Index(line, proto.ResultMarker); i >= 0 {
		ev.Kind, ev.Result = EventResult, &proto.Result{}
		payload, rest = ev.Result, line[i+len(proto.ResultMarker):]
	} else {
		return ev, false
	}
	ev.Line = line
	if err := json.Unmarshal([]byte(rest), payload); err != nil {
		ev.Err = fmt.Errorf("malformed result line %q: %v", line, err)
	}
	return ev, true
}

func (vm *VM) push(ev Event) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	ev.At = time.Since(vm.Started)
	if ev.Kind == EventBegin && vm.boot == 0 {
		vm.boot = ev.At
	}
	vm.events = append(vm.events, ev)
	close(vm.notify)
	vm.notify = make(chan struct{})
}

// BootTime returns the time from QEMU's start to the guest's begin line,
// or 0 if the guest has not printed it yet.
func (vm *VM) BootTime() time.Duration {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.boot
}

// Next returns the next event, waiting at most timeout.
func (vm *VM) Next(timeout time.Duration) (Event, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		vm.mu.Lock()
		if vm.next < len(vm.events) {
			ev := vm.events[vm.next]
			vm.next++
			vm.mu.Unlock()
			return ev, nil
		}
		ch := vm.notify
		vm.mu.Unlock()
		select {
		case <-ch:
		case <-deadline.C:
			return Event{}, fmt.Errorf("no guest result within %v; console tail:\n%s", timeout, vm.ConsoleTail(40))
		}
	}
}

// WaitFor returns the first next event for which match is true. QEMU's
// exit, a guest end line or a failed guest result that does not match are
// errors, as is the timeout.
func (vm *VM) WaitFor(timeout time.Duration, what string, match func(Event) bool) (Event, error) {
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			left = time.Millisecond
		}
		ev, err := vm.Next(left)
		if err != nil {
			return ev, fmt.Errorf("waiting for %s: %w", what, err)
		}
		if match(ev) {
			return ev, nil
		}
		switch {
		case ev.Err != nil && ev.Kind != EventExit:
			return ev, ev.Err
		case ev.Kind == EventExit:
			return ev, fmt.Errorf("waiting for %s: QEMU exited (%v); console tail:\n%s", what, ev.Err, vm.ConsoleTail(40))
		case ev.Kind == EventEnd:
			return ev, fmt.Errorf("waiting for %s: the guest finished; console tail:\n%s", what, vm.ConsoleTail(40))
		case ev.Kind == EventResult && !ev.Result.OK:
			return ev, fmt.Errorf("waiting for %s: guest step %s on %s failed: %s", what, ev.Result.Step, ev.Result.Disk, ev.Result.Error)
		}
	}
}

// Run is the outcome of a guest run.
type Run struct {
	Begin    *proto.Begin
	Results  []proto.Result // final results (events of streaming steps are in Events)
	Events   []Event
	End      *proto.End
	BootTime time.Duration // QEMU start to the begin line
	Wall     time.Duration // QEMU start to QEMU exit
}

// Result returns the first final result of a step on a disk ("" for any).
func (r *Run) Result(step, disk string) *proto.Result {
	for i := range r.Results {
		if r.Results[i].Step == step && (disk == "" || r.Results[i].Disk == disk) {
			return &r.Results[i]
		}
	}
	return nil
}

// Wait collects events until QEMU exits, at most timeout (then QEMU is
// killed). It fails if the guest printed no end line, a line was
// malformed, or QEMU exited with an error; failed steps are in the Run and
// reported by Run.Failed.
func (vm *VM) Wait(timeout time.Duration) (*Run, error) {
	run := &Run{}
	deadline := time.Now().Add(timeout)
	var malformed []error
	for {
		left := time.Until(deadline)
		if left <= 0 {
			state := vm.VirtioState()
			vm.Kill()
			return run, fmt.Errorf("guest did not finish within %v (QEMU killed); QEMU's virtio state:\n%s\nconsole tail:\n%s", timeout, state, vm.ConsoleTail(60))
		}
		ev, err := vm.Next(left)
		if err != nil {
			continue
		}
		run.Events = append(run.Events, ev)
		if ev.Err != nil && ev.Kind != EventExit {
			malformed = append(malformed, ev.Err)
			continue
		}
		switch ev.Kind {
		case EventBegin:
			run.Begin = ev.Begin
		case EventResult:
			if ev.Result.Event == "" {
				run.Results = append(run.Results, *ev.Result)
			}
		case EventEnd:
			run.End = ev.End
		case EventExit:
			run.Wall = ev.At
			run.BootTime = vm.BootTime()
			switch {
			case run.End == nil:
				return run, fmt.Errorf("QEMU exited (%v) before the guest's end line; console tail:\n%s", ev.Err, vm.ConsoleTail(60))
			case ev.Err != nil:
				return run, fmt.Errorf("QEMU exited with %v; console tail:\n%s", ev.Err, vm.ConsoleTail(30))
			case len(malformed) > 0:
				return run, fmt.Errorf("malformed guest output: %v", malformed)
			}
			return run, nil
		}
	}
}

// Failed describes the failed steps of a run, or returns "".
func (r *Run) Failed() string {
	var b strings.Builder
	for _, res := range r.Results {
		if !res.OK {
			fmt.Fprintf(&b, "step %s on %s failed: %s\n", res.Step, res.Disk, res.Error)
		}
	}
	if b.Len() == 0 && r.End != nil && !r.End.OK {
		fmt.Fprintf(&b, "guest reports %d failed steps\n", r.End.Failed)
	}
	return b.String()
}

// Kill kills QEMU (SIGKILL) and waits for it to exit.
func (vm *VM) Kill() {
	if vm.Cmd.Process != nil {
		vm.Cmd.Process.Kill()
	}
	select {
	case <-vm.exited:
	case <-time.After(10 * time.Second):
	}
}

// Exited is closed when QEMU has exited.
func (vm *VM) Exited() <-chan struct{} { return vm.exited }

// Console returns everything the guest and QEMU printed so far.
func (vm *VM) Console() string {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.console.String()
}

// ConsoleTail returns the last n lines of the console.
func (vm *VM) ConsoleTail(n int) string {
	lines := strings.Split(strings.TrimRight(vm.Console(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// CommandLine returns QEMU's command line, quoted for a shell.
func (vm *VM) CommandLine() string {
	q := []string{vm.Cmd.Path}
	for _, a := range vm.Args {
		if strings.ContainsAny(a, " ,=") {
			a = "'" + a + "'"
		}
		q = append(q, a)
	}
	return strings.Join(q, " ")
}

// VirtioState returns QEMU's view of every virtio device and its queues
// (x-query-virtio-status, x-query-virtio-queue-status and, for vhost
// devices, x-query-virtio-vhost-queue-status), one JSON object a line: for
// a hung guest it shows whether the driver's request reached the ring
// (shadow-avail-idx) and whether the back end's completion reached QEMU
// and the guest (used-idx, signalled-used). Wait calls it on a guest that
// timed out. Beware of calling it on a guest that is still working: in 3
// of 3 runs (QEMU 10.0.2, TCG) these queries made while the guest
// submitted a request left that request unserved (avail.idx 7, used.idx 6,
// with vhostdm before and after issue 21's changes); 0 of 2 otherwise
// identical runs without them hung (issue 21, item 8).
func (vm *VM) VirtioState() string {
	if vm.qmpPath == "" {
		return "(no QMP monitor)"
	}
	q, err := DialQMP(vm.qmpPath, 5*time.Second)
	if err != nil {
		return fmt.Sprintf("(QMP: %v)", err)
	}
	defer q.Close()
	var b strings.Builder
	raw, err := q.Execute("x-query-virtio", nil, 5*time.Second)
	if err != nil {
		return fmt.Sprintf("(x-query-virtio: %v)", err)
	}
	var devs []struct {
		Path string `json:"path"`
		Name string `json:"name"`
	}
	json.Unmarshal(raw, &devs)
	for _, d := range devs {
		st, err := q.Execute("x-query-virtio-status", map[string]any{"path": d.Path}, 5*time.Second)
		if err != nil {
			fmt.Fprintf(&b, "%s %s: %v\n", d.Path, d.Name, err)
			continue
		}
		var s struct {
			NumVqs int `json:"num-vqs"`
		}
		json.Unmarshal(st, &s)
		fmt.Fprintf(&b, "%s %s: %s\n", d.Path, d.Name, compactJSON(st))
		for i := range s.NumVqs {
			// queue-element reads the rings in guest memory: avail.idx
			// against used.idx tells a request the back end never
			// completed from a completion the guest was not told of.
			for _, cmd := range []string{"x-query-virtio-queue-status", "x-query-virtio-vhost-queue-status", "x-query-virtio-queue-element"} {
				if r, err := q.Execute(cmd, map[string]any{"path": d.Path, "queue": i}, 5*time.Second); err == nil {
					fmt.Fprintf(&b, "  queue %d %s: %s\n", i, strings.TrimPrefix(cmd, "x-query-virtio-"), compactJSON(r))
				}
			}
		}
	}
	return b.String()
}

func compactJSON(raw json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return string(raw)
	}
	return b.String()
}
