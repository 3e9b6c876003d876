//go:build ceph

package main

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/cmd/repagent-hub/internal/failover"
	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// hubQMP runs one QMP command on the hub child and returns its "return"
// (or the error the hub answered).
func hubQMP(t *testing.T, sock, command string, args map[string]any) (json.RawMessage, error) {
	t.Helper()
	mon, err := dialQMP(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	cmd, _ := json.Marshal(map[string]any{"execute": command, "arguments": args})
	raw, err := mon.Run(cmd)
	if err != nil {
		return nil, err
	}
	var r struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		t.Fatalf("%s: %s: %v", command, raw, err)
	}
	return r.Return, nil
}

// readExport reads a whole failover-test export as a test VM does, over
// vhost-user-blk.
func readExport(t *testing.T, e failover.Export) []byte {
	t.Helper()
	ctx := reptest.Context(t)
	c, err := frontend.Dial(ctx, frontend.Config{Socket: e.Socket, MemSize: 16 << 20})
	if err != nil {
		t.Fatalf("dial %s: %v", e.Socket, err)
	}
	defer c.Close()
	img := make([]byte, e.Sectors*512)
	for off := 0; off < len(img); off += 1 << 20 {
		if err := c.ReadAt(ctx, 0, img[off:min(off+1<<20, len(img))], uint64(off/512)); err != nil {
			t.Fatalf("read %s at %d: %v", e.Volume, off, err)
		}
	}
	return img
}

