//go:build linux

package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/test/e2e/internal/pattern"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// runStep runs one step on one disk and returns its results (most steps
// have one; info and fio have one per disk or job).
func runStep(name, diskArg string, p params) (rs []proto.Result) {
	start := time.Now()
	defer func() {
		if r := recover(); r != nil {
			rs = append(rs, proto.Result{Step: name, Disk: diskArg, Error: fmt.Sprintf("panic: %v", r)})
		}
	}()
	if name == proto.StepInfo {
		return stepInfo(start)
	}
	if name == proto.StepSleep {
		time.Sleep(time.Duration(p.int(proto.ParamDuration, 1)) * time.Second)
		return []proto.Result{{Step: name, OK: true, MS: since(start)}}
	}
	disk, err := resolveDisk(diskArg)
	if err != nil {
		return []proto.Result{{Step: name, Disk: diskArg, Error: err.Error(), MS: since(start)}}
	}
	if base, job, ok := strings.Cut(name, "/"); ok && base == proto.StepFio {
		return stepFio(disk, p, job, start)
	}
	var r proto.Result
	switch name {
	case proto.StepVerify:
		r = stepVerify(disk, p, true)
	case proto.StepReadVerify:
		r = stepVerify(disk, p, false)
	case proto.StepFlush:
		r = stepFlush(disk, p)
	case proto.StepDiscard:
		r = stepZeroRange(disk, p, proto.StepDiscard)
	case proto.StepZeroes:
		r = stepZeroRange(disk, p, proto.StepZeroes)
	case proto.StepReadOnly:
		r = stepReadOnly(disk)
	case proto.StepWriter:
		r = stepWriter(disk, p)
	case proto.StepWriterCheck:
		r = stepWriterCheck(disk, p)
	case proto.StepResize:
		r = stepResize(disk, p)
	case proto.StepDiscardWatch:
		r = stepDiscardWatch(disk, p)
	case proto.StepFio:
		return stepFio(disk, p, "", start)
	default:
		r.Error = fmt.Sprintf("unknown step %q", name)
	}
	r.Step, r.Disk, r.MS = name, disk, since(start)
	return []proto.Result{r}
}

func since(t time.Time) int64 { return time.Since(t).Milliseconds() }

func errResult(err error) proto.Result { return proto.Result{Error: err.Error()} }

func stepInfo(start time.Time) []proto.Result {
	var rs []proto.Result
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "vd") {
			continue
		}
		di, err := diskInfo(e.Name())
		r := proto.Result{Step: proto.StepInfo, Disk: e.Name(), OK: err == nil, Info: di, MS: since(start)}
		if err != nil {
			r.Error = err.Error()
		}
		rs = append(rs, r)
	}
	if len(rs) == 0 {
		rs = append(rs, proto.Result{Step: proto.StepInfo, Error: "no virtio disks", MS: since(start)})
	}
	return rs
}

