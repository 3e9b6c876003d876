package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// xtsDecrypt is the external oracle of TestCryptOverStriped: it decrypts
// a file of aes-xts-plain64 sectors with python3-cryptography, the IV of
// each 512-byte sector being its number as a little-endian 64-bit value
// padded to 16 bytes (dm-crypt's plain64, iv_offset 0).
const xtsDecrypt = `
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key = bytes.fromhex(sys.argv[1])
src = open(sys.argv[2], 'rb').read()
out = bytearray(len(src))
for s in range(len(src) // 512):
    iv = s.to_bytes(8, 'little') + bytes(8)
    d = Cipher(algorithms.AES(key), modes.XTS(iv)).decryptor()
    out[s*512:(s+1)*512] = d.update(src[s*512:(s+1)*512]) + d.finalize()
open(sys.argv[3], 'wb').write(out)
`

// TestCryptOverStriped boots a guest on a crypt device (aes-xts-plain64,
// 512-bit key) stacked on a striped device over two images, runs the
// verify pattern, then on the host de-stripes the two images and decrypts
// them with python3-cryptography: the plaintext must be the guest's data,
// the ciphertext must not be, and nothing may be written outside the
// guest's extents.
func TestCryptOverStriped(t *testing.T) {
	e := needEnv(t)
	const (
		imgSize                   = 16 << 20
		size                      = 2 * imgSize
		secs                      = size / 512
		stripes                   = 2
		chunk                     = 128 // sectors: 64 KiB stripes
		chunkBytes                = chunk * 512
		seed, coverage, maxBlocks = 8008, 50, 64
		// A 512-bit aes-xts key: two AES-256 keys.
		keyHex = "2b7e151628aed2a6abf7158809cf4f3c762e7160f38b4da56a784d9045190cfe" +
			"a0b1c2d3e4f5061728394a5b6c7d8e9f00112233445566778899aabbccddeeff"
	)
	dir, sd := t.TempDir(), sockDir(t)
	imgA := sparse(t, filepath.Join(dir, "stripe-a.img"), imgSize)
	imgB := sparse(t, filepath.Join(dir, "stripe-b.img"), imgSize)
	cfg := &harness.Config{
		QMP: harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{
			{Name: "stripes", Table: fmt.Sprintf("0 %d striped %d %d %s 0 %s 0", secs, stripes, chunk, imgA, imgB)},
			{Name: "secret", Table: fmt.Sprintf("0 %d crypt aes-xts-plain64 %s 0 /dev/mapper/stripes 0", secs, keyHex)},
		},
		Exports: []harness.ExportConfig{{ID: "x0", Device: "secret", Socket: filepath.Join(sd, "x0.sock"),
			NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "e2e-crypt"}},
	}
	startVhostdm(t, e, writeConfig(t, dir, cfg))
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepInfo, proto.StepVerify},
		Params: seedParams(seed, coverage, maxBlocks),
	})
	if di := info(t, run, "vda"); di.Sectors != secs {
		t.Errorf("guest capacity %d sectors, want %d", di.Sectors, secs)
	}

	// De-stripe: chunk i is chunk i/2 of image i%2.
	a, b := mustRead(t, imgA), mustRead(t, imgB)
	if pattern.IsZero(a) || pattern.IsZero(b) {
		t.Fatalf("a stripe image is all zeros after the guest wrote 50%% of the disk (a zero: %v, b zero: %v)", pattern.IsZero(a), pattern.IsZero(b))
	}
	ct := make([]byte, size)
	for i := 0; i < size/chunkBytes; i++ {
		src := a
		if i%stripes == 1 {
			src = b
		}
		o := (i / stripes) * chunkBytes
		copy(ct[i*chunkBytes:], src[o:o+chunkBytes])
	}
	ctPath, ptPath := filepath.Join(dir, "ciphertext.raw"), filepath.Join(dir, "plaintext.raw")
	if err := os.WriteFile(ctPath, ct, 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if out, err := exec.Command("python3", "-c", xtsDecrypt, keyHex, ctPath, ptPath).CombinedOutput(); err != nil {
		t.Fatalf("the external oracle (python3-cryptography AES-XTS) failed: %v\n%s", err, out)
	}
	t.Logf("python3-cryptography decrypted %d MiB in %v", size>>20, time.Since(start).Round(time.Millisecond))
	pt := mustRead(t, ptPath)
	for _, err := range harness.CheckPlan(pt, harness.PlanCheck{Seed: seed, Coverage: coverage, MaxBlocks: maxBlocks}) {
		t.Errorf("host decryption of the de-striped images does not give the guest's data: %v", err)
	}
	// The ciphertext is not the plaintext, and sectors the guest never
	// wrote are still unwritten (zero) on the images.
	covered := make([]bool, size/512)
	for _, x := range pattern.Plan(seed, size, coverage, maxBlocks) {
		for s := x.Off / 512; s < x.End()/512; s++ {
			covered[s] = true
		}
	}
	var plainOnDisk, strays int
	for s := range covered {
		c := ct[s*512 : (s+1)*512]
		switch {
		case covered[s] && bytes.Equal(c, pt[s*512:(s+1)*512]):
			plainOnDisk++
		case !covered[s] && !pattern.IsZero(c):
			strays++
		}
	}
	if plainOnDisk > 0 {
		t.Errorf("%d sectors the guest wrote are stored in the clear on the images", plainOnDisk)
	}
	if strays > 0 {
		t.Errorf("%d sectors the guest never wrote are not zero on the images (stray writes)", strays)
	}
}

