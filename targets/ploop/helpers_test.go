package ploop_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	_ "github.com/vhostdm/vhostdm/targets/ploop"
)

// tool returns the path of an external oracle, failing the test loudly
// when it is missing: these tests never skip.
func tool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found: install the Debian package %s", name, pkg)
	}
	return p
}

// run runs a command and returns its combined output and exit code.
func run(t *testing.T, name string, args ...string) (string, int) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return string(out), 0
}

// mustRun runs a command that must succeed.
func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, rc := run(t, name, args...)
	if rc != 0 {
		t.Fatalf("%s %s: exit %d\n%s", name, strings.Join(args, " "), rc, out)
	}
	return out
}

// qemuCheck asserts qemu-img check finds nothing wrong with img.
func qemuCheck(t *testing.T, img string) {
	t.Helper()
	tool(t, "qemu-img", "qemu-utils")
	out, rc := run(t, "qemu-img", "check", "-f", "parallels", img)
	if rc != 0 || !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check %s: exit %d\n%s", filepath.Base(img), rc, out)
	}
}

// ploopCheck asserts Debian's ploop check accepts img.
func ploopCheck(t *testing.T, img string) {
	t.Helper()
	tool(t, "ploop", "ploop")
	mustRun(t, "ploop", "check", "-f", "-r", "-c", img)
}

// qemuRaw returns the content of img as qemu-img converts it.
func qemuRaw(t *testing.T, img string) []byte {
	t.Helper()
	tool(t, "qemu-img", "qemu-utils")
	out := filepath.Join(t.TempDir(), "out.raw")
	mustRun(t, "qemu-img", "convert", "-f", "parallels", "-O", "raw", img, out)
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func newManager(t *testing.T) *mapper.Manager {
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(func() { m.Close() })
	return m
}

func create(t *testing.T, m *mapper.Manager, name, table string) *mapper.Device {
	t.Helper()
	d, err := m.CreateTable(name, "", false, table)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return d
}

func submit(t *testing.T, d *mapper.Device, op mapper.Op, sector uint64, data []byte) {
	t.Helper()
	r := &mapper.Request{Op: op, Sector: sector, Sectors: uint64(len(data)) / 512}
	if op == mapper.OpRead || op == mapper.OpWrite {
		r.Data = [][]byte{data}
	}
	if op == mapper.OpFlush {
		r.Sectors = 0
	}
	if err := d.Submit(r); err != nil {
		t.Fatalf("%s %d+%d: %v", op, sector, r.Sectors, err)
	}
}

func readAll(t *testing.T, d *mapper.Device) []byte {
	t.Helper()
	buf := make([]byte, d.Size()*512)
	submit(t, d, mapper.OpRead, 0, buf)
	return buf
}

func message(t *testing.T, d *mapper.Device, words ...string) string {
	t.Helper()
	reply, err := d.Message(0, words)
	if err != nil {
		t.Fatalf("message %s: %v", strings.Join(words, " "), err)
	}
	return reply
}

// merge sends the merge message and waits for the background merge to
// end: the INFO flag m gone and one delta fewer.
func merge(t *testing.T, d *mapper.Device) {
	t.Helper()
	before := strings.Fields(status(d, mapper.StatusInfo))[0]
	message(t, d, "merge")
	waitMerged(t, d, before)
}

// waitMerged waits until the merge a stack of before deltas runs ends.
func waitMerged(t *testing.T, d *mapper.Device, before string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		f := strings.Fields(status(d, mapper.StatusInfo))
		if !strings.Contains(f[3], "m") {
			if f[0] == before {
				t.Fatalf("merge ended with the delta still there: INFO %q", strings.Join(f, " "))
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("merge still running after 2 minutes: INFO %q", strings.Join(f, " "))
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func status(d *mapper.Device, kind mapper.StatusKind) string {
	return d.Status(kind, false)[0].Params
}

func pattern(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// equal reports the first differing byte of two contents.
func diff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	if i := firstDiff(got, want); i >= 0 {
		return fmt.Sprintf("byte %d (sector %d) is %#x, want %#x", i, i/512, got[i], want[i])
	}
	return ""
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// emptyFile creates an empty file in dir.
func emptyFile(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
