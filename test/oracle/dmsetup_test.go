package oracle

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"
)

// sessionFile holds dmsetup command lines and the kernel's dmsetup output
// for them, which cmd/vhostdm's TestDmsetupKernel compares vhostdm ctl with.
const sessionFile = "../../cmd/vhostdm/testdata/dmsetup_kernel"

// TestKernelDmsetup boots the real kernel once and runs the session's
// commands with its dmsetup: the output must be what the file says (with
// -oracle.record, it is written into the file). The tables stand on zero
// devices only, so the guest needs no disks.
func TestKernelDmsetup(t *testing.T) {
	s, err := ParseSession(sessionFile)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	g, err := NewGuest(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("initramfs built in %v", time.Since(start))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start = time.Now()
	out, err := g.Run(ctx, SessionScript(s), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest ran in %v", time.Since(start))
	got, err := ParseSessionOutput(s, out)
	if err != nil {
		t.Fatalf("%s: %v\n%s", sessionFile, err, out)
	}
	if *record {
		s.Cmds = got
		s.Header = setKernelHeader(s.Header, "# kernel: Linux "+g.Release+" in a QEMU TCG guest, recorded by go test ./test/oracle -run TestKernelDmsetup -oracle.record")
		if err := os.WriteFile(sessionFile, []byte(s.Format()), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	for i, c := range s.Cmds {
		if g := got[i]; !slices.Equal(g.Out, c.Out) || g.Exit != c.Exit {
			t.Errorf("%s:%d: dmsetup %s:\n got  %q exit %d\n file %q exit %d", sessionFile, c.Line, c.Text, g.Out, g.Exit, c.Out, c.Exit)
		}
	}
}