// TestSnapshotViaQMP stacks snapshot-origin over a linear base device and
// exports the origin. The guest runs the verified writer, then sleeps
// while the host takes a snapshot over QMP (dm-suspend origin, dm-create
// snapshot P 8, dm-resume origin), then writes the verify plan over the
// origin. The snapshot, read through a second export with the vhost
// client, must hold exactly the writer's data; the base image the writer
// plus the plan. Merging the snapshot back (origin reloaded as
// snapshot-merge, snapshot removed) must leave the base image equal to the
// snapshot, byte for byte.
func TestSnapshotViaQMP(t *testing.T) {
	e := needEnv(t)
	const (
		size                           = 16 << 20
		secs                           = size / 512
		seed, dur, coverage, maxBlocks = 9009, 5, 50, 64
		originDev, baseDev, snapDev    = "origin", "base", "snap"
		snapExport, chunk              = "snapx", 8
	)
	dir, sd := t.TempDir(), sockDir(t)
	baseImg := sparse(t, filepath.Join(dir, "base.img"), size)
	cow := sparse(t, filepath.Join(dir, "cow.img"), size+(4<<20))
	cfg := &harness.Config{
		QMP: harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{
			{Name: baseDev, Table: fmt.Sprintf("0 %d linear %s 0", secs, baseImg)},
			{Name: originDev, Table: fmt.Sprintf("0 %d snapshot-origin /dev/mapper/%s", secs, baseDev)},
		},
		Exports: []harness.ExportConfig{{ID: "x0", Device: originDev, Socket: filepath.Join(sd, "x0.sock"),
			NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "e2e-origin"}},
	}
	startVhostdm(t, e, writeConfig(t, dir, cfg))
	q := dialQMP(t, cfg.QMP.Socket, "vhostdm")
	vm := startVM(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepWriter, proto.StepSleep, proto.StepVerify},
		Params: snapshotParams(seed, dur, coverage, maxBlocks),
	})
	writes := waitWriterDone(t, vm)
	// The guest now sleeps dur seconds: take the snapshot.
	t0 := time.Now()
	qmpDo(t, q, "dm-suspend", map[string]any{"name": originDev})
	qmpDo(t, q, "dm-create", map[string]any{"name": snapDev,
		"table": fmt.Sprintf("0 %d snapshot /dev/mapper/%s %s P %d", secs, baseDev, cow, chunk)})
	qmpDo(t, q, "dm-resume", map[string]any{"name": originDev})
	took := time.Since(t0)
	t.Logf("snapshot taken in %v after %d writer writes", took.Round(time.Millisecond), writes)
	if took > (dur-1)*time.Second {
		t.Fatalf("taking the snapshot took %v, longer than the guest's %d s sleep allows: it may hold post-snapshot writes", took, dur)
	}
	run := waitGuestEnd(t, vm)
	if r := run.Result(proto.StepVerify, "vda"); r == nil || !r.OK {
		t.Fatalf("no successful verify result after the snapshot: %+v", r)
	}

	// The snapshot holds exactly the writer's data.
	qmpDo(t, q, "block-export-add", map[string]any{"type": "vhost-user-blk", "id": snapExport, "node-name": snapDev,
		"addr": map[string]any{"type": "unix", "path": filepath.Join(sd, "snap.sock")}, "writable": false})
	snap := readExport(t, filepath.Join(sd, "snap.sock"), size)
	for _, err := range harness.CheckWriterExact(snap, seed, writes) {
		t.Errorf("snapshot (read through its export) does not hold the pre-snapshot data: %v", err)
	}
	st := dmStatus(t, q, snapDev)
	if alloc, _, meta, ok := parseSnapStatus(st); !ok || alloc <= meta {
		t.Errorf("snapshot status %q: want <allocated>/<total> <metadata> with chunks allocated beyond the metadata", st)
	}
	t.Logf("snapshot status before merge: %s", st)
	// The origin (base image) holds the plan over the writer's data.
	if d := firstDiff(mustRead(t, baseImg), withPlan(snap, seed, coverage, maxBlocks)); d != "" {
		t.Errorf("base image after the post-snapshot writes is not the writer's data with the verify plan over it: %s", d)
	}
	if t.Failed() {
		return
	}

	// Merge back: the origin becomes snapshot-merge, the snapshot goes.
	qmpDo(t, q, "block-export-del", map[string]any{"id": snapExport, "mode": "hard"})
	qmpDo(t, q, "dm-suspend", map[string]any{"name": originDev})
	qmpDo(t, q, "dm-load", map[string]any{"name": originDev,
		"table": fmt.Sprintf("0 %d snapshot-merge /dev/mapper/%s %s P %d", secs, baseDev, cow, chunk)})
	qmpDo(t, q, "dm-resume", map[string]any{"name": originDev})
	qmpDo(t, q, "dm-remove", map[string]any{"name": snapDev})
	t0 = time.Now()
	for {
		st = dmStatus(t, q, originDev)
		if alloc, _, meta, ok := parseSnapStatus(st); ok && alloc == meta {
			break
		}
		if time.Since(t0) > 30*time.Second {
			t.Fatalf("merge not finished after 30 s: origin status %q", st)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("merge finished in %v (status %s)", time.Since(t0).Round(time.Millisecond), st)
	qmpDo(t, q, "dm-suspend", map[string]any{"name": originDev}) // flush the merged data
	qmpDo(t, q, "dm-resume", map[string]any{"name": originDev})
	if d := firstDiff(mustRead(t, baseImg), snap); d != "" {
		t.Errorf("base image after the merge differs from the snapshot: %s", d)
	}
	for _, err := range harness.CheckWriterExact(readExport(t, filepath.Join(sd, "x0.sock"), size), seed, writes) {
		t.Errorf("origin export after the merge does not hold the pre-snapshot data: %v", err)
	}
}

// qemuImgMap returns the byte ranges qemu-img says an image allocates.
func qemuImgMap(t *testing.T, img string) []pattern.Extent {
	t.Helper()
	out, err := exec.Command("qemu-img", "map", "-f", "parallels", "--output=json", img).Output()
	if err != nil {
		t.Fatalf("qemu-img map %s: %v", img, err)
	}
	var m []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("qemu-img map %s: %v\n%s", img, err, out)
	}
	var xs []pattern.Extent
	for _, r := range m {
		if r.Data {
			xs = append(xs, pattern.Extent{Off: r.Start, Len: r.Length})
		}
	}
	return xs
}

