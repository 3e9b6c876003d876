//go:build ceph

package ceph_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/internal/cephtest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	_ "github.com/vhostdm/vhostdm/targets" // linear
)

var cluster *cephtest.Cluster

func TestMain(m *testing.M) { os.Exit(cephtest.Main(m, &cluster)) }

// opener returns an Opener on the test cluster as client.admin, closed
// when t ends.
func opener(t *testing.T) *ceph.Opener {
	o := ceph.NewOpener(ceph.Config{Conf: cluster.Conf}, slog.New(slog.DiscardHandler))
	t.Cleanup(func() {
		if err := o.Close(); err != nil {
			t.Errorf("close opener: %v", err)
		}
	})
	return o
}

func manager(t *testing.T, o *ceph.Opener) *mapper.Manager {
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler), Schemes: map[string]mapper.OpenFunc{ceph.Scheme: o.Open}})
	t.Cleanup(func() { m.Close() })
	return m
}

// rbdStorage is mappertest.Storage over images of the test cluster.
type rbdStorage struct{}

func (rbdStorage) Create(t *testing.T, n, size int) []string {
	var names []string
	for range n {
		names = append(names, cluster.CreateImage(t, cephtest.Pool, int64(size)))
	}
	return names
}

func (rbdStorage) Schemes(t *testing.T) map[string]mapper.OpenFunc {
	return map[string]mapper.OpenFunc{ceph.Scheme: opener(t).Open}
}

// TestConformance runs the mapper conformance suite for linear tables
// over RBD images.
func TestConformance(t *testing.T) {
	mappertest.RunTarget(t, "linear", mappertest.TargetCase{
		Backends: 1, BackendBytes: 1 << 20, Stores: true, Storage: rbdStorage{},
		Table: func(b []string) string { return fmt.Sprintf("0 1000 linear %s 48", b[0]) },
	})
	mappertest.RunTarget(t, "linear-multi", mappertest.TargetCase{
		Backends: 2, BackendBytes: 1 << 20, Stores: true, Storage: rbdStorage{},
		Table: func(b []string) string {
			return fmt.Sprintf("0 300 linear %s 0\n300 700 linear %s 5\n1000 24 linear %s 1000", b[0], b[1], b[0])
		},
	})
}

// TestFlushedWritesInExport writes through a device in vectors of every
// shape (many small ones gathered, large ones passed through), flushes,
// and checks the image with rbd export while the device stays open.
func TestFlushedWritesInExport(t *testing.T) {
	const size = 8 << 20
	name := cluster.CreateImage(t, cephtest.Pool, size)
	m := manager(t, opener(t))
	d, err := m.CreateTable("d", "", false, fmt.Sprintf("0 %d linear %s 0", size/512, name))
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(7, 7))
	shapes := [][]int{{512}, {4096, 512, 1024, 2560}, {64 << 10, 512, 512, 128 << 10, 3072}, {1 << 20, 1 << 20}, {512, 2 << 20, 512}}
	off := 0
	for i := range 40 {
		shape := shapes[i%len(shapes)]
		total := 0
		for _, n := range shape {
			total += n
		}
		if off+total > size {
			off = 0
		}
		var bufs [][]byte
		for _, n := range shape {
			b := make([]byte, n)
			for j := range b {
				b[j] = byte(rng.Uint32())
			}
			bufs = append(bufs, b)
		}
		if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: uint64(off / 512), Sectors: uint64(total / 512), Data: bufs}); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		copy(model[off:], bytes.Join(bufs, nil))
		// Read back in a different shape.
		back := [][]byte{make([]byte, 512), make([]byte, total-512)}
		if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: uint64(off / 512), Sectors: uint64(total / 512), Data: back}); err != nil {
			t.Fatalf("read %d: %v", i, err)
		}
		if !bytes.Equal(bytes.Join(back, nil), model[off:off+total]) {
			t.Fatalf("write %d (%v at %d) reads back different", i, shape, off)
		}
		off += total + 512*rng.IntN(64)
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Fatal(err)
	}
	if got := cluster.Export(t, name); !bytes.Equal(got, model) {
		t.Fatal("rbd export of the image differs from what was written and flushed")
	}
	// Write-zeroes and discard reach the image.
	if err := d.Submit(&mapper.Request{Op: mapper.OpWriteZeroes, Sector: 8, Sectors: 4096}); err != nil {
		t.Fatal(err)
	}
	clear(model[8*512 : (8+4096)*512])
	if err := d.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: 8192, Sectors: 8192}); err != nil {
		t.Fatal(err)
	}
	clear(model[8192*512 : 16384*512]) // one whole 4 MiB object: deallocated
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Fatal(err)
	}
	if got := cluster.Export(t, name); !bytes.Equal(got, model) {
		t.Fatal("rbd export after write-zeroes and discard differs")
	}
}

