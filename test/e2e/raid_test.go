package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// raidInfo is a parsed raid INFO status line:
// "<type> <#devs> <health> <done>/<total> <action> <mismatches> 0 -".
type raidInfo struct {
	line              string
	health, action    string
	done, total, mism int64
}

func parseRaidInfo(s string) (raidInfo, bool) {
	f := strings.Fields(s)
	if len(f) != 8 {
		return raidInfo{}, false
	}
	d, tot, ok := strings.Cut(f[3], "/")
	if !ok {
		return raidInfo{}, false
	}
	ri := raidInfo{line: s, health: f[2], action: f[4]}
	var err1, err2, err3 error
	ri.done, err1 = strconv.ParseInt(d, 10, 64)
	ri.total, err2 = strconv.ParseInt(tot, 10, 64)
	ri.mism, err3 = strconv.ParseInt(f[5], 10, 64)
	return ri, err1 == nil && err2 == nil && err3 == nil
}

// raidStatus returns the parsed INFO status of raid device name.
func raidStatus(t *testing.T, q *harness.QMP, name string) raidInfo {
	t.Helper()
	st := dmStatus(t, q, name)
	ri, ok := parseRaidInfo(st)
	if !ok {
		t.Fatalf("raid status of %s %q: want <type> <#devs> <health> <done>/<total> <action> <mismatches> 0 -", name, st)
	}
	return ri
}