// qemuImgRaw converts a parallels image to raw with qemu-img and returns
// its bytes.
func qemuImgRaw(t *testing.T, img string) []byte {
	t.Helper()
	raw := img + ".raw"
	if out, err := exec.Command("qemu-img", "convert", "-f", "parallels", "-O", "raw", img, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert -f parallels %s: %v\n%s", img, err, out)
	}
	return mustRead(t, raw)
}

// TestPloopSnapshotViaQMP serves a ploop disk (one ploop1 image, 1 MiB
// clusters). The guest runs the verified writer, sleeps while the host
// sends `snapshot <new top>` with dm-message, then writes the verify plan.
// After a clean stop, qemu-img is the judge: the lower image converted to
// raw is exactly the writer's data (point 1), the lower image with the
// clusters qemu-img maps in the top image over it is point 2 (the writer's
// data with the plan over it), as is the device read through the export;
// qemu-img check finds both images clean.
func TestPloopSnapshotViaQMP(t *testing.T) {
	e := needEnv(t)
	const (
		size                           = 16 << 20
		secs                           = size / 512
		seed, dur, coverage, maxBlocks = 12012, 5, 50, 64
	)
	dir, sd := t.TempDir(), sockDir(t)
	lower := sparse(t, filepath.Join(dir, "lower.hds"), 0)
	top := sparse(t, filepath.Join(dir, "top.hds"), 0)
	cfg := &harness.Config{
		QMP:     harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{{Name: "pl", Table: fmt.Sprintf("0 %d ploop 11 %s", secs, lower)}},
		Exports: []harness.ExportConfig{{ID: "x0", Device: "pl", Socket: filepath.Join(sd, "x0.sock"),
			NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "e2e-ploop"}},
	}
	vd := startVhostdm(t, e, writeConfig(t, dir, cfg))
	q := dialQMP(t, cfg.QMP.Socket, "vhostdm")
	vm := startVM(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepWriter, proto.StepSleep, proto.StepVerify},
		Params: snapshotParams(seed, dur, coverage, maxBlocks),
	})
	writes := waitWriterDone(t, vm)
	t0 := time.Now()
	qmpDo(t, q, "dm-message", map[string]any{"name": "pl", "sector": 0, "message": "snapshot " + top})
	took := time.Since(t0)
	t.Logf("ploop snapshot taken in %v after %d writer writes", took.Round(time.Millisecond), writes)
	if took > (dur-1)*time.Second {
		t.Fatalf("the snapshot message took %v, longer than the guest's %d s sleep allows", took, dur)
	}
	st := dmStatus(t, q, "pl")
	if !strings.HasPrefix(st, "2 v2 2048 ") {
		t.Errorf("ploop status after the snapshot %q, want 2 deltas, v2, 2048-sector clusters", st)
	}
	waitGuestEnd(t, vm)
	dev := readExport(t, filepath.Join(sd, "x0.sock"), size)
	raw, err := q.Execute("dm-table", map[string]any{"name": "pl"}, 10*time.Second)
	if err != nil || !regexp.MustCompile(`11 \S*top\.hds \S*lower\.hds`).Match(raw) {
		t.Errorf("ploop table after the snapshot: %s (%v), want \"11 .../top.hds .../lower.hds\"", raw, err)
	}
	q.Close()
	vd.Stop() // a clean close clears the in-use flags
	if err := vd.ExitErr(); err != nil {
		t.Errorf("vhostdm's exit after SIGTERM: %v", err)
	}

	for _, img := range []string{lower, top} {
		if out, err := exec.Command("qemu-img", "check", "-f", "parallels", img).CombinedOutput(); err != nil {
			t.Errorf("qemu-img check %s: %v\n%s", filepath.Base(img), err, out)
		}
	}
	p1 := qemuImgRaw(t, lower)
	if int64(len(p1)) != size {
		t.Fatalf("qemu-img reads the lower image as %d bytes, want %d", len(p1), size)
	}
	for _, err := range harness.CheckWriterExact(p1, seed, writes) {
		t.Errorf("point 1 (lower image through qemu-img) is not the writer's data: %v", err)
	}
	want2 := withPlan(p1, seed, coverage, maxBlocks)
	topRaw := qemuImgRaw(t, top)
	p2 := bytes.Clone(p1)
	mapped := qemuImgMap(t, top)
	if len(mapped) == 0 {
		t.Fatal("qemu-img map finds no clusters in the top image after the guest wrote the verify plan")
	}
	for _, x := range mapped {
		copy(p2[x.Off:x.End()], topRaw[x.Off:x.End()])
	}
	if d := firstDiff(p2, want2); d != "" {
		t.Errorf("point 2 (top image's clusters over the lower image, through qemu-img) is not the writer's data with the plan over it: %s", d)
	}
	if d := firstDiff(dev, want2); d != "" {
		t.Errorf("the device read through its export after the guest is not point 2: %s", d)
	}
	t.Logf("top image: %d allocated ranges", len(mapped))
}

