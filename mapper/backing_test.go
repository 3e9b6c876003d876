package mapper_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

// TestBacking: a device's backing names each file its tables (and the
// devices they stack on) open once, with the identity and times stat
// gives; the table digest follows what the tables map; other backends are
// named as opaque.
func TestBacking(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"a.img", "b.img"} {
		if err := os.WriteFile(filepath.Join(dir, n), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	mem := mappertest.NewMem("x", 1<<20)
	m := mapper.NewManager(mapper.ManagerOptions{Dir: dir, Schemes: map[string]mapper.OpenFunc{
		"mem": func(string, bool) (mapper.Backend, error) { return mem, nil },
	}})
	defer m.Close()
	low, err := m.CreateTable("low", "", false, "0 1024 linear b.img 0\n1024 1024 linear a.img 0")
	if err != nil {
		t.Fatal(err)
	}
	top, err := m.CreateTable("top", "", false, "0 1024 linear a.img 1024\n1024 2048 linear /dev/mapper/low 0\n3072 8 linear mem:x 0")
	if err != nil {
		t.Fatal(err)
	}
	b, err := top.Backing()
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, f := range b.Files {
		paths = append(paths, filepath.Base(f.Path))
		want, err := mapper.StatBacking(f.Path)
		if err != nil {
			t.Fatal(err)
		}
		if !f.Unchanged(want) || f.Block || f.Ino == 0 || f.Size != 1<<20 {
			t.Errorf("%s: backing %+v, stat says %+v", f.Path, f, want)
		}
	}
	if !slices.Equal(paths, []string{"a.img", "b.img"}) {
		t.Errorf("files %q, want a.img (named twice, once through low) then b.img", paths)
	}
	if !slices.Equal(b.Opaque, []string{"x"}) { // the backend's Name
		t.Errorf("opaque backends %q, want x", b.Opaque)
	}

	// The digest covers the stacked device's table.
	lb, err := low.Backing()
	if err != nil {
		t.Fatal(err)
	}
	if err := low.Reload("0 1024 linear a.img 0\n1024 1024 linear b.img 0"); err != nil {
		t.Fatal(err)
	}
	b2, err := top.Backing()
	if err != nil {
		t.Fatal(err)
	}
	lb2, err := low.Backing()
	if err != nil {
		t.Fatal(err)
	}
	if b2.Table == b.Table || lb2.Table == lb.Table {
		t.Error("the table digest did not change with the stacked device's table")
	}

	// A write moves the times; the identity stays.
	time.Sleep(10 * time.Millisecond)
	if err := os.WriteFile(filepath.Join(dir, "a.img"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	now, err := mapper.StatBacking(filepath.Join(dir, "a.img"))
	if err != nil {
		t.Fatal(err)
	}
	if !now.SameStorage(b.Files[0]) || now.Unchanged(b.Files[0]) {
		t.Errorf("after a write: %+v against %+v: want the same storage, changed", now, b.Files[0])
	}
}

// TestBackingBlockDevice: a block device's backing holds its size and the
// kernel's count of the sectors written to it; a write by another program
// through another node of the device moves the count, a read does not, and the same host's boot identifier
// makes two looks comparable.
func TestBackingBlockDevice(t *testing.T) {
	const size = 4 << 20
	d := blockDevice(t, size, mapper.CacheWriteback)
	b, err := d.Backing()
	if err != nil {
		t.Fatal(err)
	}
	if len(b.Files) != 1 {
		t.Fatalf("files %+v, want the loop device", b.Files)
	}
	was := b.Files[0]
	if !was.Block || was.Size != size || was.Boot == "" || was.Ino != 0 {
		t.Fatalf("backing of the loop device: %+v, want a block device of %d bytes with a boot identifier", was, size)
	}
	look := func() mapper.BackingFile {
		t.Helper()
		f, err := mapper.StatBacking(was.Path)
		if err != nil {
			t.Fatal(err)
		}
		if !f.SameStorage(was) || !f.Comparable(was) {
			t.Fatalf("a second look %+v is not comparable with %+v", f, was)
		}
		return f
	}
	if now := look(); !now.Unchanged(was) {
		t.Fatalf("nothing written, yet the device changed: %+v, was %+v", now, was)
	}

	// A read leaves the count.
	buf := make([]byte, 64<<10)
	if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: 128, Data: [][]byte{buf}}); err != nil {
		t.Fatal(err)
	}
	if now := look(); !now.Unchanged(was) {
		t.Errorf("a read changed the device: %+v, was %+v", now, was)
	}

	// Another program writes 64 KiB through a node of its own.
	node := filepath.Join(t.TempDir(), "node")
	if err := unix.Mknod(node, unix.S_IFBLK|0o600, int(was.Dev)); err != nil {
		t.Fatalf("mknod (needs root): %v", err)
	}
	f, err := os.OpenFile(node, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{7}, 64<<10), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	now := look()
	if now.Unchanged(was) || now.Written-was.Written < 128 {
		t.Errorf("after 128 sectors written the count moved from %d to %d", was.Written, now.Written)
	}

	// Another host run: not comparable.
	other := was
	other.Boot = "another boot"
	if other.Comparable(now) || now.Comparable(other) {
		t.Error("looks from two runs of the host are comparable")
	}
}

// TestMarkBacking: MarkBacking marks each Marker backend of a device and
// the devices it stacks on once, and ChangedSince tells, backend by
// backend, whether the storage was written since, drops the marks, and
// takes a backend without a mark as changed.
func TestMarkBacking(t *testing.T) {
	x, y := mappertest.NewMarked("x", 1<<20), mappertest.NewMarked("y", 1<<20)
	m := mapper.NewManager(mapper.ManagerOptions{Dir: t.TempDir(), Schemes: map[string]mapper.OpenFunc{
		"mem": func(name string, _ bool) (mapper.Backend, error) {
			if name == "mem:x" {
				return x, nil
			}
			return y, nil
		},
	}})
	defer m.Close()
	if _, err := m.CreateTable("low", "", false, "0 8 linear mem:y 0"); err != nil {
		t.Fatal(err)
	}
	top, err := m.CreateTable("top", "", false, "0 8 linear mem:x 0\n8 8 linear mem:x 8\n16 8 linear /dev/mapper/low 0")
	if err != nil {
		t.Fatal(err)
	}
	marks, err := top.MarkBacking("vm1.a0")
	if err != nil {
		t.Fatal(err)
	}
	if len(marks) != 2 || marks[0].Backend != "x" || marks[1].Backend != "y" || marks[0].Token == "" || x.Marked != 1 || y.Marked != 1 {
		t.Fatalf("marks %+v (x marked %d times, y %d), want one each of x and y", marks, x.Marked, y.Marked)
	}
	if why, err := top.ChangedSince(marks); err != nil || why != "" {
		t.Fatalf("nothing written: ChangedSince says %q, %v", why, err)
	}
	if x.Held() != 0 || y.Held() != 0 {
		t.Errorf("ChangedSince left %d and %d marks", x.Held(), y.Held())
	}

	// Written behind the device's back, through the backend.
	if marks, err = top.MarkBacking("vm1.a0"); err != nil {
		t.Fatal(err)
	}
	if err := y.WriteAt([][]byte{{1, 2, 3}}, 4096); err != nil {
		t.Fatal(err)
	}
	why, err := top.ChangedSince(marks)
	if err != nil || !strings.Contains(why, "y: 3 bytes differ") || strings.Contains(why, "x:") {
		t.Errorf("y written: ChangedSince says %q, %v", why, err)
	}

	// No mark (a record without one), a mark gone, a failed mark.
	if why, _ := top.ChangedSince(nil); !strings.Contains(why, "no mark of x") || !strings.Contains(why, "no mark of y") {
		t.Errorf("without marks: %q", why)
	}
	if marks, err = top.MarkBacking("vm1.a0"); err != nil {
		t.Fatal(err)
	}
	x.ForgetMarks()
	if why, _ := top.ChangedSince(marks); !strings.Contains(why, "the mark") || !strings.Contains(why, "is gone") {
		t.Errorf("x's mark gone: %q", why)
	}
	x.MarkErr = errors.New("cluster away")
	if _, err := top.MarkBacking("vm1.a0"); err == nil || !strings.Contains(err.Error(), "mark x: cluster away") {
		t.Errorf("a failed mark: %v", err)
	}
}
