package mapper

import (
	"math/bits"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioMode is how fileBackend.readv and writev make their system calls.
type ioMode uint8

const (
	// ioBlocking: preadv2/pwritev2 without flags, through the Go
	// scheduler (the thread may block; its P is handed off).
	ioBlocking ioMode = iota
	// ioNowait: with RWF_NOWAIT, through the Go scheduler.
	ioNowait
	// ioNowaitRaw: with RWF_NOWAIT as a raw system call, for buffers
	// in resident memory (Request.Resident): neither the read or write
	// nor a fault on the buffers waits for a disk, so the thread keeps
	// its P and the runtime's monitor thread is not woken.
	ioNowaitRaw
)

// nowaitMode returns the non-blocking mode for buffers that are resident
// or not.
func nowaitMode(resident bool) ioMode {
	if resident {
		return ioNowaitRaw
	}
	return ioNowait
}

// rw2 is preadv2 or pwritev2 (trap) of vec at off with flags, raw when
// raw is set. It returns the bytes transferred or the errno.
func rw2(trap uintptr, fd int, vec [][]byte, off int64, flags int, raw bool) (int, error) {
	if !raw {
		if trap == unix.SYS_PREADV2 {
			return unix.Preadv2(fd, vec, off, flags)
		}
		return unix.Pwritev2(fd, vec, off, flags)
	}
	var small [8]unix.Iovec
	iov := small[:0]
	if len(vec) > len(small) {
		iov = make([]unix.Iovec, 0, len(vec))
	}
	for _, b := range vec {
		v := unix.Iovec{}
		if len(b) > 0 {
			v.Base = &b[0]
			v.SetLen(len(b))
		}
		iov = append(iov, v)
	}
	if trap == unix.SYS_PWRITEV2 {
		raceReleaseIO()
	}
	// The offset's high word for the kernel's pos_from_hilo: 0 on 64-bit.
	lo, hi := uintptr(off), uintptr(uint64(off)>>(bits.UintSize-1)>>1)
	n, _, errno := unix.RawSyscall6(trap, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(iov))), uintptr(len(iov)), lo, hi, uintptr(flags))
	runtime.KeepAlive(iov)
	if errno != 0 {
		return 0, errno
	}
	if trap == unix.SYS_PREADV2 {
		raceWroteBufs(vec, int(n))
	} else {
		raceReadBufs(vec, int(n))
	}
	return int(n), nil
}
