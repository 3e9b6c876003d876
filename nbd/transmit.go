package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/vhostdm/vhostdm/mapper"
)

// transmit reads requests until DISC, an error or the connection closes;
// each request runs on its own goroutine (at most maxInflight at once,
// payload bounded by maxInflightBytes) and replies as it completes.
func (c *conn) transmit(ctx context.Context, e *Export) error {
	hdr := make([]byte, requestLen)
	for {
		if _, err := io.ReadFull(c.r, hdr); err != nil {
			return err
		}
		if c.failed.Load() {
			return errors.New("a reply could not be sent")
		}
		req, err := DecodeRequest(hdr)
		if err != nil {
			return err
		}
		if req.Type == cmdDisc {
			return nil
		}
		var weight int64
		switch req.Type {
		case cmdWrite:
			if req.Length > MaxPayload {
				// The payload cannot be skipped cheaply and the
				// client ignored the advertised maximum.
				return fmt.Errorf("write of %d bytes: over the %d-byte maximum", req.Length, MaxPayload)
			}
			weight = int64(req.Length)
		case cmdRead:
			if req.Length <= MaxPayload {
				weight = int64(req.Length)
			}
		}
		if err := c.budget.Acquire(ctx, weight); err != nil {
			return err
		}
		var payload []byte
		if req.Type == cmdWrite {
			payload = make([]byte, req.Length)
			if _, err := io.ReadFull(c.r, payload); err != nil {
				c.budget.Release(weight)
				return err
			}
		}
		select {
		case c.slots <- struct{}{}:
		case <-ctx.Done():
			c.budget.Release(weight)
			return ctx.Err()
		}
		c.reqs.Add(1)
		go func() {
			defer func() {
				c.budget.Release(weight)
				<-c.slots
				c.reqs.Done()
			}()
			c.handle(e, req, payload)
		}()
	}
}

// reqError is a request's failure: an errno and a message for the
// structured error chunk.
type reqError struct {
	errno uint32
	msg   string
}

func fail(errno uint32, format string, args ...any) *reqError {
	return &reqError{errno: errno, msg: fmt.Sprintf(format, args...)}
}

// errnoOf maps a mapper error to the protocol's errno.
func errnoOf(err error) uint32 {
	switch {
	case errors.Is(err, mapper.ErrInvalid):
		return errInval
	case errors.Is(err, mapper.ErrReadOnly):
		return errPerm
	case errors.Is(err, mapper.ErrUnsupported):
		return errNotSup
	}
	return errIO
}

// allowedFlags are the command flags each command takes.
var allowedFlags = map[uint16]uint16{
	cmdRead:        cmdFlagDF,
	cmdWrite:       cmdFlagFUA,
	cmdFlush:       0,
	cmdTrim:        cmdFlagFUA,
	cmdCache:       0,
	cmdWriteZeroes: cmdFlagFUA | cmdFlagNoHole | cmdFlagFastZero,
	cmdBlockStatus: cmdFlagReqOne,
}

// check validates a request against the export; it returns nil when the
// request may run.
func (c *conn) check(e *Export, req Request) *reqError {
	allowed, known := allowedFlags[req.Type]
	if !known {
		return fail(errInval, "unknown command %d", req.Type)
	}
	if req.Flags&^allowed != 0 {
		return fail(errInval, "flags %#x not valid for command %d", req.Flags, req.Type)
	}
	if req.Flags&cmdFlagDF != 0 && !c.structured {
		return fail(errInval, "DF without structured replies")
	}
	if req.Type == cmdFlush {
		return nil
	}
	size := e.Device.Size() << mapper.SectorShift
	write := req.Type == cmdWrite || req.Type == cmdTrim || req.Type == cmdWriteZeroes
	if write && !e.Writable {
		return fail(errPerm, "export is read-only")
	}
	if req.Length == 0 {
		return fail(errInval, "zero length")
	}
	if req.Offset > size || uint64(req.Length) > size-req.Offset {
		if write {
			return fail(errNoSpc, "request beyond the end of the export")
		}
		return fail(errInval, "request beyond the end of the export")
	}
	switch req.Type {
	case cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes:
		if req.Offset%minBlock != 0 || req.Length%minBlock != 0 {
			return fail(errInval, "offset and length must be multiples of %d", minBlock)
		}
		if req.Type == cmdRead && req.Length > MaxPayload {
			return fail(errOverflow, "read of %d bytes: over the %d-byte maximum", req.Length, MaxPayload)
		}
	case cmdBlockStatus:
		if !c.structured || len(c.contexts) == 0 {
			return fail(errInval, "block status needs structured replies and a meta context")
		}
	}
	return nil
}

