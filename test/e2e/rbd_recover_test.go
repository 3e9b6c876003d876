//go:build ceph

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// TestRBDRecoverCheckpointGuest is point-in-time recovery from the Ceph
// store as a user does it: a repagent-hub process serves --store
// ceph:POOL; an agent (in this process, guests driven over vhost-user)
// protects two volumes. Phase 1 writes the verify plan of seed1 into both,
// a named checkpoint follows, then phase 2 overwrites part of every plan
// extent and adds a second plan. `repagent-hub recover --checkpoint` makes
// RBD clones and writes a vm.toml, and so does `recover --at` a time
// between the checkpoint and phase 2; `vhostdm serve -c` of each file as
// written serves its clones through the rbd: backend, and a failover
// test at the checkpoint serves the hub's own clones; one QEMU guest reads
// and verifies phase 1's plan on all six disks. The host then
// checks the clones byte for byte: phase 1 exactly, none of phase 2.
// `repagent-hub clones` refuses to remove a clone vhostdm serves; stopping
// the failover test removes its clones and only those, and `clones
// --remove-all` the recoveries' once vhostdm has stopped.
func TestRBDRecoverCheckpointGuest(t *testing.T) {
	e := needEnv(t)
	c := needCeph(t)
	const (
		vmName                     = "vm1" // reptest's agent
		ckpt                       = "before-phase-2"
		seed1, seed2               = 4242, 977
		coverage, maxBlocks        = 40, 32
		coverage2                  = 15
		size0, size1               = 16 << 20, 8 << 20 // different sizes: a swapped volume shows
		protectTimeout, recTimeout = 90 * time.Second, 2 * time.Minute
	)
	pool := c.CreatePool(t, "rbd")
	sd := sockDir(t)
	hubAddr := freeLoopbackAddr(t)
	hubQMP := filepath.Join(sd, "hub.qmp")
	// A recovery window: phase 2 stays in the journal, not in the
	// replicas, so the checkpoint is a point behind the newest.
	startHub(t, e, hubAddr, "ceph:"+pool, hubQMP, "--ceph-conf", c.Conf, "--retain", "1h")
	hq := dialQMP(t, hubQMP, "repagent-hub")

	r := reptest.New(t)
	r.Addr = hubAddr
	vols := []*reptest.Vol{r.AddVolume("root", size0), r.AddVolume("data", size1)}
	r.StartAgent(reptest.ProtectAll(vols...))
	settled := func(why string) {
		t.Helper()
		deadline := time.Now().Add(protectTimeout)
		for {
			vm := queryRepagent(t, hq, vmName)
			ok := vm != nil && vm.Connected && len(vm.Volumes) == len(vols) && vm.Journal != nil && !vm.Journal.Resyncing
			for _, v := range volumesOf(vm) {
				ok = ok && v.State == "protecting"
			}
			for _, v := range r.Agent.Status().Volumes {
				ok = ok && v.Mirroring && v.BacklogIOs == 0 && v.DirtyRegions == 0
			}
			if ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: not protected within %v: %+v", why, protectTimeout, vm)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	start := time.Now()
	settled("initial sync")
	t.Logf("initial sync to ceph:%s in %v", pool, time.Since(start).Round(time.Millisecond))

	// The writes and recoveries share one deadline, generous for a
	// loaded machine (reptest.Context's 30 s ran out under load).
	ctx, cancelAll := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancelAll()
	write := func(v *reptest.Vol, seed uint64, off int64, n int64) {
		t.Helper()
		p := make([]byte, n)
		pattern.Fill(p, seed, off)
		if err := v.Client.WriteAt(ctx, 0, p, uint64(off/512)); err != nil {
			t.Fatalf("write %s [%d,+%d): %v", v.Name, off, n, err)
		}
	}
	// Phase 1: seed1's plan; the model is what the checkpoint holds.
	model := make([][]byte, len(vols))
	for i, v := range vols {
		model[i] = make([]byte, v.Size)
		for _, x := range pattern.Plan(seed1, v.Size, coverage, maxBlocks) {
			write(v, seed1, x.Off, x.Len)
			pattern.Fill(model[i][x.Off:x.End()], seed1, x.Off)
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := r.Agent.Checkpoint(cctx, ckpt)
	cancel()
	if err != nil {
		t.Fatalf("checkpoint %q: %v", ckpt, err)
	}
	// A wall-clock point after the checkpoint and before phase 2, whose
	// writes are issued after it: the same state, found by time.
	time.Sleep(20 * time.Millisecond)
	at := time.Now()
	time.Sleep(20 * time.Millisecond)
	// Phase 2: the first 4 KiB of every plan extent, then seed2's plan.
	for _, v := range vols {
		for _, x := range pattern.Plan(seed1, v.Size, coverage, maxBlocks) {
			write(v, seed2, x.Off, min(x.Len, 4096))
		}
		for _, x := range pattern.Plan(seed2, v.Size, coverage2, maxBlocks) {
			write(v, seed2, x.Off, x.Len)
		}
	}
	settled("after phase 2")
	for i, v := range vols {
		src, err := os.ReadFile(v.Backing)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(src, model[i]) {
			t.Fatalf("phase 2 left %s as the checkpoint had it: the test could not tell the points apart", v.Name)
		}
	}

	// Recovery through the running hub, by checkpoint and by time: RBD
	// clones and a vm.toml each, served as written (the user's path) by
	// one vhostdm each.
	bin, err := e.GoBuild("./cmd/repagent-hub", "repagent-hub", false)
	if err != nil {
		t.Fatal(err)
	}
	var disks []harness.Disk
	var clones []string // in the order of disks
	var procs []*harness.Process
	for _, pt := range []struct{ dir, flag, value string }{
		{"ckpt", "--checkpoint", ckpt},
		{"at", "--at", at.UTC().Format(time.RFC3339Nano)},
	} {
		out := filepath.Join(sd, pt.dir) // sockets live here: keep it short
		start := time.Now()
		rctx, rcancel := context.WithTimeout(ctx, recTimeout)
		var stdout, stderr bytes.Buffer
		cmd := exec.CommandContext(rctx, bin, "recover", "--qmp", hubQMP, "--vm", vmName, "--out", out,
			pt.flag, pt.value, "--ceph-conf", c.Conf)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		rcancel()
		if err != nil {
			t.Fatalf("repagent-hub recover %s %s: %v\n%s", pt.flag, pt.value, err, stderr.String())
		}
		recTime := time.Since(start)
		var rec struct {
			Seq     uint64 `json:"seq"`
			Config  string `json:"config"`
			Volumes []struct {
				Name string `json:"name"`
				Path string `json:"path"`
			} `json:"volumes"`
		}
		if err := json.Unmarshal(stdout.Bytes(), &rec); err != nil || len(rec.Volumes) != len(vols) {
			t.Fatalf("recover output %q (%v): want %d volumes", stdout.String(), err, len(vols))
		}
		toml, err := os.ReadFile(rec.Config)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("recover %s %s: seq %d in %v; %s:\n%s", pt.flag, pt.value, rec.Seq, recTime.Round(time.Millisecond), rec.Config, toml)
		cfg, err := harness.LoadConfig(rec.Config)
		if err != nil {
			t.Fatalf("%v\n%s", err, toml)
		}
		// The guest's disks in the order of vols, by the export serving each.
		for _, v := range vols {
			clone := ""
			for _, rv := range rec.Volumes {
				if rv.Name == v.Name {
					clone = rv.Path
				}
			}
			if !strings.HasPrefix(clone, "rbd:"+pool+"/") {
				t.Fatalf("volume %s recovered as %q, not an RBD image of pool %s", v.Name, clone, pool)
			}
			var disk harness.Disk
			for _, x := range cfg.Exports {
				if d, err := cfg.Device(x.Device); err == nil && strings.Contains(d.Table, " "+clone+" ") {
					disk = harness.Disk{Socket: x.Socket, NumQueues: max(x.NumQueues, 1)}
				}
			}
			if disk.Socket == "" {
				t.Fatalf("no export of %s serves %s (%s)", rec.Config, v.Name, clone)
			}
			disks, clones = append(disks, disk), append(clones, clone)
		}
		procs = append(procs, startVhostdm(t, e, rec.Config))
	}

	// A failover test at the checkpoint: the hub serves RBD clones of its
	// own (the live replicas never) over vhost-user-blk.
	fdir := sockDir(t)
	start = time.Now()
	raw := qmpDo(t, hq, "repagent-failover-test", map[string]any{"vm": vmName, "dir": fdir, "checkpoint": ckpt})
	var fx []struct {
		Volume, Socket, Image string
	}
	if err := json.Unmarshal(raw, &fx); err != nil || len(fx) != len(vols) {
		t.Fatalf("repagent-failover-test reply %s (%v): want %d exports", raw, err, len(vols))
	}
	t.Logf("failover test at %q started in %v", ckpt, time.Since(start).Round(time.Millisecond))
	testClones := map[string]bool{}
	for _, v := range vols {
		found := false
		for _, x := range fx {
			if x.Volume == v.Name {
				if !strings.HasPrefix(x.Image, "rbd:"+pool+"/vhostdm-hub."+vmName+"."+v.Name+".rec-") {
					t.Fatalf("failover test serves %s from %q, not a recovery clone", v.Name, x.Image)
				}
				disks, clones = append(disks, harness.Disk{Socket: x.Socket, NumQueues: 1}), append(clones, x.Image)
				testClones[x.Image] = true
				found = true
			}
		}
		if !found {
			t.Fatalf("repagent-failover-test serves no volume %q: %s", v.Name, raw)
		}
	}

	// One guest reads both recoveries and the failover test: vda, vdb at
	// the checkpoint, vdc, vdd at the time, vde, vdf the failover test's;
	// each must hold phase 1's plan.
	params := seedParams(seed1, coverage, maxBlocks)
	params[proto.ParamDisks] = strconv.Itoa(len(disks))
	steps := []string{proto.StepInfo}
	for i := range disks {
		steps = append(steps, proto.StepReadVerify+"@"+vdName(i))
	}
	run := runGuest(t, e, harness.VMConfig{Disks: disks, Steps: steps, Params: params})
	for i := range disks {
		v := vols[i%len(vols)]
		if di := info(t, run, vdName(i)); di.Sectors != v.Size/512 {
			t.Errorf("guest %s: %d sectors, want %d", vdName(i), di.Sectors, v.Size/512)
		}
	}
	// `repagent-hub clones` refuses a clone a running vhostdm serves.
	clonesCmd := func(args ...string) (string, error) {
		cmd := exec.Command(bin, append([]string{"clones", "--store", "ceph:" + pool, "--ceph-conf", c.Conf}, args...)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := clonesCmd("--remove", clones[0]); err == nil || !strings.Contains(out, "open by a client") {
		t.Errorf("repagent-hub clones --remove of a clone vhostdm serves: %v\n%s", err, out)
	}
	for _, p := range procs {
		p.Stop()
		if err := p.ExitErr(); err != nil {
			t.Errorf("vhostdm did not stop cleanly: %v\n%s", err, tail(p.Log(), 30))
		}
	}
	// Byte for byte: the clones hold phase 1 and nothing of phase 2.
	for i, clone := range clones {
		v := vols[i%len(vols)]
		data := c.Export(t, clone)
		if int64(len(data)) != v.Size {
			t.Errorf("rbd export of %s: %d bytes, want %d", clone, len(data), v.Size)
			continue
		}
		if !bytes.Equal(data, model[i%len(vols)]) {
			for _, err := range harness.CheckPlan(data, harness.PlanCheck{Seed: seed1, Coverage: coverage, MaxBlocks: maxBlocks, ZeroElsewhere: true}) {
				t.Errorf("recovered %s (%s): %v", v.Name, clone, err)
			}
			t.Errorf("recovered %s (%s) differs from the state at checkpoint %q", v.Name, clone, ckpt)
		}
	}
	// Stopping the failover test removes its clones, not the recoveries';
	// those go with `repagent-hub clones --remove-all` once vhostdm is done.
	qmpDo(t, hq, "repagent-failover-test-stop", map[string]any{"vm": vmName})
	ls := c.Must(t, "rbd", "ls", pool)
	for _, clone := range clones {
		name := strings.TrimPrefix(clone, "rbd:"+pool+"/")
		if gone := !strings.Contains(ls, name); gone != testClones[clone] {
			t.Errorf("after the failover test stopped, %s is there: %v (a failover test's clone: %v)\n%s", clone, !gone, testClones[clone], ls)
		}
	}
	// A vhostdm that served a clone as a protected volume left the
	// snapshot that marks its stop (ceph.MarkSnapPrefix): it goes with
	// the clone.
	for _, clone := range clones {
		if !testClones[clone] {
			c.Must(t, "rbd", "snap", "create", strings.TrimPrefix(clone, "rbd:")+"@vhostdm-stopped."+vmName+".root") // ceph.MarkSnapPrefix
			break
		}
	}
	if out, err := clonesCmd("--vm", vmName, "--purpose", "recover", "--remove-all"); err != nil || strings.Count(out, "removed ") != 2*len(vols) {
		t.Errorf("repagent-hub clones --remove-all: %v\n%s", err, out)
	}
	if ls := c.Must(t, "rbd", "ls", pool); strings.Contains(ls, ".rec-") {
		t.Errorf("recovery clones left after clones --remove-all:\n%s", ls)
	}
}

// vdName is the guest's name of its i-th virtio disk (up to 26).
func vdName(i int) string { return "vd" + string(rune('a'+i)) }