// stepVerify writes (if write) the seed's plan extents with O_DIRECT, fsyncs,
// then reads every extent back and checks the pattern.
func stepVerify(disk string, p params, write bool) proto.Result {
	size, err := diskBytes(disk)
	if err != nil {
		return errResult(err)
	}
	seed := p.uint(proto.ParamSeed, 1)
	maxBlocks := int(p.int(proto.ParamMaxBlocks, 64))
	plan := pattern.Plan(seed, size, int(p.int(proto.ParamCoverage, 25)), maxBlocks)
	mode := unix.O_RDONLY
	if write {
		mode = unix.O_RDWR
	}
	fd, err := openDisk(disk, mode)
	if err != nil {
		return errResult(err)
	}
	defer unix.Close(fd)
	buf := alignedBuf(maxBlocks * pattern.BlockSize)
	defer freeBuf(buf)
	var total int64
	for _, e := range plan {
		total += e.Len
	}
	vals := map[string]int64{"extents": int64(len(plan)), "bytes": total, "disk_bytes": size}
	if write {
		t := time.Now()
		for _, e := range plan {
			b := buf[:e.Len]
			pattern.Fill(b, seed, e.Off)
			if err := pwriteFull(fd, b, e.Off); err != nil {
				return proto.Result{Error: err.Error(), Values: vals}
			}
		}
		if err := unix.Fsync(fd); err != nil {
			return proto.Result{Error: fmt.Sprintf("fsync: %v", err), Values: vals}
		}
		vals["write_ms"] = since(t)
	}
	t := time.Now()
	bad := 0
	var first error
	for _, e := range plan {
		b := buf[:e.Len]
		if err := preadFull(fd, b, e.Off); err != nil {
			return proto.Result{Error: err.Error(), Values: vals}
		}
		if err := pattern.Check(b, seed, e.Off); err != nil {
			bad++
			if first == nil {
				first = err
			}
		}
	}
	vals["read_ms"] = since(t)
	vals["bad_extents"] = int64(bad)
	if first != nil {
		return proto.Result{Error: fmt.Sprintf("%d of %d extents differ; first: %v", bad, len(plan), first), Values: vals}
	}
	return proto.Result{OK: true, Values: vals}
}

// stepFlush writes the flush extent and makes it durable with fsync and
// fdatasync.
func stepFlush(disk string, p params) proto.Result {
	size, err := diskBytes(disk)
	if err != nil {
		return errResult(err)
	}
	seed := p.uint(proto.ParamSeed, 1)
	off := proto.MiddleOffset(size) + proto.FlushOffset
	fd, err := openDisk(disk, unix.O_RDWR)
	if err != nil {
		return errResult(err)
	}
	defer unix.Close(fd)
	buf := alignedBuf(proto.FlushLen)
	defer freeBuf(buf)
	pattern.Fill(buf, seed, off)
	if err := pwriteFull(fd, buf, off); err != nil {
		return errResult(err)
	}
	t := time.Now()
	if err := unix.Fsync(fd); err != nil {
		return errResult(fmt.Errorf("fsync: %w", err))
	}
	fsyncUS := time.Since(t).Microseconds()
	if err := unix.Fdatasync(fd); err != nil {
		return errResult(fmt.Errorf("fdatasync: %w", err))
	}
	wc, _ := sysString(disk, "queue/write_cache")
	return proto.Result{OK: true, Values: map[string]int64{
		"offset": off, "len": proto.FlushLen, "fsync_us": fsyncUS, "write_back": boolInt(wc == "write back"),
	}}
}

