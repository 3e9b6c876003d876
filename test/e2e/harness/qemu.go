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
	NumQueues int  // default 1
	QueueSize int  // default: QEMU's
	Packed    bool // packed virtqueues (packed=on)
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
	// MaxCPUs is QEMU's -smp maxcpus: default max(CPUs, 2), never 1
	// unless a test asks, because a TCG guest with max_cpus 1 loses
	// virtqueue kicks and interrupts (see QEMUArgs).
	MaxCPUs int
	MemMB   int // default 512
	Fio     bool
	// Interactive connects the console to this process's terminal and adds
	// busybox to the initramfs.
	Interactive bool
	// Console, if set, receives a copy of everything the guest prints.
	Console io.Writer
	// ExtraArgs are appended to QEMU's command line.
	ExtraArgs []string
	// OnEvent, if set, is called with each guest line (and QEMU's exit)
	// as the console reader parses it, before Next or Wait return it: a
	// test samples host state (a back end's CPU time) at the moment the
	// guest reports. It runs on the reader goroutine and must be quick.
	OnEvent func(Event)
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
	onEvent func(Event)   // VMConfig.OnEvent; set before the reader starts
}

// QEMUArgs returns QEMU's arguments for cfg with the given initrd.
func (e *Env) QEMUArgs(cfg VMConfig, initrd string) []string {
	cpus := max(cfg.CPUs, 1)
	maxCPUs := cfg.MaxCPUs
	if maxCPUs == 0 {
		maxCPUs = max(cpus, 2)
	}
	// maxcpus >= 2 even for one vCPU: with max_cpus 1, QEMU's multi-
	// threaded TCG translates the guest without CF_PARALLEL
	// (accel/tcg/tcg-accel-ops-mttcg.c, mttcg_start_vcpu_thread:
	// tcg_cpu_init_cflags(cpu, current_machine->smp.max_cpus > 1); the
	// single-threaded -accel tcg,thread=single never sets it), and then
	// a LOCK-prefixed guest instruction becomes a plain load, op and store
	// with no barrier (tcg/tcg-op-ldst.c, GEN_ATOMIC_HELPER:
	// do_nonatomic_op_i32/_i64). QEMU commit c914d46d0a64 ("tcg: Do not
	// elide memory barriers for !CF_PARALLEL in system mode", 8.1) kept
	// explicit fences for the I/O threads' sake, but not these. Linux's
	// x86-64 smp_mb() is "lock; addl $0,-4(%rsp)"
	// (arch/x86/include/asm/barrier.h, __smp_mb), and virtio_ring's
	// virtio_mb() for PCI devices (weak barriers) is that smp_mb(): the
	// store-to-load barrier between publishing avail->idx and reading
	// avail_event (virtqueue_kick_prepare), and between writing
	// used_event and re-reading used->idx (virtqueue_poll), vanishes. A
	// vhost-user back end runs in another host process concurrently, so
	// the host CPU's store buffer reorders the two like Dekker's
	// algorithm without a fence: the guest skips a kick the device asked
	// for, or sleeps on a completion whose interrupt the device (reading
	// the old used_event) skipped. That was the e2e fio hang of issue 21
	// item 8 with qemu-storage-daemon (and vhostdm, before its one-second
	// lost-interrupt second look): 16 requests in flight, forever. With
	// max_cpus 2, CF_PARALLEL makes the LOCK ADD a host atomic, a full
	// barrier on the host.
	maxCPUs = max(maxCPUs, cpus)
	mem := cfg.MemMB
	if mem == 0 {
		mem = 512
	}
	args := []string{
		"-accel", "tcg", "-machine", "q35", "-smp", fmt.Sprintf("cpus=%d,maxcpus=%d", cpus, maxCPUs), "-m", strconv.Itoa(mem),
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
		if d.Packed {
			dev += ",packed=on"
		}
		args = append(args, "-device", dev)
	}
	// no_timer_check: on a busy host TCG can miss the kernel's IO-APIC
	// timer check, which then panics ("IO-APIC + timer doesn't work!",
	// seen with 2 vCPUs at load 30 on 2 cores); the check proves nothing
	// about a virtual machine's timer.
	// nokaslr: the kernel's text at fixed addresses, so that the
	// instruction pointers a hung guest's VirtioState shows can be looked
	// up in /proc/kallsyms of any other boot of the same kernel.
	app := []string{"console=ttyS0", "panic=-1", "quiet", "loglevel=4", "no_timer_check", "nokaslr"}
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
	vm := &VM{notify: make(chan struct{}), exited: make(chan struct{}), onEvent: cfg.OnEvent}
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
	ev.At = time.Since(vm.Started)
	if vm.onEvent != nil {
		vm.onEvent(ev)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
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
// killed), extended at most maxExtensions times by half of it while a vCPU
// is busy (Busy): only a guest that waits is hung. It fails if the guest printed no end line, a line was
// malformed, or QEMU exited with an error; failed steps are in the Run and
// reported by Run.Failed.
func (vm *VM) Wait(timeout time.Duration) (*Run, error) {
	run := &Run{}
	deadline := time.Now().Add(timeout)
	extended := 0
	var malformed []error
	for {
		left := time.Until(deadline)
		if left <= 0 && extended < maxExtensions && vm.Busy() {
			// A guest that is computing is slow, not hung: on a shared,
			// loaded host (load 30 on 2 cores) a TCG guest took more
			// than 3 minutes just to unpack its initramfs (its vCPU in
			// inflate_fast). A hung guest waits with its vCPUs halted.
			extended++
			deadline = time.Now().Add(timeout / 2)
			vm.mu.Lock()
			fmt.Fprintf(&vm.console, "=== harness: guest busy (a vCPU running) at the deadline; waiting %v more (%d of %d)\n", timeout/2, extended, maxExtensions)
			vm.mu.Unlock()
			continue
		}
		if left <= 0 {
			state := vm.VirtioState()
			stacks := ThreadStacks(vm.Cmd.Process.Pid)
			vm.Kill()
			return run, fmt.Errorf("guest did not finish within %v (QEMU killed); QEMU's virtio state:\n%s\nQEMU's threads:\n%s\nconsole tail:\n%s", timeout, state, stacks, vm.ConsoleTail(60))
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

// maxExtensions bounds how often Wait extends a busy guest's deadline (by
// half the timeout each time).
const maxExtensions = 2

// Busy reports whether a vCPU of the guest was running (not halted) in
// most of five looks 200 ms apart, from QEMU's "info registers -a".
func (vm *VM) Busy() bool {
	if vm.qmpPath == "" {
		return false
	}
	q, err := DialQMP(vm.qmpPath, 5*time.Second)
	if err != nil {
		return false
	}
	defer q.Close()
	running := 0
	for i := 0; i < 5; i++ {
		if i > 0 {
			time.Sleep(200 * time.Millisecond)
		}
		out, err := q.Execute("human-monitor-command", map[string]any{"command-line": "info registers -a"}, 5*time.Second)
		if err != nil {
			return false
		}
		var text string
		json.Unmarshal(out, &text)
		if strings.Contains(text, "HLT=0") {
			running++
		}
	}
	return running >= 3
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
// (x-query-virtio-status, x-query-virtio-queue-element and, for vhost
// devices, x-query-virtio-vhost-queue-status instead of
// x-query-virtio-queue-status), one JSON object a line: for a hung guest
// it shows whether the driver's request reached the ring (avail.idx) and
// whether the back end's completion reached the guest (used.idx). Wait
// calls it on a guest that timed out. It no longer asks a vhost device for
// x-query-virtio-queue-status: QEMU answers that by sending GET_VRING_BASE
// to the back end, which stops the ring (the vhost-user protocol says so)
// and QEMU never restarts it; that is why, in 3 of 3 runs (QEMU 10.0.2,
// TCG), these queries made while the guest was working left its next
// request unserved (avail.idx 7, used.idx 6, with vhostdm and with
// qemu-storage-daemon alike) (issue 21, item 8).
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
	// The vCPUs: halted or running, where, interrupts enabled (EFL bit
	// 9), and the local APIC's timer and pending vectors: a guest whose
	// timer no longer fires sleeps forever like one that lost an I/O
	// interrupt.
	idle := true // every vCPU halted: the guest waits, it is not just slow
	for _, cmd := range []string{"info registers -a", "info lapic"} {
		out, err := q.Execute("human-monitor-command", map[string]any{"command-line": cmd}, 5*time.Second)
		if err != nil {
			continue
		}
		var text string
		json.Unmarshal(out, &text)
		for _, l := range strings.Split(text, "\n") {
			if strings.Contains(l, "HLT=0") {
				idle = false
			}
			if strings.HasPrefix(l, "RIP=") || strings.Contains(l, "HLT=") || strings.HasPrefix(l, "CPU#") ||
				strings.HasPrefix(l, "dumping") || strings.HasPrefix(l, "LVT0") || strings.HasPrefix(l, "LVTT") ||
				strings.HasPrefix(l, "Timer") || strings.HasPrefix(l, "ISR") || strings.HasPrefix(l, "IRR") || strings.HasPrefix(l, "SPIV") {
				fmt.Fprintf(&b, "%s: %s\n", cmd, strings.TrimSpace(l))
			}
		}
	}
	// Each vCPU's next instructions and the top of its stack (return
	// addresses into kernel text, with nokaslr at fixed addresses): where a
	// guest spins with interrupts disabled.
	hmp := func(cmd string) string {
		out, err := q.Execute("human-monitor-command", map[string]any{"command-line": cmd}, 5*time.Second)
		if err != nil {
			return err.Error()
		}
		var text string
		json.Unmarshal(out, &text)
		return strings.TrimSpace(text)
	}
	for cpu := 0; cpu < 8; cpu++ {
		if out := hmp(fmt.Sprintf("cpu %d", cpu)); out != "" {
			break // no such CPU
		}
		for _, cmd := range []string{"x/5i $pc", "x/12gx $sp"} {
			fmt.Fprintf(&b, "cpu %d %s:\n  %s\n", cpu, cmd, strings.ReplaceAll(hmp(cmd), "\n", "\n  "))
		}
	}
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
			NumVqs   int             `json:"num-vqs"`
			VhostDev json.RawMessage `json:"vhost-dev"`
		}
		json.Unmarshal(st, &s)
		fmt.Fprintf(&b, "%s %s: %s\n", d.Path, d.Name, compactJSON(st))
		cmds := []string{"x-query-virtio-queue-status", "x-query-virtio-vhost-queue-status", "x-query-virtio-queue-element"}
		if s.VhostDev != nil {
			// On a started vhost device queue-status sends
			// GET_VRING_BASE, which stops the back end's ring for
			// good (qmp_x_query_virtio_queue_status in QEMU's
			// hw/virtio/virtio-qmp.c).
			cmds = cmds[1:]
		}
		for i := range s.NumVqs {
			// queue-element reads the rings in guest memory: avail.idx
			// against used.idx tells a request the back end never
			// completed from a completion the guest was not told of.
			for _, cmd := range cmds {
				r, err := q.Execute(cmd, map[string]any{"path": d.Path, "queue": i}, 5*time.Second)
				if err != nil {
					continue
				}
				fmt.Fprintf(&b, "  queue %d %s: %s\n", i, strings.TrimPrefix(cmd, "x-query-virtio-"), compactJSON(r))
				if cmd == "x-query-virtio-vhost-queue-status" {
					fmt.Fprintf(&b, "  queue %d ring: %s\n", i, ringState(q, r, idle))
				}
			}
		}
	}
	return b.String()
}

// ringState reads the four indexes of a split virtqueue from guest memory
// with the human monitor's xp (which reads guest physical memory and
// involves neither the device nor the back end) and says what they mean
// for a stalled queue (virtio 1.x 2.7.7, 2.7.10, event idx):
//
//   - avail.idx != used.idx with avail_event == used.idx: the device
//     consumed everything up to avail_event and asked to be kicked beyond
//     it; the driver made more available but the device never saw a kick
//     (a lost kick);
//   - used.idx != used_event with avail.idx == used.idx: the device
//     completed everything, but the driver's used_event lies behind
//     used.idx, so the driver was owed an interrupt it never acted on (a
//     lost interrupt).
//
// Both verdicts need an idle guest (every vCPU halted): a guest whose CPU
// is busy, e.g. starved on a loaded host and still booting, has simply not
// got to its ring yet. status is the device's
// x-query-virtio-vhost-queue-status answer, which gives the rings' guest
// physical addresses.
func ringState(q *QMP, status json.RawMessage, idle bool) string {
	var st struct {
		Num       uint64 `json:"num"`
		AvailPhys uint64 `json:"avail-phys"`
		UsedPhys  uint64 `json:"used-phys"`
	}
	if err := json.Unmarshal(status, &st); err != nil || st.Num == 0 || st.AvailPhys == 0 || st.UsedPhys == 0 {
		return "(no ring addresses)"
	}
	read := func(addr uint64) (uint16, error) {
		out, err := q.Execute("human-monitor-command", map[string]any{"command-line": fmt.Sprintf("xp /1hx %#x", addr)}, 5*time.Second)
		if err != nil {
			return 0, err
		}
		var text string
		json.Unmarshal(out, &text)
		_, val, ok := strings.Cut(text, ": ")
		if !ok {
			return 0, fmt.Errorf("xp: %q", text)
		}
		v, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(val), "0x"), 16, 16)
		return uint16(v), err
	}
	var vals [6]uint16
	for i, addr := range []uint64{
		st.AvailPhys, st.AvailPhys + 2, st.AvailPhys + 4 + 2*st.Num, // flags, idx, used_event
		st.UsedPhys, st.UsedPhys + 2, st.UsedPhys + 4 + 8*st.Num, // flags, idx, avail_event
	} {
		v, err := read(addr)
		if err != nil {
			return fmt.Sprintf("(xp %#x: %v)", addr, err)
		}
		vals[i] = v
	}
	availIdx, usedEvent, usedIdx, availEvent := vals[1], vals[2], vals[4], vals[5]
	verdict := "no request outstanding"
	switch {
	case !idle && (availIdx != usedIdx || usedIdx != usedEvent):
		verdict = fmt.Sprintf("%d requests at the device, %d completions not consumed yet; a vCPU is running (HLT=0), so the guest is busy or starved, not waiting",
			availIdx-usedIdx, usedIdx-usedEvent)
	case availIdx != usedIdx && availEvent == usedIdx:
		verdict = fmt.Sprintf("LOST KICK: %d requests available past avail_event, none consumed", availIdx-availEvent)
	case availIdx != usedIdx:
		verdict = fmt.Sprintf("%d requests at the device", availIdx-usedIdx)
	case usedIdx != usedEvent:
		verdict = fmt.Sprintf("LOST INTERRUPT: used.idx passed used_event by %d", usedIdx-usedEvent)
	}
	return fmt.Sprintf("avail.flags=%#x avail.idx=%d used_event=%d used.flags=%#x used.idx=%d avail_event=%d: %s",
		vals[0], availIdx, usedEvent, vals[3], usedIdx, availEvent, verdict)
}

// ThreadStacks returns the stack of every thread of a process, from gdb
// if it is installed (a diagnostic only: a hung guest's vCPU and main-loop
// threads show whether QEMU waits on the back end, on a lock, or for an
// interrupt), or why not.
func ThreadStacks(pid int) string {
	gdb, err := exec.LookPath("gdb")
	if err != nil {
		return "(gdb not installed)"
	}
	cmd := exec.Command(gdb, "-p", strconv.Itoa(pid), "-batch", "-nx", "-ex", "thread apply all bt 12")
	done := make(chan struct{})
	timer := time.AfterFunc(60*time.Second, func() {
		select {
		case <-done:
		default:
			if cmd.Process != nil {
				cmd.Process.Kill()
			}
		}
	})
	out, err := cmd.CombinedOutput()
	close(done)
	timer.Stop()
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "Thread ") || strings.HasPrefix(l, "#") {
			keep = append(keep, l)
		}
	}
	if len(keep) == 0 {
		return fmt.Sprintf("(gdb: %v: %s)", err, strings.TrimSpace(string(out)))
	}
	return strings.Join(keep, "\n")
}

func compactJSON(raw json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return string(raw)
	}
	return b.String()
}
