package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/qmpclient"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// queryAgent runs query-repagent on the child's QMP socket.
func queryAgent(sock string) (agentStatus, error) {
	var s agentStatus
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	mon, err := qmpclient.Dial(ctx, "unix", sock)
	if err != nil {
		return s, err
	}
	defer mon.Close()
	raw, err := mon.Run([]byte(`{"execute":"query-repagent"}`))
	if err != nil {
		return s, err
	}
	var resp struct {
		Return agentStatus `json:"return"`
	}
	err = json.Unmarshal(raw, &resp)
	return resp.Return, err
}

const crashRepConfig = `
[qmp]
socket = "qmp.sock"

[repagent]
hub = "%s"
vm = "vm1"
al-extents = %d
al-extent-size = "1m"

[[device]]
name = "a"
table = "0 %d linear a.img 0"

[[device]]
name = "b"
table = "0 %d linear b.img 0"

[[export]]
id = "a0"
device = "a"
socket = "a.sock"
writable = true
protect = true

[[export]]
id = "b0"
device = "b"
socket = "b.sock"
writable = true
protect = true
`

// TestCrashResyncsActivityLogOnly: kill -9 of a real `vhostdm serve` child
// process under writes to two protected volumes; after the restart the
// agent sends its activity log's extents as the dirty map, the hub reads
// only those (at most al-extents × extent size, a fraction of the
// volumes), query-repagent says why and how much, and the replicas end
// byte-identical to the sources.
func TestCrashResyncsActivityLogOnly(t *testing.T) {
	const (
		volBytes  = 32 << 20
		alExtents = 6
		extBytes  = 1 << 20
	)
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	h, addr := startTestHub(t, store)
	for _, n := range []string{"a.img", "b.img"} {
		sparse(t, filepath.Join(dir, n), volBytes)
	}
	cfg := writeConfig(t, dir, fmt.Sprintf(crashRepConfig, addr, alExtents, volBytes/512, volBytes/512))
	qmpSock := filepath.Join(dir, "qmp.sock")
	images := map[string]string{"a0": filepath.Join(dir, "a.img"), "b0": filepath.Join(dir, "b.img")}

	child := startChild(t, cfg)
	waitHubProtecting(t, h, images, child)
	st0, err := queryAgent(qmpSock)
	if err != nil {
		t.Fatal(err)
	}

	// Writers: random 4..64 KiB writes over the whole of both volumes
	// from 4 goroutines each, until the child dies.
	stop, count := startCrashWriters(t, dir, volBytes, 0)
	time.Sleep(1500 * time.Millisecond)
	n := count()
	if n < 50 {
		t.Fatalf("only %d writes before the kill", n)
	}
	child.kill(t)
	stop()

	// Restart under new writes (once the agent mirrors again, so that
	// they are not dirty-map regions beside the activity log's): the
	// agent numbers its writes from 1 again, and the hub's journal goes
	// on taking them.
	child = startChild(t, cfg)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		st, err := queryAgent(qmpSock)
		ok := err == nil && st.Connected && len(st.Volumes) == 2
		for _, v := range st.Volumes {
			ok = ok && v.Mirroring
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restarted agent does not mirror: %+v %v\n%s", st, err, child.log)
		}
	}
	stop, count = startCrashWriters(t, dir, volBytes, 100)
	for deadline := time.Now().Add(15 * time.Second); count() < 20 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	stop()
	if after := count(); after == 0 {
		t.Fatalf("no write after the restart:\n%s", child.log)
	}
	quiesceMirrored(t, qmpSock)
	// Only the activity log's extents are read back.
	waitHubProtecting(t, h, images, child)
	st, err := queryAgent(qmpSock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Session != st0.Session {
		t.Errorf("session %s after the restart, want %s (kept with a trusted activity log)", st.Session, st0.Session)
	}
	var moved, planned uint64
	for _, v := range st.Volumes {
		t.Logf("%s: resync %q planned %d bytes, hub read %d bytes", v.Volume, v.ResyncReason, v.ResyncBytes, v.RemoteBytes)
		if v.ResyncBytes > 0 && v.ResyncReason == "" {
			t.Errorf("%s: resync of %d bytes without a reason", v.Volume, v.ResyncBytes)
		}
		moved += v.RemoteBytes
		planned += v.ResyncBytes
	}
	if planned == 0 {
		t.Errorf("nothing planned for resync after kill -9 under %d writes", n)
	}
	if limit := uint64(alExtents * extBytes); planned > limit || moved > limit {
		t.Errorf("resync planned %d and moved %d bytes, more than the activity log's %d extents of %d bytes", planned, moved, alExtents, extBytes)
	}
	if moved > planned {
		t.Errorf("resync moved %d bytes, more than the %d the activity log named", moved, planned)
	}
	t.Logf("%d writes before kill -9; resync moved %d of %d bytes (volumes: %d)", n, moved, planned, 2*volBytes)
	checkReplicas(t, h, store, images, volBytes)

	// A clean stop marks the log clean: the next start resyncs nothing.
	child.stop(t)
	child = startChild(t, cfg)
	waitHubProtecting(t, h, images, child)
	wantNoResync(t, qmpSock, "after a clean stop")
	checkReplicas(t, h, store, images, volBytes)

	// A log that cannot be trusted means a full resync, with the reason.
	child.kill(t)
	if err := os.WriteFile(filepath.Join(dir, "vm1.actlog"), bytes.Repeat([]byte("garbage!"), 1024), 0o600); err != nil {
		t.Fatal(err)
	}
	child = startChild(t, cfg)
	waitHubProtecting(t, h, images, child)
	if st, err = queryAgent(qmpSock); err != nil {
		t.Fatal(err)
	}
	for _, v := range st.Volumes {
		if v.ResyncBytes != volBytes || !strings.Contains(v.ResyncReason, "full resync") || !strings.Contains(v.ResyncReason, "trusted") {
			t.Errorf("%s: untrusted log: resync %d bytes, reason %q; want a full resync saying why", v.Volume, v.ResyncBytes, v.ResyncReason)
		}
	}
	if !strings.Contains(child.log.String(), "activity log not trusted") {
		t.Errorf("no WARN about the untrusted activity log in:\n%s", child.log)
	}
	checkReplicas(t, h, store, images, volBytes)
}