func boolInt(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// stepZeroRange writes a pattern, fsyncs, then discards (BLKDISCARD) or
// zeroes (BLKZEROOUT) the range and checks that it reads back as zeros.
func stepZeroRange(disk string, p params, which string) proto.Result {
	size, err := diskBytes(disk)
	if err != nil {
		return errResult(err)
	}
	seed := p.uint(proto.ParamSeed, 1)
	off, n, req, limitAttr := proto.MiddleOffset(size)+proto.DiscardOffset, int64(proto.DiscardLen), uintptr(blkDiscard), "queue/discard_max_bytes"
	if which == proto.StepZeroes {
		off, n, req, limitAttr = proto.MiddleOffset(size)+proto.ZeroesOffset, proto.ZeroesLen, blkZeroout, "queue/write_zeroes_max_bytes"
	}
	limit, _ := sysInt(disk, limitAttr)
	vals := map[string]int64{"offset": off, "len": n, "max_bytes": limit}
	if off+n > size {
		return proto.Result{Error: fmt.Sprintf("disk of %d bytes too small for the %s range", size, which), Values: vals}
	}
	fd, err := openDisk(disk, unix.O_RDWR)
	if err != nil {
		return errResult(err)
	}
	defer unix.Close(fd)
	buf := alignedBuf(int(n))
	defer freeBuf(buf)
	pattern.Fill(buf, seed, off)
	if err := pwriteFull(fd, buf, off); err != nil {
		return proto.Result{Error: err.Error(), Values: vals}
	}
	if err := unix.Fsync(fd); err != nil {
		return proto.Result{Error: fmt.Sprintf("fsync: %v", err), Values: vals}
	}
	t := time.Now()
	if err := blkRange(fd, req, off, n); err != nil {
		name := map[string]string{proto.StepDiscard: "BLKDISCARD", proto.StepZeroes: "BLKZEROOUT"}[which]
		return proto.Result{Error: fmt.Sprintf("%s at %d len %d: %v (%s %d)", name, off, n, err, limitAttr, limit), Values: vals}
	}
	vals["ioctl_us"] = time.Since(t).Microseconds()
	if err := unix.Fsync(fd); err != nil {
		return proto.Result{Error: fmt.Sprintf("fsync: %v", err), Values: vals}
	}
	clear(buf)
	if err := preadFull(fd, buf, off); err != nil {
		return proto.Result{Error: err.Error(), Values: vals}
	}
	for i := 0; i < len(buf); i += pattern.SectorSize {
		if !pattern.IsZero(buf[i : i+pattern.SectorSize]) {
			return proto.Result{Error: fmt.Sprintf("after %s, sector at byte %d is not zero", which, off+int64(i)), Values: vals}
		}
	}
	vals["zeroed"] = 1
	return proto.Result{OK: true, Values: vals}
}

// stepReadOnly checks that every way of writing to the disk fails.
func stepReadOnly(disk string) proto.Result {
	vals := map[string]int64{}
	ro, _ := sysInt(disk, "ro")
	vals["sysfs_ro"] = ro
	var leaks []string
	var errs []string
	note := func(what string, err error) {
		if err == nil {
			leaks = append(leaks, what+" succeeded")
		} else {
			errs = append(errs, what+": "+errnoName(err))
		}
	}
	buf := alignedBuf(pattern.BlockSize)
	defer freeBuf(buf)
	for i := range buf {
		buf[i] = 0xa5
	}
	if fd, err := openDisk(disk, unix.O_RDWR); err != nil {
		errs = append(errs, "open O_RDWR|O_DIRECT: "+errnoName(err))
	} else {
		_, err := unix.Pwrite(fd, buf, 0)
		note("O_DIRECT write", err)
		note("BLKDISCARD", blkRange(fd, blkDiscard, 0, 1<<20))
		note("BLKZEROOUT", blkRange(fd, blkZeroout, 1<<20, 1<<20))
		unix.Fsync(fd)
		unix.Close(fd)
	}
	if fd, err := unix.Open("/dev/"+disk, unix.O_WRONLY|unix.O_CLOEXEC, 0); err != nil {
		errs = append(errs, "open O_WRONLY: "+errnoName(err))
	} else {
		_, err := unix.Pwrite(fd, buf, 8192)
		if err == nil {
			err = unix.Fsync(fd)
		}
		note("buffered write+fsync", err)
		unix.Close(fd)
	}
	r := proto.Result{Values: vals}
	if len(leaks) > 0 {
		r.Error = "writes to a read-only disk: " + strings.Join(leaks, "; ")
		return r
	}
	if ro != 1 {
		r.Error = fmt.Sprintf("writes failed (%s) but /sys/block/%s/ro is %d, want 1", strings.Join(errs, "; "), disk, ro)
		return r
	}
	r.OK = true
	vals["refused"] = int64(len(errs))
	return r
}

// stepWriter is the long-running verified writer: batches of qd concurrent
// O_DIRECT writes of self-identifying blocks, an fsync every flushevery
// writes announced by a "flush" event whose value "acked" counts the writes
// it covered, "ioerror" events for failed I/O, and at the end a read-back
// of every block against what was written.
func stepWriter(disk string, p params) proto.Result {
	size, err := diskBytes(disk)
	if err != nil {
		return errResult(err)
	}
	start := time.Now()
	w := pattern.NewWriter(p.uint(proto.ParamSeed, 1), size)
	qd := int(max(1, min(p.int(proto.ParamQD, 4), 64)))
	flushEvery := max(1, p.int(proto.ParamFlushEvery, 32))
	dur := time.Duration(p.int(proto.ParamDuration, 20)) * time.Second
	fd, err := openDisk(disk, unix.O_RDWR)
	if err != nil {
		return errResult(err)
	}
	defer unix.Close(fd)
	bufs := make([][]byte, qd)
	for i := range bufs {
		bufs[i] = alignedBuf(pattern.BlockSize)
		defer freeBuf(bufs[i])
	}
	event := func(ev string, vals map[string]int64, err error) {
		r := proto.Result{Step: proto.StepWriter, Disk: disk, Event: ev, OK: err == nil, MS: since(start), Values: vals}
		if err != nil {
			r.Error = err.Error()
		}
		printLine(proto.ResultMarker, r)
	}
	event("start", map[string]int64{"blocks": w.Blocks, "qd": int64(qd), "flush_every": flushEvery}, nil)
	var (
		seq, sinceFlush, flushes, ioErrors int64
		maxLat                             time.Duration
		errs                               = make([]error, qd)
		lats                               = make([]time.Duration, qd)
		wg                                 sync.WaitGroup
	)
	reportErr := func(err error) {
		ioErrors++
		if ioErrors <= 20 {
			event("ioerror", map[string]int64{"seq": seq}, err)
		}
	}
	var lastEvent time.Time
	flush := func(force bool) {
		t := time.Now()
		err := unix.Fsync(fd)
		maxLat = max(maxLat, time.Since(t))
		if err != nil {
			reportErr(fmt.Errorf("fsync after %d writes: %w", seq, err))
			return
		}
		flushes++
		sinceFlush = 0
		// The console is slow under TCG: announce at most 5 flushes a
		// second. Each announced count was covered by a completed flush.
		if force || time.Since(lastEvent) >= 200*time.Millisecond {
			lastEvent = time.Now()
			event("flush", map[string]int64{"acked": seq, "fsync_ms": since(t), "flushes": flushes}, nil)
		}
	}
	for time.Since(start) < dur {
		n := qd
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int, s int64) {
				defer wg.Done()
				w.Fill(bufs[i], s)
				t := time.Now()
				errs[i] = pwriteFull(fd, bufs[i], w.Index(s)*pattern.BlockSize)
				lats[i] = time.Since(t)
			}(i, seq+int64(i))
		}
		wg.Wait()
		for i := 0; i < n; i++ {
			maxLat = max(maxLat, lats[i])
			if errs[i] != nil {
				reportErr(fmt.Errorf("write %d: %w", seq+int64(i), errs[i]))
			}
		}
		seq += int64(n)
		sinceFlush += int64(n)
		if sinceFlush >= flushEvery {
			flush(false)
		}
	}
	flush(true)
	vals := map[string]int64{"writes": seq, "flushes": flushes, "io_errors": ioErrors, "max_latency_ms": maxLat.Milliseconds(), "write_ms": since(start)}
	// Read back every block: each must hold exactly the last write to it.
	t := time.Now()
	last := w.LastWrites(seq)
	bad, firstBad := checkBlocks(fd, w, func(idx, got int64) error {
		if got != last[idx] {
			return fmt.Errorf("block %d holds write %d, want %d", idx, got, last[idx])
		}
		return nil
	})
	vals["verify_ms"] = since(t)
	vals["bad_blocks"] = bad
	r := proto.Result{Values: vals}
	switch {
	case ioErrors > 0:
		r.Error = fmt.Sprintf("%d I/O errors during the run", ioErrors)
	case bad > 0:
		r.Error = fmt.Sprintf("%d blocks wrong after the run; first: %v", bad, firstBad)
	default:
		r.OK = true
	}
	return r
}