// TestSnapshotUnderWriter takes a snapshot while the guest's verified
// writer is running (suspend, create snapshot, resume, as an operator would
// over QMP). What the origin held at the instant of the suspend — captured
// on the host while the device is suspended and flushed — must be exactly
// what the snapshot serves afterwards, byte for byte, however many writes
// the guest made after it; the guest must see no I/O error.
func TestSnapshotUnderWriter(t *testing.T) {
	e := needEnv(t)
	const (
		size  = 16 << 20
		secs  = size / 512
		chunk = 8
	)
	dir, sd := t.TempDir(), sockDir(t)
	baseImg := sparse(t, filepath.Join(dir, "base.img"), size)
	cow := sparse(t, filepath.Join(dir, "cow.img"), size+(4<<20))
	cfg := &harness.Config{
		QMP: harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{
			{Name: "base", Table: fmt.Sprintf("0 %d linear %s 0", secs, baseImg)},
			{Name: "origin", Table: fmt.Sprintf("0 %d snapshot-origin /dev/mapper/base", secs)},
		},
		Exports: []harness.ExportConfig{{ID: "x0", Device: "origin", Socket: filepath.Join(sd, "x0.sock"),
			NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "e2e-snapw"}},
	}
	startVhostdm(t, e, writeConfig(t, dir, cfg))
	q := dialQMP(t, cfg.QMP.Socket, "vhostdm")
	vm := startVM(t, e, harness.VMConfig{Disks: disksOf(cfg), Steps: []string{proto.StepWriter}, Params: writerParams(12)})
	waitFlushes(t, vm, 3, guestTimeout, "the writer's first flushes")

	qmpDo(t, q, "dm-suspend", map[string]any{"name": "origin"})
	pre := mustRead(t, baseImg) // the origin at the snapshot instant: no I/O moves while suspended
	qmpDo(t, q, "dm-create", map[string]any{"name": "snap",
		"table": fmt.Sprintf("0 %d snapshot /dev/mapper/base %s P %d", secs, cow, chunk)})
	qmpDo(t, q, "dm-resume", map[string]any{"name": "origin"})
	acked := waitFlushes(t, vm, 3, guestTimeout, "flushes after the snapshot")
	t.Logf("writer at %d acknowledged writes three flushes after the snapshot", acked)

	run := waitGuestEnd(t, vm)
	if f := run.Failed(); f != "" {
		t.Fatalf("the guest saw the snapshot: %s", f)
	}
	res := run.Result(proto.StepWriter, "")
	if res == nil {
		t.Fatal("no final writer result")
	}
	if changed := firstDiff(mustRead(t, baseImg), pre); changed == "" {
		t.Fatal("the origin did not change after the snapshot: the test proves nothing")
	}
	for _, err := range harness.CheckWriterExact(mustRead(t, baseImg), writerSeed, res.Values["writes"]) {
		t.Errorf("origin after the run: %v", err)
	}
	qmpDo(t, q, "block-export-add", map[string]any{"type": "vhost-user-blk", "id": "snapx", "node-name": "snap",
		"addr": map[string]any{"type": "unix", "path": filepath.Join(sd, "snap.sock")}, "writable": false})
	if d := firstDiff(readExport(t, filepath.Join(sd, "snap.sock"), size), pre); d != "" {
		t.Errorf("the snapshot differs from the origin at the snapshot instant: %s", d)
	}
}

