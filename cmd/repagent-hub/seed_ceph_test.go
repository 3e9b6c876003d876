//go:build ceph

package main

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// TestCephSeed: `repagent-hub seed --store ceph:POOL` makes a file and an
// RBD image a VM's replicas (RBD images of the pool; a source's zero
// chunks are not written, so the replica stays thin) and refuses to seed
// the VM again. A repagent-hub child process on the pool then serves the
// VM: when its agent connects with sources that differ from the seeds in
// a few regions, the checksum resync reads exactly those regions, and the
// replicas end equal to the sources.
func TestCephSeed(t *testing.T) {
	const rb = 64 << 10
	c := cephCluster(t)
	pool := c.CreatePool(t, "rbd")
	store := "ceph:" + pool
	dir := t.TempDir()
	o := ceph.NewOpener(ceph.Config{Conf: c.Conf}, slog.New(slog.DiscardHandler))
	defer o.Close()

	// root from a file whose second half is zeroes; data from an RBD image.
	root := reptest.Pattern(1, 8<<20)
	clear(root[4<<20:])
	rootFile := filepath.Join(dir, "root.raw")
	if err := os.WriteFile(rootFile, root, 0o600); err != nil {
		t.Fatal(err)
	}
	data := reptest.Pattern(2, 4<<20)
	srcImg := c.CreateImage(t, pool, int64(len(data)))
	b, err := o.Open(srcImg, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.WriteAt([][]byte{data}, 0); err != nil {
		t.Fatal(err)
	}
	b.Close()

	r := reptest.New(t)
	args := []string{"seed", "--store", store, "--ceph-conf", c.Conf, "--vm", "vm1", "--uuid", r.AgentCfg.UUID,
		"--volume", "root=" + rootFile, "--volume", "data=" + srcImg}
	start := time.Now()
	if code, out := cli(args...); code != 0 {
		t.Fatalf("seed: exit %d: %s", code, out)
	}
	t.Logf("seeded %d bytes into %s in %v", len(root)+len(data), store, time.Since(start).Round(time.Millisecond))
	if code, out := cli(args...); code != 1 || !strings.Contains(out, "already holds vm") {
		t.Errorf("seeding again: exit %d: %s", code, out)
	}
	replica := map[string]string{"root": "rbd:" + pool + "/vhostdm-hub.vm1.root", "data": "rbd:" + pool + "/vhostdm-hub.vm1.data"}
	if !bytes.Equal(readRBD(t, o, replica["root"]), root) || !bytes.Equal(readRBD(t, o, replica["data"]), data) {
		t.Fatalf("the seeded replicas differ from their sources")
	}
	// Thin: only root's first 4 MiB (one RBD object) were written.
	du, err := c.Run("rbd", "diff", "--format", "json", strings.TrimPrefix(replica["root"], "rbd:"))
	var extents []struct{ Length int64 }
	if err != nil || json.Unmarshal([]byte(du), &extents) != nil {
		t.Fatalf("rbd diff: %v %q", err, du)
	}
	used := int64(0)
	for _, e := range extents {
		used += e.Length
	}
	if used > 4<<20 {
		t.Errorf("the seeded root replica has %d bytes allocated, want at most the 4 MiB of data", used)
	}

	// The hub resyncs the seeded replicas by checksums.
	addr := freeAddr(t)
	hp := startHubProc(t, dir, addr, 0, "--store", store, "--ceph-conf", c.Conf)
	defer func() { hp.kill() }()
	r.Addr = addr
	vr, vd := r.AddVolume("root", int64(len(root))), r.AddVolume("data", int64(len(data)))
	srcRoot, srcData := bytes.Clone(root), bytes.Clone(data)
	copy(srcRoot[3*rb+100:], reptest.Pattern(3, 4096))        // region 3
	copy(srcRoot[100*rb:], reptest.Pattern(4, 512))           // region 100 (zero in the seed)
	copy(srcData[len(srcData)-512:], reptest.Pattern(5, 512)) // the last region
	os.WriteFile(vr.Backing, srcRoot, 0o600)
	os.WriteFile(vd.Backing, srcData, 0o600)
	r.StartAgent(reptest.ProtectAll(vr, vd))
	for _, v := range []struct {
		name       string
		size, diff int64
	}{{"root", int64(len(root)), 2 * rb}, {"data", int64(len(data)), rb}} {
		st := waitVolume(t, hp, v.name, 90*time.Second, func(s hub.VolumeStatus) bool {
			return s.State == hub.StateProtecting && s.ResyncBytes == 0 && s.CsumPendingBytes == 0
		})
		if st.RemoteReadBytes != uint64(v.diff) || st.CsumMatchedBytes != uint64(v.size-v.diff) {
			t.Errorf("%s: the resync read %d bytes (%d compared equal), want the %d of the differing regions", v.name, st.RemoteReadBytes, st.CsumMatchedBytes, v.diff)
		}
		t.Logf("%s: seeded replica resynced by checksums: read %d of %d bytes", v.name, st.RemoteReadBytes, v.size)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if bytes.Equal(readRBD(t, o, replica["root"]), srcRoot) && bytes.Equal(readRBD(t, o, replica["data"]), srcData) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the replicas do not converge to the sources")
		}
	}
}
