package mapper

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// memfdBuf returns n bytes of shared memory from a memfd, as a vhost
// front end's guest memory is.
func memfdBuf(t *testing.T, n int) []byte {
	t.Helper()
	fd, err := unix.MemfdCreate("rawio-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(n)); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(fd, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m) })
	return m
}

// TestNowaitRawPath: a non-blocking read or write of a resident request
// takes the raw system call path and one of a non-resident request does
// not; both move the same data, split over more vectors than the raw
// path keeps on its stack, at an offset above 4 GiB, with the end of the
// file read as zeros, and data evicted from the page cache is
// ErrWouldBlock on both.
func TestNowaitRawPath(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	const base = 5 << 30 // past 4 GiB: the offset's high bits reach the kernel
	const size = base + 1<<20
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	b, err := openFile(path, false, CacheWriteback)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	raws := 0
	b.onRaw = func() { raws++ }

	mem := memfdBuf(t, 64<<10)
	// 12 vectors of 512 bytes (more than the raw path's 8 on the stack)
	// and one of 4096.
	vec := func(m []byte) [][]byte {
		var v [][]byte
		for i := range 12 {
			v = append(v, m[i*512:(i+1)*512])
		}
		return append(v, m[6144:10240])
	}
	src, dst := mem[:10240], mem[16<<10:16<<10+10240]
	for i := range src {
		src[i] = byte(i*7 + i>>9)
	}
	for _, resident := range []bool{true, false} {
		raws = 0
		off := int64(base)
		if !resident {
			off += 64 << 10
		}
		// The blocking write first: a non-blocking one into a hole may
		// need block allocation and return ErrWouldBlock.
		if err := b.WriteAt(vec(src), off); err != nil {
			t.Fatal(err)
		}
		if err := b.TryWriteAt(vec(src), off, resident); err != nil && !errors.Is(err, ErrWouldBlock) {
			t.Fatalf("resident %v: TryWriteAt: %v", resident, err)
		}
		clear(dst)
		if err := b.TryReadAt(vec(dst), off, resident); err != nil {
			t.Fatalf("resident %v: TryReadAt: %v", resident, err)
		}
		if !bytes.Equal(dst, src) {
			t.Fatalf("resident %v: read back differs", resident)
		}
		// The last 4 KiB of the file and 6 KiB past its end: zeros.
		if err := b.WriteAt([][]byte{src[:4096]}, size-4096); err != nil {
			t.Fatal(err)
		}
		for i := range dst {
			dst[i] = 0xff
		}
		if err := b.TryReadAt(vec(dst), size-4096, resident); err != nil {
			t.Fatalf("resident %v: TryReadAt at the end: %v", resident, err)
		}
		if !bytes.Equal(dst[:4096], src[:4096]) || bytes.ContainsFunc(dst[4096:], func(r rune) bool { return r != 0 }) {
			t.Fatalf("resident %v: read across the end of the file: wrong data", resident)
		}
		// Data evicted from the page cache. FADV_DONTNEED skips pages it
		// cannot drop at that moment (one still in another CPU's LRU
		// batch, or locked): it is repeated until the data is out.
		for try := 0; ; try++ {
			if err := unix.Fdatasync(b.fd); err != nil {
				t.Fatal(err)
			}
			if err := unix.Fadvise(b.fd, 0, 0, unix.FADV_DONTNEED); err != nil {
				t.Fatal(err)
			}
			err := b.TryReadAt(vec(dst), off, resident)
			if errors.Is(err, ErrWouldBlock) {
				break
			}
			if err != nil || try == 50 {
				t.Fatalf("resident %v: TryReadAt of evicted data = %v (%d tries), want ErrWouldBlock", resident, err, try+1)
			}
			time.Sleep(20 * time.Millisecond)
		}
		// Four non-blocking reads and at least one write (the try of the
		// write may have been refused by the file system).
		if resident && raws < 4 {
			t.Errorf("resident: %d raw calls, want at least 4", raws)
		}
		if !resident && raws != 0 {
			t.Errorf("not resident: %d raw calls, want 0", raws)
		}
	}

	// TryMapBackend passes the request's Resident on.
	if err := b.ReadAt(vec(dst), base); err != nil {
		t.Fatal(err)
	}
	for _, resident := range []bool{true, false} {
		raws = 0
		r := &Request{Op: OpRead, Sector: base >> SectorShift, Sectors: 20, Data: vec(dst), Resident: resident}
		if err := TryMapBackend(b, r.Sector, r); err != nil {
			t.Fatal(err)
		}
		if got := raws > 0; got != resident {
			t.Errorf("TryMapBackend with Resident %v: raw path taken %v", resident, got)
		}
	}
}
