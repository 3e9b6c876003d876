package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// hubVolume is the part of a query-repagent volume the test reads.
type hubVolume struct {
	Volume       string `json:"volume"`
	State        string `json:"state"`
	Reason       string `json:"reason"`
	Sectors      uint64 `json:"sectors"`
	BacklogIOs   uint64 `json:"backlog-ios"`
	BacklogBytes uint64 `json:"backlog-bytes"`
	AppliedSeq   uint64 `json:"applied-sequence"`
	AppliedBytes uint64 `json:"applied-bytes"`
	RemoteRead   uint64 `json:"remote-read-bytes"`
	Replica      string `json:"replica"`
}

// hubVM is one VM of query-repagent.
type hubVM struct {
	VM        string      `json:"vm"`
	Connected bool        `json:"connected"`
	Volumes   []hubVolume `json:"volumes"`
	Journal   *struct {
		Resyncing bool `json:"resyncing"`
	} `json:"journal"`
}

// queryRepagent returns the hub's view of vm, or nil if it has none.
func queryRepagent(t *testing.T, q *harness.QMP, vm string) *hubVM {
	t.Helper()
	var vms []hubVM
	raw := qmpDo(t, q, "query-repagent", nil)
	if err := json.Unmarshal(raw, &vms); err != nil {
		t.Fatalf("query-repagent reply %s: %v", raw, err)
	}
	for i := range vms {
		if vms[i].VM == vm {
			return &vms[i]
		}
	}
	return nil
}

// freeLoopbackAddr returns a loopback TCP address nothing listens on.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startHub builds and starts repagent-hub (extra: more serve flags) and
// stops it at the end.
func startHub(t *testing.T, e *harness.Env, listen, store, qmp string, extra ...string) *harness.Process {
	t.Helper()
	bin, err := e.GoBuild("./cmd/repagent-hub", "repagent-hub", false)
	if err != nil {
		t.Fatalf("cannot build the hub: %v", err)
	}
	p, err := harness.StartProcess("repagent-hub", bin, append([]string{"serve", "--listen", listen, "--store", store, "--qmp", qmp, "--retain", "0"}, extra...), []string{qmp}, 15*time.Second)
	if err != nil {
		t.Fatalf("repagent-hub serve: %v", err)
	}
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("repagent-hub log:\n%s", tail(p.Log(), 60))
		}
	})
	return p
}

