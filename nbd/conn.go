package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/vhostdm/vhostdm/mapper"
)

// maxInflightBytes bounds the payload buffers of one connection's
// in-flight requests; maxInflight bounds their number.
const (
	maxInflightBytes = 64 << 20
	maxInflight      = 32
	maxExtents       = 8192 // descriptors per block status chunk
)

// Context ids: fixed per export.
const (
	idBaseAllocation = 1
	idBitmapBase     = 2 // + index in Export.Bitmaps
)

// conn is one client connection.
type conn struct {
	s    *Server
	nc   net.Conn // replaced by the TLS connection after STARTTLS
	r    *bufio.Reader
	log  *slog.Logger
	done chan struct{}

	closeOnce sync.Once

	// Negotiation state, owned by serve's goroutine.
	noZeroes   bool
	tlsOn      bool
	structured bool
	ctxExport  string   // the export the meta context selection is for
	contexts   []uint32 // selected context ids, in order

	exp atomic.Pointer[Export] // set when transmission starts

	// Transmission.
	wmu    sync.Mutex // one reply at a time
	budget *semaphore.Weighted
	slots  chan struct{}
	reqs   sync.WaitGroup
	failed atomic.Bool // a reply could not be written
}

func newConn(s *Server, nc net.Conn) *conn {
	return &conn{s: s, nc: nc, r: bufio.NewReaderSize(nc, 64<<10), done: make(chan struct{}),
		log:    s.log.With("remote", nc.RemoteAddr().String()),
		budget: semaphore.NewWeighted(maxInflightBytes), slots: make(chan struct{}, maxInflight)}
}

func (c *conn) export() *Export { return c.exp.Load() }

func (c *conn) close() { c.closeOnce.Do(func() { c.nc.Close() }) }

// errClose ends negotiation: the connection closes without more replies.
var errClose = errors.New("nbd: client ended negotiation")

func (c *conn) serve(ctx context.Context) {
	defer close(c.done)
	defer c.close()
	stop := context.AfterFunc(ctx, c.close)
	defer stop()
	c.nc.SetDeadline(time.Now().Add(c.s.cfg.HandshakeTimeout))
	e, err := c.negotiate()
	if err != nil {
		if !errors.Is(err, errClose) && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
			c.log.Info("nbd: negotiation failed", "err", err)
		}
		return
	}
	c.nc.SetDeadline(time.Time{})
	c.log.Info("nbd: client connected", "export", e.Name, "tls", c.tlsOn, "structured", c.structured)
	err = c.transmit(ctx, e)
	c.reqs.Wait()
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		c.log.Info("nbd: connection closed", "export", e.Name, "err", err)
	} else {
		c.log.Info("nbd: client disconnected", "export", e.Name)
	}
}

// write sends b, all of it or an error.
func (c *conn) write(b []byte) error {
	_, err := c.nc.Write(b)
	return err
}

// negotiate runs the handshake and option haggling; it returns the export
// chosen by GO or EXPORT_NAME.
func (c *conn) negotiate() (*Export, error) {
	hello := make([]byte, 0, 18)
	hello = appendU64(hello, nbdMagic)
	hello = appendU64(hello, optMagic)
	hello = appendU16(hello, flagFixedNewstyle|flagNoZeroes)
	if err := c.write(hello); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.r, cf[:]); err != nil {
		return nil, err
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(flagFixedNewstyle|flagNoZeroes) != 0 || flags&flagFixedNewstyle == 0 {
		return nil, fmt.Errorf("client flags %#x: fixed newstyle required, no unknown flags", flags)
	}
	c.noZeroes = flags&flagNoZeroes != 0
	for {
		e, err := c.option()
		if err != nil || e != nil {
			return e, err
		}
	}
}

