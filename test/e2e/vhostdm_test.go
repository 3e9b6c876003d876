package e2e

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// exampleSocketDir is the socket directory the example configs name.
const exampleSocketDir = "/tmp/vhostdm-examples/"

// exampleConfig copies examples/<name> into a temporary directory with its
// sockets moved into a private directory, creates its images there (image
// paths are relative to the config's directory) and returns its path and
// contents.
func exampleConfig(t *testing.T, e *harness.Env, name string) (string, *harness.Config) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.RepoRoot, "examples", name))
	if err != nil {
		t.Fatalf("example config: %v", err)
	}
	if !bytes.Contains(b, []byte(exampleSocketDir)) {
		t.Fatalf("examples/%s: sockets are expected under %s", name, exampleSocketDir)
	}
	dir, sd := t.TempDir(), sockDir(t)
	b = bytes.ReplaceAll(b, []byte(exampleSocketDir), []byte(sd+"/"))
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := harness.LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "images"), 0o755)
	if _, err := cfg.CreateImages(); err != nil {
		t.Fatalf("create images: %v", err)
	}
	return path, cfg
}

// disksOf returns the guest disks for a config's exports, in order.
func disksOf(cfg *harness.Config) []harness.Disk {
	var ds []harness.Disk
	for _, x := range cfg.Exports {
		ds = append(ds, harness.Disk{Socket: x.Socket, NumQueues: max(x.NumQueues, 1)})
	}
	return ds
}

// readDevice reads a whole device through the host model of its table.
func readDevice(t *testing.T, cfg *harness.Config, dev string) []byte {
	t.Helper()
	n, err := cfg.DeviceSectors(dev)
	if err != nil {
		t.Fatal(err)
	}
	data, err := cfg.ReadDevice(dev, 0, n)
	if err != nil {
		t.Fatalf("read device %s through the host model: %v", dev, err)
	}
	return data
}

func seedParams(seed uint64, coverage, maxBlocks int) map[string]string {
	return map[string]string{
		proto.ParamSeed: strconv.FormatUint(seed, 10), proto.ParamCoverage: strconv.Itoa(coverage),
		proto.ParamMaxBlocks: strconv.Itoa(maxBlocks),
	}
}

// TestBasicPatternVerify boots a guest on examples/vm-basic.toml, writes
// the verify pattern over the whole disk with O_DIRECT and reads it back;
// the host then re-reads the image and checks it byte for byte.
func TestBasicPatternVerify(t *testing.T) {
	e := needEnv(t)
	path, cfg := exampleConfig(t, e, "vm-basic.toml")
	startVhostdm(t, e, path)
	const seed, coverage, maxBlocks = 1001, 100, 64
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepInfo, proto.StepVerify},
		Params: seedParams(seed, coverage, maxBlocks),
	})
	sectors, _ := cfg.DeviceSectors("root")
	di := info(t, run, "vda")
	if di.Sectors != sectors {
		t.Errorf("guest capacity %d sectors, want %d (the table's length)", di.Sectors, sectors)
	}
	if di.Serial != "basic-root" {
		t.Errorf("guest serial %q, want %q", di.Serial, "basic-root")
	}
	for _, err := range harness.CheckPlan(readDevice(t, cfg, "root"), harness.PlanCheck{
		Seed: seed, Coverage: coverage, MaxBlocks: maxBlocks, ZeroElsewhere: true,
	}) {
		t.Errorf("host check of images/basic-root.img: %v", err)
	}
}

// TestStripedTwoQueues boots a 2-CPU guest on examples/vm-striped.toml
// (2 queues on the striped disk), runs the verify pattern on it and checks
// both images against the striping model on the host; the read-only disk
// must still be unwritten.
func TestStripedTwoQueues(t *testing.T) {
	e := needEnv(t)
	path, cfg := exampleConfig(t, e, "vm-striped.toml")
	startVhostdm(t, e, path)
	const seed, coverage, maxBlocks = 2002, 50, 64
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		CPUs:   2, // virtio-blk uses min(num-queues, CPUs) queues
		Steps:  []string{proto.StepInfo, proto.StepVerify + "@vda"},
		Params: seedParams(seed, coverage, maxBlocks),
	})
	di := info(t, run, "vda")
	if di.Queues != 2 {
		t.Errorf("guest vda has %d blk-mq queues, want 2 (export num-queues = 2, 2 CPUs)", di.Queues)
	}
	if want, _ := cfg.DeviceSectors("data"); di.Sectors != want {
		t.Errorf("guest vda capacity %d sectors, want %d", di.Sectors, want)
	}
	if ro := info(t, run, "vdb"); !ro.ReadOnly {
		t.Errorf("guest vdb (export ro0, writable = false) is not read-only")
	}
	for _, err := range harness.CheckPlan(readDevice(t, cfg, "data"), harness.PlanCheck{
		Seed: seed, Coverage: coverage, MaxBlocks: maxBlocks, ZeroElsewhere: true,
	}) {
		t.Errorf("host check through the striping model: %v", err)
	}
	// Both stripes got data: a table that ignored striping would leave one empty.
	for _, img := range []string{"images/striped-a.img", "images/striped-b.img"} {
		b, err := os.ReadFile(cfg.Path(img))
		if err != nil {
			t.Fatal(err)
		}
		if pattern.IsZero(b) {
			t.Errorf("%s is all zeros after the guest wrote the striped disk", img)
		}
	}
}

