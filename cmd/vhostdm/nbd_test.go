package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/qmp"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// needTool fails the test loudly when an external judge is missing.
func needTool(t *testing.T, tool, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		t.Fatalf("%s not found: install the Debian package %s (scripts/setup.sh)", tool, pkg)
	}
}

// tool runs an external command and returns its standard output.
func tool(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// nbdURI is the libnbd/QEMU URI of an export on a unix socket.
func nbdURI(sock, name string) string {
	return "nbd+unix:///" + name + "?socket=" + sock
}

// randomFile writes size random bytes to path.
func randomFile(t *testing.T, path string, size int, seed uint64) []byte {
	t.Helper()
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, 1))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// deviceBytes reads a whole device through the mapper.
func deviceBytes(t *testing.T, d *mapper.Device) []byte {
	t.Helper()
	b := make([]byte, d.Size()<<mapper.SectorShift)
	if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sectors: d.Size(), Data: [][]byte{b}}); err != nil {
		t.Fatal(err)
	}
	return b
}

// startTestDaemon runs the daemon in-process on config text written to dir.
func startTestDaemon(t *testing.T, dir, text string) *daemon {
	t.Helper()
	c, err := config.Parse([]byte(text), filepath.Join(dir, "vm.toml"), dir)
	if err != nil {
		t.Fatal(err)
	}
	d, err := startDaemon(context.Background(), c, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// mapEntry is one line of nbdinfo --map.
type mapEntry struct {
	off, length uint64
	typ         int
}

func nbdinfoMap(t *testing.T, ctxName, uri string) []mapEntry {
	t.Helper()
	arg := "--map"
	if ctxName != "" {
		arg = "--map=" + ctxName
	}
	out := tool(t, "nbdinfo", arg, uri)
	var m []mapEntry
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 {
			continue
		}
		off, err1 := strconv.ParseUint(f[0], 10, 64)
		n, err2 := strconv.ParseUint(f[1], 10, 64)
		typ, err3 := strconv.Atoi(f[2])
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatalf("nbdinfo --map line %q", sc.Text())
		}
		m = append(m, mapEntry{off, n, typ})
	}
	return m
}