// handle runs one request and sends its reply.
func (c *conn) handle(e *Export, req Request, payload []byte) {
	if re := c.check(e, req); re != nil {
		c.replyError(req, re)
		return
	}
	sector, sectors := req.Offset>>mapper.SectorShift, uint64(req.Length)>>mapper.SectorShift
	submit := func(r *mapper.Request) *reqError {
		if err := e.Device.Submit(r); err != nil {
			c.log.Warn("nbd: request failed", "export", e.Name, "op", r.Op.String(), "offset", req.Offset, "length", req.Length, "err", err)
			return fail(errnoOf(err), "%s failed", r.Op)
		}
		return nil
	}
	flushIfFUA := func() *reqError {
		if req.Flags&cmdFlagFUA != 0 {
			return submit(&mapper.Request{Op: mapper.OpFlush})
		}
		return nil
	}
	var re *reqError
	switch req.Type {
	case cmdRead:
		c.read(e, req, sector, sectors)
		return
	case cmdBlockStatus:
		c.blockStatus(e, req)
		return
	case cmdWrite:
		re = submit(&mapper.Request{Op: mapper.OpWrite, Sector: sector, Sectors: sectors, Data: [][]byte{payload}, FUA: req.Flags&cmdFlagFUA != 0})
	case cmdFlush:
		re = submit(&mapper.Request{Op: mapper.OpFlush})
	case cmdTrim:
		if re = submit(&mapper.Request{Op: mapper.OpDiscard, Sector: sector, Sectors: sectors}); re == nil {
			re = flushIfFUA()
		}
	case cmdWriteZeroes:
		if req.Flags&cmdFlagFastZero != 0 {
			re = c.fastZero(e, sector, sectors)
			break
		}
		if re = submit(&mapper.Request{Op: mapper.OpWriteZeroes, Sector: sector, Sectors: sectors, Unmap: req.Flags&cmdFlagNoHole == 0}); re == nil {
			re = flushIfFUA()
		}
	case cmdCache:
		// Advisory; the range was checked.
	}
	if re != nil {
		c.replyError(req, re)
		return
	}
	c.send(simpleReply(make([]byte, 0, 16), 0, req.Cookie))
}

// fastZero answers a WRITE_ZEROES with FAST_ZERO: it succeeds at once
// when the table says the whole range already reads as zeros (holes of
// thin, ploop, sparse files, zero targets), and fails with ENOTSUP
// otherwise, since the mapper cannot promise that zeroing data is faster
// than writing it. The client then writes zeros itself or skips the
// pre-zeroing, as the spec intends.
func (c *conn) fastZero(e *Export, sector, sectors uint64) *reqError {
	for end := sector + sectors; sector < end; {
		n, st, err := e.Device.Allocation(sector, end-sector)
		if err != nil || n == 0 || st&mapper.AllocZero == 0 {
			return fail(errNotSup, "fast zero not possible")
		}
		sector += n
	}
	return nil
}

// send writes one whole reply; a failure closes the connection.
func (c *conn) send(b []byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.failed.Load() {
		return
	}
	if err := c.write(b); err != nil {
		c.failed.Store(true)
		c.close()
	}
}