// linearConfig returns a config with one linear device "d0" over a new
// sparse image of size bytes, exported as "x0".
func linearConfig(t *testing.T, size int64, writable bool, serial string) (*harness.Config, string) {
	t.Helper()
	dir, sd := t.TempDir(), sockDir(t)
	img := sparse(t, filepath.Join(dir, "d0.img"), size)
	cfg := &harness.Config{
		QMP: harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{{Name: "d0",
			Table: fmt.Sprintf("0 %d linear %s 0", size/512, img)}},
		Exports: []harness.ExportConfig{{ID: "x0", Device: "d0", Socket: filepath.Join(sd, "x0.sock"),
			NumQueues: 1, Writable: writable, LogicalBlockSize: 512, Serial: serial}},
	}
	writeConfig(t, dir, cfg)
	return cfg, img
}

// TestFlushDiscardWriteZeroes checks flush, discard and write-zeroes as the
// guest uses them (fsync, BLKDISCARD, BLKZEROOUT, then zeros on read-back),
// the serial and the capacity, and the image on the host.
func TestFlushDiscardWriteZeroes(t *testing.T) {
	e := needEnv(t)
	const size, serial, seed = 64 << 20, "e2e-serial-0123", 3003
	cfg, img := linearConfig(t, size, true, serial)
	startVhostdm(t, e, filepath.Join(cfg.Dir, "vm.toml"))
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepInfo, proto.StepFlush, proto.StepDiscard, proto.StepZeroes},
		Params: seedParams(seed, 25, 64),
	})
	di := info(t, run, "vda")
	if di.Serial != serial {
		t.Errorf("guest serial %q, want %q (export serial)", di.Serial, serial)
	}
	if di.Sectors != size/512 {
		t.Errorf("guest capacity %d sectors, want %d", di.Sectors, size/512)
	}
	if di.DiscardMaxBytes == 0 {
		t.Errorf("guest sees no discard support (discard_max_bytes 0): the export must offer VIRTIO_BLK_F_DISCARD")
	}
	if di.WriteZeroesMax == 0 {
		t.Errorf("guest sees no write-zeroes support (write_zeroes_max_bytes 0): the export must offer VIRTIO_BLK_F_WRITE_ZEROES; BLKZEROOUT was emulated with writes")
	}
	if di.WriteCache != "write back" {
		t.Errorf("guest write cache mode %q, want \"write back\": without VIRTIO_BLK_F_FLUSH the guest never sends flushes and fsync proves nothing", di.WriteCache)
	}
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	fl, dis, ze := fixedExtents(size)
	if err := harness.CheckExtentPattern(data, fl, seed); err != nil {
		t.Errorf("flushed extent on the host: %v", err)
	}
	if err := harness.CheckExtentZero(data, dis); err != nil {
		t.Errorf("discarded extent on the host: %v", err)
	}
	if err := harness.CheckExtentZero(data, ze); err != nil {
		t.Errorf("zeroed extent on the host: %v", err)
	}
}

// TestReadOnlyDisk exports a pre-filled image read-only: the guest reads
// the pattern, every write attempt fails, and the image is unchanged.
func TestReadOnlyDisk(t *testing.T) {
	e := needEnv(t)
	const size, seed, coverage, maxBlocks = 32 << 20, 4004, 25, 16
	cfg, img := linearConfig(t, size, false, "e2e-ro")
	// Fill the image with the verify pattern of the plan.
	data := make([]byte, size)
	for _, x := range pattern.Plan(seed, size, coverage, maxBlocks) {
		pattern.Fill(data[x.Off:x.End()], seed, x.Off)
	}
	if err := os.WriteFile(img, data, 0o644); err != nil {
		t.Fatal(err)
	}
	before := sha256.Sum256(data)
	startVhostdm(t, e, filepath.Join(cfg.Dir, "vm.toml"))
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepInfo, proto.StepReadVerify, proto.StepReadOnly},
		Params: seedParams(seed, coverage, maxBlocks),
	})
	if !info(t, run, "vda").ReadOnly {
		t.Errorf("guest sees vda writable; the export has writable = false (VIRTIO_BLK_F_RO)")
	}
	after, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(after) != before {
		for o := 0; o < len(after); o += pattern.SectorSize {
			if !bytes.Equal(after[o:o+pattern.SectorSize], data[o:o+pattern.SectorSize]) {
				t.Fatalf("read-only image changed, first at byte %d", o)
			}
		}
	}
	if r := run.Result(proto.StepReadOnly, "vda"); r != nil {
		t.Logf("refused writes: %v", r.Values)
	}
}
