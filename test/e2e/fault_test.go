package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// Writer parameters of the fault tests.
const (
	writerSeed       = 5005
	writerQD         = 4
	writerFlushEvery = 32
)

func writerParams(duration int) map[string]string {
	return map[string]string{
		proto.ParamSeed:       strconv.Itoa(writerSeed),
		proto.ParamDuration:   strconv.Itoa(duration),
		proto.ParamQD:         strconv.Itoa(writerQD),
		proto.ParamFlushEvery: strconv.Itoa(writerFlushEvery),
	}
}

func isFlush(ev harness.Event) bool {
	return ev.Kind == harness.EventResult && ev.Result.Step == proto.StepWriter && ev.Result.Event == "flush"
}

func isWriterEvent(ev harness.Event) bool {
	return ev.Kind == harness.EventResult && ev.Result.Step == proto.StepWriter && ev.Result.Event != ""
}

// waitFlushes waits for n more flush events of the writer and returns the
// last one's acknowledged write count. Any other failed result (an
// "ioerror" event) fails the test.
func waitFlushes(t *testing.T, vm *harness.VM, n int, timeout time.Duration, what string) int64 {
	t.Helper()
	var acked int64
	deadline := time.Now().Add(timeout)
	for i := 0; i < n; i++ {
		ev, err := vm.WaitFor(time.Until(deadline), what, func(ev harness.Event) bool {
			return isFlush(ev) || (isWriterEvent(ev) && ev.Result.OK)
		})
		if err != nil {
			t.Fatal(err)
		}
		if !isFlush(ev) {
			i--
			continue
		}
		acked = ev.Result.Values["acked"]
	}
	return acked
}

// backendCrash runs the verified writer on a 2-CPU guest, kills the back
// end with SIGKILL while writes are in flight, restarts it on the same
// socket (twice)
// and requires the guest to carry on without an I/O error, its final
// read-back to verify and the host to find exactly the last write in
// every block.
func backendCrash(t *testing.T, e *harness.Env, be *harness.Process, disks []harness.Disk, read func() []byte) {
	vm := startVM(t, e, harness.VMConfig{
		Disks:  disks,
		CPUs:   2, // writes from both CPUs go to both queues
		Steps:  []string{proto.StepWriter},
		Params: writerParams(20),
	})
	acked := waitFlushes(t, vm, 3, guestTimeout, "the writer's first flushes")
	// Two crashes: more chances to catch requests in flight on every queue.
	for round := 1; round <= 2; round++ {
		t.Logf("crash %d: writer at %d acknowledged writes: kill -9 %s", round, acked, be.Name)
		killed := time.Now()
		be.Kill()
		time.Sleep(300 * time.Millisecond)
		if err := be.Start(15 * time.Second); err != nil {
			t.Fatalf("restart %s on the same socket: %v", be.Name, err)
		}
		t.Logf("crash %d: %s restarted after %v", round, be.Name, time.Since(killed).Round(time.Millisecond))
		acked = waitFlushes(t, vm, 3, 90*time.Second, "flushes after the back end restarted (QEMU reconnect + in-flight resubmission)")
		t.Logf("crash %d: writer progressed to %d acknowledged writes %v after the kill", round, acked, time.Since(killed).Round(time.Millisecond))
	}
	run, err := vm.Wait(guestTimeout)
	if err != nil {
		t.Fatalf("guest: %v", err)
	}
	logRun(t, run)
	if f := run.Failed(); f != "" {
		t.Fatalf("the guest saw the back-end crash:\n%s", f)
	}
	res := run.Result(proto.StepWriter, "")
	if res == nil {
		t.Fatal("no final writer result")
	}
	t.Logf("writer: %v (max_latency_ms is the stall across the restart)", res.Values)
	for _, err := range harness.CheckWriterExact(read(), writerSeed, res.Values["writes"]) {
		t.Errorf("host check after the run: %v", err)
	}
}

// qemuKilled runs the verified writer, kills QEMU mid-write, checks that
// the back end survives and serves a new QEMU, whose guest finds every
// write acknowledged by a flush; the host checks the same.
func qemuKilled(t *testing.T, e *harness.Env, be *harness.Process, disks []harness.Disk, read func() []byte) {
	vm := startVM(t, e, harness.VMConfig{
		Disks:  disks,
		Steps:  []string{proto.StepWriter},
		Params: writerParams(600),
	})
	acked := waitFlushes(t, vm, 5, guestTimeout, "the writer's first flushes")
	vm.Kill()
	// Flushes the console delivered before the kill count too.
	for {
		ev, err := vm.Next(2 * time.Second)
		if err != nil || ev.Kind == harness.EventExit {
			break
		}
		if isFlush(ev) {
			acked = ev.Result.Values["acked"]
		}
	}
	t.Logf("QEMU killed with %d writes acknowledged by a flush", acked)
	time.Sleep(500 * time.Millisecond)
	if !be.Alive() {
		t.Fatalf("%s exited when QEMU was killed: %v", be.Name, be.ExitErr())
	}
	params := writerParams(0)
	params[proto.ParamAcked] = strconv.FormatInt(acked, 10)
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disks,
		Steps:  []string{proto.StepInfo, proto.StepWriterCheck},
		Params: params,
	})
	if r := run.Result(proto.StepWriterCheck, ""); r != nil {
		t.Logf("writercheck in the second guest: %v", r.Values)
	}
	if !be.Alive() {
		t.Fatalf("%s exited after the second guest: %v", be.Name, be.ExitErr())
	}
	for _, err := range harness.CheckWriter(read(), writerSeed, acked, -1) {
		t.Errorf("host check: %v", err)
	}
}

func readFile(t *testing.T, path string) func() []byte {
	return func() []byte {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
}

// TestBackendCrashRestart: kill -9 vhostdm during the verified writer,
// restart it on the same socket; in-flight requests are resubmitted from
// the inflight region and QEMU reconnects, so the guest sees no error.
func TestBackendCrashRestart(t *testing.T) {
	e := needEnv(t)
	cfg, img := linearConfig(t, 32<<20, true, "e2e-crash")
	cfg.Exports[0].NumQueues = 2
	writeConfig(t, cfg.Dir, cfg)
	be := startVhostdm(t, e, filepath.Join(cfg.Dir, "vm.toml"))
	backendCrash(t, e, be, disksOf(cfg), readFile(t, img))
}

// TestQEMUKilledMidWrite: QEMU dies during the verified writer; vhostdm
// keeps running, serves a new QEMU, and what was flushed is intact.
func TestQEMUKilledMidWrite(t *testing.T) {
	e := needEnv(t)
	cfg, img := linearConfig(t, 32<<20, true, "e2e-qkill")
	be := startVhostdm(t, e, filepath.Join(cfg.Dir, "vm.toml"))
	qemuKilled(t, e, be, disksOf(cfg), readFile(t, img))
}
