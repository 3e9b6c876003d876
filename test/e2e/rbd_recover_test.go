//go:build ceph

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
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
// RBD clones and writes a vm.toml; `vhostdm serve -c` of that file as
// written serves them through the rbd: backend to a QEMU guest, which
// reads and verifies phase 1's plan on both disks. The host then checks
// the clones byte for byte: phase 1 exactly, none of phase 2.
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

	ctx := reptest.Context(t)
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

	// Recovery at the checkpoint through the running hub: RBD clones.
	bin, err := e.GoBuild("./cmd/repagent-hub", "repagent-hub", false)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(sd, "rec") // sockets live here: keep it short
	start = time.Now()
	rctx, rcancel := context.WithTimeout(ctx, recTimeout)
	defer rcancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(rctx, bin, "recover", "--qmp", hubQMP, "--vm", vmName, "--out", out,
		"--checkpoint", ckpt, "--ceph-conf", c.Conf)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("repagent-hub recover: %v\n%s", err, stderr.String())
	}
	recTime := time.Since(start)
	var rec struct {
		Seq     uint64 `json:"seq"`
		Config  string `json:"config"`
		Volumes []struct {
			Name string `json:"name"`
			Size int64  `json:"size"`
			Path string `json:"path"`
		} `json:"volumes"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &rec); err != nil || len(rec.Volumes) != len(vols) {
		t.Fatalf("recover output %q (%v): want %d volumes", stdout.String(), err, len(vols))
	}
	t.Logf("recovered checkpoint %q (seq %d) in %v: %s", ckpt, rec.Seq, recTime.Round(time.Millisecond), stdout.String())
	toml, err := os.ReadFile(rec.Config)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := harness.LoadConfig(rec.Config)
	if err != nil {
		t.Fatalf("%v\n%s", err, toml)
	}
	// The guest's disks in the order of vols, by the export serving each.
	disks := make([]harness.Disk, len(vols))
	clones := make([]string, len(vols))
	for i, v := range vols {
		for _, rv := range rec.Volumes {
			if rv.Name == v.Name {
				clones[i] = rv.Path
			}
		}
		if !strings.HasPrefix(clones[i], "rbd:"+pool+"/") {
			t.Fatalf("volume %s recovered as %q, not an RBD image of pool %s:\n%s", v.Name, clones[i], pool, toml)
		}
		for _, x := range cfg.Exports {
			if d, err := cfg.Device(x.Device); err == nil && strings.Contains(d.Table, " "+clones[i]+" ") {
				disks[i] = harness.Disk{Socket: x.Socket, NumQueues: max(x.NumQueues, 1)}
			}
		}
		if disks[i].Socket == "" {
			t.Fatalf("no export of the recovered configuration serves %s (%s):\n%s", v.Name, clones[i], toml)
		}
	}

	// The user's path: vhostdm serve -c the file as written.
	p := startVhostdm(t, e, rec.Config)
	params := seedParams(seed1, coverage, maxBlocks)
	params[proto.ParamDisks] = "2"
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disks,
		Steps:  []string{proto.StepInfo, proto.StepReadVerify + "@vda", proto.StepReadVerify + "@vdb"},
		Params: params,
	})
	for i, d := range []string{"vda", "vdb"} {
		if di := info(t, run, d); di.Sectors != vols[i].Size/512 {
			t.Errorf("guest %s: %d sectors, want %d", d, di.Sectors, vols[i].Size/512)
		}
	}
	p.Stop()
	if err := p.ExitErr(); err != nil {
		t.Errorf("vhostdm did not stop cleanly: %v\n%s", err, tail(p.Log(), 30))
	}
	// Byte for byte: the clones hold phase 1 and nothing of phase 2.
	for i, v := range vols {
		data := c.Export(t, clones[i])
		if int64(len(data)) != v.Size {
			t.Errorf("rbd export of %s: %d bytes, want %d", clones[i], len(data), v.Size)
			continue
		}
		if !bytes.Equal(data, model[i]) {
			for _, err := range harness.CheckPlan(data, harness.PlanCheck{Seed: seed1, Coverage: coverage, MaxBlocks: maxBlocks, ZeroElsewhere: true}) {
				t.Errorf("recovered %s (%s): %v", v.Name, clones[i], err)
			}
			t.Errorf("recovered %s (%s) differs from the state at checkpoint %q", v.Name, clones[i], ckpt)
		}
	}
}
