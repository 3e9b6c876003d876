package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/internal/looptest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	"github.com/vhostdm/vhostdm/repagent/agent/actlog"
)

// backingRig is a daemon's life as the backing record sees it: devices
// over files in dir, and agents started and stopped over one activity log.
type backingRig struct {
	t   *testing.T
	dir string
	m   *mapper.Manager
	dev *mapper.Device
}

const backingSize = 1 << 20

func newBackingRig(t *testing.T) *backingRig {
	dir := t.TempDir()
	r := &backingRig{t: t, dir: dir, m: mapper.NewManager(mapper.ManagerOptions{Dir: dir})}
	t.Cleanup(func() { r.m.Close() })
	if err := os.WriteFile(filepath.Join(dir, "v.img"), make([]byte, backingSize), 0o600); err != nil {
		t.Fatal(err)
	}
	r.table("0 2048 linear v.img 0")
	return r
}

// table (re)creates the device with text: the files are opened anew.
func (r *backingRig) table(text string) {
	r.t.Helper()
	if r.dev != nil {
		if err := r.m.Remove("d", true); err != nil {
			r.t.Fatal(err)
		}
	}
	d, err := r.m.CreateTable("d", "", false, text)
	if err != nil {
		r.t.Fatal(err)
	}
	r.dev = d
}

// start is a daemon's start: the check before the tables (CheckBacking;
// the rig's tables are built already, as by a daemon that writes
// nothing when it builds them), then the agent and the attach of volume
// v. It returns the agent and why v's backing changed.
func (r *backingRig) start() (*Agent, string) {
	r.t.Helper()
	al := filepath.Join(r.dir, "vm1.actlog")
	a, err := New(Config{Hub: "127.0.0.1:1", VM: "vm1", Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		ActivityLog: ActivityLog{Path: al, Volumes: []actlog.Volume{{Name: "v", Size: backingSize}}, Backing: CheckBacking(al)}})
	if err != nil {
		r.t.Fatal(err)
	}
	return a, r.attach(a)
}