// TestReplicationFailover protects two exports of one VM with repagent:
// a guest runs the verify plan on one disk and the verified writer on the
// other; once the hub reports both volumes protecting with no backlog,
// each replica must be byte-identical to its source image. Then
// repagent-failover-test serves copies at the newest consistent point as vhost-user-blk sockets and
// a second guest booted on them finds the verify plan and every write of
// the writer.
func TestReplicationFailover(t *testing.T) {
	e := needEnv(t)
	const (
		vmName                        = "e2e-vm"
		size0, size1                  = 32 << 20, 24 << 20 // different sizes: a swapped replica shows
		seed, coverage, maxBlocks     = 6006, 50, 64
		writerDuration, settleTimeout = 6, 45 * time.Second
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
	sizes := []int64{size0, size1}
	ids := []string{"x0", "x1"}
	// harness.Config has no [repagent] table nor protect keys: write the
	// TOML here.
	var b strings.Builder
	fmt.Fprintf(&b, "[qmp]\nsocket = %q\n\n[repagent]\nhub = %q\nvm = %q\n", filepath.Join(sd, "qmp.sock"), hubAddr, vmName)
	var disks []harness.Disk
	for i := range imgs {
		sock := filepath.Join(sd, ids[i]+".sock")
		fmt.Fprintf(&b, "\n[[device]]\nname = \"d%d\"\ntable = %q\n", i, fmt.Sprintf("0 %d linear %s 0", sizes[i]/512, imgs[i]))
		fmt.Fprintf(&b, "\n[[export]]\nid = %q\ndevice = \"d%d\"\nsocket = %q\nnum-queues = 1\nwritable = true\nserial = %q\nprotect = true\n",
			ids[i], i, sock, "e2e-rep-"+ids[i])
		disks = append(disks, harness.Disk{Socket: sock, NumQueues: 1})
	}
	config := filepath.Join(dir, "vm.toml")
	if err := os.WriteFile(config, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	startVhostdm(t, e, config)

	params := seedParams(seed, coverage, maxBlocks)
	params[proto.ParamDisks] = "2"
	params[proto.ParamDuration] = strconv.Itoa(writerDuration)
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disks,
		Steps:  []string{proto.StepVerify + "@vda", proto.StepWriter + "@vdb"},
		Params: params,
	})
	wr := run.Result(proto.StepWriter, "vdb")
	if wr == nil || wr.Values["writes"] == 0 {
		t.Fatalf("no writer result with writes on vdb: %+v", wr)
	}
	writes := wr.Values["writes"]

	// Quiesce: both volumes protecting, nothing in flight.
	start := time.Now()
	var vm *hubVM
	for {
		vm = queryRepagent(t, hq, vmName)
		settled := vm != nil && vm.Connected && len(vm.Volumes) == 2
		for _, v := range volumesOf(vm) {
			settled = settled && v.State == "protecting" && v.BacklogIOs == 0 && v.BacklogBytes == 0
		}
		if settled {
			break
		}
		if time.Since(start) > settleTimeout {
			t.Fatalf("the hub did not report both volumes protecting with zero backlog within %v: %+v", settleTimeout, vm)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("hub settled %v after the guest: %+v", time.Since(start).Round(time.Millisecond), vm.Volumes)
	for i, id := range ids {
		v := findVolume(vm, id)
		if v == nil {
			t.Fatalf("the hub has no volume %q for export %s: %+v", id, id, vm.Volumes)
		}
		if v.Sectors != uint64(sizes[i]/512) {
			t.Errorf("volume %s: hub reports %d sectors, want %d", id, v.Sectors, sizes[i]/512)
		}
		// The replica is the journal's base image: the applier (--retain
		// 0) brings it to the journaled point within moments.
		d := "not compared"
		for try := 0; try < 100 && d != ""; try++ {
			if try > 0 {
				time.Sleep(100 * time.Millisecond)
			}
			d = firstDiff(mustRead(t, v.Replica), mustRead(t, imgs[i]))
		}
		if d != "" {
			t.Errorf("replica %s of %s is not identical to its source: %s", v.Replica, id, d)
		}
	}
	if t.Failed() {
		return
	}

	// Failover test: a second guest on the replicas.
	fdir := sockDir(t)
	raw := qmpDo(t, hq, "repagent-failover-test", map[string]any{"vm": vmName, "dir": fdir})
	var fx []struct {
		Volume  string `json:"volume"`
		Socket  string `json:"socket"`
		Sectors uint64 `json:"sectors"`
	}
	if err := json.Unmarshal(raw, &fx); err != nil || len(fx) != 2 {
		t.Fatalf("repagent-failover-test reply %s (%v): want two exports", raw, err)
	}
	t.Cleanup(func() { hq.Execute("repagent-failover-test-stop", map[string]any{"vm": vmName}, 10*time.Second) })
	var fdisks []harness.Disk
	for i, id := range ids {
		found := false
		for _, x := range fx {
			if x.Volume == id {
				if x.Sectors != uint64(sizes[i]/512) {
					t.Errorf("failover export of %s has %d sectors, want %d", id, x.Sectors, sizes[i]/512)
				}
				if !strings.HasPrefix(x.Socket, fdir) {
					t.Errorf("failover socket %s is not in the requested dir %s", x.Socket, fdir)
				}
				fdisks = append(fdisks, harness.Disk{Socket: x.Socket, NumQueues: 1})
				found = true
			}
		}
		if !found {
			t.Fatalf("repagent-failover-test serves no volume %q: %s", id, raw)
		}
	}
	if vm := queryRepagent(t, hq, vmName); vm != nil {
		for _, v := range vm.Volumes {
			// The test VM runs on copies materialised at the newest
			// consistent point: protection goes on.
			if v.State != "protecting" {
				t.Errorf("volume %s in state %q during the failover test, want protecting", v.Volume, v.State)
			}
		}
	}
	params2 := seedParams(seed, coverage, maxBlocks)
	params2[proto.ParamDisks] = "2"
	params2[proto.ParamAcked] = strconv.FormatInt(writes, 10)
	params2[proto.ParamIssued] = strconv.FormatInt(writes, 10)
	run2 := runGuest(t, e, harness.VMConfig{
		Disks:  fdisks,
		Steps:  []string{proto.StepInfo, proto.StepReadVerify + "@vda", proto.StepWriterCheck + "@vdb"},
		Params: params2,
	})
	for i, d := range []string{"vda", "vdb"} {
		if di := info(t, run2, d); di.Sectors != sizes[i]/512 {
			t.Errorf("failover guest %s: %d sectors, want %d", d, di.Sectors, sizes[i]/512)
		}
	}
	if r := run2.Result(proto.StepWriterCheck, "vdb"); r == nil || r.Values["newest_write"] != writes-1 {
		// With acked = issued = writes every block holds its last write,
		// so the newest one seen is the last write made.
		t.Errorf("failover guest's writercheck %+v: want newest_write %d", r, writes-1)
	}
	qmpDo(t, hq, "repagent-failover-test-stop", map[string]any{"vm": vmName})
}

func volumesOf(vm *hubVM) []hubVolume {
	if vm == nil {
		return nil
	}
	return vm.Volumes
}

func findVolume(vm *hubVM, name string) *hubVolume {
	for i := range vm.Volumes {
		if vm.Volumes[i].Volume == name {
			return &vm.Volumes[i]
		}
	}
	return nil
}
