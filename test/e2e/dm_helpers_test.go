package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// dialQMP connects to a QMP socket and closes it at the end of the test.
func dialQMP(t *testing.T, sock, what string) *harness.QMP {
	t.Helper()
	q, err := harness.DialQMP(sock, 10*time.Second)
	if err != nil {
		t.Fatalf("%s's QMP socket %s: %v", what, sock, err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

// qmpDo runs one QMP command and fails the test, naming it, on an error.
func qmpDo(t *testing.T, q *harness.QMP, cmd string, args any) json.RawMessage {
	t.Helper()
	ret, err := q.Execute(cmd, args, 30*time.Second)
	if err != nil {
		t.Fatalf("QMP %s %v: %v", cmd, args, err)
	}
	return ret
}

// dmStatus returns the INFO status params of a one-line device.
func dmStatus(t *testing.T, q *harness.QMP, name string) string {
	t.Helper()
	raw := qmpDo(t, q, "dm-status", map[string]any{"name": name})
	var st []struct {
		Name  string `json:"name"`
		Lines []struct {
			Target string `json:"target"`
			Params string `json:"params"`
		} `json:"lines"`
	}
	if err := json.Unmarshal(raw, &st); err != nil || len(st) != 1 || len(st[0].Lines) != 1 {
		t.Fatalf("dm-status %s: unexpected reply %s (%v)", name, raw, err)
	}
	return st[0].Lines[0].Params
}

// readExport reads size bytes from a vhost-user-blk export with the vhost
// client, as a guest would see them.
func readExport(t *testing.T, sock string, size int64) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := frontend.Dial(ctx, frontend.Config{Socket: sock, MemSize: 16 << 20})
	if err != nil {
		t.Fatalf("vhost client on %s: %v", sock, err)
	}
	defer c.Close()
	if got := int64(c.Config().Capacity) * 512; got != size {
		t.Fatalf("export %s has capacity %d bytes, want %d", sock, got, size)
	}
	const chunk = 1 << 20
	buf, err := c.Buf(chunk)
	if err != nil {
		t.Fatal(err)
	}
	defer c.FreeBuf(buf)
	out := make([]byte, size)
	for off := int64(0); off < size; off += chunk {
		n := min(chunk, size-off)
		if err := c.ReadAt(ctx, 0, buf[:n], uint64(off/512)); err != nil {
			t.Fatalf("read of %s at byte %d: %v", sock, off, err)
		}
		copy(out[off:], buf[:n])
	}
	return out
}

// mustRead reads a whole file.
func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// firstDiff describes where a and b first differ, or returns "".
func firstDiff(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("sizes differ: %d and %d bytes", len(a), len(b))
	}
	if bytes.Equal(a, b) {
		return ""
	}
	n := 0
	first := -1
	for o := 0; o < len(a); o += pattern.SectorSize {
		end := min(o+pattern.SectorSize, len(a))
		if !bytes.Equal(a[o:end], b[o:end]) {
			if first < 0 {
				first = o
			}
			n++
		}
	}
	return fmt.Sprintf("%d sectors differ, the first at byte %d", n, first)
}

// waitWriterDone waits for the writer step's final result and returns its
// number of writes; a failed writer fails the test.
func waitWriterDone(t *testing.T, vm *harness.VM) int64 {
	t.Helper()
	ev, err := vm.WaitFor(guestTimeout, "the writer's final result", func(ev harness.Event) bool {
		return ev.Kind == harness.EventResult && ev.Result.Step == proto.StepWriter && (ev.Result.Event == "" || !ev.Result.OK)
	})
	if err != nil {
		t.Fatal(err)
	}
	if !ev.Result.OK || ev.Result.Event != "" {
		t.Fatalf("the guest's writer failed: %s (%s)", ev.Result.Error, ev.Result.Event)
	}
	n := ev.Result.Values["writes"]
	if n == 0 {
		t.Fatalf("the guest's writer made no writes: %v", ev.Result.Values)
	}
	return n
}

// waitGuestEnd waits for the rest of a guest run and fails the test on any
// failed step.
func waitGuestEnd(t *testing.T, vm *harness.VM) *harness.Run {
	t.Helper()
	run, err := vm.Wait(guestTimeout)
	if err != nil {
		t.Fatalf("guest run: %v", err)
	}
	logRun(t, run)
	if f := run.Failed(); f != "" {
		t.Fatalf("guest steps failed:\n%s", f)
	}
	return run
}

// withPlan returns base with the verify plan of seed written over it: what
// a disk holds after the verify step ran on content base.
func withPlan(base []byte, seed uint64, coverage, maxBlocks int) []byte {
	out := bytes.Clone(base)
	for _, x := range pattern.Plan(seed, int64(len(out)), coverage, maxBlocks) {
		pattern.Fill(out[x.Off:x.End()], seed, x.Off)
	}
	return out
}

// snapshotParams are the guest parameters of the snapshot tests: the
// writer (pre-snapshot data), a sleep of the same duration for the host to
// take the snapshot in, then the verify plan (post-snapshot data).
func snapshotParams(seed uint64, duration, coverage, maxBlocks int) map[string]string {
	p := seedParams(seed, coverage, maxBlocks)
	p[proto.ParamDuration] = strconv.Itoa(duration)
	p[proto.ParamQD] = "4"
	p[proto.ParamFlushEvery] = "32"
	return p
}

var snapStatusRE = regexp.MustCompile(`^(\d+)/(\d+) (\d+)$`)

// parseSnapStatus parses a snapshot INFO status "<alloc>/<total> <meta>".
func parseSnapStatus(s string) (alloc, total, meta int64, ok bool) {
	m := snapStatusRE.FindStringSubmatch(s)
	if m == nil {
		return 0, 0, 0, false
	}
	alloc, _ = strconv.ParseInt(m[1], 10, 64)
	total, _ = strconv.ParseInt(m[2], 10, 64)
	meta, _ = strconv.ParseInt(m[3], 10, 64)
	return alloc, total, meta, true
}