// waitRaid polls the status of raid device name until cond holds, calling
// seen on every status read, and returns the status that satisfied cond.
func waitRaid(t *testing.T, q *harness.QMP, name string, timeout time.Duration, what string, seen func(raidInfo), cond func(raidInfo) bool) raidInfo {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ri := raidStatus(t, q, name)
		if seen != nil {
			seen(ri)
		}
		if cond(ri) {
			return ri
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached after %v; raid status %q", what, timeout, ri.line)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// dmEvents returns the DM_EVENTs of device name with the given kind that
// the QMP client has collected so far, as their data members.
func dmEvents(t *testing.T, q *harness.QMP, name, kind string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, raw := range q.Events {
		var ev struct {
			Event string `json:"event"`
			Data  struct {
				Name   string         `json:"name"`
				Target string         `json:"target"`
				Event  string         `json:"event"`
				Data   map[string]any `json:"data"`
			} `json:"data"`
		}
		if err := json.Unmarshal(raw, &ev); err != nil {
			t.Fatalf("QMP event %s: %v", raw, err)
		}
		if ev.Event == "DM_EVENT" && ev.Data.Name == name && ev.Data.Event == kind {
			out = append(out, ev.Data.Data)
		}
	}
	return out
}

// writeExport writes data at sector 0 of a vhost-user-blk export with the
// vhost client and flushes it.
func writeExport(t *testing.T, sock string, data []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := frontend.Dial(ctx, frontend.Config{Socket: sock, MemSize: 16 << 20})
	if err != nil {
		t.Fatalf("vhost client on %s: %v", sock, err)
	}
	defer c.Close()
	if got := int64(c.Config().Capacity) * 512; got != int64(len(data)) {
		t.Fatalf("export %s has capacity %d bytes, want %d", sock, got, len(data))
	}
	const chunk = 1 << 20
	buf, err := c.Buf(chunk)
	if err != nil {
		t.Fatal(err)
	}
	defer c.FreeBuf(buf)
	for off := 0; off < len(data); off += chunk {
		n := copy(buf, data[off:])
		if err := c.WriteAt(ctx, 0, buf[:n], uint64(off/512)); err != nil {
			t.Fatalf("write of %s at byte %d: %v", sock, off, err)
		}
	}
	if err := c.Flush(ctx, 0); err != nil {
		t.Fatalf("flush of %s: %v", sock, err)
	}
}

// TestRaid6FlakeyLeg runs the guest's verified writer on a raid6_zr array
// of five member devices (linear over images, no metadata devices) and
// fails member 2 mid-run by reloading it, over QMP, to an always-down
// flakey table. The guest must see no I/O error; the raid must take the
// leg out of service (status D, DM_EVENT device-failed) and carry on
// degraded; every write must then read back through an export. The leg
// then returns over its stale image and the raid table is reloaded with
// "nosync rebuild 2" (nosync: no resync may repair parity behind the
// rebuild's back); recovery must run to completion (in-sync event, status
// AAAAA), the data must still read back, a "check" must find 0
// mismatches, and every member image must be byte-identical to the member
// of a healthy twin array (fresh images) into which the host wrote the
// same data.
func TestRaid6FlakeyLeg(t *testing.T) {
	e := needEnv(t)
	const (
		legs       = 5
		failed     = 2
		legSize    = 8 << 20
		legSecs    = legSize / 512
		size       = (legs - 2) * legSize // raid6: two devices' worth of parity
		secs       = size / 512
		chunk      = 64   // sectors
		rate       = 4096 // kB/s per device: recover and check take about 2 s each
		writerSecs = 12
		raidDev    = "r0"
	)
	dir, sd := t.TempDir(), sockDir(t)
	var imgs, twins, members []string
	cfg := &harness.Config{QMP: harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")}}
	for i := range legs {
		imgs = append(imgs, sparse(t, filepath.Join(dir, fmt.Sprintf("leg%d.img", i)), legSize))
		twins = append(twins, sparse(t, filepath.Join(dir, fmt.Sprintf("twin%d.img", i)), legSize))
		members = append(members, fmt.Sprintf("leg%d", i))
		cfg.Devices = append(cfg.Devices, harness.DeviceConfig{Name: members[i], Table: fmt.Sprintf("0 %d linear %s 0", legSecs, imgs[i])})
	}
	raidTable := func(params string, devs []string) string {
		var b strings.Builder
		fmt.Fprintf(&b, "0 %d raid raid6_zr %d %s %d", secs, len(strings.Fields(params)), params, legs)
		for _, d := range devs {
			b.WriteString(" - " + d)
		}
		return b.String()
	}
	var memberPaths []string
	for _, m := range members {
		memberPaths = append(memberPaths, "/dev/mapper/"+m)
	}
	// Fresh zeroed members are consistent (P = Q = 0): nosync.
	cfg.Devices = append(cfg.Devices, harness.DeviceConfig{Name: raidDev,
		Table: raidTable(fmt.Sprintf("%d nosync max_recovery_rate %d", chunk, rate), memberPaths)})
	cfg.Exports = []harness.ExportConfig{{ID: "x0", Device: raidDev, Socket: filepath.Join(sd, "x0.sock"),
		NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "e2e-raid6"}}
	startVhostdm(t, e, writeConfig(t, dir, cfg))
	q := dialQMP(t, cfg.QMP.Socket, "vhostdm")
	if ri := raidStatus(t, q, raidDev); ri.health != "AAAAA" || ri.action != "idle" || ri.done != legSecs || ri.total != legSecs {
		t.Fatalf("new raid6 array: status %q, want AAAAA %d/%d idle", ri.line, legSecs, legSecs)
	}

	start := time.Now()
	vm := startVM(t, e, harness.VMConfig{Disks: disksOf(cfg), Steps: []string{proto.StepWriter}, Params: writerParams(writerSecs)})
	acked := waitFlushes(t, vm, 2, guestTimeout, "the writer's first flushes")
	t.Logf("writer at %d acknowledged writes: member %d goes down (flakey, always down)", acked, failed)

	// Leg 2 fails under the writer.
	failedAt := time.Now()
	qmpDo(t, q, "dm-reload", map[string]any{"name": members[failed],
		"table": fmt.Sprintf("0 %d flakey %s 0 0 3600", legSecs, imgs[failed])})
	health := func(c byte) string { // c at the failed leg, A elsewhere
		h := []byte(strings.Repeat("A", legs))
		h[failed] = c
		return string(h)
	}
	wantDown := health('D')
	ri := waitRaid(t, q, raidDev, 20*time.Second, "raid leg "+strconv.Itoa(failed)+" marked failed (D) under the writer", nil,
		func(ri raidInfo) bool { return ri.health != "AAAAA" })
	if ri.health != wantDown {
		t.Fatalf("after member %d went down the raid status is %q: want health %s (only that leg failed)", failed, ri.line, wantDown)
	}
	t.Logf("raid noticed the failure after %v: %s", time.Since(failedAt).Round(time.Millisecond), ri.line)
	// The event is sent to QMP clients asynchronously; the harness
	// collects events while it reads replies, so ask until it is in.
	evs := dmEvents(t, q, raidDev, "device-failed")
	for deadline := time.Now().Add(10 * time.Second); len(evs) == 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		qmpDo(t, q, "query-version", nil)
		evs = dmEvents(t, q, raidDev, "device-failed")
	}
	if len(evs) != 1 {
		t.Fatalf("want exactly one DM_EVENT device-failed from %s, got %d: %v", raidDev, len(evs), evs)
	}
	if idx, _ := evs[0]["index"].(float64); int(idx) != failed || evs[0]["device"] != memberPaths[failed] {
		t.Fatalf("DM_EVENT device-failed data %v: want index %d, device %s", evs[0], failed, memberPaths[failed])
	}
	acked = waitFlushes(t, vm, 3, guestTimeout, "the writer's flushes on the degraded array")
	t.Logf("writer carried on degraded: %d acknowledged writes", acked)

	// The guest ends without an I/O error; every write reads back degraded.
	writes := waitWriterDone(t, vm)
	waitGuestEnd(t, vm)
	if ri := raidStatus(t, q, raidDev); ri.health != wantDown {
		t.Fatalf("raid status after the writer: %q, want health %s", ri.line, wantDown)
	}
	data := readExport(t, cfg.Exports[0].Socket, size)
	for _, err := range harness.CheckWriterExact(data, writerSeed, writes) {
		t.Errorf("degraded raid6 (read through its export) after %d writes: %v", writes, err)
	}
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d writes verified on the degraded array", writes)

	// A healthy twin array over fresh images, written with the same data:
	// what every member must hold.
	qmpDo(t, q, "dm-create", map[string]any{"name": "twin",
		"table": raidTable(fmt.Sprintf("%d nosync", chunk), twins)})
	twinSock := filepath.Join(sd, "twin.sock")
	qmpDo(t, q, "block-export-add", map[string]any{"type": "vhost-user-blk", "id": "twinx", "node-name": "twin",
		"addr": map[string]any{"type": "unix", "path": twinSock}, "writable": true})
	writeExport(t, twinSock, data)
	if d := firstDiff(readExport(t, twinSock, size), data); d != "" {
		t.Fatalf("twin raid6 does not read back what the host wrote: %s", d)
	}
	qmpDo(t, q, "block-export-del", map[string]any{"id": "twinx", "mode": "hard"})
	qmpDo(t, q, "dm-remove", map[string]any{"name": "twin"})
	want := make([][]byte, legs)
	for i := range legs {
		want[i] = mustRead(t, twins[i])
	}
	// The surviving members already hold what a healthy array would (the
	// degraded writes kept their P and Q right); the failed one is stale.
	for i := range legs {
		d := firstDiff(mustRead(t, imgs[i]), want[i])
		switch {
		case i == failed && d == "":
			t.Fatalf("member %d's image is not stale after the failure: the rebuild would prove nothing", i)
		case i != failed && d != "":
			t.Errorf("surviving member %d on the degraded array differs from a healthy array's: %s", i, d)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// The leg returns over its stale image; rebuild it.
	qmpDo(t, q, "dm-reload", map[string]any{"name": members[failed],
		"table": fmt.Sprintf("0 %d linear %s 0", legSecs, imgs[failed])})
	rebuildStart := time.Now()
	qmpDo(t, q, "dm-reload", map[string]any{"name": raidDev,
		"table": raidTable(fmt.Sprintf("%d nosync rebuild %d max_recovery_rate %d", chunk, failed, rate), memberPaths)})
	sawRecover := false
	ri = waitRaid(t, q, raidDev, 30*time.Second, "rebuild of member "+strconv.Itoa(failed),
		func(ri raidInfo) {
			if ri.action == "recover" {
				sawRecover = true
				if ri.health != health('a') {
					t.Fatalf("raid status while recovering %q: want health %s (member %d alive, not in sync)", ri.line, health('a'), failed)
				}
			}
		},
		func(ri raidInfo) bool {
			return ri.health == "AAAAA" && ri.action == "idle" && ri.done == legSecs && ri.total == legSecs
		})
	t.Logf("rebuild finished in %v: %s", time.Since(rebuildStart).Round(time.Millisecond), ri.line)
	if !sawRecover {
		t.Errorf("never saw the recover action in the raid status between the reload and AAAAA")
	}
	if n := len(dmEvents(t, q, raidDev, "in-sync")); n != 1 {
		t.Errorf("want one DM_EVENT in-sync from %s after the rebuild, got %d", raidDev, n)
	}
	if n := len(dmEvents(t, q, raidDev, "device-failed")); n != 1 {
		t.Errorf("want no further DM_EVENT device-failed after the leg returned, got %d in all", n)
	}
	for _, err := range harness.CheckWriterExact(readExport(t, cfg.Exports[0].Socket, size), writerSeed, writes) {
		t.Errorf("rebuilt raid6 (read through its export): %v", err)
	}

	// A check compares P and Q with the data everywhere: 0 mismatches.
	qmpDo(t, q, "dm-message", map[string]any{"name": raidDev, "sector": 0, "message": "check"})
	sawCheck := false
	ri = waitRaid(t, q, raidDev, 30*time.Second, "check of the rebuilt array",
		func(ri raidInfo) { sawCheck = sawCheck || ri.action == "check" },
		func(ri raidInfo) bool { return ri.action == "idle" })
	if !sawCheck {
		t.Errorf("never saw the check action in the raid status after the check message")
	}
	if ri.health != "AAAAA" || ri.mism != 0 || ri.done != legSecs {
		t.Errorf("raid status after check: %q, want AAAAA %d/%d idle with 0 mismatches", ri.line, legSecs, legSecs)
	}
	// Every member, the rebuilt one included, is the healthy array's.
	for i := range legs {
		if d := firstDiff(mustRead(t, imgs[i]), want[i]); d != "" {
			t.Errorf("member %d after the rebuild differs from a healthy array's member %d: %s", i, i, d)
		}
	}
	if bytes.Equal(want[failed], make([]byte, legSize)) {
		t.Errorf("the healthy array's member %d is all zeros: the comparison proves nothing", failed)
	}
	t.Logf("total %v (guest boot to rebuilt and checked)", time.Since(start).Round(time.Millisecond))
}