// checkBlocks reads every writer block in 1 MiB chunks, decodes it and
// calls check with its sequence number (-1 if never written). It returns
// the number of bad blocks and the first error.
func checkBlocks(fd int, w pattern.Writer, check func(idx, seq int64) error) (int64, error) {
	const chunk = 256
	buf := alignedBuf(chunk * pattern.BlockSize)
	defer freeBuf(buf)
	var bad int64
	var first error
	for base := int64(0); base < w.Blocks; base += chunk {
		n := min(chunk, w.Blocks-base)
		b := buf[:n*pattern.BlockSize]
		if err := preadFull(fd, b, base*pattern.BlockSize); err != nil {
			bad += n
			if first == nil {
				first = err
			}
			continue
		}
		for i := int64(0); i < n; i++ {
			idx := base + i
			seq, err := w.Decode(b[i*pattern.BlockSize:(i+1)*pattern.BlockSize], idx)
			if err == nil {
				err = check(idx, seq)
			}
			if err != nil {
				bad++
				if first == nil {
					first = err
				}
			}
		}
	}
	return bad, first
}

// stepWriterCheck checks the writer's blocks after a fault: every write
// below "acked" must be present or superseded, none at or beyond "issued".
func stepWriterCheck(disk string, p params) proto.Result {
	size, err := diskBytes(disk)
	if err != nil {
		return errResult(err)
	}
	w := pattern.NewWriter(p.uint(proto.ParamSeed, 1), size)
	acked := p.int(proto.ParamAcked, 0)
	issued := p.int(proto.ParamIssued, -1)
	fd, err := openDisk(disk, unix.O_RDONLY)
	if err != nil {
		return errResult(err)
	}
	defer unix.Close(fd)
	last := w.LastWrites(acked)
	var newest int64 = -1
	bad, first := checkBlocks(fd, w, func(idx, seq int64) error {
		newest = max(newest, seq)
		if seq < last[idx] {
			return fmt.Errorf("block %d holds write %d, but write %d was acknowledged by a flush", idx, seq, last[idx])
		}
		if issued >= 0 && seq >= issued {
			return fmt.Errorf("block %d holds write %d, beyond the %d issued", idx, seq, issued)
		}
		return nil
	})
	vals := map[string]int64{"acked": acked, "bad_blocks": bad, "newest_write": newest}
	if bad > 0 {
		return proto.Result{Error: fmt.Sprintf("%d blocks lost or wrong; first: %v", bad, first), Values: vals}
	}
	return proto.Result{OK: true, Values: vals}
}