// TestPloopMergeUnderGuestWriter merges a ploop delta in the background
// while the guest's verified writer runs: the lower image (256 MiB of
// clusters, all allocated, zeros) is merged into the empty top through
// `dm-message merge` as soon as the writer starts. The message returns at
// once and the merge runs under the writer; the writer's final read-back
// is right, the stack ends with the top alone, and after a clean stop the
// top image, judged by qemu-img check and ploop check and converted by
// qemu-img, is exactly the writer's data.
func TestPloopMergeUnderGuestWriter(t *testing.T) {
	e := needEnv(t)
	const (
		size      = 256 << 20
		secs      = size / 512
		seed, dur = 12013, 10
	)
	dir, sd := t.TempDir(), sockDir(t)
	lower := filepath.Join(dir, "lower.hds")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "parallels", lower, fmt.Sprint(size)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	if out, err := exec.Command("qemu-io", "-f", "parallels", "-c", fmt.Sprintf("write -P 0 0 %d", size), lower).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io write: %v\n%s", err, out)
	}
	top := sparse(t, filepath.Join(dir, "top.hds"), 0)
	cfg := &harness.Config{
		QMP:     harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{{Name: "pl", Table: fmt.Sprintf("0 %d ploop 11 %s %s", secs, top, lower)}},
		Exports: []harness.ExportConfig{{ID: "x0", Device: "pl", Socket: filepath.Join(sd, "x0.sock"),
			NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "e2e-ploopm"}},
	}
	vd := startVhostdm(t, e, writeConfig(t, dir, cfg))
	q := dialQMP(t, cfg.QMP.Socket, "vhostdm")
	params := snapshotParams(seed, dur, 50, 64)
	params[proto.ParamFlushEvery] = "4" // many flush events: the guest's progress
	vm := startVM(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepWriter},
		Params: params,
	})
	if _, err := vm.WaitFor(guestTimeout, "the writer's start", func(ev harness.Event) bool {
		return ev.Kind == harness.EventResult && ev.Result.Step == proto.StepWriter && ev.Result.Event == "start"
	}); err != nil {
		t.Fatal(err)
	}
	if st := dmStatus(t, q, "pl"); !strings.HasPrefix(st, "2 v2 2048 o ") {
		t.Fatalf("ploop status before the merge %q, want 2 deltas", st)
	}
	t0 := time.Now()
	qmpDo(t, q, "dm-message", map[string]any{"name": "pl", "sector": 0, "message": "merge"})
	sent := time.Since(t0)
	var took time.Duration
	for {
		st := dmStatus(t, q, "pl")
		if f := strings.Fields(st); len(f) > 3 && !strings.Contains(f[3], "m") {
			if f[0] != "1" {
				t.Fatalf("ploop status after the merge %q, want the top alone", st)
			}
			took = time.Since(t0)
			break
		}
		if time.Since(t0) > 3*time.Minute {
			t.Fatalf("merge still running after 3 minutes: %q", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Guest flushes that completed while the merge ran, logged: each waits
	// for the merged data written so far, so they are few either way (the
	// in-process TestMergeUnderWrites measures the writes that go on).
	m0 := t0.Sub(vm.Started)
	flushes := 0
	var writes int64
	for {
		ev, err := vm.Next(guestTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if ev.Kind != harness.EventResult || ev.Result.Step != proto.StepWriter {
			continue
		}
		if !ev.Result.OK {
			t.Fatalf("the guest's writer failed: %s (%s)", ev.Result.Error, ev.Result.Event)
		}
		if ev.Result.Event == "flush" && ev.At > m0 && ev.At < m0+took {
			flushes++
		}
		if ev.Result.Event == "" {
			writes = ev.Result.Values["writes"]
			break
		}
	}
	t.Logf("merge message returned in %v; the merge of 256 clusters took %v; %d guest flushes during it; %d writer writes",
		sent.Round(time.Microsecond), took.Round(time.Millisecond), flushes, writes)
	if sent > took/2 {
		t.Errorf("the merge message took %v of the merge's %v: it should start the merge and return", sent, took)
	}
	waitGuestEnd(t, vm)
	q.Close()
	vd.Stop()
	if err := vd.ExitErr(); err != nil {
		t.Errorf("vhostdm's exit after SIGTERM: %v", err)
	}
	if out, err := exec.Command("qemu-img", "check", "-f", "parallels", top).CombinedOutput(); err != nil {
		t.Errorf("qemu-img check top: %v\n%s", err, out)
	}
	if out, err := exec.Command("ploop", "check", "-f", "-r", "-c", top).CombinedOutput(); err != nil {
		t.Errorf("ploop check top (Debian package ploop): %v\n%s", err, out)
	}
	p := qemuImgRaw(t, top)
	if int64(len(p)) != size {
		t.Fatalf("qemu-img reads the merged top as %d bytes, want %d", len(p), size)
	}
	for _, err := range harness.CheckWriterExact(p, seed, writes) {
		t.Errorf("the merged top through qemu-img is not the writer's data: %v", err)
	}
}