// TestNBDReadStripedAndThin exports a striped and a thin device read-only
// and lets real clients judge: qemu-img info sees the size, qemu-img
// compare and nbdcopy see the device's bytes, and nbdinfo --map shows the
// thin device's unmapped blocks as holes (3: hole,zero) and its mapped
// blocks as data.
func TestNBDReadStripedAndThin(t *testing.T) {
	needTool(t, "qemu-img", "qemu-utils")
	needTool(t, "nbdcopy", "libnbd-bin")
	needTool(t, "nbdinfo", "libnbd-bin")
	dir := t.TempDir()
	randomFile(t, filepath.Join(dir, "a.img"), 4<<20, 1)
	randomFile(t, filepath.Join(dir, "b.img"), 4<<20, 2)
	sparse(t, filepath.Join(dir, "meta.img"), 4<<20)
	sparse(t, filepath.Join(dir, "data.img"), 16<<20)
	d := startTestDaemon(t, dir, `
[[device]]
name = "striped"
table = "0 16384 striped 2 128 a.img 0 b.img 0"

[[device]]
name = "pool"
table = "0 32768 thin-pool meta.img data.img 128 0"

[[export]]
id = "s0"
type = "nbd"
device = "striped"
socket = "nbd.sock"
description = "the striped disk"
`)
	pool, _ := d.m.Get("pool")
	if _, err := pool.Message(0, []string{"create_thin", "0"}); err != nil {
		t.Fatal(err)
	}
	thin, err := d.m.CreateTable("thin", "", false, "0 16384 thin /dev/mapper/pool 0")
	if err != nil {
		t.Fatal(err)
	}
	// Map blocks 1, 2 and 9 (64 KiB each) with data.
	for _, blk := range []uint64{1, 2, 9} {
		buf := bytes.Repeat([]byte{byte(blk)}, 64<<10)
		if err := thin.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: blk * 128, Sectors: 128, Data: [][]byte{buf}}); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(dir, "nbd.sock")
	if err := d.ex.Add(qmp.ExportOptions{Type: "nbd", ID: "t0", NodeName: "thin", Socket: sock, Name: "thin"}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"striped", "thin"} {
		dev, _ := d.m.Get(name)
		want := deviceBytes(t, dev)
		ref := filepath.Join(dir, name+".ref")
		os.WriteFile(ref, want, 0o644)
		uri := nbdURI(sock, name)
		var info struct {
			VirtualSize int64 `json:"virtual-size"`
		}
		if err := json.Unmarshal([]byte(tool(t, "qemu-img", "info", "--output=json", uri)), &info); err != nil {
			t.Fatal(err)
		}
		if info.VirtualSize != int64(len(want)) {
			t.Errorf("%s: qemu-img info virtual-size %d, want %d", name, info.VirtualSize, len(want))
		}
		tool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", ref, uri)
		out := filepath.Join(dir, name+".copy")
		tool(t, "nbdcopy", uri, out)
		got, _ := os.ReadFile(out)
		if !bytes.Equal(got, want) {
			t.Errorf("%s: nbdcopy's copy differs from the device", name)
		}
	}
	m := nbdinfoMap(t, "", nbdURI(sock, "thin"))
	mapped := map[uint64]bool{1: true, 2: true, 9: true}
	var covered uint64
	for _, e := range m {
		if e.off != covered {
			t.Fatalf("map not contiguous at %d: %v", covered, m)
		}
		covered += e.length
		for b := e.off / (64 << 10); b < (e.off+e.length)/(64<<10); b++ {
			wantTyp := 3
			if mapped[b] {
				wantTyp = 0
			}
			if e.typ != wantTyp {
				t.Errorf("thin block %d: map type %d, want %d (map %v)", b, e.typ, wantTyp, m)
			}
		}
	}
	if covered != 16384*512 {
		t.Errorf("map covers %d bytes, want %d", covered, 16384*512)
	}
	// A sparse file's holes and a zero target are holes too.
	sp := filepath.Join(dir, "sparse.img")
	sparse(t, sp, 1<<20)
	f, _ := os.OpenFile(sp, os.O_WRONLY, 0)
	f.WriteAt(bytes.Repeat([]byte{7}, 64<<10), 256<<10)
	f.Close()
	if _, err := d.m.CreateTable("holes", "", false, "0 2048 linear "+sp+" 0\n2048 2048 zero"); err != nil {
		t.Fatal(err)
	}
	if err := d.ex.Add(qmp.ExportOptions{Type: "nbd", ID: "h0", NodeName: "holes", Socket: sock, Name: "holes"}); err != nil {
		t.Fatal(err)
	}
	hm := nbdinfoMap(t, "", nbdURI(sock, "holes"))
	want := []mapEntry{{0, 256 << 10, 3}, {256 << 10, 64 << 10, 0}, {320 << 10, 2<<20 - 320<<10, 3}}
	if fmt.Sprint(hm) != fmt.Sprint(want) {
		t.Errorf("sparse file + zero target map %v, want %v", hm, want)
	}
	// LIST shows both exports with the description.
	list := tool(t, "nbdinfo", "--list", "nbd+unix://?socket="+sock)
	if !strings.Contains(list, "export=\"striped\"") || !strings.Contains(list, "the striped disk") || !strings.Contains(list, "export=\"thin\"") {
		t.Errorf("nbdinfo --list:\n%s", list)
	}
	if got := fmt.Sprint(len(d.ex.List())); got != "3" {
		t.Errorf("exports listed: %v", d.ex.List())
	}
}

// bitmapInfo returns query-named-block-nodes' entry for a bitmap.
func (q *qmpConn) bitmapInfo(node, name string) (mapper.BitmapInfo, bool) {
	q.t.Helper()
	var nodes []struct {
		NodeName     string              `json:"node-name"`
		DirtyBitmaps []mapper.BitmapInfo `json:"dirty-bitmaps"`
	}
	if err := json.Unmarshal(q.must("query-named-block-nodes", nil), &nodes); err != nil {
		q.t.Fatal(err)
	}
	for _, n := range nodes {
		for _, b := range n.DirtyBitmaps {
			if n.NodeName == node && b.Name == name {
				return b, true
			}
		}
	}
	return mapper.BitmapInfo{}, false
}