// TestSnapshotReadOnly serves a snapshot: it reads as the image did when
// the snapshot was taken, and cannot be opened writable.
func TestSnapshotReadOnly(t *testing.T) {
	const size = 1 << 20
	name := cluster.CreateImage(t, cephtest.Pool, size)
	o := opener(t)
	m := manager(t, o)
	d, err := m.CreateTable("live", "", false, fmt.Sprintf("0 %d linear %s 0", size/512, name))
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte("before snapshot."), size/16)
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: size / 512, Data: [][]byte{old}, FUA: true}); err != nil {
		t.Fatal(err)
	}
	cluster.Must(t, "rbd", "snap", "create", strings.TrimPrefix(name, "rbd:")+"@s1")
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: size / 512, Data: [][]byte{bytes.Repeat([]byte{0xee}, size)}, FUA: true}); err != nil {
		t.Fatal(err)
	}
	snap, err := m.CreateTable("snap", "", true, fmt.Sprintf("0 %d linear %s@s1 0", size/512, name))
	if err != nil {
		t.Fatal(err)
	}
	back := make([]byte, size)
	if err := snap.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: size / 512, Data: [][]byte{back}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, old) {
		t.Fatal("the snapshot does not read as the image did when it was taken")
	}
	if err := snap.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: 1, Data: [][]byte{make([]byte, 512)}}); !errors.Is(err, mapper.ErrReadOnly) {
		t.Fatalf("write to the read-only snapshot device: %v", err)
	}
	_, err = m.CreateTable("snaprw", "", false, fmt.Sprintf("0 8 linear %s@s1 0", name))
	if !errors.Is(err, mapper.ErrInvalid) || !strings.Contains(err.Error(), `snapshot "s1" is read-only`) {
		t.Fatalf("writable table over a snapshot: %v", err)
	}
}

// TestBadSpecs: every kind of bad rbd: name fails at table load with an
// error that says what is wrong, and leaves no device behind.
func TestBadSpecs(t *testing.T) {
	name := cluster.CreateImage(t, cephtest.Pool, 1<<20)
	img := strings.TrimPrefix(name, "rbd:rbd/")
	cluster.Must(t, "rbd", "snap", "create", "rbd/"+img+"@there")
	noperm := cluster.AddClient(t, "noperm", "mon", "profile rbd", "osd", "profile rbd pool=elsewhere")
	admin := opener(t)
	cases := []struct {
		what     string
		o        *ceph.Opener
		spec     string
		readOnly bool
		class    error
		want     string
	}{
		{"malformed", admin, "rbd:" + img, false, mapper.ErrInvalid, "want rbd:POOL/IMAGE[@SNAP]"},
		{"missing pool", admin, "rbd:nosuchpool/" + img, false, mapper.ErrNotFound, `pool "nosuchpool" not found`},
		{"missing namespace", admin, "rbd:rbd/nosuchns/" + img, false, mapper.ErrNotFound, `namespace "nosuchns" not found in pool "rbd"`},
		{"missing image", admin, "rbd:rbd/nosuchimage", false, mapper.ErrNotFound, `image "nosuchimage" not found in pool "rbd"`},
		{"missing snapshot", admin, name + "@nosuchsnap", true, mapper.ErrNotFound, `snapshot "nosuchsnap" of image "` + img + `" not found`},
		{"writable snapshot", admin, name + "@there", false, mapper.ErrInvalid, `snapshot "there" is read-only`},
		{"no permission", ceph.NewOpener(ceph.Config{Conf: cluster.Conf, ID: "noperm", Keyring: noperm}, nil), name, false, mapper.ErrInvalid, "permission denied"},
		{"unknown client", ceph.NewOpener(ceph.Config{Conf: cluster.Conf, ID: "nobody", Keyring: cluster.Keyring}, nil), name, false, mapper.ErrIO, "client.nobody"},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.what, " ", "-"), func(t *testing.T) {
			m := manager(t, c.o)
			_, err := m.CreateTable("bad", "", c.readOnly, "0 8 linear "+c.spec+" 0")
			if err == nil {
				t.Fatalf("table over %s loaded", c.spec)
			}
			t.Logf("%s: %v", c.what, err)
			if !errors.Is(err, c.class) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.spec) {
				t.Errorf("error %q: want class %v, naming %s and saying %q", err, c.class, c.spec, c.want)
			}
			if _, err := m.Get("bad"); !errors.Is(err, mapper.ErrNotFound) {
				t.Errorf("a device was left behind: %v", err)
			}
		})
	}
	for _, c := range cases[len(cases)-2:] {
		c.o.Close()
	}
}

