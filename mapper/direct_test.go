package mapper_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/internal/looptest"
	"github.com/vhostdm/vhostdm/mapper"
)

// misaligned returns a buffer of n bytes whose address is skew bytes past
// a 4096-byte boundary, filled from seed.
func misaligned(n, skew int, seed uint64) []byte {
	raw := make([]byte, n+8192)
	start := int(-uintptr(unsafe.Pointer(&raw[0]))&4095) + skew
	b := raw[start : start+n : start+n]
	r := rand.New(rand.NewPCG(seed, 1))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// directRoundTrip writes through d with buffers that are not aligned in
// memory (odd addresses, a 512-byte segment split 100+412), reads them back
// through equally unaligned buffers and through the backend file at path
// with ordinary reads, and compares.
func directRoundTrip(t *testing.T, d *mapper.Device, path string, bs int) {
	t.Helper()
	data := misaligned(4*bs, 3, 7)
	segs := [][]byte{data[:100], data[100:bs], data[bs:]}
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: uint64(2 * bs / 512), Sectors: uint64(4 * bs / 512), Data: segs}); err != nil {
		t.Fatalf("unaligned write: %v", err)
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Fatal(err)
	}
	back := misaligned(4*bs, 511, 0)
	if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: uint64(2 * bs / 512), Sectors: uint64(4 * bs / 512),
		Data: [][]byte{back[:7], back[7:]}}); err != nil {
		t.Fatalf("unaligned read: %v", err)
	}
	if !bytes.Equal(back, data) {
		t.Fatal("O_DIRECT read through a bounce buffer: not what was written")
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	onDisk := make([]byte, 4*bs)
	if _, err := f.ReadAt(onDisk, int64(2*bs)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(onDisk, data) {
		t.Fatal("the backend does not hold what the O_DIRECT write acknowledged")
	}
}

// TestDirectUnalignedBuffers runs a cache = "none" device over a file:
// the backend is opened with O_DIRECT (the page cache does not hold what
// was written) and guest buffers at any address go through bounce
// buffers.
func TestDirectUnalignedBuffers(t *testing.T) {
	d, path := engineDevice(t, t.TempDir(), 1<<20, mapper.CacheNone)
	if d.Cache() != mapper.CacheNone {
		t.Fatalf("cache %v", d.Cache())
	}
	directRoundTrip(t, d, path, d.BlockSize())

	// The page cache is bypassed: mincore on a mapping of the file
	// finds a page written through the device absent.
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 1024, Sectors: 8, Data: [][]byte{misaligned(4096, 5, 3)}}); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mem, err := unix.Mmap(int(f.Fd()), 0, 1<<20, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	vec := make([]byte, (1<<20)/os.Getpagesize())
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&mem[0])), uintptr(len(mem)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatal(e)
	}
	if vec[1024*512/os.Getpagesize()]&1 != 0 {
		t.Error("a page written with cache = none is in the page cache")
	}

}

// TestDirect4KLogicalBlocks runs a cache = "none" device over a loop
// device with 4096-byte logical blocks (losetup --sector-size 4096): the
// device reports 4096 as its block size (exports with a smaller
// logical-block-size are refused, see cmd/vhostdm), 4 KiB-aligned I/O
// from unaligned buffers works, and a 512-byte request fails with an
// error naming the logical block instead of reaching the disk.
func TestDirect4KLogicalBlocks(t *testing.T) {
	img := filepath.Join(t.TempDir(), "loop.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 4<<20); err != nil {
		t.Fatal(err)
	}
	dev := looptest.Attach(t, img, 4096)
	m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
	t.Cleanup(func() { m.Close() })
	d, err := m.CreateTableWith("d4k", "", mapper.DeviceOptions{Cache: mapper.CacheNone}, fmt.Sprintf("0 8192 linear %s 0", dev))
	if err != nil {
		t.Fatal(err)
	}
	if d.BlockSize() != 4096 {
		t.Fatalf("block size %d, want 4096", d.BlockSize())
	}
	directRoundTrip(t, d, dev, 4096)
	err = d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 1, Sectors: 1, Data: [][]byte{make([]byte, 512)}})
	if err == nil || !strings.Contains(err.Error(), "4096-byte logical block") {
		t.Fatalf("512-byte write to a 4096-byte device: %v, want an error naming the logical block", err)
	}
	// The same device with the page cache: 512 is fine.
	d2, err := m.CreateTable("d4k-cached", "", false, fmt.Sprintf("0 8192 linear %s 0", dev))
	if err != nil {
		t.Fatal(err)
	}
	if d2.BlockSize() != 512 {
		t.Fatalf("cached device block size %d, want 512", d2.BlockSize())
	}
}

// TestDirectRefused loads a cache = "none" table over a file on ramfs,
// which refuses O_DIRECT (tmpfs accepts it since Linux 6.6): the load
// fails with an error that says so and no device is left behind.
func TestDirectRefused(t *testing.T) {
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "ramfs", "ramfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount -t ramfs (needs root): %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
	t.Cleanup(func() { m.Close() })
	_, err := m.CreateTableWith("r", "", mapper.DeviceOptions{Cache: mapper.CacheNone}, fmt.Sprintf("0 2048 linear %s 0", path))
	if err == nil || !strings.Contains(err.Error(), "refuses O_DIRECT") {
		t.Fatalf("cache none on ramfs: %v, want an error saying the file system refuses O_DIRECT", err)
	}
	if _, err := m.Get("r"); err == nil {
		t.Fatal("a device is left behind after the failed load")
	}
	// The same file with the page cache loads.
	if _, err := m.CreateTable("r", "", false, fmt.Sprintf("0 2048 linear %s 0", path)); err != nil {
		t.Fatal(err)
	}
}