func nbdExportArgs(id, node, sock string, writable bool, bitmaps ...string) map[string]any {
	a := map[string]any{"type": "nbd", "id": id, "node-name": node, "name": id, "writable": writable,
		"addr": map[string]any{"type": "unix", "path": sock}}
	if bitmaps != nil {
		a["bitmaps"] = bitmaps
	}
	return a
}

// dirtyChunks returns the chunks nbdinfo --map=qemu:dirty-bitmap:NAME
// reports dirty, checking that extents are whole chunks.
func dirtyChunks(t *testing.T, uri, bitmap string, gran uint64) map[uint64]bool {
	t.Helper()
	out := map[uint64]bool{}
	for _, e := range nbdinfoMap(t, "qemu:dirty-bitmap:"+bitmap, uri) {
		if e.typ == 0 {
			continue
		}
		if e.off%gran != 0 || e.length%gran != 0 {
			t.Errorf("dirty extent %d+%d not at the bitmap's granularity %d", e.off, e.length, gran)
		}
		for c := e.off / gran; c < (e.off+e.length+gran-1)/gran; c++ {
			out[c] = true
		}
	}
	return out
}

// applyDelta patches image with the dirty chunks read from the export by
// qemu-img dd, as an incremental backup tool reads only what changed.
func applyDelta(t *testing.T, dir, uri string, image []byte, chunks map[uint64]bool, gran uint64) {
	t.Helper()
	for c := range chunks {
		part := filepath.Join(dir, fmt.Sprintf("delta-%d", c))
		tool(t, "qemu-img", "dd", "-f", "raw", "-O", "raw", fmt.Sprintf("bs=%d", gran), fmt.Sprintf("skip=%d", c), fmt.Sprintf("count=%d", c+1), // qemu-img dd counts from block 0
			"if="+uri, "of="+part)
		b, err := os.ReadFile(part)
		if err != nil || uint64(len(b)) != gran {
			t.Fatalf("delta chunk %d: %d bytes, %v", c, len(b), err)
		}
		copy(image[c*gran:], b)
	}
}

