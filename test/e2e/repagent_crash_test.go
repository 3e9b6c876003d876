package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// agentVolume is the part of a volume of vhostdm's query-repagent the
// tests read.
type agentVolume struct {
	Volume       string `json:"volume"`
	Mirroring    bool   `json:"mirroring"`
	BacklogIOs   int    `json:"backlog-ios"`
	DirtyRegions uint64 `json:"dirty-regions"`
	ResyncReason string `json:"resync-reason"`
	ResyncBytes  uint64 `json:"resync-bytes"`
	RemoteBytes  uint64 `json:"remote-read-bytes"`
	ResyncTotal  uint64 `json:"resync-requested-bytes"`
	Mirrored     uint64 `json:"mirrored-writes"`
}

// agentState is the part of vhostdm's query-repagent the tests read.
type agentState struct {
	Connected   bool   `json:"connected"`
	Session     string `json:"session"`
	ActivityLog *struct {
		Lost         bool   `json:"lost"`
		Hot          int    `json:"hot-extents"`
		Capacity     int    `json:"al-extents"`
		Transactions uint64 `json:"transactions"`
	} `json:"activity-log"`
	Volumes []agentVolume `json:"volumes"`
}

// queryAgent runs vhostdm's query-repagent.
func queryAgent(t *testing.T, q *harness.QMP) agentState {
	t.Helper()
	var st agentState
	raw := qmpDo(t, q, "query-repagent", nil)
	if err := json.Unmarshal(raw, &st); err != nil {
		t.Fatalf("vhostdm's query-repagent reply %s: %v", raw, err)
	}
	return st
}

