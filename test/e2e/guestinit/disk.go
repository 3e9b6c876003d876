//go:build linux

package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// Block device ioctls (linux/fs.h).
const (
	blkDiscard = 0x1277 // _IO(0x12,119)
	blkZeroout = 0x127f // _IO(0x12,127)
)

// resolveDisk turns a step's disk argument (a /sys/block name or a serial)
// into a /sys/block name.
func resolveDisk(arg string) (string, error) {
	if _, err := os.Stat("/sys/block/" + arg); err == nil {
		return arg, nil
	}
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		if s, _ := sysString(e.Name(), "serial"); s == arg {
			return e.Name(), nil
		}
	}
	return "", fmt.Errorf("no disk named or with serial %q", arg)
}

func sysString(disk, attr string) (string, error) {
	b, err := os.ReadFile("/sys/block/" + disk + "/" + attr)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

func sysInt(disk, attr string) (int64, error) {
	s, err := sysString(disk, attr)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(s, 10, 64)
}

// diskInfo reads what sysfs says about a disk.
func diskInfo(disk string) (*proto.DiskInfo, error) {
	sectors, err := sysInt(disk, "size")
	if err != nil {
		return nil, fmt.Errorf("capacity: %w", err)
	}
	di := &proto.DiskInfo{Name: disk, Sectors: sectors}
	di.Serial, _ = sysString(disk, "serial")
	ro, _ := sysInt(disk, "ro")
	di.ReadOnly = ro != 0
	if ents, err := os.ReadDir("/sys/block/" + disk + "/mq"); err == nil {
		di.Queues = len(ents)
	}
	lbs, _ := sysInt(disk, "queue/logical_block_size")
	pbs, _ := sysInt(disk, "queue/physical_block_size")
	di.LogicalBlockSize, di.PhysicalBlockSize = int(lbs), int(pbs)
	di.DiscardMaxBytes, _ = sysInt(disk, "queue/discard_max_bytes")
	di.WriteZeroesMax, _ = sysInt(disk, "queue/write_zeroes_max_bytes")
	di.WriteCache, _ = sysString(disk, "queue/write_cache")
	return di, nil
}

// diskBytes returns the capacity of a disk in bytes.
func diskBytes(disk string) (int64, error) {
	s, err := sysInt(disk, "size")
	if err != nil {
		return 0, fmt.Errorf("capacity of %s: %w", disk, err)
	}
	return s * 512, nil
}

// alignedBuf returns n bytes of page-aligned anonymous memory for O_DIRECT.
func alignedBuf(n int) []byte {
	if n <= 0 {
		n = 4096
	}
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		panic(fmt.Sprintf("mmap %d bytes: %v", n, err))
	}
	return b
}

func freeBuf(b []byte) { unix.Munmap(b) }

// openDisk opens /dev/<disk> with O_DIRECT and the given access mode.
func openDisk(disk string, mode int) (int, error) {
	fd, err := unix.Open("/dev/"+disk, mode|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/%s: %w", disk, err)
	}
	return fd, nil
}

// pwriteFull writes all of p at off.
func pwriteFull(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(fd, p, off)
		if err != nil {
			return fmt.Errorf("write %d bytes at %d: %w", len(p), off, err)
		}
		if n == 0 {
			return fmt.Errorf("write at %d: no progress", off)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// preadFull reads all of p from off.
func preadFull(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pread(fd, p, off)
		if err != nil {
			return fmt.Errorf("read %d bytes at %d: %w", len(p), off, err)
		}
		if n == 0 {
			return fmt.Errorf("read at %d: unexpected end of disk", off)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// blkRange issues BLKDISCARD or BLKZEROOUT on [off, off+n).
func blkRange(fd int, req uintptr, off, n int64) error {
	r := [2]uint64{uint64(off), uint64(n)}
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&r[0])))
	if e != 0 {
		return e
	}
	return nil
}

// errnoName names the errno inside err, or "".
func errnoName(err error) string {
	var e unix.Errno
	if errors.As(err, &e) {
		return unix.ErrnoName(e)
	}
	return ""
}