func sameSet(a, b map[uint64]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

const vhostNBDConfig = `
[qmp]
socket = "qmp.sock"

[[device]]
name = "disk"
table = "0 16384 linear disk.img 0"

[[export]]
id = "v0"
device = "disk"
socket = "v.sock"
writable = true
`

// TestNBDIncrementalBackup: a bitmap records writes made through a
// vhost-user export; nbdinfo --map=qemu:dirty-bitmap:b0 lists exactly the
// written chunks; a delta read with qemu-img dd applied to the full backup
// (read with nbdcopy) equals the device; after clearing, a second
// increment lists only the newer writes and rebuilds the device again.
func TestNBDIncrementalBackup(t *testing.T) {
	needTool(t, "qemu-img", "qemu-utils")
	needTool(t, "nbdcopy", "libnbd-bin")
	needTool(t, "nbdinfo", "libnbd-bin")
	dir := t.TempDir()
	randomFile(t, filepath.Join(dir, "disk.img"), 8<<20, 3)
	d := startTestDaemon(t, dir, vhostNBDConfig)
	q := dialQMP(t, filepath.Join(dir, "qmp.sock"))
	dev, _ := d.m.Get("disk")
	const gran = 64 << 10
	nsock := filepath.Join(dir, "nbd.sock")
	q.must("block-dirty-bitmap-add", map[string]any{"node": "disk", "name": "b0", "granularity": gran})

	// Full backup.
	q.must("block-export-add", nbdExportArgs("full", "disk", nsock, false))
	tool(t, "nbdcopy", nbdURI(nsock, "full"), filepath.Join(dir, "full.img"))
	q.must("block-export-del", map[string]any{"id": "full"})
	full, _ := os.ReadFile(filepath.Join(dir, "full.img"))

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	vc, err := frontend.Dial(ctx, frontend.Config{Socket: filepath.Join(dir, "v.sock")})
	if err != nil {
		t.Fatal(err)
	}
	defer vc.Close()
	type w struct {
		off, n uint64
		zero   bool
	}
	write := func(ws []w, fill byte) map[uint64]bool {
		chunks := map[uint64]bool{}
		for _, x := range ws {
			var err error
			if x.zero {
				err = vc.WriteZeroes(ctx, 0, x.off/512, uint32(x.n/512), false)
			} else {
				err = vc.WriteAt(ctx, 0, bytes.Repeat([]byte{fill}, int(x.n)), x.off/512)
			}
			if err != nil {
				t.Fatal(err)
			}
			for c := x.off / gran; c <= (x.off+x.n-1)/gran; c++ {
				chunks[c] = true
			}
		}
		return chunks
	}
	want := write([]w{{100 << 10, 4 << 10, false}, {1<<20 - 512, 1024, false}, {5 << 20, 128 << 10, false}, {7 << 20, 64 << 10, true}}, 0xa1)

	// A recording bitmap is refused on a read-only export, as QEMU does.
	if _, e := q.call("block-export-add", nbdExportArgs("inc", "disk", nsock, false, "b0")); !strings.Contains(e, "Enabled bitmap 'b0' incompatible with readonly export") {
		t.Fatalf("export of an enabled bitmap: %q", e)
	}
	q.must("block-dirty-bitmap-disable", map[string]any{"node": "disk", "name": "b0"})
	if bi, _ := q.bitmapInfo("disk", "b0"); bi.Count != uint64(len(want))*gran || bi.Recording || bi.Granularity != gran {
		t.Errorf("query-named-block-nodes b0: %+v, want count %d, not recording", bi, len(want)*gran)
	}
	q.must("block-export-add", nbdExportArgs("inc", "disk", nsock, false, "b0"))
	if bi, _ := q.bitmapInfo("disk", "b0"); !bi.Busy {
		t.Errorf("exported bitmap not busy: %+v", bi)
	}
	uri := nbdURI(nsock, "inc")
	got := dirtyChunks(t, uri, "b0", gran)
	if !sameSet(got, want) {
		t.Fatalf("dirty chunks %v, want %v", got, want)
	}
	rebuilt := append([]byte(nil), full...)
	applyDelta(t, dir, uri, rebuilt, got, gran)
	if !bytes.Equal(rebuilt, deviceBytes(t, dev)) {
		t.Fatal("full backup + first increment differs from the device")
	}

	// Second increment: clear, record again, only the newer writes.
	if _, e := q.call("block-dirty-bitmap-clear", map[string]any{"node": "disk", "name": "b0"}); !strings.Contains(e, "in use") {
		t.Errorf("clear of an exported bitmap: %q", e)
	}
	q.must("block-export-del", map[string]any{"id": "inc"})
	q.must("block-dirty-bitmap-clear", map[string]any{"node": "disk", "name": "b0"})
	q.must("block-dirty-bitmap-enable", map[string]any{"node": "disk", "name": "b0"})
	want2 := write([]w{{3 << 20, 8 << 10, false}, {6<<20 + 4096, 200 << 10, false}}, 0xb2)
	q.must("block-dirty-bitmap-disable", map[string]any{"node": "disk", "name": "b0"})
	q.must("block-export-add", nbdExportArgs("inc2", "disk", nsock, false, "b0"))
	uri2 := nbdURI(nsock, "inc2")
	got2 := dirtyChunks(t, uri2, "b0", gran)
	if !sameSet(got2, want2) {
		t.Fatalf("second increment: dirty chunks %v, want %v", got2, want2)
	}
	applyDelta(t, dir, uri2, rebuilt, got2, gran)
	if !bytes.Equal(rebuilt, deviceBytes(t, dev)) {
		t.Fatal("full backup + two increments differ from the device")
	}
	// Merge: b1 gets b0's bits.
	q.must("block-dirty-bitmap-add", map[string]any{"node": "disk", "name": "b1", "granularity": 4096, "disabled": true})
	q.must("block-dirty-bitmap-merge", map[string]any{"node": "disk", "target": "b1", "bitmaps": []string{"b0"}})
	if bi, _ := q.bitmapInfo("disk", "b1"); bi.Count != uint64(len(want2))*gran {
		t.Errorf("merged b1 counts %d bytes, want %d", bi.Count, len(want2)*gran)
	}
	if _, e := q.call("block-dirty-bitmap-remove", map[string]any{"node": "disk", "name": "b0"}); !strings.Contains(e, "in use") {
		t.Errorf("remove of an exported bitmap: %q", e)
	}
	q.must("block-export-del", map[string]any{"id": "inc2"})
	q.must("block-dirty-bitmap-remove", map[string]any{"node": "disk", "name": "b0"})
	if _, ok := q.bitmapInfo("disk", "b0"); ok {
		t.Error("b0 still listed after remove")
	}
}

// TestNBDWritableSeenByVhost: qemu-io writes, write-zeroes and discards
// through a writable NBD export are what a vhost-user export of the same
// device reads, and a bitmap records them.
func TestNBDWritableSeenByVhost(t *testing.T) {
	needTool(t, "qemu-io", "qemu-utils")
	dir := t.TempDir()
	randomFile(t, filepath.Join(dir, "disk.img"), 8<<20, 4)
	startTestDaemon(t, dir, vhostNBDConfig)
	q := dialQMP(t, filepath.Join(dir, "qmp.sock"))
	q.must("block-dirty-bitmap-add", map[string]any{"node": "disk", "name": "b0"})
	nsock := filepath.Join(dir, "nbd.sock")
	q.must("block-export-add", nbdExportArgs("w", "disk", nsock, true))
	tool(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -z 2M 128k", "-c", "flush", nbdURI(nsock, "w"))

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	vc, err := frontend.Dial(ctx, frontend.Config{Socket: filepath.Join(dir, "v.sock")})
	if err != nil {
		t.Fatal(err)
	}
	defer vc.Close()
	buf := make([]byte, 64<<10)
	if err := vc.ReadAt(ctx, 0, buf, (1<<20)/512); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, bytes.Repeat([]byte{0xab}, len(buf))) {
		t.Error("vhost export does not read qemu-io's write")
	}
	zb := make([]byte, 128<<10)
	if err := vc.ReadAt(ctx, 0, zb, (2<<20)/512); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(zb, make([]byte, len(zb))) {
		t.Error("vhost export does not read qemu-io's write-zeroes as zeros")
	}
	if bi, _ := q.bitmapInfo("disk", "b0"); bi.Count != 3*65536 {
		t.Errorf("bitmap counts %d dirty bytes after NBD writes, want %d", bi.Count, 3*65536)
	}
	// qemu-img convert onto the export pre-zeroes with FAST_ZERO (refused
	// here: the disk holds data) and still lands the image exactly.
	src := filepath.Join(dir, "src.img")
	sparse(t, src, 8<<20)
	f, _ := os.OpenFile(src, os.O_WRONLY, 0)
	f.WriteAt(bytes.Repeat([]byte{0x3c}, 300<<10), 5<<20)
	f.Close()
	tool(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, nbdURI(nsock, "w"))
	tool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, nbdURI(nsock, "w"))
	// Read-only exports refuse writes.
	q.must("block-export-add", nbdExportArgs("ro", "disk", nsock, false))
	cmd := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 1 0 512", nbdURI(nsock, "ro"))
	if out, err := cmd.CombinedOutput(); err == nil && !strings.Contains(string(out), "ermission") && !strings.Contains(string(out), "read-only") && !strings.Contains(string(out), "read only") {
		t.Errorf("qemu-io write to a read-only export: %s", out)
	}
}

