package vhost

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// diskDir returns a directory for a file on a disk file system (not
// tmpfs): the test's temporary directory or, where that is tmpfs, one
// made in the package's directory.
func diskDir(t *testing.T) string {
	t.Helper()
	onDisk := func(dir string) bool {
		var s unix.Statfs_t
		if err := unix.Statfs(dir, &s); err != nil {
			t.Fatal(err)
		}
		return s.Type != unix.TMPFS_MAGIC && s.Type != unix.HUGETLBFS_MAGIC && s.Type != unix.RAMFS_MAGIC
	}
	if dir := t.TempDir(); onDisk(dir) {
		return dir
	}
	dir, err := os.MkdirTemp(".", "resident-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if !onDisk(dir) {
		t.Fatalf("neither $TMPDIR nor the package directory is on a disk file system (both tmpfs)")
	}
	return dir
}

// TestResidentFD: memfd (tmpfs), memfd with MFD_HUGETLB (hugetlbfs) and a
// file in /dev/shm are resident memory; a regular file on a disk file
// system is not.
func TestResidentFD(t *testing.T) {
	memfd := func(flags int) int {
		fd, err := unix.MemfdCreate("resident-test", flags|unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatalf("memfd_create(%#x): %v (the kernel needs CONFIG_HUGETLBFS for MFD_HUGETLB)", flags, err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	file := func(dir string) int {
		f, err := os.CreateTemp(dir, "resident-test-")
		if err != nil {
			t.Fatal(err)
		}
		os.Remove(f.Name())
		t.Cleanup(func() { f.Close() })
		return int(f.Fd())
	}
	for _, c := range []struct {
		name string
		fd   int
		want bool
	}{
		{"memfd", memfd(0), true},
		{"memfd hugetlb", memfd(unix.MFD_HUGETLB), true},
		{"/dev/shm", file("/dev/shm"), true},
		{"disk file", file(diskDir(t)), false},
	} {
		got, err := residentFD(c.fd)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got != c.want {
			t.Errorf("%s: resident %v, want %v", c.name, got, c.want)
		}
	}
}

// TestMemResident: a table is resident when every region is: a memfd
// region is, a region mapped from a disk file is not, and a table with
// both is not.
func TestMemResident(t *testing.T) {
	const size = 1 << 20
	region := func(fd int, gpa uint64) *memRegion {
		if err := unix.Ftruncate(fd, size); err != nil {
			t.Fatal(err)
		}
		r, err := mapRegion(wire.MemRegion{GPA: gpa, Size: size, UserAddr: gpa}, fd)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(r.unmap)
		return r
	}
	mfd, err := unix.MemfdCreate("resident-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mfd)
	f, err := os.CreateTemp(diskDir(t), "guest-")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	shm, disk := region(mfd, 0), region(int(f.Fd()), size)
	if !shm.resident || disk.resident {
		t.Fatalf("memfd region resident %v, disk file region resident %v; want true, false", shm.resident, disk.resident)
	}
	for _, c := range []struct {
		regs []*memRegion
		want bool
	}{{[]*memRegion{shm}, true}, {[]*memRegion{disk}, false}, {[]*memRegion{shm, disk}, false}} {
		m, err := newMem(c.regs)
		if err != nil {
			t.Fatal(err)
		}
		if m.resident != c.want {
			t.Errorf("table of %d regions: resident %v, want %v", len(c.regs), m.resident, c.want)
		}
	}
}

// residentRecorder is a mapper device that counts the reads and writes
// the ring goroutine tries on it by their Resident flag.
type residentRecorder struct {
	*mapper.Device
	resident, other atomic.Int64
}

func (d *residentRecorder) TrySubmit(r *mapper.Request) error {
	if r.Resident {
		d.resident.Add(1)
	} else {
		d.other.Add(1)
	}
	return d.Device.TrySubmit(r)
}

// TestResidentRequests: with guest memory in a memfd the ring goroutine
// tries reads and writes as resident (raw system calls); with guest
// memory mapped from a file on a disk file system (QEMU's
// memory-backend-file there) it tries none as resident. The data is
// right either way.
func TestResidentRequests(t *testing.T) {
	forEachLayout(t, testResidentRequests)
}

func testResidentRequests(t *testing.T, packed bool) {
	const size = 4 << 20
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: testLogger()})
	defer m.Close()
	dev, err := m.CreateTable("vm0", "", false, fmt.Sprintf("0 %d linear %s 0", size/512, img))
	if err != nil {
		t.Fatal(err)
	}
	rec := &residentRecorder{Device: dev}
	sock := filepath.Join(dir, "vhost.sock")
	exp, err := NewExport(ExportConfig{ID: "vm0-disk", Socket: sock, Writable: true, Logger: testLogger()}, rec)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- exp.Serve(context.Background()) }()
	defer func() {
		exp.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after Close")
		}
	}()
	for _, c := range []struct {
		name     string
		memDir   string
		resident bool
	}{{"memfd", "", true}, {"disk file", diskDir(t), false}} {
		t.Run(c.name, func(t *testing.T) {
			rec.resident.Store(0)
			rec.other.Store(0)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cl, err := frontend.Dial(ctx, frontend.Config{Socket: sock, Packed: packed, MemDir: c.memDir})
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			for i := range 8 {
				data := pattern(uint64(i+1), 4096)
				sector := uint64(i * 64)
				if err := cl.WriteAt(ctx, 0, data, sector); err != nil {
					t.Fatal(err)
				}
				got := make([]byte, 4096)
				if err := cl.ReadAt(ctx, 0, got, sector); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, data) {
					t.Fatalf("sector %d: read back differs", sector)
				}
			}
			res, other := rec.resident.Load(), rec.other.Load()
			if c.resident && (res < 8 || other != 0) {
				t.Errorf("tried %d resident and %d other requests, want at least 8 resident and no other", res, other)
			}
			if !c.resident && (other < 8 || res != 0) {
				t.Errorf("tried %d resident and %d other requests, want no resident and at least 8 other", res, other)
			}
		})
	}
}