// option reads and answers one option.
func (c *conn) option() (*Export, error) {
	var h [16]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return nil, err
	}
	if binary.BigEndian.Uint64(h[:]) != optMagic {
		return nil, fmt.Errorf("bad option magic %#x", binary.BigEndian.Uint64(h[:]))
	}
	opt := binary.BigEndian.Uint32(h[8:])
	n := binary.BigEndian.Uint32(h[12:])
	if n > maxDiscardOptionLen {
		return nil, fmt.Errorf("option %d: %d bytes of data", opt, n)
	}
	if n > maxOptionLen {
		if _, err := io.CopyN(io.Discard, c.r, int64(n)); err != nil {
			return nil, err
		}
		if opt == optExportName {
			return nil, fmt.Errorf("export name of %d bytes", n)
		}
		return nil, c.reply(opt, repErrTooBig, "option data too long")
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(c.r, data); err != nil {
		return nil, err
	}
	if c.s.cfg.TLS != nil && !c.tlsOn {
		switch opt {
		case optStartTLS, optAbort:
		case optExportName:
			return nil, fmt.Errorf("EXPORT_NAME before STARTTLS on a TLS server")
		default:
			return nil, c.reply(opt, repErrTLSReqd, "TLS is required")
		}
	}
	switch opt {
	case optExportName:
		return c.exportName(string(data))
	case optAbort:
		c.write(optReply(opt, repAck, nil)) // best effort: the client may be gone
		return nil, errClose
	case optList:
		if n != 0 {
			return nil, c.reply(opt, repErrInvalid, "LIST takes no data")
		}
		for _, e := range c.s.list() {
			d := appendU32(nil, uint32(len(e.Name)))
			d = append(d, e.Name...)
			d = append(d, e.Description...)
			if err := c.write(optReply(opt, repServer, d)); err != nil {
				return nil, err
			}
		}
		return nil, c.write(optReply(opt, repAck, nil))
	case optStartTLS:
		return nil, c.startTLS(n)
	case optInfo, optGo:
		return c.info(opt, data)
	case optStructuredReply:
		if n != 0 {
			return nil, c.reply(opt, repErrInvalid, "STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return nil, c.write(optReply(opt, repAck, nil))
	case optListMetaContext, optSetMetaContext:
		return nil, c.metaContext(opt, data)
	}
	return nil, c.reply(opt, repErrUnsup, fmt.Sprintf("option %d not supported", opt))
}

// reply sends an error reply with a message.
func (c *conn) reply(opt, typ uint32, msg string) error {
	return c.write(optReply(opt, typ, []byte(msg)))
}

func (c *conn) startTLS(n uint32) error {
	switch {
	case n != 0:
		return c.reply(optStartTLS, repErrInvalid, "STARTTLS takes no data")
	case c.s.cfg.TLS == nil:
		return c.reply(optStartTLS, repErrPolicy, "TLS not configured")
	case c.tlsOn:
		return c.reply(optStartTLS, repErrInvalid, "TLS already negotiated")
	case c.r.Buffered() != 0:
		return fmt.Errorf("data sent after STARTTLS before the TLS handshake")
	}
	if err := c.write(optReply(optStartTLS, repAck, nil)); err != nil {
		return err
	}
	tc := tls.Server(c.nc, c.s.cfg.TLS)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.nc = tc
	c.r = bufio.NewReaderSize(tc, 64<<10)
	c.tlsOn = true
	// The spec: state negotiated before STARTTLS is forgotten.
	c.structured, c.contexts, c.ctxExport = false, nil, ""
	return nil
}

func (c *conn) transmissionFlags(e *Export) uint16 {
	f := uint16(tfHasFlags | tfSendFlush | tfSendFUA | tfCanMultiConn | tfSendCache)
	if e.Writable {
		f |= tfSendTrim | tfSendWriteZeroes | tfSendFastZero
	} else {
		f |= tfReadOnly
	}
	if c.structured {
		f |= tfSendDF
	}
	return f
}

func (c *conn) exportName(name string) (*Export, error) {
	e := c.s.lookup(name)
	if e == nil {
		return nil, fmt.Errorf("EXPORT_NAME %q: no such export", name)
	}
	if c.ctxExport != e.Name {
		c.contexts = nil
	}
	if !c.s.attach(c, e) {
		return nil, fmt.Errorf("EXPORT_NAME %q: export removed", name)
	}
	b := appendU64(nil, e.Device.Size()<<mapper.SectorShift)
	b = appendU16(b, c.transmissionFlags(e))
	if !c.noZeroes {
		b = append(b, make([]byte, 124)...)
	}
	if err := c.write(b); err != nil {
		return nil, err
	}
	return e, nil
}

// info answers INFO and GO.
func (c *conn) info(opt uint32, data []byte) (*Export, error) {
	r := reader{b: data}
	name := r.str()
	nreq := r.u16()
	var reqs []uint16
	for i := 0; i < int(nreq) && !r.bad; i++ {
		reqs = append(reqs, r.u16())
	}
	if r.bad || len(r.b) != 0 {
		return nil, c.reply(opt, repErrInvalid, "malformed request")
	}
	e := c.s.lookup(name)
	if e == nil {
		return nil, c.reply(opt, repErrUnknown, fmt.Sprintf("export '%s' not present", name))
	}
	send := func(typ uint16, b []byte) error {
		return c.write(optReply(opt, repInfo, append(appendU16(nil, typ), b...)))
	}
	for _, q := range reqs {
		var err error
		switch q {
		case infoName:
			err = send(infoName, []byte(e.Name))
		case infoDescription:
			if e.Description != "" {
				err = send(infoDescription, []byte(e.Description))
			}
		}
		if err != nil {
			return nil, err
		}
	}
	bs := appendU32(nil, minBlock)
	bs = appendU32(bs, preferredBlock)
	bs = appendU32(bs, MaxPayload)
	if err := send(infoBlockSize, bs); err != nil {
		return nil, err
	}
	ex := appendU64(nil, e.Device.Size()<<mapper.SectorShift)
	ex = appendU16(ex, c.transmissionFlags(e))
	if err := send(infoExport, ex); err != nil {
		return nil, err
	}
	if opt == optGo && !c.s.attach(c, e) {
		return nil, c.reply(opt, repErrUnknown, fmt.Sprintf("export '%s' removed", name))
	}
	if err := c.write(optReply(opt, repAck, nil)); err != nil {
		return nil, err
	}
	if opt == optInfo {
		return nil, nil
	}
	if c.ctxExport != e.Name {
		c.contexts = nil
	}
	return e, nil
}

// contextsOf returns the context names of e with their ids.
func contextsOf(e *Export) ([]string, []uint32) {
	names := []string{ContextBaseAllocation}
	ids := []uint32{idBaseAllocation}
	for i, b := range e.Bitmaps {
		names = append(names, ContextDirtyPrefix+b.Name())
		ids = append(ids, uint32(idBitmapBase+i))
	}
	return names, ids
}

// metaContext answers LIST_META_CONTEXT and SET_META_CONTEXT.
func (c *conn) metaContext(opt uint32, data []byte) error {
	if !c.structured {
		return c.reply(opt, repErrInvalid, "meta contexts need structured replies")
	}
	r := reader{b: data}
	name := r.str()
	nq := r.u32()
	var queries []string
	for i := uint32(0); i < nq && !r.bad; i++ {
		queries = append(queries, r.str())
	}
	if r.bad || len(r.b) != 0 {
		return c.reply(opt, repErrInvalid, "malformed request")
	}
	e := c.s.lookup(name)
	if e == nil {
		return c.reply(opt, repErrUnknown, fmt.Sprintf("export '%s' not present", name))
	}
	names, ids := contextsOf(e)
	var sel []int
	if opt == optListMetaContext && len(queries) == 0 {
		for i := range names {
			sel = append(sel, i)
		}
	}
	for _, q := range queries {
		for i, n := range names {
			match := n == q
			if opt == optListMetaContext {
				// Namespace and leaf-prefix queries list all matches.
				match = match || q == "base:" && strings.HasPrefix(n, "base:") ||
					q == "qemu:" && strings.HasPrefix(n, "qemu:") ||
					q == ContextDirtyPrefix && strings.HasPrefix(n, ContextDirtyPrefix)
			}
			if match && !containsInt(sel, i) {
				sel = append(sel, i)
			}
		}
	}
	var chosen []uint32
	for _, i := range sel {
		id := ids[i]
		if opt == optListMetaContext {
			id = 0
		}
		d := appendU32(nil, id)
		d = append(d, names[i]...)
		if err := c.write(optReply(opt, repMetaContext, d)); err != nil {
			return err
		}
		chosen = append(chosen, ids[i])
	}
	if opt == optSetMetaContext {
		c.contexts, c.ctxExport = chosen, e.Name
	}
	return c.write(optReply(opt, repAck, nil))
}

func containsInt(l []int, v int) bool {
	for _, x := range l {
		if x == v {
			return true
		}
	}
	return false
}
