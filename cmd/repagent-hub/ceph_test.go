//go:build ceph

package main

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/mapper"
)

// TestCephHubKillAndRecover: a repagent-hub child process with --store
// ceph:POOL replicates two protected volumes under a writer; it is killed
// with SIGKILL and restarted (waiting for its old lease): the resync
// moves only the agent's dirty regions (no full resync) and the replicas,
// RBD images, end byte-identical to the sources. Then `repagent-hub
// recover` through the hub's QMP recovers the newest point as RBD clones
// and writes a vhostdm TOML naming them rbd:POOL/IMAGE with a [ceph]
// section: the TOML validates, and the clones read through devices of
// its tables (the rbd: backend) hold the whole write history.
func TestCephHubKillAndRecover(t *testing.T) {
	c := cephCluster(t)
	pool := c.CreatePool(t, "rbd")
	dir := t.TempDir()
	hubAddr := freeAddr(t)
	const lease = 3 * time.Second
	extra := []string{"--store", "ceph:" + pool, "--ceph-conf", c.Conf, "--ceph-lease", lease.String()}
	hp := startHubProc(t, dir, hubAddr, 0, extra...)
	defer func() { hp.kill() }()

	r := reptest.New(t)
	r.Addr = hubAddr
	vols := []*reptest.Vol{r.AddVolume("root", 32<<20), r.AddVolume("data", 16<<20)}
	r.StartAgent(reptest.ProtectAll(vols...))
	total := uint64(0)
	for _, v := range vols {
		total += uint64(v.Size)
	}
	dirtyMapped := func() uint64 { return dirtyMappedBytes(r) }
	agentRemote := func() uint64 { return remoteReadBytes(r) }
	waitProtected := func(why string) {
		t.Helper()
		waitHubProtected(t, hp, r, len(vols), 90*time.Second, why)
	}
	start := time.Now()
	waitProtected("initial sync")
	t.Logf("initial sync of %d bytes to the Ceph store in %v", total, time.Since(start).Round(time.Millisecond))
	if st, _ := hp.status(); !strings.HasPrefix(st[0].Volumes[0].Replica, "rbd:"+pool+"/") {
		t.Errorf("replica %q is not an RBD image of the pool", st[0].Volumes[0].Replica)
	}

	var h history
	stop := startWriter(t, &h, vols, 2*time.Millisecond)
	defer stop()

	time.Sleep(1500 * time.Millisecond)
	hp.kill()
	killed := time.Now()
	// The writer pauses while the hub is away (its restart waits for
	// the lease): the resync is then the writes the kill left
	// unacknowledged, not a growing outage.
	resume := h.pause()
	defer resume()
	before, dirtyBefore := agentRemote(), dirtyMapped()
	hp = startHubProc(t, dir, hubAddr, 1, extra...)
	waitProtected("after hub kill -9")
	resume()
	moved, planned := agentRemote()-before, dirtyMapped()-dirtyBefore
	t.Logf("hub kill -9: protecting again %v after the kill (lease %v); resync moved %d bytes for %d bytes of dirty regions (volumes: %d bytes); %d writes so far",
		time.Since(killed).Round(time.Millisecond), lease, moved, planned, total, h.len())
	if moved > planned || moved >= total {
		t.Errorf("resync after the kill moved %d bytes (dirty regions %d, volumes %d): a full resync", moved, planned, total)
	}
	time.Sleep(500 * time.Millisecond)
	stop()
	waitProtected("after the writer stopped")

	// The applier (retain 0) brings the RBD replicas to the sources.
	o := ceph.NewOpener(ceph.Config{Conf: c.Conf}, slog.New(slog.DiscardHandler))
	defer o.Close()
	replica := replicasOf(t, hp)
	deadline := time.Now().Add(60 * time.Second)
	for {
		var bad []string
		for _, v := range vols {
			src, err := os.ReadFile(v.Backing)
			if err != nil {
				t.Fatal(err)
			}
			if got := readRBD(t, o, replica[v.Name]); !bytes.Equal(got[:len(src)], src) {
				bad = append(bad, v.Name)
			}
		}
		if len(bad) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("RBD replicas of %v differ from the sources after quiesce", bad)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// Point-in-time recovery from the Ceph store: RBD clones, a TOML.
	out := filepath.Join(dir, "recovered")
	rec := recoverCLI(t, "--qmp", hp.qmp, "--vm", "vm1", "--out", out, "--ceph-conf", c.Conf)
	toml, err := os.ReadFile(rec.Config)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse(toml, rec.Config, out)
	if err != nil {
		t.Fatalf("recovered configuration: %v\n%s", err, toml)
	}
	if cfg.Ceph.Conf == "" || len(cfg.Devices) != len(vols) {
		t.Fatalf("recovered configuration has no [ceph] conf or %d devices:\n%s", len(cfg.Devices), toml)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler),
		Schemes: map[string]mapper.OpenFunc{ceph.Scheme: ceph.NewOpener(cfg.CephConfig(), nil).Open}})
	defer m.Close()
	path := map[string]string{}
	for _, v := range rec.Volumes {
		path[v.Name] = v.Path
	}
	var imgs [][]byte
	for _, v := range vols {
		d := cfg.Devices[slicesIndex(cfg.Devices, v.Name)]
		if !strings.Contains(d.Table, "linear "+path[v.Name]+" 0") || !strings.HasPrefix(path[v.Name], "rbd:"+pool+"/") {
			t.Fatalf("volume %s is not served from an RBD clone: table %q, path %q", v.Name, d.Table, path[v.Name])
		}
		dev, err := m.CreateTable(d.Name, "", true, d.Table)
		if err != nil {
			t.Fatalf("load %s's table %q: %v", d.Name, d.Table, err)
		}
		buf := make([]byte, dev.Size()*512) // Size is in sectors
		if err := dev.Submit(&mapper.Request{Op: mapper.OpRead, Sectors: uint64(len(buf)) / 512, Data: [][]byte{buf}}); err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, buf)
	}
	k, err := h.prefixOf(imgs)
	if err != nil || k != h.len() {
		t.Fatalf("the recovered clones hold %d of %d writes: %v", k, h.len(), err)
	}
	t.Logf("recovered seq %d as %s: all %d writes", rec.Seq, rec.Volumes[0].Path, k)
}

func slicesIndex(ds []config.Device, name string) int {
	for i, d := range ds {
		if d.Name == name {
			return i
		}
	}
	panic(fmt.Sprintf("no device %s", name))
}