// replyError sends re as a structured error chunk when structured replies
// are on, else as a simple reply.
func (c *conn) replyError(req Request, re *reqError) {
	if !c.structured {
		c.send(simpleReply(make([]byte, 0, 16), re.errno, req.Cookie))
		return
	}
	msg := re.msg
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	b := chunkHeader(make([]byte, 0, 26+len(msg)), replyFlagDone, replyTypeError, req.Cookie, uint32(6+len(msg)))
	b = appendU32(b, re.errno)
	b = appendU16(b, uint16(len(msg)))
	c.send(append(b, msg...))
}

func (c *conn) read(e *Export, req Request, sector, sectors uint64) {
	hl := 16
	if c.structured {
		hl = 28
	}
	buf := make([]byte, hl+int(req.Length))
	r := &mapper.Request{Op: mapper.OpRead, Sector: sector, Sectors: sectors, Data: [][]byte{buf[hl:]}}
	if err := e.Device.Submit(r); err != nil {
		c.log.Warn("nbd: read failed", "export", e.Name, "offset", req.Offset, "length", req.Length, "err", err)
		c.replyError(req, fail(errnoOf(err), "read failed"))
		return
	}
	if c.structured {
		h := chunkHeader(buf[:0], replyFlagDone, replyTypeOffsetData, req.Cookie, 8+req.Length)
		appendU64(h, req.Offset)
	} else {
		simpleReply(buf[:0], 0, req.Cookie)
	}
	c.send(buf)
}

// extent is one block status descriptor.
type extent struct{ length, flags uint32 }

// extents collects descriptors, merging runs of equal flags, up to limit.
type extents struct {
	list  []extent
	limit int
}

// add appends a run; it returns false once the list is full.
func (x *extents) add(n uint64, flags uint32) bool {
	if k := len(x.list); k > 0 && x.list[k-1].flags == flags && uint64(x.list[k-1].length)+n <= 1<<32-minBlock {
		x.list[k-1].length += uint32(n)
		return true
	}
	if len(x.list) >= x.limit {
		return false
	}
	x.list = append(x.list, extent{uint32(n), flags})
	return true
}

func (c *conn) blockStatus(e *Export, req Request) {
	limit := maxExtents
	if req.Flags&cmdFlagReqOne != 0 {
		limit = 1
	}
	end := req.Offset + uint64(req.Length)
	var out []byte
	for i, id := range c.contexts {
		x := extents{limit: limit}
		switch {
		case id == idBaseAllocation:
			for pos := req.Offset; pos < end; {
				sector := pos >> mapper.SectorShift
				want := (end - sector<<mapper.SectorShift + mapper.SectorSize - 1) >> mapper.SectorShift
				n, st, err := e.Device.Allocation(sector, want)
				if err != nil || n == 0 {
					c.log.Warn("nbd: block status failed", "export", e.Name, "offset", req.Offset, "err", err)
					c.replyError(req, fail(errIO, "block status failed"))
					return
				}
				runEnd := min((sector+n)<<mapper.SectorShift, end)
				if !x.add(runEnd-pos, uint32(st)) {
					break
				}
				pos = runEnd
			}
		case id >= idBitmapBase && int(id-idBitmapBase) < len(e.Bitmaps):
			e.Bitmaps[id-idBitmapBase].Extents(req.Offset, uint64(req.Length), func(m mapper.Extent) bool {
				var f uint32
				if m.Dirty {
					f = 1
				}
				return x.add(m.Length, f)
			})
		}
		if len(x.list) == 0 { // a bitmap shorter than the device: clean
			x.list = append(x.list, extent{req.Length, 0})
		}
		var flags uint16
		if i == len(c.contexts)-1 {
			flags = replyFlagDone
		}
		out = chunkHeader(out, flags, replyTypeBlockStatus, req.Cookie, uint32(4+8*len(x.list)))
		out = appendU32(out, id)
		for _, d := range x.list {
			out = appendU32(out, d.length)
			out = appendU32(out, d.flags)
		}
	}
	c.send(out)
}