// waitReplicated waits until the agent holds nothing unsent for any of
// volumes and the hub protects them all with no resync set open.
func waitReplicated(t *testing.T, aq, hq *harness.QMP, vm string, volumes []string, timeout time.Duration, why string) {
	t.Helper()
	start := time.Now()
	for {
		st := queryAgent(t, aq)
		ok := st.Connected && len(st.Volumes) == len(volumes)
		for _, v := range st.Volumes {
			ok = ok && v.Mirroring && v.BacklogIOs == 0 && v.DirtyRegions == 0
		}
		h := queryRepagent(t, hq, vm)
		ok = ok && h != nil && h.Connected && len(h.Volumes) == len(volumes)
		for _, v := range volumesOf(h) {
			ok = ok && v.State == "protecting" && v.BacklogIOs == 0
		}
		ok = ok && h.Journal != nil && !h.Journal.Resyncing
		if ok {
			t.Logf("%s: replicated %v after waiting", why, time.Since(start).Round(time.Millisecond))
			return
		}
		if time.Since(start) > timeout {
			t.Fatalf("%s: not replicated within %v: agent %+v, hub %+v", why, timeout, st, h)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestReplicationVhostdmKilled: a guest's verified writers run on two
// protected disks of a real `vhostdm serve` replicating to a real
// repagent-hub; vhostdm is killed with SIGKILL mid-run and restarted on
// the same sockets. QEMU reconnects and resubmits what was in flight, so
// the guest sees no I/O error and its read-back verifies; the restarted
// agent sends only its activity log's extents as the dirty map, so the
// resync after the crash moves at most al-extents × al-extent-size bytes
// (not the volumes); after quiesce the newest consistent point, recovered
// from the hub, is byte-identical to the sources, which hold exactly the
// writers' last writes.
func TestReplicationVhostdmKilled(t *testing.T) {
	e := needEnv(t)
	testStart := time.Now()
	const (
		vmName        = "e2e-crash"
		size0, size1  = 16 << 20, 12 << 20 // different sizes: a swapped replica shows
		alExtents     = 8
		alExtentBytes = 1 << 20
		duration      = 16 // seconds of writing in the guest
	)
	dir, sd := t.TempDir(), sockDir(t)
	store := filepath.Join(dir, "hub")
	if err := os.Mkdir(store, 0o755); err != nil {
		t.Fatal(err)
	}
	hubAddr := freeLoopbackAddr(t)
	hubQMPSock := filepath.Join(sd, "hub.qmp")
	startHub(t, e, hubAddr, store, hubQMPSock)
	hq := dialQMP(t, hubQMPSock, "repagent-hub")

	imgs := []string{sparse(t, filepath.Join(dir, "d0.img"), size0), sparse(t, filepath.Join(dir, "d1.img"), size1)}
	ids := []string{"x0", "x1"}
	qmpSock := filepath.Join(sd, "qmp.sock")
	var b strings.Builder
	fmt.Fprintf(&b, "[qmp]\nsocket = %q\n\n[repagent]\nhub = %q\nvm = %q\nal-extents = %d\nal-extent-size = \"%dk\"\n",
		qmpSock, hubAddr, vmName, alExtents, alExtentBytes>>10)
	var disks []harness.Disk
	for i, size := range []int64{size0, size1} {
		sock := filepath.Join(sd, ids[i]+".sock")
		fmt.Fprintf(&b, "\n[[device]]\nname = \"d%d\"\ntable = %q\n", i, fmt.Sprintf("0 %d linear %s 0", size/512, imgs[i]))
		fmt.Fprintf(&b, "\n[[export]]\nid = %q\ndevice = \"d%d\"\nsocket = %q\nnum-queues = 1\nwritable = true\nserial = %q\nprotect = true\n",
			ids[i], i, sock, "e2e-crash-"+ids[i])
		disks = append(disks, harness.Disk{Socket: sock, NumQueues: 1})
	}
	config := filepath.Join(dir, "vm.toml")
	if err := os.WriteFile(config, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	be := startVhostdm(t, e, config)
	aq := dialQMP(t, qmpSock, "vhostdm")
	waitReplicated(t, aq, hq, vmName, ids, 30*time.Second, "initial sync")
	session := queryAgent(t, aq).Session

	vm := startVM(t, e, harness.VMConfig{
		Disks:  disks,
		Steps:  []string{proto.StepWriter + "@vda+vdb"},
		Params: writerParams(duration),
	})
	// Both writers under way and flushing.
	flushes := map[string]int{}
	waitDiskFlushes := func(n int, what string) {
		t.Helper()
		deadline := time.Now().Add(guestTimeout)
		want := map[string]int{"vda": flushes["vda"] + n, "vdb": flushes["vdb"] + n}
		for flushes["vda"] < want["vda"] || flushes["vdb"] < want["vdb"] {
			ev, err := vm.WaitFor(time.Until(deadline), what, func(ev harness.Event) bool {
				return isWriterEvent(ev) && ev.Result.OK
			})
			if err != nil {
				t.Fatal(err)
			}
			if isFlush(ev) {
				flushes[ev.Result.Disk]++
			}
		}
	}
	waitDiskFlushes(2, "the writers' first flushes on both disks")
	aq.Close()
	t.Logf("writers flushing on both disks: kill -9 vhostdm")
	killed := time.Now()
	be.Kill()
	time.Sleep(300 * time.Millisecond)
	if err := be.Start(15 * time.Second); err != nil {
		t.Fatalf("restart vhostdm on the same sockets: %v", err)
	}
	t.Logf("vhostdm restarted after %v", time.Since(killed).Round(time.Millisecond))
	aq = dialQMP(t, qmpSock, "vhostdm (restarted)")
	waitDiskFlushes(2, "flushes on both disks after vhostdm restarted (QEMU reconnect + in-flight resubmission)")
	t.Logf("both writers progressed %v after the kill", time.Since(killed).Round(time.Millisecond))

	run, err := vm.Wait(guestTimeout)
	if err != nil {
		t.Fatalf("guest: %v", err)
	}
	logRun(t, run)
	if f := run.Failed(); f != "" {
		t.Fatalf("the guest saw the crash:\n%s", f)
	}
	// The guest kernel logs failed block requests on the console.
	for _, bad := range []string{"I/O error", "blk_update_request"} {
		if strings.Contains(vm.Console(), bad) {
			t.Errorf("the guest kernel logged %q:\n%s", bad, vm.ConsoleTail(40))
		}
	}
	writes := map[string]int64{}
	for _, d := range []string{"vda", "vdb"} {
		r := run.Result(proto.StepWriter, d)
		if r == nil || r.Values["writes"] == 0 || r.Values["io_errors"] != 0 || r.Values["bad_blocks"] != 0 {
			t.Fatalf("writer on %s: %+v, want writes, no I/O error and a clean read-back", d, r)
		}
		writes[d] = r.Values["writes"]
	}

	// Quiesce, then the resync after the restart: only the activity log.
	waitReplicated(t, aq, hq, vmName, ids, 60*time.Second, "after the restart")
	st := queryAgent(t, aq)
	if st.Session != session {
		t.Errorf("agent session %s after the restart, want %s (kept with a trusted activity log)", st.Session, session)
	}
	var planned, moved uint64
	for _, v := range st.Volumes {
		t.Logf("%s after the restart: resync %q of %d bytes; requested %d bytes in all, the hub read %d bytes; %d writes mirrored",
			v.Volume, v.ResyncReason, v.ResyncBytes, v.ResyncTotal, v.RemoteBytes, v.Mirrored)
		if v.ResyncTotal > 0 && v.ResyncReason == "" {
			t.Errorf("%s: resync of %d bytes without a reason", v.Volume, v.ResyncTotal)
		}
		planned += v.ResyncTotal
		moved += v.RemoteBytes
	}
	limit := uint64(alExtents * alExtentBytes)
	if planned == 0 {
		t.Errorf("nothing resynchronised after kill -9 under the writers: the activity log had no hot extent")
	}
	if planned > limit || moved > limit {
		t.Errorf("resync after the restart: requested %d and read %d bytes, more than the activity log's %d extents of %d bytes (%d)",
			planned, moved, alExtents, alExtentBytes, limit)
	}
	t.Logf("resync after kill -9: requested %d bytes, the hub read %d bytes (bound %d, volumes %d)", planned, moved, limit, size0+size1)

	// The hub's newest consistent point equals the sources, which hold
	// exactly the writers' last writes.
	out := filepath.Join(dir, "recovered")
	raw := qmpDo(t, hq, "repagent-recover", map[string]any{"vm": vmName, "out": out})
	var rec struct {
		Seq     uint64 `json:"seq"`
		Volumes []struct {
			Name string `json:"name"`
			Path string `json:"path"`
		} `json:"volumes"`
	}
	if err := json.Unmarshal(raw, &rec); err != nil || len(rec.Volumes) != 2 {
		t.Fatalf("repagent-recover reply %s (%v): want two volumes", raw, err)
	}
	for i, id := range ids {
		src := mustRead(t, imgs[i])
		for _, err := range harness.CheckWriterExact(src, writerSeed, writes[[]string{"vda", "vdb"}[i]]) {
			t.Errorf("source %s after the run: %v", id, err)
		}
		found := false
		for _, v := range rec.Volumes {
			if v.Name == id {
				found = true
				if d := firstDiff(mustRead(t, v.Path), src); d != "" {
					t.Errorf("volume %s recovered at the newest point (seq %d) differs from its source: %s", id, rec.Seq, d)
				}
			}
		}
		if !found {
			t.Errorf("the recovered point has no volume %s: %s", id, raw)
		}
	}
	t.Logf("recovered the newest point (seq %d): identical to the sources; test wall time %v", rec.Seq, time.Since(testStart).Round(time.Millisecond))
}