// clonesCLI runs `repagent-hub clones` with the store's flags.
func clonesCLI(store, conf string, args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(append([]string{"clones", "--store", store, "--ceph-conf", conf}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

func listClones(t *testing.T, store, conf string, args ...string) []hub.RecoveredImage {
	t.Helper()
	code, out, errs := clonesCLI(store, conf, append([]string{"--json"}, args...)...)
	if code != 0 {
		t.Fatalf("clones --json: exit %d: %s", code, errs)
	}
	var l []hub.RecoveredImage
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		t.Fatalf("clones --json %q: %v", out, err)
	}
	return l
}

// TestCephFailoverTestPromoteClones: a repagent-hub child process on a
// Ceph store replicates two volumes under a writer, with a named
// checkpoint in the middle and a retention window. A failover test at
// the checkpoint (repagent-failover-test over QMP) serves RBD clones of
// the replicas' snapshots through vhostdm's mapper and vhost-user-blk: a
// reader sees exactly the writer's state at the checkpoint, its writes
// reach the clone and never the live replica, `repagent-hub clones` lists
// the clones labelled failover-test and refuses to remove them while they
// are served (watchers), and stopping the test removes the clones and
// their snapshots. A second test at the newest point, stopped with keep,
// leaves its clones, which `clones --remove-all` removes. Then `promote
// --checkpoint` makes clones at the checkpoint the VM's new sources: its
// vm.toml serves them through rbd: tables (read back: the checkpoint's
// state), the agent is refused, and `clones --remove-all` keeps promoted
// volumes (only --remove NAME removes them).
func TestCephFailoverTestPromoteClones(t *testing.T) {
	c := cephCluster(t)
	pool := c.CreatePool(t, "rbd")
	store := "ceph:" + pool
	dir := t.TempDir()
	hubAddr := freeAddr(t)
	// The initial sync is applied to the replicas (--retain 0), then the
	// hub restarts with a retention window: the failover tests' volumes
	// are clones of replica snapshots with the journal replayed into them.
	hp := startHubProc(t, dir, hubAddr, 0, "--store", store, "--ceph-conf", c.Conf)
	defer func() { hp.kill() }()

	r := reptest.New(t)
	r.Addr = hubAddr
	vols := []*reptest.Vol{r.AddVolume("root", 8<<20), r.AddVolume("data", 4<<20)}
	r.StartAgent(reptest.ProtectAll(vols...))
	waitProtected := func(applied bool) {
		t.Helper()
		for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			st, err := hp.status()
			ok := err == nil && len(st) == 1 && st[0].Connected && len(st[0].Volumes) == len(vols) && st[0].Journal != nil &&
				!st[0].Journal.Resyncing && (!applied || st[0].Journal.Bytes == 0)
			for _, v := range volumesIn(st) {
				ok = ok && v.State == hub.StateProtecting
			}
			if ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("not protected: %+v %v", st, err)
			}
		}
	}
	waitProtected(true)
	hp.cmd.Process.Signal(syscall.SIGTERM)
	if err := hp.cmd.Wait(); err != nil {
		t.Fatalf("hub stopped with %v", err)
	}
	hp.log.Close()
	hp = startHubProc(t, dir, hubAddr, 1, "--store", store, "--ceph-conf", c.Conf, "--retain", "1h")
	waitProtected(false)

	h, kCkpt := writeAroundCheckpoint(t, r, vols, "cp1")
	kEnd := h.len()
	// The newest consistent point holds every write once the agent has
	// no backlog.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ok := true
		for _, v := range r.Agent.Status().Volumes {
			ok = ok && v.BacklogIOs == 0 && v.DirtyRegions == 0
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent's backlog does not drain: %+v", r.Agent.Status())
		}
	}

	o := ceph.NewOpener(ceph.Config{Conf: c.Conf}, slog.New(slog.DiscardHandler))
	defer o.Close()
	replica := replicasOf(t, hp)
	startTest := func(testDir string, args map[string]any) []failover.Export {
		t.Helper()
		args["vm"], args["dir"] = "vm1", testDir
		start := time.Now()
		raw, err := hubQMP(t, hp.qmp, "repagent-failover-test", args)
		if err != nil {
			t.Fatalf("repagent-failover-test %v: %v", args, err)
		}
		var exps []failover.Export
		if err := json.Unmarshal(raw, &exps); err != nil || len(exps) != len(vols) {
			t.Fatalf("repagent-failover-test: %s (%v)", raw, err)
		}
		t.Logf("failover test %v started in %v", args, time.Since(start).Round(time.Millisecond))
		byVol := map[string]failover.Export{}
		for _, e := range exps {
			byVol[e.Volume] = e
		}
		exps = exps[:0]
		for _, v := range vols { // in the history's volume order
			e, ok := byVol[v.Name]
			if !ok || !strings.HasPrefix(e.Image, "rbd:"+pool+"/") || e.Image == replica[e.Volume] || e.Sectors != uint64(v.Size/512) {
				t.Fatalf("export %+v: want volume %s served from an RBD clone in %s, not the replica %s", e, v.Name, pool, replica[v.Name])
			}
			exps = append(exps, e)
		}
		return exps
	}
	readAll := func(exps []failover.Export) [][]byte {
		var imgs [][]byte
		for _, e := range exps {
			imgs = append(imgs, readExport(t, e))
		}
		return imgs
	}

	// 1. A failover test at the checkpoint.
	exps := startTest(filepath.Join(dir, "test1"), map[string]any{"checkpoint": "cp1"})
	if k, err := h.prefixOf(readAll(exps)); err != nil || k != kCkpt {
		t.Fatalf("the failover test's volumes hold the first %d writes (%v), want the %d of the checkpoint", k, err, kCkpt)
	}
	if _, err := hubQMP(t, hp.qmp, "repagent-failover-test", map[string]any{"vm": "vm1", "dir": filepath.Join(dir, "again")}); err == nil {
		t.Errorf("a second failover test of the VM started")
	}
	// The test VM writes its clone, never the live replica.
	mark := reptest.Pattern(99, 64<<10)
	{
		ctx := reptest.Context(t)
		fc, err := frontend.Dial(ctx, frontend.Config{Socket: exps[0].Socket, MemSize: 16 << 20})
		if err != nil {
			t.Fatal(err)
		}
		if err := fc.WriteAt(ctx, 0, mark, 0); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(mark))
		if err := fc.ReadAt(ctx, 0, got, 0); err != nil || !bytes.Equal(got, mark) {
			t.Errorf("the test VM does not read back its write (%v)", err)
		}
		fc.Close()
	}
	if got := readRBD(t, o, exps[0].Image); !bytes.Equal(got[:len(mark)], mark) {
		t.Errorf("the test VM's write is not in its clone %s", exps[0].Image)
	}
	if got := readRBD(t, o, replica["root"]); bytes.Equal(got[:len(mark)], mark) {
		t.Errorf("the test VM's write reached the live replica %s", replica["root"])
	}
	// The clones are listed, labelled, in use: not removable.
	cl := listClones(t, store, c.Conf)
	if len(cl) != 2 {
		t.Fatalf("clones lists %+v, want the test's 2", cl)
	}
	for i, ri := range cl {
		if ri.VM != "vm1" || ri.Purpose != hub.PurposeFailoverTest || len(ri.Watchers) == 0 || !strings.HasPrefix(ri.Parent, replica[ri.Volume]+"@pos-") || ri.Size != vols[1-i].Size {
			t.Errorf("clone %+v: want vm1's failover-test clone of %s, in use", ri, replica[ri.Volume])
		}
	}
	if code, _, errs := clonesCLI(store, c.Conf, "--remove", exps[0].Image); code != 1 || !strings.Contains(errs, "open by a client") {
		t.Errorf("removing a served clone: exit %d: %s", code, errs)
	}
	if code, out, errs := clonesCLI(store, c.Conf); code != 0 || !strings.Contains(out, "failover-test") || !strings.Contains(out, exps[1].Image) {
		t.Errorf("clones table: exit %d:\n%s%s", code, out, errs)
	}
	stopStart := time.Now()
	if _, err := hubQMP(t, hp.qmp, "repagent-failover-test-stop", map[string]any{"vm": "vm1"}); err != nil {
		t.Fatalf("repagent-failover-test-stop: %v", err)
	}
	t.Logf("failover test stopped and its clones removed in %v", time.Since(stopStart).Round(time.Millisecond))
	if cl := listClones(t, store, c.Conf); len(cl) != 0 {
		t.Errorf("after the failover test, clones remain: %+v", cl)
	}
	for _, v := range vols {
		name := strings.TrimPrefix(replica[v.Name], "rbd:")
		if out, err := c.Run("rbd", "snap", "ls", name); err != nil || strings.Contains(out, "pos-") {
			t.Errorf("after the failover test, %s has snapshots %q (%v)", name, out, err)
		}
	}

	// 2. A failover test at the newest point, kept.
	exps = startTest(filepath.Join(dir, "test2"), map[string]any{})
	if k, err := h.prefixOf(readAll(exps)); err != nil || k != kEnd {
		t.Errorf("the newest point's failover test holds the first %d writes (%v), want all %d", k, err, kEnd)
	}
	raw, err := hubQMP(t, hp.qmp, "repagent-failover-test-stop", map[string]any{"vm": "vm1", "keep": true})
	var kept struct{ Kept []string }
	if err != nil || json.Unmarshal(raw, &kept) != nil || len(kept.Kept) != 2 || !slices.Contains(kept.Kept, exps[0].Image) {
		t.Fatalf("repagent-failover-test-stop keep: %s %v", raw, err)
	}
	cl = listClones(t, store, c.Conf, "--vm", "vm1", "--purpose", hub.PurposeFailoverTest)
	if len(cl) != 2 || len(cl[0].Watchers)+len(cl[1].Watchers) != 0 {
		t.Fatalf("kept clones: %+v, want 2 not in use", cl)
	}
	if got := readRBD(t, o, exps[1].Image); len(got) != int(vols[1].Size) {
		t.Errorf("kept clone %s reads %d bytes, want %d", exps[1].Image, len(got), vols[1].Size)
	}
	if code, out, errs := clonesCLI(store, c.Conf, "--vm", "vm1", "--remove-all"); code != 0 || strings.Count(out, "removed ") != 2 {
		t.Errorf("clones --remove-all: exit %d:\n%s%s", code, out, errs)
	}
	if cl := listClones(t, store, c.Conf); len(cl) != 0 {
		t.Errorf("after --remove-all, clones remain: %+v", cl)
	}

	// 3. Promote at the checkpoint: clones are the new sources.
	out := filepath.Join(dir, "promoted")
	var stdout, stderr bytes.Buffer
	if code := run([]string{"promote", "--qmp", hp.qmp, "--vm", "vm1", "--out", out, "--checkpoint", "cp1", "--ceph-conf", c.Conf}, &stdout, &stderr); code != 0 {
		t.Fatalf("promote: exit %d: %s", code, stderr.String())
	}
	var rec Recovered
	if err := json.Unmarshal(stdout.Bytes(), &rec); err != nil {
		t.Fatalf("promote output %q: %v", stdout.String(), err)
	}
	cfg, err := config.Load(rec.Config)
	if err != nil || len(cfg.Devices) != len(vols) || cfg.Ceph.Conf == "" {
		t.Fatalf("the promoted VM's configuration %s: %v %+v", rec.Config, err, cfg)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler),
		Schemes: map[string]mapper.OpenFunc{ceph.Scheme: ceph.NewOpener(cfg.CephConfig(), nil).Open}})
	var imgs [][]byte
	for _, v := range vols {
		d := cfg.Devices[slicesIndex(cfg.Devices, v.Name)]
		if !strings.Contains(d.Table, " linear rbd:"+pool+"/") {
			t.Fatalf("promoted volume %s is not served from an RBD clone: %q", v.Name, d.Table)
		}
		dev, err := m.CreateTable(d.Name, "", true, d.Table)
		if err != nil {
			t.Fatalf("load %s's table %q: %v", d.Name, d.Table, err)
		}
		buf := make([]byte, dev.Size()*512)
		if err := dev.Submit(&mapper.Request{Op: mapper.OpRead, Sectors: uint64(len(buf)) / 512, Data: [][]byte{buf}}); err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, buf)
	}
	m.Close()
	if k, err := h.prefixOf(imgs); err != nil || k != kCkpt {
		t.Errorf("promoted clones hold the first %d writes (%v), want the %d of the checkpoint", k, err, kCkpt)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		as := r.Agent.Status()
		if !as.Connected && strings.Contains(as.Refused, "promoted") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent is not refused after promote: %+v", as)
		}
	}
	if st, err := hp.status(); err != nil || len(st) != 1 || !st[0].Promoted {
		t.Errorf("hub after promote: %+v %v", st, err)
	}
	cl = listClones(t, store, c.Conf, "--purpose", hub.PurposePromote)
	if len(cl) != 2 {
		t.Fatalf("promoted clones listed: %+v", cl)
	}
	if code, out, errs := clonesCLI(store, c.Conf, "--remove-all"); code != 0 || strings.Contains(out, "removed") || !strings.Contains(errs, "promoted VM's volume: kept") {
		t.Errorf("clones --remove-all with promoted volumes: exit %d:\n%s%s", code, out, errs)
	}
	if cl := listClones(t, store, c.Conf); len(cl) != 2 {
		t.Errorf("--remove-all removed promoted volumes: %+v", cl)
	}
	// Promote closed the VM's journal: recover --store opens it offline,
	// its clones labelled recover.
	offline := recoverCLI(t, "--store", store, "--ceph-conf", c.Conf, "--vm", "vm1", "--out", filepath.Join(dir, "offline"), "--checkpoint", "cp1")
	if rl := listClones(t, store, c.Conf, "--purpose", hub.PurposeRecover); len(rl) != 2 || offline.Mode != "offline" {
		t.Errorf("offline recovery's clones: %+v (%s)", rl, offline.Mode)
	}
	if code, out, errs := clonesCLI(store, c.Conf, "--purpose", hub.PurposeRecover, "--remove-all"); code != 0 || strings.Count(out, "removed ") != 2 {
		t.Errorf("clones --purpose recover --remove-all: exit %d:\n%s%s", code, out, errs)
	}
	if code, _, errs := clonesCLI(store, c.Conf, "--remove", cl[0].Name, "--remove", strings.TrimPrefix(cl[1].Name, "rbd:"+pool+"/")); code != 0 {
		t.Errorf("clones --remove of the promoted volumes: exit %d: %s", code, errs)
	}
	if code, _, errs := clonesCLI(store, c.Conf, "--remove", replica["root"]); code != 1 || !strings.Contains(errs, "not a recovered volume") {
		t.Errorf("clones --remove of a replica: exit %d: %s", code, errs)
	}
	if cl := listClones(t, store, c.Conf); len(cl) != 0 {
		t.Errorf("clones remain: %+v", cl)
	}
}
