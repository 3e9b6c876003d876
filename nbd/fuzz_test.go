package nbd

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// memDev is a 1 MiB in-memory device whose allocation alternates every 8
// sectors between data and hole.
type memDev struct {
	mu sync.Mutex
	b  []byte
}

func (d *memDev) Size() uint64 { return uint64(len(d.b)) >> mapper.SectorShift }

func (d *memDev) Submit(r *mapper.Request) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if r.Op == mapper.OpFlush {
		return nil
	}
	if r.Sectors == 0 || r.Sector >= d.Size() || r.Sectors > d.Size()-r.Sector {
		return mapper.ErrInvalid
	}
	p := d.b[r.Sector<<9 : (r.Sector+r.Sectors)<<9]
	switch r.Op {
	case mapper.OpRead:
		for _, b := range r.Data {
			p = p[copy(b, p):]
		}
	case mapper.OpWrite:
		for _, b := range r.Data {
			p = p[copy(p, b):]
		}
	default:
		clear(p)
	}
	return nil
}

func (d *memDev) Allocation(sector, sectors uint64) (uint64, mapper.AllocState, error) {
	n := min(sectors, 8-sector%8)
	if (sector/8)%2 == 1 {
		return n, mapper.AllocHole | mapper.AllocZero, nil
	}
	return n, 0, nil
}

// memBitmap is dirty every other 64 KiB.
type memBitmap struct{}

func (memBitmap) Name() string { return "b0" }
func (memBitmap) Extents(off, n uint64, fn func(mapper.Extent) bool) {
	for end := off + n; off < end; {
		next := min((off/65536+1)*65536, end)
		if !fn(mapper.Extent{Length: next - off, Dirty: (off/65536)%2 == 1}) {
			return
		}
		off = next
	}
}

func testServer() *Server {
	s := NewServer(Config{Logger: slog.New(slog.DiscardHandler), HandshakeTimeout: 2 * time.Second})
	s.Add(&Export{Name: "x", Description: "fuzz", Device: &memDev{b: make([]byte, 1<<20)}, Writable: true, Bitmaps: []Bitmap{memBitmap{}}})
	return s
}

// drive feeds input to a server connection as a client would and drains
// the replies; it returns when the server has closed the connection.
func drive(t testing.TB, s *Server, input []byte) {
	cl, sv := net.Pipe()
	s.ServeConn(context.Background(), sv)
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, cl)
		close(done)
	}()
	cl.SetWriteDeadline(time.Now().Add(5 * time.Second))
	cl.Write(input)
	cl.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("connection not closed after the client went away")
	}
	s.Close()
}

func opt(b []byte, o uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, optMagic)
	b = binary.BigEndian.AppendUint32(b, o)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func str(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// negotiated is a client's negotiation up to transmission on export x,
// with structured replies and both contexts.
func negotiated() []byte {
	b := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	b = opt(b, optStructuredReply, nil)
	q := str(nil, "x")
	q = binary.BigEndian.AppendUint32(q, 2)
	q = str(q, ContextBaseAllocation)
	q = str(q, ContextDirtyPrefix+"b0")
	b = opt(b, optSetMetaContext, q)
	g := str(nil, "x")
	g = append(g, 0, 1, 0, infoBlockSize)
	return opt(b, optGo, g)
}

func request(b []byte, flags, typ uint16, off uint64, n uint32) []byte {
	b = binary.BigEndian.AppendUint32(b, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, 1)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, n)
}

// FuzzNegotiation feeds arbitrary client bytes to option negotiation: no
// input may panic the server or keep the connection open once the client
// is gone.
func FuzzNegotiation(f *testing.F) {
	f.Add(negotiated())
	f.Add(binary.BigEndian.AppendUint32(nil, 0xffffffff))
	b := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle)
	f.Add(opt(b, optList, nil))
	f.Add(opt(b, optInfo, append(str(nil, "x"), 0, 3, 0, 0, 0, 1, 0, 2)))
	f.Add(opt(b, optListMetaContext, append(str(nil, "x"), 0, 0, 0, 0)))
	f.Add(opt(opt(b, optStructuredReply, nil), optListMetaContext, append(str(nil, "x"), 0, 0, 0, 1, 0, 0, 0, 5, 'q', 'e', 'm', 'u', ':')))
	f.Add(opt(b, optExportName, []byte("x")))
	f.Add(opt(b, optStartTLS, nil))
	f.Add(opt(b, optAbort, nil))
	f.Add(opt(b, 99, make([]byte, 70000)))
	f.Fuzz(func(t *testing.T, in []byte) {
		drive(t, testServer(), in)
	})
}

// FuzzRequests feeds arbitrary transmission requests after a good
// negotiation (structured replies, both meta contexts).
func FuzzRequests(f *testing.F) {
	f.Add(request(nil, 0, cmdRead, 0, 4096))
	f.Add(append(request(nil, cmdFlagFUA, cmdWrite, 512, 512), make([]byte, 512)...))
	f.Add(request(nil, 0, cmdBlockStatus, 0, 1<<20))
	f.Add(request(nil, cmdFlagReqOne, cmdBlockStatus, 100, 7000))
	f.Add(request(nil, cmdFlagNoHole, cmdWriteZeroes, 4096, 8192))
	f.Add(request(nil, cmdFlagFastZero, cmdWriteZeroes, 0, 1<<20))
	f.Add(request(nil, 0, cmdTrim, 0, 1<<20))
	f.Add(request(nil, 0, cmdFlush, 0, 0))
	f.Add(request(nil, 0, cmdCache, 3, 5))
	f.Add(request(nil, 0, cmdWrite, 0, 0xffffffff))
	f.Add(request(nil, 0, cmdRead, ^uint64(0), 512))
	f.Add(request(nil, 0xffff, 0xffff, 0, 0))
	f.Add(request(nil, 0, cmdDisc, 0, 0))
	f.Fuzz(func(t *testing.T, in []byte) {
		drive(t, testServer(), append(negotiated(), in...))
	})
}

// FuzzDecodeRequest: the header decoder never panics and round-trips.
func FuzzDecodeRequest(f *testing.F) {
	f.Add(request(nil, 1, 2, 3, 4))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := DecodeRequest(in)
		if err != nil {
			return
		}
		if got := request(nil, r.Flags, r.Type, r.Offset, r.Length); string(got[:8]) != string(in[:8]) || string(got[16:28]) != string(in[16:28]) {
			t.Fatalf("decode %x: %+v", in[:28], r)
		}
	})
}