// startCrashWriters writes random 4..64 KiB blocks over the whole of the
// volumes a and b in dir from 4 goroutines each until stop is called or
// the daemon goes away; count returns the writes completed.
func startCrashWriters(t *testing.T, dir string, volBytes int, seed uint64) (stop func(), count func() int) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var mu sync.Mutex
	written := 0
	var clients []*frontend.Client
	for i, id := range []string{"a", "b"} {
		cl, err := frontend.Dial(ctx, frontend.Config{Socket: filepath.Join(dir, id+".sock")})
		if err != nil {
			cancel()
			t.Fatal(err)
		}
		clients = append(clients, cl)
		for g := range 4 {
			buf, err := cl.Buf(64 << 10)
			if err != nil {
				cancel()
				t.Fatal(err)
			}
			wg.Add(1)
			go func(seed uint64) {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, 1))
				for ctx.Err() == nil {
					n := 4096 * (1 + rng.IntN(16))
					off := uint64(rng.IntN(volBytes/4096-16)) * 4096
					copy(buf[:n], reptest.Pattern(rng.Uint64(), n))
					if cl.WriteAt(ctx, 0, buf[:n], off/512) != nil {
						return
					}
					mu.Lock()
					written++
					mu.Unlock()
				}
			}(seed + uint64(i*10+g))
		}
	}
	stop = func() {
		cancel()
		wg.Wait()
		for _, cl := range clients {
			cl.Close()
		}
	}
	count = func() int {
		mu.Lock()
		defer mu.Unlock()
		return written
	}
	return stop, count
}

// waitHubProtecting waits until the hub protects every volume of images
// with nothing outstanding and the child's agent holds nothing unsent.
func waitHubProtecting(t *testing.T, h *hub.Hub, images map[string]string, child *child) {
	t.Helper()
	sock := filepath.Join(filepath.Dir(images["a0"]), "qmp.sock")
	deadline := time.Now().Add(60 * time.Second)
	for {
		ok := true
		got := map[string]hub.VolumeStatus{}
		for _, vm := range h.Status() {
			ok = ok && vm.Connected
			for _, v := range vm.Volumes {
				got[v.Volume] = v
			}
		}
		for vol := range images {
			v, found := got[vol]
			ok = ok && found && v.State == hub.StateProtecting && v.ResyncBytes == 0
		}
		if ok {
			st, err := queryAgent(sock)
			ok = err == nil && st.Connected && len(st.Volumes) == len(images)
			for _, v := range st.Volumes {
				ok = ok && v.Mirroring && v.BacklogIOs == 0 && v.DirtyRegions == 0
			}
		}
		if ok {
			return
		}
		select {
		case <-child.done:
			t.Fatalf("vhostdm serve exited:\n%s", child.log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("not protecting: hub %+v\nchild log:\n%s", got, child.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// quiesceMirrored waits until the agent on sock has mirrored the same
// number of writes for 200 ms: writers stopped by startCrashWriters gave
// up waiting for their last writes, which still land and are mirrored.
func quiesceMirrored(t *testing.T, sock string) {
	t.Helper()
	for last := -1; ; time.Sleep(200 * time.Millisecond) {
		st, err := queryAgent(sock)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, v := range st.Volumes {
			n += int(v.Mirrored)
		}
		if n == last {
			return
		}
		last = n
	}
}

// wantNoResync checks that no volume of the child on sock was
// resynchronised (planned or read) since it started.
func wantNoResync(t *testing.T, sock, when string) {
	t.Helper()
	st, err := queryAgent(sock)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range st.Volumes {
		if v.RemoteBytes != 0 || v.ResyncBytes != 0 {
			t.Errorf("%s: %s the restart resynced %d bytes (planned %d, %q)", v.Volume, when, v.RemoteBytes, v.ResyncBytes, v.ResyncReason)
		}
	}
}

// checkReplicas compares each replica with its source once the hub's
// journal is applied: the replica files are the journal's base images,
// which the applier advances in the background.
func checkReplicas(t *testing.T, h *hub.Hub, store string, images map[string]string, size int64) {
	t.Helper()
	if err := h.ApplyNow("vm1"); err != nil {
		t.Fatal(err)
	}
	for vol, img := range images {
		if err := reptest.SameFiles(img, filepath.Join(store, "vm1", vol+".img"), size); err != nil {
			t.Errorf("%s: replica differs from the source: %v", vol, err)
		}
	}
}