// stepResize announces "ready", waits until the capacity changes, then
// writes and verifies the pattern at the first, middle and last block of
// the new space.
func stepDiscardWatch(disk string, p params) proto.Result {
	start := time.Now()
	fd, err := openDisk(disk, unix.O_RDWR)
	if err != nil {
		return errResult(err)
	}
	defer unix.Close(fd)
	// The kernel logs a failed request: "I/O error, dev vda, ..." for
	// VIRTIO_BLK_S_IOERR, "operation not supported error, dev vda, ..."
	// for VIRTIO_BLK_S_UNSUPP; BLKDISCARD itself returns 0 for the latter
	// (a discard is a hint: blkdev_issue_discard drops EOPNOTSUPP).
	kmsg, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return errResult(fmt.Errorf("open /dev/kmsg: %w", err))
	}
	defer unix.Close(kmsg)
	if _, err := unix.Seek(kmsg, 0, 2); err != nil { // SEEK_END: new messages only
		return errResult(fmt.Errorf("seek /dev/kmsg: %w", err))
	}
	rec := make([]byte, 8192)
	kernelSaid := func() (unsupp, ioerr string) {
		for {
			n, err := unix.Read(kmsg, rec)
			if err == unix.EPIPE { // records overwritten: skip them
				continue
			}
			if err != nil || n <= 0 {
				return "", ""
			}
			line := string(rec[:n])
			if !strings.Contains(line, "dev "+disk+",") {
				continue
			}
			if strings.Contains(line, "operation not supported error") {
				return line, ""
			}
			if strings.Contains(line, "error") {
				return "", line
			}
		}
	}
	const off, n = 1 << 20, 64 << 10
	if err := blkRange(fd, blkDiscard, off, n); err != nil {
		return proto.Result{Error: fmt.Sprintf("BLKDISCARD before the reload: %v", err)}
	}
	if u, e := kernelSaid(); u != "" || e != "" {
		return proto.Result{Error: fmt.Sprintf("discard failed before the reload: %s%s", u, e)}
	}
	printLine(proto.ResultMarker, proto.Result{Step: proto.StepDiscardWatch, Disk: disk, Event: "ready", OK: true})
	timeout := time.Duration(p.int(proto.ParamResizeTimeout, 60)) * time.Second
	tries := int64(1)
	for {
		err := blkRange(fd, blkDiscard, off, n)
		tries++
		u, e := kernelSaid()
		switch {
		case e != "":
			return proto.Result{Error: "a discard failed with an I/O error, want \"operation not supported\": " + strings.TrimSpace(e)}
		case err != nil && !errors.Is(err, unix.EOPNOTSUPP):
			return proto.Result{Error: fmt.Sprintf("BLKDISCARD: %v (%s), want success or EOPNOTSUPP", err, errnoName(err))}
		case u != "":
			logf("kernel: %s", strings.TrimSpace(u))
			return proto.Result{OK: true, Values: map[string]int64{"tries": tries, "wait_ms": since(start)}}
		}
		if time.Since(start) > timeout {
			return proto.Result{Error: fmt.Sprintf("discards still served after %v", timeout)}
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func stepResize(disk string, p params) proto.Result {
	start := time.Now()
	old, err := sysInt(disk, "size")
	if err != nil {
		return errResult(err)
	}
	printLine(proto.ResultMarker, proto.Result{Step: proto.StepResize, Disk: disk, Event: "ready", OK: true,
		Values: map[string]int64{"sectors": old}})
	timeout := time.Duration(p.int(proto.ParamResizeTimeout, 60)) * time.Second
	var cur int64
	for {
		cur, err = sysInt(disk, "size")
		if err != nil {
			return errResult(err)
		}
		if cur != old {
			break
		}
		if time.Since(start) > timeout {
			return proto.Result{Error: fmt.Sprintf("capacity still %d sectors after %v", old, timeout),
				Values: map[string]int64{"old_sectors": old}}
		}
		time.Sleep(100 * time.Millisecond)
	}
	vals := map[string]int64{"old_sectors": old, "new_sectors": cur, "wait_ms": since(start)}
	if cur < old {
		return proto.Result{OK: true, Values: vals}
	}
	seed := p.uint(proto.ParamSeed, 1)
	lo, hi := (old*512+pattern.BlockSize-1)/pattern.BlockSize, cur*512/pattern.BlockSize
	if hi <= lo {
		return proto.Result{OK: true, Values: vals}
	}
	blocks := []int64{lo, (lo + hi) / 2, hi - 1}
	fd, err := openDisk(disk, unix.O_RDWR)
	if err != nil {
		return proto.Result{Error: err.Error(), Values: vals}
	}
	defer unix.Close(fd)
	buf := alignedBuf(pattern.BlockSize)
	defer freeBuf(buf)
	for _, b := range blocks {
		pattern.Fill(buf, seed, b*pattern.BlockSize)
		if err := pwriteFull(fd, buf, b*pattern.BlockSize); err != nil {
			return proto.Result{Error: "write to the new space: " + err.Error(), Values: vals}
		}
	}
	if err := unix.Fsync(fd); err != nil {
		return proto.Result{Error: "fsync: " + err.Error(), Values: vals}
	}
	for _, b := range blocks {
		if err := preadFull(fd, buf, b*pattern.BlockSize); err != nil {
			return proto.Result{Error: "read the new space: " + err.Error(), Values: vals}
		}
		if err := pattern.Check(buf, seed, b*pattern.BlockSize); err != nil {
			return proto.Result{Error: "new space: " + err.Error(), Values: vals}
		}
	}
	vals["checked_blocks"] = int64(len(blocks))
	return proto.Result{OK: true, Values: vals}
}
