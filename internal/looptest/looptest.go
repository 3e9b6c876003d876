// Package looptest attaches files to loop devices for tests that need a
// real block device. It needs root and losetup (util-linux), which the
// project's setup installs; a test on a machine without them fails,
// saying so.
package looptest

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"
)

// Attach attaches the file at path to a free loop device with the given
// logical block size (512 or 4096 bytes) and returns the device's node;
// the device is detached when the test ends.
func Attach(t testing.TB, path string, sectorSize int) string {
	t.Helper()
	var stderr strings.Builder
	cmd := exec.Command("losetup", "-f", "--show", "--sector-size", fmt.Sprint(sectorSize), path)
	cmd.Stderr = &stderr // warnings, as for a file smaller than a block
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("losetup --sector-size %d (util-linux; run as root with loop devices): %v: %s", sectorSize, err, stderr.String())
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	return dev
}
