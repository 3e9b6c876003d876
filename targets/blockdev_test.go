package targets_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/internal/looptest"
	"github.com/vhostdm/vhostdm/mapper"
)

// loopDevice attaches a file of size bytes to a loop device and returns
// the device node and its major:minor. It needs root and losetup
// (util-linux), which the project's machines have.
func loopDevice(t *testing.T, size int64) (string, string) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "loop.img")
	sparse := files(t, 1, size)[0]
	if err := os.Rename(sparse, img); err != nil {
		t.Fatal(err)
	}
	dev := looptest.Attach(t, img, 512)
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	return dev, fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
}

// TestBlockDeviceBackend runs linear over a real block device, named by
// path and by major:minor: data, discard, write-zeroes (BLKDISCARD,
// BLKZEROOUT) and the size check (BLKGETSIZE64).
func TestBlockDeviceBackend(t *testing.T) {
	dev, mm := loopDevice(t, 4<<20)
	m := manager(t)
	for _, name := range []string{dev, mm} {
		d, err := m.CreateTable("blk", "", false, fmt.Sprintf("0 8192 linear %s 0", name))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		data := pattern(3, 64<<10)
		if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 100, Sectors: 128, Data: [][]byte{data}}); err != nil {
			t.Fatal(err)
		}
		if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
			t.Fatal(err)
		}
		back := make([]byte, len(data))
		if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 100, Sectors: 128, Data: [][]byte{back}}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(back, data) {
			t.Fatalf("%s: read back differs", name)
		}
		for _, op := range []mapper.Op{mapper.OpDiscard, mapper.OpWriteZeroes} {
			if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 100, Sectors: 128, Data: [][]byte{data}}); err != nil {
				t.Fatal(err)
			}
			if err := d.Submit(&mapper.Request{Op: op, Sector: 100, Sectors: 128}); err != nil {
				t.Fatalf("%s %s: %v", name, op, err)
			}
			if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 100, Sectors: 128, Data: [][]byte{back}}); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back, make([]byte, len(back))) {
				t.Fatalf("%s: %s did not read back zeros", name, op)
			}
		}
		if got := d.Status(mapper.StatusTable, false)[0].Params; got != name+" 0" {
			t.Fatalf("table echoes %q, want %q", got, name+" 0")
		}
		if err := m.Remove("blk", false); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.CreateTable("big", "", false, fmt.Sprintf("0 8193 linear %s 0", dev)); err == nil ||
		!strings.Contains(err.Error(), "too small for target: start=0, len=8193, dev_size=8192") {
		t.Fatalf("oversized table on a block device: %v", err)
	}
	if _, err := m.CreateTable("nodev", "", false, "0 8 linear 4095:4095 0"); err == nil ||
		!strings.Contains(err.Error(), "4095:4095: no such block device") {
		t.Fatalf("unknown major:minor: %v", err)
	}
}
