//go:build ceph

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/vhostdm/vhostdm/internal/cephtest"
	"github.com/vhostdm/vhostdm/internal/reptest"
)

// TestRBDBackingWrittenWhileStopped is TestBackingWrittenWhileStopped over
// rbd: images of a throwaway Ceph cluster, which vhostdm cannot look at as
// files: at a clean stop `vhostdm serve` (a real child process, built
// with -tags ceph) flushes each protected image and takes a snapshot of
// it; another librbd client writes three regions of one image while the
// daemon is stopped; at the restart the daemon compares each image with
// its snapshot (rbd_diff_iterate2), removes the snapshot, and reports the
// written one changed: the hub reads exactly the regions that differ and
// nothing of the other image, and replicas end identical. A restart with
// nothing written (after the daemon's own writes) moves nothing, and no
// snapshot is left while the daemon serves the images.
func TestRBDBackingWrittenWhileStopped(t *testing.T) {
	const (
		volBytes = 16 << 20
		region   = 64 << 10 // the default dirty-map region
	)
	c, err := cephtest.Start()
	if err != nil {
		t.Fatalf("this test needs a throwaway Ceph cluster: %v", err)
	}
	t.Cleanup(func() { c.Stop() })
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	h, addr := startTestHub(t, store)
	images := map[string]string{
		"a0": c.CreateImage(t, cephtest.Pool, volBytes),
		"b0": c.CreateImage(t, cephtest.Pool, volBytes),
	}
	text := fmt.Sprintf(crashRepConfig, addr, 6, volBytes/512, volBytes/512)
	text = strings.Replace(text, "linear a.img", "linear "+images["a0"], 1)
	text = strings.Replace(text, "linear b.img", "linear "+images["b0"], 1)
	text += fmt.Sprintf("\n[ceph]\nconf = %q\nid = %q\nkeyring = %q\n", c.Conf, c.ID, c.Keyring)
	cfg := writeConfig(t, dir, text)
	qmpSock := filepath.Join(dir, "qmp.sock")
	// waitHubProtecting finds the QMP socket beside the volumes' names.
	names := map[string]string{"a0": filepath.Join(dir, "a0"), "b0": filepath.Join(dir, "b0")}
	snaps := func(vol string) string {
		return strings.TrimSpace(c.Must(t, "rbd", "snap", "ls", strings.TrimPrefix(images[vol], "rbd:")))
	}
	check := func(step string) {
		t.Helper()
		if err := h.ApplyNow("vm1"); err != nil {
			t.Fatal(err)
		}
		for vol, img := range images {
			src := filepath.Join(t.TempDir(), vol+".src")
			if err := os.WriteFile(src, c.Export(t, img), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := reptest.SameFiles(src, filepath.Join(store, "vm1", vol+".img"), volBytes); err != nil {
				t.Errorf("%s: %s: the replica differs from the image: %v", step, vol, err)
			}
		}
	}
	write := func(child *child, seed uint64) {
		t.Helper()
		stop, count := startCrashWriters(t, dir, volBytes, seed)
		for deadline := time.Now().Add(20 * time.Second); count() < 100 && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		stop()
		quiesceMirrored(t, qmpSock)
		waitHubProtecting(t, h, names, child)
	}

	child := startChild(t, cfg)
	waitHubProtecting(t, h, names, child)
	write(child, 7)
	check("first run")
	child.stop(t)
	for vol := range images {
		if s := snaps(vol); !strings.Contains(s, "vhostdm-stopped.vm1."+vol) {
			t.Fatalf("after a clean stop %s has no snapshot vhostdm-stopped.vm1.%s:\n%s", vol, vol, s)
		}
	}

	// Another librbd client writes three regions of a0's image.
	offs := []int64{1 << 20, 5<<20 + region, 9 << 20}
	writeRBD(t, c, images["a0"], offs, region)

	child = startChild(t, cfg)
	waitHubProtecting(t, h, names, child)
	for vol := range images {
		if s := snaps(vol); s != "" {
			t.Errorf("%s keeps a snapshot while served (every object written next would be copied):\n%s", vol, s)
		}
	}
	wantWrittenResync(t, h, qmpSock, images["a0"], uint64(len(offs)*region), volBytes)
	check("after the restart")

	// The daemon's own writes, then a stop and a start: nothing moves.
	write(child, 8)
	child.stop(t)
	child = startChild(t, cfg)
	waitHubProtecting(t, h, names, child)
	wantNoResync(t, qmpSock, "with nothing written while stopped")
	check("after the last restart")
	child.stop(t)
}

// writeRBD writes n bytes of a pattern at each of offs into the image
// name (rbd:POOL/IMAGE) as another librbd client.
func writeRBD(t *testing.T, c *cephtest.Cluster, name string, offs []int64, n int) {
	t.Helper()
	pool, image, _ := strings.Cut(strings.TrimPrefix(name, "rbd:"), "/")
	conn, err := rados.NewConnWithUser(c.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Shutdown()
	if err := conn.ReadConfigFile(c.Conf); err != nil {
		t.Fatal(err)
	}
	if err := conn.SetConfigOption("keyring", c.Keyring); err != nil {
		t.Fatal(err)
	}
	if err := conn.Connect(); err != nil {
		t.Fatal(err)
	}
	ioctx, err := conn.OpenIOContext(pool)
	if err != nil {
		t.Fatal(err)
	}
	defer ioctx.Destroy()
	img, err := rbd.OpenImage(ioctx, image, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	for i, off := range offs {
		if _, err := img.WriteAt(reptest.Pattern(uint64(1000+i), n), off); err != nil {
			img.Close()
			t.Fatal(err)
		}
	}
	if err := img.Flush(); err != nil {
		img.Close()
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
}
