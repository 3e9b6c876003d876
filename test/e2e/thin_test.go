package e2e

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// thinBlock is the pool's data block size in the thin tests: 128 sectors
// (64 KiB), the kernel's smallest.
const (
	thinBlock      = 128
	thinBlockBytes = thinBlock * 512
)

// thinDialQMP connects to vhostdm's QMP socket, waiting for it to appear:
// a configuration without exports gives the harness no socket to wait for.
func thinDialQMP(t *testing.T, vd *harness.Process, sock string) *harness.QMP {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		q, err := harness.DialQMP(sock, 10*time.Second)
		if err == nil {
			t.Cleanup(func() { q.Close() })
			return q
		}
		if !vd.Alive() {
			t.Fatalf("vhostdm exited before serving QMP on %s: %v", sock, vd.ExitErr())
		}
		if time.Now().After(deadline) {
			t.Fatalf("vhostdm's QMP socket %s: %v", sock, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// thinExport adds a vhost-user-blk export of a device over QMP.
func thinExport(t *testing.T, q *harness.QMP, id, dev, sock string, writable bool) {
	t.Helper()
	qmpDo(t, q, "block-export-add", map[string]any{"type": "vhost-user-blk", "id": id, "node-name": dev,
		"addr": map[string]any{"type": "unix", "path": sock}, "writable": writable,
		"logical-block-size": 512, "serial": "e2e-" + dev})
}

// thinCreate sends create_thin to the pool and activates the new device.
func thinCreate(t *testing.T, q *harness.QMP, pool, name string, id int, secs int64) {
	t.Helper()
	qmpDo(t, q, "dm-message", map[string]any{"name": pool, "sector": 0, "message": fmt.Sprintf("create_thin %d", id)})
	qmpDo(t, q, "dm-create", map[string]any{"name": name, "table": fmt.Sprintf("0 %d thin /dev/mapper/%s %d", secs, pool, id)})
}

// thinMapped returns which data-block-sized pieces of a thin device's
// content are non-zero. On a zeroing pool written only with the writer's
// non-zero blocks these are exactly the provisioned blocks.
func thinMapped(data []byte) []bool {
	m := make([]bool, len(data)/thinBlockBytes)
	for v := range m {
		m[v] = !pattern.IsZero(data[v*thinBlockBytes : (v+1)*thinBlockBytes])
	}
	return m
}

// thinStatusWant is a thin device's INFO status for the mapped blocks m,
// as the kernel prints it.
func thinStatusWant(m []bool) string {
	n, hi := 0, -1
	for v, ok := range m {
		if ok {
			n, hi = n+1, v
		}
	}
	if hi < 0 {
		return "0 -"
	}
	return fmt.Sprintf("%d %d", n*thinBlock, (hi+1)*thinBlock-1)
}

var thinPoolStatusRE = regexp.MustCompile(`^(\d+) (\d+)/(\d+) (\d+)/(\d+) (\S+) (rw|ro|out_of_data_space) `)

// thinPoolData parses a thin-pool INFO status and returns its used and
// total data blocks.
func thinPoolData(t *testing.T, st string) (used, total int64) {
	t.Helper()
	m := thinPoolStatusRE.FindStringSubmatch(st)
	if m == nil {
		t.Fatalf("thin-pool status %q is not \"<transaction id> <used meta>/<total meta> <used data>/<total data> <held root> rw ...\"", st)
	}
	used, _ = strconv.ParseInt(m[4], 10, 64)
	total, _ = strconv.ParseInt(m[5], 10, 64)
	return used, total
}

// thinDump is the part of thin_dump's XML the e2e tests read.
type thinDump struct {
	NrDataBlocks int64 `xml:"nr_data_blocks,attr"`
	Devices      []struct {
		ID           int   `xml:"dev_id,attr"`
		MappedBlocks int64 `xml:"mapped_blocks,attr"`
		Ranges       []struct {
			Origin int64 `xml:"origin_begin,attr"`
			Data   int64 `xml:"data_begin,attr"`
			Length int64 `xml:"length,attr"`
		} `xml:"range_mapping"`
		Singles []struct {
			Origin int64 `xml:"origin_block,attr"`
			Data   int64 `xml:"data_block,attr"`
		} `xml:"single_mapping"`
	} `xml:"device"`
}

// thinDumpMappings runs thin_check and thin_dump on a metadata image and
// returns, per device id, virtual block → data block.
func thinDumpMappings(t *testing.T, meta string) (map[int]map[int64]int64, int64) {
	t.Helper()
	if out, err := exec.Command("thin_check", meta).CombinedOutput(); err != nil {
		t.Fatalf("thin_check %s (thin-provisioning-tools) rejects the metadata vhostdm left: %v\n%s", meta, err, out)
	}
	out, err := exec.Command("thin_dump", meta).Output()
	if err != nil {
		t.Fatalf("thin_dump %s: %v", meta, err)
	}
	var d thinDump
	if err := xml.Unmarshal(out, &d); err != nil {
		t.Fatalf("thin_dump %s output: %v\n%s", meta, err, tail(string(out), 20))
	}
	devs := map[int]map[int64]int64{}
	for _, dev := range d.Devices {
		m := map[int64]int64{}
		for _, r := range dev.Ranges {
			for i := int64(0); i < r.Length; i++ {
				m[r.Origin+i] = r.Data + i
			}
		}
		for _, s := range dev.Singles {
			m[s.Origin] = s.Data
		}
		if int64(len(m)) != dev.MappedBlocks {
			t.Errorf("thin_dump: device %d says mapped_blocks=%d but lists %d mappings", dev.ID, dev.MappedBlocks, len(m))
		}
		devs[dev.ID] = m
	}
	return devs, d.NrDataBlocks
}

// writerMaxSeq returns the newest writer write found in data, or -1.
func writerMaxSeq(t *testing.T, data []byte) int64 {
	t.Helper()
	w := pattern.NewWriter(writerSeed, int64(len(data)))
	top := int64(-1)
	for idx := int64(0); idx < w.Blocks; idx++ {
		seq, err := w.Decode(data[idx*pattern.BlockSize:(idx+1)*pattern.BlockSize], idx)
		if err != nil {
			t.Fatalf("snapshot content: %v", err)
		}
		top = max(top, seq)
	}
	return top
}

// TestThinLiveSnapshot serves a thin device of a fresh thin-pool (zeroed
// metadata image, sparse data image, block zeroing on) to a guest running
// the verified writer, and takes a live snapshot mid-run exactly as
// dmsetup users do for an active origin: dm-suspend thin0, dm-message pool
// "create_snap 1 0", dm-resume thin0. It proves:
//   - the snapshot holds every write a flush acknowledged before the
//     suspend, and is a prefix-consistent state of the writer (all writes
//     below some batch boundary B ≥ acked, part of batch [B, B+qd), none
//     newer): nothing written after the resume leaks into it;
//   - the snapshot, read while the origin keeps being written (copy on
//     write of shared blocks under load) and again after the run, is byte
//     for byte the same;
//   - the origin verifies exactly against all the guest's writes, and the
//     guest sees no I/O error across the suspend;
//   - both thin devices' status lines and the pool's used data blocks
//     match the model (provisioned blocks of each, minus blocks still
//     shared); a second snapshot of the idle origin allocates nothing;
//     after a clean stop thin_check accepts the metadata and thin_dump
//     lists exactly those mappings, shared blocks at the same data block
//     in both devices and the second snapshot identical to the origin.
func TestThinLiveSnapshot(t *testing.T) {
	e := needEnv(t)
	const (
		size      = 16 << 20
		secs      = size / 512
		dataBytes = 3 * size // the origin, its snapshot and some slack
		duration  = 14       // writer seconds
	)
	dir, sd := t.TempDir(), sockDir(t)
	meta := sparse(t, filepath.Join(dir, "meta.img"), 4<<20) // zeroed: formatted at load
	data := sparse(t, filepath.Join(dir, "data.img"), dataBytes)
	cfg := &harness.Config{
		QMP: harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{{Name: "pool",
			Table: fmt.Sprintf("0 %d thin-pool %s %s %d 0", dataBytes/512, meta, data, thinBlock)}},
	}
	vd := startVhostdm(t, e, writeConfig(t, dir, cfg))
	q := thinDialQMP(t, vd, cfg.QMP.Socket)
	thinCreate(t, q, "pool", "thin0", 0, secs)
	originSock, snapSock := filepath.Join(sd, "x0.sock"), filepath.Join(sd, "snap.sock")
	thinExport(t, q, "x0", "thin0", originSock, true)

	vm := startVM(t, e, harness.VMConfig{
		Disks:  []harness.Disk{{Socket: originSock, NumQueues: 1}},
		Steps:  []string{proto.StepWriter},
		Params: writerParams(duration),
	})
	acked := waitFlushes(t, vm, 3, guestTimeout, "the writer's first flushes on thin0")
	// The guest prints a flush event before it writes on: suspending at
	// once would snapshot exactly a flushed state. Let it write unflushed
	// data first, so the snapshot must catch writes only the suspend
	// drains and commits.
	time.Sleep(150 * time.Millisecond)

	// The live snapshot, as dmsetup users take it of an active origin.
	t0 := time.Now()
	qmpDo(t, q, "dm-suspend", map[string]any{"name": "thin0"})
	suspended := time.Now()
	qmpDo(t, q, "dm-message", map[string]any{"name": "pool", "sector": 0, "message": "create_snap 1 0"})
	qmpDo(t, q, "dm-resume", map[string]any{"name": "thin0"})
	t.Logf("snapshot: suspend %v, create_snap + resume %v; %d writes acknowledged by a flush before the suspend",
		suspended.Sub(t0).Round(time.Millisecond), time.Since(suspended).Round(time.Millisecond), acked)
	qmpDo(t, q, "dm-create", map[string]any{"name": "thin1", "table": fmt.Sprintf("0 %d thin /dev/mapper/pool 1", secs)})
	thinExport(t, q, "snapx", "thin1", snapSock, false)

	// Read the snapshot while the guest keeps writing the origin.
	t0 = time.Now()
	snap := readExport(t, snapSock, size)
	t.Logf("snapshot read during the run in %v", time.Since(t0).Round(time.Millisecond))
	for _, err := range harness.CheckWriter(snap, writerSeed, acked, -1) {
		t.Errorf("snapshot lacks a write acknowledged before the suspend: %v", err)
	}
	if t.Failed() {
		t.FailNow()
	}
	top := writerMaxSeq(t, snap)
	batch := top - top%writerQD // the writer issues batches of writerQD from multiples of writerQD
	for _, err := range harness.CheckWriter(snap, writerSeed, batch, batch+writerQD) {
		t.Errorf("snapshot is not a prefix-consistent state of the writer (newest write %d, so every write below %d and none from %d): %v",
			top, batch, batch+writerQD, err)
	}

	writes := waitWriterDone(t, vm)
	waitGuestEnd(t, vm)
	t.Logf("writer: %d writes in all; the snapshot holds writes up to %d (%d past the last flush acknowledged before the suspend), %d writes came after",
		writes, top, top+1-acked, writes-batch-writerQD)
	if writes-batch-writerQD < pattern.NewWriter(writerSeed, size).Blocks/4 {
		t.Fatalf("the writer made only %d writes after the snapshot: too few for the test to prove the snapshot stays put", writes-batch-writerQD)
	}

	again := readExport(t, snapSock, size)
	if d := firstDiff(again, snap); d != "" {
		t.Errorf("the snapshot changed while the origin was written: %s", d)
	}
	origin := readExport(t, originSock, size)
	for _, err := range harness.CheckWriterExact(origin, writerSeed, writes) {
		t.Errorf("origin thin0 after the run: %v", err)
	}
	if firstDiff(origin, snap) == "" {
		t.Fatal("the origin equals its snapshot after the run: the writes after the snapshot went nowhere")
	}

	// Status lines against the model: provisioned blocks of each device
	// and blocks still shared (never written on the origin since).
	m0, m1 := thinMapped(origin), thinMapped(snap)
	var n0, n1, shared int64
	for v := range m0 {
		if m0[v] {
			n0++
		}
		if m1[v] {
			n1++
			if bytes.Equal(origin[v*thinBlockBytes:(v+1)*thinBlockBytes], snap[v*thinBlockBytes:(v+1)*thinBlockBytes]) {
				shared++
			}
		}
	}
	if st, want := dmStatus(t, q, "thin0"), thinStatusWant(m0); st != want {
		t.Errorf("thin0 status %q, want %q (%d blocks written by the guest)", st, want, n0)
	}
	if st, want := dmStatus(t, q, "thin1"), thinStatusWant(m1); st != want {
		t.Errorf("thin1 (snapshot) status %q, want %q (%d blocks it holds)", st, want, n1)
	}
	pst := dmStatus(t, q, "pool")
	used, total := thinPoolData(t, pst)
	t.Logf("pool status %q: origin %d blocks, snapshot %d, %d still shared", pst, n0, n1, shared)
	if total != dataBytes/thinBlockBytes {
		t.Errorf("pool status has %d data blocks, want %d (table length / block size)", total, dataBytes/thinBlockBytes)
	}
	if want := n0 + n1 - shared; used != want {
		t.Errorf("pool uses %d data blocks, want %d (origin %d + snapshot %d - shared %d)", used, want, n0, n1, shared)
	}
	// A second snapshot of the idle origin shares every block: no data
	// block may be allocated for it.
	qmpDo(t, q, "dm-suspend", map[string]any{"name": "thin0"})
	qmpDo(t, q, "dm-message", map[string]any{"name": "pool", "sector": 0, "message": "create_snap 2 0"})
	qmpDo(t, q, "dm-resume", map[string]any{"name": "thin0"})
	if used2, _ := thinPoolData(t, dmStatus(t, q, "pool")); used2 != used {
		t.Errorf("pool uses %d data blocks after a snapshot of the idle origin, want %d as before (all shared)", used2, used)
	}

	// The external judge, after a clean stop.
	q.Close()
	vd.Stop()
	if err := vd.ExitErr(); err != nil {
		t.Errorf("vhostdm's exit after SIGTERM: %v", err)
	}
	devs, nr := thinDumpMappings(t, meta)
	if len(devs) != 3 || devs[0] == nil || devs[1] == nil || devs[2] == nil {
		t.Fatalf("thin_dump lists devices %v, want exactly 0, 1 and 2", keysOf(devs))
	}
	if nr != dataBytes/thinBlockBytes {
		t.Errorf("thin_dump: nr_data_blocks %d, want %d", nr, dataBytes/thinBlockBytes)
	}
	var dumpShared int64
	for id, m := range map[int][]bool{0: m0, 1: m1} {
		for v, want := range m {
			if _, got := devs[id][int64(v)]; got != want {
				t.Errorf("thin_dump: device %d block %d mapped=%v, want %v (the content read through the export)", id, v, got, want)
			}
		}
	}
	for v, d1 := range devs[1] {
		if d0, ok := devs[0][v]; ok && d0 == d1 {
			dumpShared++
		}
	}
	if dumpShared != shared {
		t.Errorf("thin_dump: devices 0 and 1 share %d data blocks, want %d (snapshot blocks the origin never rewrote)", dumpShared, shared)
	}
	if len(devs[2]) != len(devs[0]) {
		t.Errorf("thin_dump: the idle origin's snapshot (device 2) maps %d blocks, the origin %d", len(devs[2]), len(devs[0]))
	}
	for v, d0 := range devs[0] {
		if d2, ok := devs[2][v]; !ok || d2 != d0 {
			t.Errorf("thin_dump: device 2 (snapshot of the idle origin) maps block %d to %d (mapped %v), want the origin's data block %d", v, d2, ok, d0)
			break
		}
	}
}

func keysOf[V any](m map[int]V) []int {
	var ks []int
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

// TestThinVsLinearFio runs the harness's fio jobs in one guest on a thin
// device (fully provisioned beforehand, so reads hit data blocks and
// writes need no allocation: the steady-state cost of the mapping) and on
// a linear device over a same-sized pre-filled image, one after the other
// in the same run, and logs the figures with the thin/linear ratio. It
// asserts only that every job ran without error, never a speed.
func TestThinVsLinearFio(t *testing.T) {
	e := needEnv(t)
	if e.Fio == "" {
		t.Fatalf("fio not found in PATH: %s", harness.SetupHint)
	}
	const (
		size      = 64 << 20
		secs      = size / 512
		dataBytes = size + (8 << 20)
		runtime   = 2 // seconds per job (plus fio's 1 s ramp)
	)
	dir, sd := t.TempDir(), sockDir(t)
	fill := make([]byte, size)
	pattern.Fill(fill, 77, 0)
	linImg := filepath.Join(dir, "linear.img")
	if err := os.WriteFile(linImg, fill, 0o644); err != nil {
		t.Fatal(err)
	}
	meta := sparse(t, filepath.Join(dir, "meta.img"), 4<<20)
	data := sparse(t, filepath.Join(dir, "data.img"), dataBytes)
	thinSock, linSock := filepath.Join(sd, "thin.sock"), filepath.Join(sd, "lin.sock")
	cfg := &harness.Config{
		QMP: harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{
			{Name: "pool", Table: fmt.Sprintf("0 %d thin-pool %s %s %d 0", dataBytes/512, meta, data, thinBlock)},
			{Name: "lin", Table: fmt.Sprintf("0 %d linear %s 0", secs, linImg)},
		},
		Exports: []harness.ExportConfig{{ID: "lin", Device: "lin", Socket: linSock,
			NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "fio-linear"}},
	}
	p := startVhostdm(t, e, writeConfig(t, dir, cfg))
	q := dialQMP(t, cfg.QMP.Socket, "vhostdm")
	thinCreate(t, q, "pool", "thin", 0, secs)
	thinExport(t, q, "thin", "thin", thinSock, true)
	t0 := time.Now()
	writeExport(t, thinSock, fill)
	took := time.Since(t0)
	t.Logf("host provisioned the thin device through its export: %d MiB (%d blocks) in %v, %.1f MiB/s; pool %s",
		size>>20, size/thinBlockBytes, took.Round(time.Millisecond), float64(size>>20)/took.Seconds(), dmStatus(t, q, "pool"))

	run := runGuest(t, e, harness.VMConfig{
		Disks:  []harness.Disk{{Socket: thinSock, NumQueues: 1}, {Socket: linSock, NumQueues: 1}},
		Steps:  []string{proto.StepFio + "@vda", proto.StepFio + "@vdb"},
		Fio:    true,
		Params: map[string]string{proto.ParamFioRuntime: strconv.Itoa(runtime)},
	})
	jobs := map[string]map[string]*proto.FioJob{}
	for _, r := range run.Results {
		if r.Step != proto.StepFio || r.Fio == nil {
			continue
		}
		if r.Fio.Errors != 0 {
			t.Errorf("fio job %s on %s reported %d errors", r.Fio.Name, r.Disk, r.Fio.Errors)
		}
		if jobs[r.Disk] == nil {
			jobs[r.Disk] = map[string]*proto.FioJob{}
		}
		jobs[r.Disk][r.Fio.Name] = r.Fio
	}
	for _, disk := range []string{"vda", "vdb"} {
		if len(jobs[disk]) != len(proto.FioJobs) {
			t.Fatalf("%s: %d fio jobs reported, want %d", disk, len(jobs[disk]), len(proto.FioJobs))
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "fio in a TCG guest (1 vCPU, direct=1, %d s per job), thin (64 KiB blocks, provisioned) on vda then linear on vdb, same run; compare within one run only:\n", runtime)
	fmt.Fprintf(&b, "%-13s %-7s %10s %10s %10s %10s %12s %12s %8s\n", "job", "engine", "thin IOPS", "lin IOPS", "thin MiB/s", "lin MiB/s", "thin lat us", "lin lat us", "thin/lin")
	for _, spec := range proto.FioJobs {
		th, li := jobs["vda"][spec.Name], jobs["vdb"][spec.Name]
		ratio := 0.0
		if li.IOPS > 0 {
			ratio = th.IOPS / li.IOPS
		}
		fmt.Fprintf(&b, "%-13s %-7s %10.0f %10.0f %10.1f %10.1f %12.0f %12.0f %8.2f\n", spec.Name, th.Engine,
			th.IOPS, li.IOPS, float64(th.BWKiBps)/1024, float64(li.BWKiBps)/1024, th.LatMeanU, li.LatMeanU, ratio)
	}
	t.Log(b.String())
	if st := dmStatus(t, q, "pool"); !thinPoolStatusRE.MatchString(st) || !strings.Contains(st, " rw ") {
		t.Errorf("pool status after fio %q, want a healthy rw pool", st)
	}
	checkNoRenotify(t, p)
}