func (r *backingRig) attach(a *Agent) string {
	r.t.Helper()
	if _, err := a.Attach("v", r.dev, VolumeOptions{Protect: true, Backing: r.dev.Backing, Reloads: r.dev.OnReload,
		MarkBacking: r.dev.MarkBacking, ChangedSince: r.dev.ChangedSince}); err != nil {
		r.t.Fatal(err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.vols["v"].changed
}

// stop is a clean stop, in a daemon's order: the agent closes, the
// storage that is not files is marked, the devices are done writing, the
// record takes the files as they are.
func (r *backingRig) stop(a *Agent) {
	a.Close()
	a.MarkBackings()
	a.RecordStop()
}

// write writes b into v.img at off, as a tool would while no daemon runs.
func (r *backingRig) write(off int64, b string) {
	r.t.Helper()
	f, err := os.OpenFile(filepath.Join(r.dir, "v.img"), os.O_WRONLY, 0)
	if err != nil {
		r.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte(b), off); err != nil {
		r.t.Fatal(err)
	}
}

func wantChanged(t *testing.T, step, got, want string) {
	t.Helper()
	switch {
	case want == "" && got != "":
		t.Fatalf("%s: the volume is reported changed (%q), want unchanged", step, got)
	case want != "" && !strings.Contains(got, want):
		t.Fatalf("%s: changed %q, want it to say %q", step, got, want)
	}
}

// TestBackingChanges: the agent reports a protected volume changed exactly
// when its data may differ from what the hub was told: no record of it, a
// file written or replaced while no daemon served it, another table, a
// file written while its export was removed; and the mark survives
// crashes until the hub has taken the resync.
func TestBackingChanges(t *testing.T) {
	r := newBackingRig(t)

	a, why := r.start()
	wantChanged(t, "first start", why, "no record of the volumes' backings")
	a.clearChanged("v") // the hub acknowledged the resync
	r.stop(a)

	a, why = r.start()
	wantChanged(t, "restart after a clean stop", why, "")
	r.stop(a)

	r.write(4096, "restored from a backup")
	a, why = r.start()
	wantChanged(t, "restart after a write to the stopped image", why, "v.img was written while vhostdm did not serve it")
	a.Abort() // crash before the hub took the resync: no RecordStop

	a, why = r.start()
	wantChanged(t, "restart after a crash with the change untold", why, "v.img was written while vhostdm did not serve it")
	a.clearChanged("v")
	a.Abort() // crash after the hub took it

	a, why = r.start()
	wantChanged(t, "restart after a crash, the change told", why, "")
	r.write(8192, "written by the daemon, then a crash") // the daemon's own writes: only identity counts
	a.Abort()
	a, why = r.start()
	wantChanged(t, "restart after a crash with the daemon's own writes", why, "")
	r.stop(a)

	// Another file at the path: a copy put in place while stopped.
	img := filepath.Join(r.dir, "v.img")
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img+".new", b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(img+".new", img); err != nil {
		t.Fatal(err)
	}
	r.table("0 2048 linear v.img 0")
	a, why = r.start()
	wantChanged(t, "restart over a replaced image", why, "another file")
	a.clearChanged("v")
	r.stop(a)

	// The same file mapped otherwise.
	r.table("0 1024 linear v.img 1024\n1024 1024 linear v.img 0")
	a, why = r.start()
	wantChanged(t, "restart with another table", why, "its table maps")
	a.clearChanged("v")

	// In one run: the export removed, the file written, the export back.
	a.Detach("v")
	wantChanged(t, "attach again, nothing written", r.attach(a), "")
	a.Detach("v")
	r.write(0, "written while the export was gone")
	wantChanged(t, "attach again after a write", r.attach(a), "v.img was written while vhostdm did not serve it")
	r.stop(a) // the hub was not told: still changed at the next start
	a, why = r.start()
	wantChanged(t, "restart with the change untold", why, "v.img was written while vhostdm did not serve it")
	a.clearChanged("v")
	r.stop(a)

	// A table reloaded under the attached volume, over another file:
	// changed at once (and saved), whatever happens next.
	a, why = r.start()
	wantChanged(t, "restart after a clean stop", why, "")
	if err := os.WriteFile(filepath.Join(r.dir, "w.img"), make([]byte, backingSize), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.dev.Reload("0 2048 linear w.img 0"); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		a.mu.Lock()
		why = a.vols["v"].changed
		a.mu.Unlock()
		if why != "" || time.Now().After(deadline) {
			break
		}
	}
	wantChanged(t, "a table reload over another file", why, "a table reload: its table maps")
	a.Abort()
	a, why = r.start()
	wantChanged(t, "restart after a crash that followed the reload", why, "a table reload: its table maps")
	a.clearChanged("v")
	r.stop(a)

	// A record that cannot be read: every volume is taken as changed.
	if err := os.WriteFile(filepath.Join(r.dir, "vm1.actlog.backing"), []byte("{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	a, why = r.start()
	wantChanged(t, "restart with a corrupt record", why, "is corrupt")
	r.stop(a)
}

// TestBackingMarks: storage that is not files (an rbd: image; here a
// memory backend that keeps marks as an image keeps snapshots) is marked
// when the daemon stops writing it and compared with the mark at the next
// attach, which drops the mark: a write by another program while stopped
// marks the volume changed, the daemon's own writes do not. A mark that is
// gone, or one that could not be made, cannot be compared: changed. A
// crash after the mark keeps it (saved at once) and the next start still
// compares and drops it.
func TestBackingMarks(t *testing.T) {
	dir := t.TempDir()
	x := mappertest.NewMarked("x", backingSize)
	r := &backingRig{t: t, dir: dir, m: mapper.NewManager(mapper.ManagerOptions{Dir: dir, Schemes: map[string]mapper.OpenFunc{
		"mem": func(string, bool) (mapper.Backend, error) { return x, nil },
	}})}
	t.Cleanup(func() { r.m.Close() })
	r.table("0 2048 linear mem:x 0")
	held := func(step string, want int) {
		t.Helper()
		if n := x.Held(); n != want {
			t.Fatalf("%s: %d marks held, want %d", step, n, want)
		}
	}

	a, why := r.start()
	wantChanged(t, "first start", why, "no record of the volumes' backings")
	a.clearChanged("v")
	if err := r.dev.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 8, Sectors: 1, Data: [][]byte{make([]byte, 512)}}); err != nil {
		t.Fatal(err)
	}
	r.stop(a)
	held("after a clean stop", 1)

	a, why = r.start()
	wantChanged(t, "restart after a clean stop", why, "")
	held("after the attach", 0)
	if err := r.dev.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 16, Sectors: 1, Data: [][]byte{[]byte(strings.Repeat("d", 512))}}); err != nil {
		t.Fatal(err)
	}
	r.stop(a)

	if err := x.WriteAt([][]byte{[]byte("written while stopped")}, 4096); err != nil {
		t.Fatal(err)
	}
	a, why = r.start()
	wantChanged(t, "restart after another program's write", why, "x: 21 bytes differ from the mark")
	a.clearChanged("v")
	r.stop(a)

	x.ForgetMarks()
	a, why = r.start()
	wantChanged(t, "restart with the mark gone", why, "is gone")
	a.clearChanged("v")
	x.MarkErr = errors.New("cluster away")
	r.stop(a)
	x.MarkErr = nil
	held("after a stop whose mark failed", 0)
	a, why = r.start()
	wantChanged(t, "restart after a failed mark", why, "holds no mark of x")
	a.clearChanged("v")

	// A crash after the mark, before the stop was recorded.
	a.Close()
	a.MarkBackings()
	a.Abort()
	held("after a crash that followed the mark", 1)
	a, why = r.start()
	wantChanged(t, "restart after the crash", why, "")
	held("after the attach", 0)

	// In one run: the export removed (its device stays), written, back.
	a.Detach("v")
	held("after the detach", 1)
	wantChanged(t, "attach again, nothing written", r.attach(a), "")
	a.Detach("v")
	if err := x.WriteAt([][]byte{{1}}, 0); err != nil {
		t.Fatal(err)
	}
	wantChanged(t, "attach again after a write", r.attach(a), "x: 1 bytes differ from the mark")
	held("at the end", 0)
	r.stop(a)
}