// TestMark: a device over an RBD image marks it with a snapshot
// (vhostdm-stopped.TAG) after flushing; ChangedSince tells a write made
// since by another client (`rbd bench`) from
// none, and removes the snapshot either way. A snapshot removed or
// replaced behind the device's back is a change that cannot be told; a
// read-only open marks nothing.
func TestMark(t *testing.T) {
	const size = 16 << 20
	name := cluster.CreateImage(t, cephtest.Pool, size)
	spec := strings.TrimPrefix(name, "rbd:")
	m := manager(t, opener(t))
	d, err := m.CreateTable("d", "", false, fmt.Sprintf("0 %d linear %s 0", size/512, name))
	if err != nil {
		t.Fatal(err)
	}
	snaps := func() string { return strings.TrimSpace(cluster.Must(t, "rbd", "snap", "ls", spec)) }
	write := func(r *mapper.Request) {
		t.Helper()
		if err := d.Submit(r); err != nil {
			t.Fatal(err)
		}
	}

	// The daemon's own write, unflushed, then the mark: not a change.
	write(&mapper.Request{Op: mapper.OpWrite, Sector: 2048, Sectors: 8, Data: [][]byte{bytes.Repeat([]byte{7}, 4096)}})
	marks, err := d.MarkBacking("vm1.v")
	if err != nil {
		t.Fatal(err)
	}
	if len(marks) != 1 || marks[0].Backend != name || !strings.HasPrefix(marks[0].Token, "vhostdm-stopped.vm1.v@") {
		t.Fatalf("marks %+v", marks)
	}
	if s := snaps(); !strings.Contains(s, "vhostdm-stopped.vm1.v") {
		t.Fatalf("no snapshot after the mark:\n%s", s)
	}
	if why, err := d.ChangedSince(marks); err != nil || why != "" {
		t.Fatalf("nothing written since the mark: %q, %v", why, err)
	}
	if s := snaps(); s != "" {
		t.Fatalf("the snapshot stays after the comparison:\n%s", s)
	}

	// Another client writes 64 KiB at 0: one 4 MiB object changed.
	if marks, err = d.MarkBacking("vm1.v"); err != nil {
		t.Fatal(err)
	}
	cluster.Must(t, "rbd", "bench", "--io-type", "write", "--io-size", "65536", "--io-total", "65536",
		"--io-pattern", "seq", "--io-threads", "1", spec)
	why, err := d.ChangedSince(marks)
	if err != nil || !strings.Contains(why, name+" was written while vhostdm did not serve it (4194304 bytes in 1 changed extents") {
		t.Errorf("written by rbd bench: %q, %v", why, err)
	}

	// A mark made twice under one tag replaces the first snapshot.
	if _, err = d.MarkBacking("vm1.v"); err != nil {
		t.Fatal(err)
	}
	if marks, err = d.MarkBacking("vm1.v"); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(snaps(), "vhostdm-stopped.vm1.v"); n != 1 {
		t.Errorf("%d snapshots after two marks under one tag, want 1", n)
	}
	// Removed behind the device's back, then made again by someone.
	cluster.Must(t, "rbd", "snap", "rm", "--no-progress", spec+"@vhostdm-stopped.vm1.v")
	if why, err := d.ChangedSince(marks); err != nil || !strings.Contains(why, "is gone") {
		t.Errorf("snapshot removed: %q, %v", why, err)
	}
	cluster.Must(t, "rbd", "snap", "create", spec+"@vhostdm-stopped.vm1.v")
	if why, err := d.ChangedSince(marks); err != nil || !strings.Contains(why, "was replaced") {
		t.Errorf("snapshot replaced: %q, %v", why, err)
	}
	cluster.Must(t, "rbd", "snap", "rm", "--no-progress", spec+"@vhostdm-stopped.vm1.v")

	// A read-only open cannot change: nothing to mark or compare.
	ro, err := m.CreateTable("ro", "", true, fmt.Sprintf("0 %d linear %s 0", size/512, name))
	if err != nil {
		t.Fatal(err)
	}
	if marks, err = ro.MarkBacking("vm1.ro"); err != nil || len(marks) != 1 || marks[0].Token != "" {
		t.Errorf("read-only marks %+v, %v; want one without a token", marks, err)
	}
	if why, err := ro.ChangedSince(marks); err != nil || why != "" {
		t.Errorf("read-only: %q, %v", why, err)
	}
	if s := snaps(); s != "" {
		t.Errorf("snapshots left:\n%s", s)
	}
}
