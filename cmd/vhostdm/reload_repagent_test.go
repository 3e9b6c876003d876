package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// startTestHub runs a hub on loopback with its store in dir.
func startTestHub(t *testing.T, dir string) (*hub.Hub, string) {
	t.Helper()
	return reptest.ServeHub(t, hub.Config{Store: dir, Name: "hub", Logger: slog.New(slog.DiscardHandler)})
}

// waitReplicated waits until the hub protects every one of vols of vm1
// with nothing outstanding on either side, then compares each replica
// with its source image.
func waitReplicated(t *testing.T, d *daemon, h *hub.Hub, store string, images map[string]string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok := true
		got := map[string]hub.VolumeStatus{}
		for _, vm := range h.Status() {
			for _, v := range vm.Volumes {
				got[v.Volume] = v
			}
		}
		for vol := range images {
			v, found := got[vol]
			ok = ok && found && v.State == hub.StateProtecting && v.BacklogIOs == 0 && v.ResyncBytes == 0
		}
		as := d.agent.Status()
		ok = ok && as.Connected
		for _, v := range as.Volumes {
			ok = ok && (!v.Protect || v.Mirroring && v.BacklogIOs == 0 && v.DirtyRegions == 0)
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not replicated: hub %+v agent %+v", got, as)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The replicas are the hub journal's base images: apply the journal.
	if err := h.ApplyNow("vm1"); err != nil {
		t.Fatal(err)
	}
	for vol, img := range images {
		fi, err := os.Stat(img)
		if err != nil {
			t.Fatal(err)
		}
		if err := reptest.SameFiles(img, filepath.Join(store, "vm1", vol+".img"), fi.Size()); err != nil {
			t.Errorf("%s: replica differs from the source: %v", vol, err)
		}
	}
}

const reloadRepConfig = `
[qmp]
socket = "qmp.sock"

[repagent]
hub = "%s"
vm = "vm1"

[[device]]
name = "root"
table = "0 8192 linear root.img 0"

[[export]]
id = "root0"
device = "root"
socket = "root.sock"
writable = true
%s`

const reloadRepData = `
[[device]]
name = "data"
table = "0 4096 linear data.img 0"

[[export]]
id = "data0"
device = "data"
socket = "data.sock"
writable = true
protect = true
`

// TestReloadKeepsProtection: exports added or changed by a reload with
// protect = true are replicated (replicas identical); [repagent] changes
// that cannot apply live are refused with nothing changed; a new hub
// address makes the agent reconnect there.
func TestReloadKeepsProtection(t *testing.T) {
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	h, addr := startTestHub(t, store)
	os.WriteFile(filepath.Join(dir, "root.img"), reptest.Pattern(1, 4<<20), 0o600)
	os.WriteFile(filepath.Join(dir, "data.img"), reptest.Pattern(2, 2<<20), 0o600)
	path := writeConfig(t, dir, fmt.Sprintf(reloadRepConfig, addr, ""))
	d, ctx := serveInProcess(t, path)

	// root0 becomes protected and data0 appears, protected.
	writeConfig(t, dir, fmt.Sprintf(reloadRepConfig, addr, "protect = true\n")+reloadRepData)
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	images := map[string]string{"root0": filepath.Join(dir, "root.img"), "data0": filepath.Join(dir, "data.img")}
	for _, id := range []string{"root0", "data0"} {
		cl, err := frontend.Dial(ctx, frontend.Config{Socket: filepath.Join(dir, strings.TrimSuffix(id, "0")+".sock")})
		if err != nil {
			t.Fatal(err)
		}
		buf, _ := cl.Buf(64 << 10)
		copy(buf, reptest.Pattern(3, len(buf)))
		for s := uint64(0); s < 2048; s += 512 {
			if err := cl.WriteAt(ctx, 0, buf, s); err != nil {
				t.Fatalf("%s: %v", id, err)
			}
		}
		cl.Close()
	}
	waitReplicated(t, d, h, store, images)

	// What cannot change live is refused, and nothing changes.
	for name, text := range map[string]string{
		"vm":         strings.Replace(fmt.Sprintf(reloadRepConfig, addr, "protect = true\n")+reloadRepData, `vm = "vm1"`, `vm = "vm2"`, 1),
		"no agent":   strings.Replace(fmt.Sprintf(reloadRepConfig, addr, "")+reloadRepData, "[repagent]\nhub = \""+addr+"\"\nvm = \"vm1\"\n", "", 1),
		"queue size": strings.Replace(fmt.Sprintf(reloadRepConfig, addr, "protect = true\n")+reloadRepData, `vm = "vm1"`, "vm = \"vm1\"\nqueue-size = \"8m\"", 1),
	} {
		writeConfig(t, dir, text)
		if err := d.reloadConfig(path); err == nil || !strings.Contains(err.Error(), "repagent") {
			t.Errorf("%s: reload %v, want a refusal", name, err)
		}
		if n := len(d.ex.List()); n != 2 {
			t.Errorf("%s: %d exports after a refused reload", name, n)
		}
	}

	// The hub moves: the agent reconnects to the new one, which protects
	// both volumes from scratch.
	store2 := filepath.Join(dir, "store2")
	h2, addr2 := startTestHub(t, store2)
	writeConfig(t, dir, fmt.Sprintf(reloadRepConfig, addr2, "protect = true\n")+reloadRepData)
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	waitReplicated(t, d, h2, store2, images)
	if c := d.agent.Status().Connects; c != 2 {
		t.Errorf("the agent connected %d times, want 2 (the first hub, then the second)", c)
	}
	if n := len(d.ex.List()); n != 2 {
		t.Errorf("%d exports after the hub moved", n)
	}
}

// TestReloadReplacesProtectedExport: a reload that replaces a protected
// export (here its serial changes) leaves it protected: the guest's
// writes after the reload reach the replica. (The agent detached and
// attached the volume between two reports: the hub took the new volume
// for the old one, "protecting, in sync", and never started it.)
func TestReloadReplacesProtectedExport(t *testing.T) {
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	h, addr := startTestHub(t, store)
	os.WriteFile(filepath.Join(dir, "root.img"), reptest.Pattern(1, 4<<20), 0o600)
	path := writeConfig(t, dir, fmt.Sprintf(reloadRepConfig, addr, "protect = true\n"))
	d, ctx := serveInProcess(t, path)
	images := map[string]string{"root0": filepath.Join(dir, "root.img")}
	waitReplicated(t, d, h, store, images)

	writeConfig(t, dir, fmt.Sprintf(reloadRepConfig, addr, "protect = true\nserial = \"replaced\"\n"))
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	cl, err := frontend.Dial(ctx, frontend.Config{Socket: filepath.Join(dir, "root.sock")})
	if err != nil {
		t.Fatal(err)
	}
	buf, _ := cl.Buf(64 << 10)
	copy(buf, reptest.Pattern(5, len(buf)))
	for s := uint64(0); s < 2048; s += 512 {
		if err := cl.WriteAt(ctx, 0, buf, s); err != nil {
			t.Fatal(err)
		}
	}
	cl.Close()
	waitReplicated(t, d, h, store, images)
	if c := d.agent.Status().Connects; c != 1 {
		t.Errorf("the agent connected %d times, want 1", c)
	}
}

// TestReloadRotatesCertificate: new contents of the same [repagent] TLS
// files (a renewed certificate) make the agent reconnect with them on
// reload; the hub sees the new identity and protection goes on.
func TestReloadRotatesCertificate(t *testing.T) {
	dir := t.TempDir()
	ca := reptest.NewCA(t, "ca")
	_, hubFiles := ca.Issue(t, dir, "hub", true)
	_, old := ca.Issue(t, dir, "host1", false)
	_, renewed := ca.Issue(t, dir, "host2", false)
	hubTLS, err := hubFiles.TLSConfig(true)
	if err != nil {
		t.Fatal(err)
	}
	auth, err := hub.ParseAuthorizations(strings.NewReader("host1 vm1\nhost2 vm1\n"), "authorize")
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	store := filepath.Join(dir, "store")
	h, err := hub.New(hub.Config{Store: store, Name: "hub", TLS: hubTLS, Authorize: auth,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := h.Listen("127.0.0.1:0", false)
	if err != nil {
		t.Fatal(err)
	}
	hctx, hcancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { defer close(served); h.Serve(hctx, ln) }()
	t.Cleanup(func() { hcancel(); h.Close(); <-served })

	// The agent's files: copies it will find replaced.
	cp := func(src, dst string) {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, dst), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cp(old.Cert, "agent.crt")
	cp(old.Key, "agent.key")
	cp(old.CA, "ca.crt")
	os.WriteFile(filepath.Join(dir, "root.img"), reptest.Pattern(4, 4<<20), 0o600)
	text := fmt.Sprintf(reloadRepConfig, ln.Addr().String(), "protect = true\n")
	text = strings.Replace(text, `vm = "vm1"`, "vm = \"vm1\"\ntls-cert = \"agent.crt\"\ntls-key = \"agent.key\"\ntls-ca = \"ca.crt\"", 1)
	path := writeConfig(t, dir, text)
	d, _ := serveInProcess(t, path)
	images := map[string]string{"root0": filepath.Join(dir, "root.img")}
	waitReplicated(t, d, h, store, images)
	if !logs.has("agent connected", "identity=host1") {
		t.Fatalf("the hub did not see host1:\n%s", logs.String())
	}

	// An unchanged file: no reconnect.
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	// The certificate is renewed in place.
	cp(renewed.Cert, "agent.crt")
	cp(renewed.Key, "agent.key")
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for !logs.has("agent connected", "identity=host2") {
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not reconnect with the renewed certificate:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	waitReplicated(t, d, h, store, images)
	if n := d.agent.Status().Connects; n != 2 {
		t.Errorf("the agent connected %d times, want 2", n)
	}
}

// has reports whether one line holds every one of want.
func (l *syncBuffer) has(want ...string) bool {
	for _, line := range strings.Split(l.String(), "\n") {
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(line, w)
		}
		if ok {
			return true
		}
	}
	return false
}

// TestRepagentHubList: `hub` as a list: the agent skips an address where
// nothing listens and replicates to the next; query-repagent shows the
// hub in use.
func TestRepagentHubList(t *testing.T) {
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	h, addr := startTestHub(t, store)
	dead := freeTCPAddr(t)
	os.WriteFile(filepath.Join(dir, "root.img"), reptest.Pattern(1, 4<<20), 0o600)
	text := strings.Replace(fmt.Sprintf(reloadRepConfig, addr, "protect = true\n"),
		`hub = "`+addr+`"`, `hub = ["`+dead+`", "`+addr+`"]`, 1)
	path := writeConfig(t, dir, text)
	d, _ := serveInProcess(t, path)
	waitReplicated(t, d, h, store, map[string]string{"root0": filepath.Join(dir, "root.img")})
	got, err := d.qmpQueryRepagent(nil)
	if err != nil {
		t.Fatal(err)
	}
	if st := got.(agentStatus); !st.Connected || st.Hub != addr {
		t.Errorf("query-repagent: connected %v to %q, want %q (after %q)", st.Connected, st.Hub, addr, dead)
	}
}

// freeTCPAddr returns a loopback address where nothing listens.
func freeTCPAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestReloadRepointsProtectedExport: a reload that re-points a protected
// export at other data — the device's table reloaded over another image
// while the export stays, then the export moved to another device by the
// configuration — is seen by the agent (the backing changed) and the hub
// resynchronises the volume by checksums: the replica ends a copy of the
// new image, not of the old one with the new writes on top. A table that
// maps the same data otherwise costs a comparison and no transfer.
func TestReloadRepointsProtectedExport(t *testing.T) {
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	h, addr := startTestHub(t, store)
	for i, n := range []string{"root.img", "other.img", "alt.img"} {
		os.WriteFile(filepath.Join(dir, n), reptest.Pattern(uint64(10+i), 4<<20), 0o600)
	}
	path := writeConfig(t, dir, fmt.Sprintf(reloadRepConfig, addr, "protect = true\n"))
	d, _ := serveInProcess(t, path)
	waitReplicated(t, d, h, store, map[string]string{"root0": filepath.Join(dir, "root.img")})
	reason := func() string {
		for _, v := range d.agent.Status().Volumes {
			if v.Name == "root0" {
				return v.Resync.Reason
			}
		}
		return ""
	}
	// hubRoot: the hub's view of root0 (what it read and compared so
	// far); compared: the bytes it read or compared by checksum. A
	// reload returns before the hub hears of it.
	hubRoot := func() hub.VolumeStatus {
		for _, vm := range h.Status() {
			for _, v := range vm.Volumes {
				if v.Volume == "root0" {
					return v
				}
			}
		}
		return hub.VolumeStatus{}
	}
	compared := func() uint64 {
		v := hubRoot()
		return v.RemoteReadBytes + v.CsumMatchedBytes + v.CsumDifferBytes
	}
	waitCompared := func(from uint64, what string) {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); compared() < from+4<<20; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the hub compared %d bytes of root0, want the whole volume again (reason %q)", what, compared()-from, reason())
			}
		}
	}
	dev, err := d.m.Get("root")
	if err != nil {
		t.Fatal(err)
	}

	// Another table over the same data: compared by checksum, nothing
	// read.
	h0 := hubRoot()
	if err := dev.Reload("0 4096 linear root.img 0\n4096 4096 linear root.img 4096"); err != nil {
		t.Fatal(err)
	}
	waitCompared(h0.RemoteReadBytes+h0.CsumMatchedBytes+h0.CsumDifferBytes, "after a table reload over the same data")
	waitReplicated(t, d, h, store, map[string]string{"root0": filepath.Join(dir, "root.img")})
	if h1 := hubRoot(); h1.RemoteReadBytes != h0.RemoteReadBytes || h1.CsumMatchedBytes-h0.CsumMatchedBytes != 4<<20 {
		t.Errorf("a table reload over the same data: the hub read %d bytes and found %d bytes equal by checksum; want 0 and the whole volume",
			h1.RemoteReadBytes-h0.RemoteReadBytes, h1.CsumMatchedBytes-h0.CsumMatchedBytes)
	}

	// The device's table, over another image, reloaded under the export
	// (as dmsetup reload and resume do; the export stays).
	before := compared()
	if err := dev.Reload("0 8192 linear other.img 0"); err != nil {
		t.Fatal(err)
	}
	waitCompared(before, "after the table reload")
	waitReplicated(t, d, h, store, map[string]string{"root0": filepath.Join(dir, "other.img")})
	if r := reason(); !strings.Contains(r, "a table reload") {
		t.Errorf("resync reason after the table reload: %q", r)
	}

	// The export, at another device.
	writeConfig(t, dir, strings.Replace(fmt.Sprintf(reloadRepConfig, addr, "protect = true\n"), `device = "root"`, `device = "alt"`, 1)+
		"\n[[device]]\nname = \"alt\"\ntable = \"0 8192 linear alt.img 0\"\n")
	before = compared()
	if err := d.reloadConfig(path); err != nil {
		t.Fatal(err)
	}
	waitCompared(before, "after the export moved to another device")
	waitReplicated(t, d, h, store, map[string]string{"root0": filepath.Join(dir, "alt.img")})
	if r := reason(); !strings.Contains(r, "backing changed") {
		t.Errorf("resync reason after the export moved to another device: %q", r)
	}
	if c := d.agent.Status().Connects; c != 1 {
		t.Errorf("the agent connected %d times, want 1", c)
	}
}
