package mapper

import "fmt"

// SectorSize is the unit of every sector number and length in this package.
const SectorSize = 512

// SectorShift is log2(SectorSize).
const SectorShift = 9

// Op is the operation of a Request.
type Op uint8

// The operations a target maps. They are the kernel's REQ_OP_READ, WRITE,
// FLUSH (a preflush with no data), DISCARD and WRITE_ZEROES.
const (
	OpRead Op = iota
	OpWrite
	OpFlush
	OpDiscard
	OpWriteZeroes
)

var opNames = [...]string{"read", "write", "flush", "discard", "write-zeroes"}

// String returns the operation's lower-case name.
func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// IsWrite reports whether the operation changes data.
func (o Op) IsWrite() bool {
	return o == OpWrite || o == OpDiscard || o == OpWriteZeroes
}

// Request is one I/O. When a Device passes it to a Target's Map, Sector is
// relative to the target's start, the range lies wholly inside the target,
// and for reads and writes the lengths of Data add up to Sectors*SectorSize.
//
// Data points into the submitter's memory (guest memory for vhost exports):
// it is valid only until Map returns and must not be retained. A target that
// must keep or transform data copies it.
type Request struct {
	Op      Op
	Sector  uint64   // first sector
	Sectors uint64   // length in sectors; 0 for flush
	Data    [][]byte // read destination or write source; nil for other ops
	Unmap   bool     // write-zeroes may deallocate (virtio-blk's unmap flag)
	FUA     bool     // write must be durable before completion
	// Resident says that Data lies in memory whose pages never wait for
	// disk I/O to be faulted in: anonymous memory, tmpfs and shmem
	// (memfd, /dev/shm), hugetlbfs. The non-blocking paths
	// (TrySubmit, SubmitAsync and IOQueue.Flush) then make their system
	// calls raw, without telling the Go scheduler: a call that cannot
	// block needs no hand-off of its thread's P, and an idle process
	// that enters one through the scheduler wakes the runtime's monitor
	// thread (sysmon), which then polls for a millisecond. A raw call
	// still copies to or from Data, and a page fault there that waits
	// for a disk (memory mapped from a regular file on a disk file
	// system) would hold the P for that long, so the submitter sets
	// Resident only for memory it knows to be resident. The blocking
	// paths ignore it.
	Resident bool
}

// Bytes returns the length of the request in bytes.
func (r *Request) Bytes() uint64 { return r.Sectors << SectorShift }

// BufsLen returns the total length of bufs.
func BufsLen(bufs [][]byte) int {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	return n
}

// SliceBufs appends to dst the part of bufs from byte off for n bytes and
// returns it. The result aliases bufs: no data is copied. It panics if the
// range is not inside bufs, which is a programmer error (callers check
// request lengths first).
func SliceBufs(dst [][]byte, bufs [][]byte, off, n int) [][]byte {
	for _, b := range bufs {
		if n == 0 {
			break
		}
		if off >= len(b) {
			off -= len(b)
			continue
		}
		b = b[off:]
		off = 0
		if len(b) > n {
			b = b[:n]
		}
		dst = append(dst, b)
		n -= len(b)
	}
	if n != 0 {
		panic("mapper: SliceBufs range outside buffers")
	}
	return dst
}

// ZeroBufs fills bufs with zero bytes.
func ZeroBufs(bufs [][]byte) {
	for _, b := range bufs {
		clear(b)
	}
}