// TestBackingBlockDevice: on a block device, whose node keeps its times,
// the agent tells a write by another program (through a node of its own)
// from the daemon's own writes by the kernel's count of the device's
// writes, taken once the daemon's cached writes are on the device: at a
// stop, and when the export goes while the device stays open. Across a
// restart of the host the counts cannot be compared: unchanged.
func TestBackingBlockDevice(t *testing.T) {
	r := newBackingRig(t)
	loop := looptest.Attach(t, filepath.Join(r.dir, "v.img"), 512)
	r.table(fmt.Sprintf("0 2048 linear %s 0", loop))
	var st unix.Stat_t
	if err := unix.Stat(loop, &st); err != nil {
		t.Fatal(err)
	}
	node := filepath.Join(r.dir, "node") // another program's way in
	if err := unix.Mknod(node, unix.S_IFBLK|0o600, int(st.Rdev)); err != nil {
		t.Fatalf("mknod (needs root): %v", err)
	}
	other := func(off int64, b string) {
		t.Helper()
		f, err := os.OpenFile(node, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt([]byte(b), off); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	// own writes through the daemon's device, left in the page cache.
	own := func(sector uint64) {
		t.Helper()
		if err := r.dev.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: sector, Sectors: 8, Data: [][]byte{make([]byte, 4096)}}); err != nil {
			t.Fatal(err)
		}
	}

	a, why := r.start()
	wantChanged(t, "first start", why, "no record of the volumes' backings")
	a.clearChanged("v")
	own(16)
	r.stop(a)
	unix.Sync() // the kernel's flusher, after the stop
	a, why = r.start()
	wantChanged(t, "restart after a clean stop that left writes in the page cache", why, "")
	r.stop(a)

	other(4096, "restored from a backup")
	a, why = r.start()
	wantChanged(t, "restart after a write to the stopped device", why, "block device "+loop+" was written while vhostdm did not serve it")
	a.clearChanged("v")
	r.stop(a)

	// In one run: the export removed with writes in the page cache, then
	// back; then removed, written by another program, and back.
	a, why = r.start()
	wantChanged(t, "restart after a clean stop", why, "")
	own(32)
	a.Detach("v")
	unix.Sync()
	wantChanged(t, "attach again, nothing written meanwhile", r.attach(a), "")
	a.Detach("v")
	other(0, "written while the export was gone")
	wantChanged(t, "attach again after another program's write", r.attach(a), "was written while vhostdm did not serve it")
	a.clearChanged("v")
	r.stop(a)

	// A record from another run of the host: the counts started again.
	path := filepath.Join(r.dir, "vm1.actlog.backing")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rec backingRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatal(err)
	}
	rec.Volumes["v"].Files[0].Boot = "another run of the host"
	rec.Volumes["v"].Files[0].Written = 0
	if b, err = json.Marshal(rec); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	a, why = r.start()
	wantChanged(t, "restart after a restart of the host", why, "")
	r.stop(a)
}

// TestSyncBlockOtherFiles: the write-back before a block device's count
// is taken opens the path without blocking and syncs only a block
// device: a FIFO put at the path (whose open would wait for a writer) or
// a regular file is left alone at once.
func TestSyncBlockOtherFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	loop := looptest.Attach(t, file, 512)
	for _, path := range []string{fifo, file, loop} {
		done := make(chan error, 1)
		go func() { done <- syncBlock(path) }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%s: %v", path, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: the write-back blocks", path)
		}
	}
	if err := syncBlock(filepath.Join(dir, "missing")); err == nil {
		t.Error("a missing path gave no error")
	}
}