// TestNBDServerStartStop: QSD's form — nbd-server-start, then
// block-export-add of type nbd without addr; nbd-server-stop removes the
// export and stops listening.
func TestNBDServerStartStop(t *testing.T) {
	needTool(t, "nbdinfo", "libnbd-bin")
	dir := t.TempDir()
	randomFile(t, filepath.Join(dir, "disk.img"), 8<<20, 8)
	startTestDaemon(t, dir, vhostNBDConfig)
	q := dialQMP(t, filepath.Join(dir, "qmp.sock"))
	exp := map[string]any{"type": "nbd", "id": "n0", "node-name": "disk", "description": "backup view"}
	if _, e := q.call("block-export-add", exp); !strings.Contains(e, "NBD server not running") {
		t.Errorf("export without a server: %q", e)
	}
	sock := filepath.Join(dir, "srv.sock")
	q.must("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "path": sock}})
	if _, e := q.call("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "path": sock}}); e != "NBD server already running" {
		t.Errorf("second nbd-server-start: %q", e)
	}
	q.must("block-export-add", exp)
	var list []qmp.ExportInfo
	json.Unmarshal(q.must("query-block-exports", nil), &list)
	if len(list) != 2 || list[0].ID != "n0" || list[0].Type != "nbd" {
		t.Errorf("query-block-exports %+v", list)
	}
	out := tool(t, "nbdinfo", nbdURI(sock, "disk"))
	if !strings.Contains(out, "export-size: 8388608") || !strings.Contains(out, "backup view") || !strings.Contains(out, "base:allocation") {
		t.Errorf("nbdinfo:\n%s", out)
	}
	q.must("nbd-server-stop", nil)
	json.Unmarshal(q.must("query-block-exports", nil), &list)
	if len(list) != 1 {
		t.Errorf("exports after nbd-server-stop: %+v", list)
	}
	if c, err := net.Dial("unix", sock); err == nil {
		c.Close()
		t.Error("the server still listens after nbd-server-stop")
	}
}

// TestBitmapTransaction: QEMU's transaction with bitmap actions (libvirt's
// backup start) applies all actions or none, and leaves the device
// running.
func TestBitmapTransaction(t *testing.T) {
	dir := t.TempDir()
	sparse(t, filepath.Join(dir, "disk.img"), 8<<20)
	d := startTestDaemon(t, dir, vhostNBDConfig)
	q := dialQMP(t, filepath.Join(dir, "qmp.sock"))
	act := func(typ string, data map[string]any) map[string]any {
		data["node"] = "disk"
		return map[string]any{"type": typ, "data": data}
	}
	q.must("block-dirty-bitmap-add", map[string]any{"node": "disk", "name": "b0"})
	q.must("transaction", map[string]any{"actions": []any{
		act("block-dirty-bitmap-add", map[string]any{"name": "b1", "granularity": 4096}),
		act("block-dirty-bitmap-disable", map[string]any{"name": "b0"}),
	}})
	if b0, _ := q.bitmapInfo("disk", "b0"); b0.Recording {
		t.Error("b0 still records after the transaction")
	}
	if b1, ok := q.bitmapInfo("disk", "b1"); !ok || !b1.Recording || b1.Granularity != 4096 {
		t.Errorf("b1 after the transaction: %+v %v", b1, ok)
	}
	_, e := q.call("transaction", map[string]any{"actions": []any{
		act("block-dirty-bitmap-add", map[string]any{"name": "b2"}),
		act("block-dirty-bitmap-clear", map[string]any{"name": "nosuch"}),
	}})
	if e != "Dirty bitmap 'nosuch' not found" {
		t.Errorf("failing transaction: %q", e)
	}
	if _, ok := q.bitmapInfo("disk", "b2"); ok {
		t.Error("a failed transaction applied its first action")
	}
	q.must("transaction", map[string]any{"actions": []any{
		act("block-dirty-bitmap-add", map[string]any{"name": "b3"}),
		act("block-dirty-bitmap-disable", map[string]any{"name": "b3"}),
		act("block-dirty-bitmap-merge", map[string]any{"target": "b3", "bitmaps": []string{"b0", "b1"}}),
	}})
	if b3, ok := q.bitmapInfo("disk", "b3"); !ok || b3.Recording {
		t.Errorf("b3: %+v %v", b3, ok)
	}
	if _, e := q.call("transaction", map[string]any{"actions": []any{map[string]any{"type": "drive-backup", "data": map[string]any{}}}}); !strings.Contains(e, "does not accept value 'drive-backup'") {
		t.Errorf("unknown action: %q", e)
	}
	if dev, _ := d.m.Get("disk"); dev.Suspended() {
		t.Error("device left suspended by the transaction")
	}
}
