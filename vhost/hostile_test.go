package vhost

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// Outcomes of a hostile chain.
const (
	ioErr    = iota // IOERR in the status byte
	answered        // IOERR in the last device-writable byte walked (no status descriptor)
	noStatus        // used length 0: the chain offers no writable byte
)

// TestHostileChains places bad descriptor chains in the ring: each request
// fails with IOERR (or, when the chain has no status byte at all, is
// returned with used length 0), and the queue goes on serving.
func TestHostileChains(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true})
	c := env.dial(t, frontend.Config{Indirect: true, QueueSize: 128})
	ctx := testCtx(t)
	memSize := uint64(len(c.Memory()))
	hdr := func(typ uint32, sector uint64) ([]byte, uint64) {
		b, _ := c.Buf(16)
		le.PutUint32(b, typ)
		le.PutUint64(b[8:], sector)
		g, _ := c.GuestAddr(b)
		return b, g
	}
	status := func() ([]byte, uint64) {
		b, _ := c.Buf(1)
		b[0] = 0xff
		g, _ := c.GuestAddr(b)
		return b, g
	}
	data := func(n int) uint64 {
		b, _ := c.Buf(n)
		g, _ := c.GuestAddr(b)
		return g
	}
	type result struct {
		res    frontend.Result
		status byte
	}
	run := func(n int, build func(idx []uint16, st uint64) []virtio.Desc) result {
		t.Helper()
		st, sg := status()
		ch := make(chan frontend.Result, 1)
		if err := c.SubmitChain(0, n, func(idx []uint16) []virtio.Desc { return build(idx, sg) }, func(r frontend.Result) { ch <- r }); err != nil {
			t.Fatal(err)
		}
		select {
		case r := <-ch:
			return result{r, st[0]}
		case <-time.After(10 * time.Second):
			t.Fatal("hostile request never completed")
		}
		return result{}
	}
	_, hg := hdr(virtio.BlkTypeIn, 0)
	_, short := hdr(virtio.BlkTypeIn, 0)
	tableBuf, _ := c.Buf(4096)
	tableGPA, _ := c.GuestAddr(tableBuf)
	for _, tc := range []struct {
		name  string
		n     int
		build func(idx []uint16, st uint64) []virtio.Desc
		want  int
	}{
		{"data address beyond memory", 3, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{
				{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: idx[1]},
				{Addr: memSize - 512, Len: 4096, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: idx[2]},
				{Addr: st, Len: 1, Flags: virtio.DescFlagWrite},
			}
		}, ioErr},
		{"data address overflows", 3, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{
				{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: idx[1]},
				{Addr: ^uint64(0) - 100, Len: 4096, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: idx[2]},
				{Addr: st, Len: 1, Flags: virtio.DescFlagWrite},
			}
		}, ioErr},
		{"next index out of range", 2, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{
				{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: 9999},
				{Addr: st, Len: 1, Flags: virtio.DescFlagWrite},
			}
		}, noStatus},
		{"loop through the status descriptor", 2, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{
				{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: idx[1]},
				{Addr: st, Len: 1, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: idx[1]},
			}
		}, ioErr},
		{"loop back to the head", 2, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{
				{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: idx[1]},
				{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: idx[0]},
			}
		}, noStatus},
		{"short header", 2, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{
				{Addr: short, Len: 8, Flags: virtio.DescFlagNext, Next: idx[1]},
				{Addr: st, Len: 1, Flags: virtio.DescFlagWrite},
			}
		}, ioErr},
		{"no header", 1, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{{Addr: st, Len: 1, Flags: virtio.DescFlagWrite}}
		}, ioErr},
		{"readable after writable", 3, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{
				{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: idx[1]},
				{Addr: data(512), Len: 512, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: idx[2]},
				{Addr: st, Len: 1},
			}
		}, answered},
		{"zero-length descriptor", 3, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{
				{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: idx[1]},
				{Addr: data(512), Len: 0, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: idx[2]},
				{Addr: st, Len: 1, Flags: virtio.DescFlagWrite},
			}
		}, ioErr},
		{"indirect table beyond memory", 1, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{{Addr: memSize - 16, Len: 64, Flags: virtio.DescFlagIndirect}}
		}, noStatus},
		{"indirect table of odd length", 1, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{{Addr: tableGPA, Len: 40, Flags: virtio.DescFlagIndirect}}
		}, noStatus},
		{"indirect with next", 2, func(idx []uint16, st uint64) []virtio.Desc {
			virtio.WriteDesc(tableBuf, virtio.Desc{Addr: st, Len: 1, Flags: virtio.DescFlagWrite})
			return []virtio.Desc{
				{Addr: tableGPA, Len: 16, Flags: virtio.DescFlagIndirect | virtio.DescFlagNext, Next: idx[1]},
				{Addr: st, Len: 1, Flags: virtio.DescFlagWrite},
			}
		}, noStatus},
		{"nested indirect table", 1, func(idx []uint16, st uint64) []virtio.Desc {
			virtio.WriteDesc(tableBuf[0:], virtio.Desc{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: 1})
			virtio.WriteDesc(tableBuf[16:], virtio.Desc{Addr: st, Len: 1, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: 2})
			virtio.WriteDesc(tableBuf[32:], virtio.Desc{Addr: tableGPA, Len: 48, Flags: virtio.DescFlagIndirect})
			return []virtio.Desc{{Addr: tableGPA, Len: 48, Flags: virtio.DescFlagIndirect}}
		}, ioErr},
		{"indirect table loop", 1, func(idx []uint16, st uint64) []virtio.Desc {
			virtio.WriteDesc(tableBuf[0:], virtio.Desc{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: 1})
			virtio.WriteDesc(tableBuf[16:], virtio.Desc{Addr: st, Len: 1, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: 1})
			return []virtio.Desc{{Addr: tableGPA, Len: 32, Flags: virtio.DescFlagIndirect}}
		}, ioErr},
		{"indirect next out of table", 1, func(idx []uint16, st uint64) []virtio.Desc {
			virtio.WriteDesc(tableBuf[0:], virtio.Desc{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: 7})
			return []virtio.Desc{{Addr: tableGPA, Len: 32, Flags: virtio.DescFlagIndirect}}
		}, noStatus},
		{"oversized indirect table", 1, func(idx []uint16, st uint64) []virtio.Desc {
			return []virtio.Desc{{Addr: data(2048 * 16), Len: 2048 * 16, Flags: virtio.DescFlagIndirect}}
		}, noStatus},
		{"oversized chain of segments", 1, func(idx []uint16, st uint64) []virtio.Desc {
			// 1000 entries, each a 4-page buffer spanning... too many
			// segments once the header and status are added: the table
			// itself is valid, the request is not (1024 segment cap).
			big, _ := c.Buf(1100 * 16)
			bg, _ := c.GuestAddr(big)
			buf := data(512)
			virtio.WriteDesc(big, virtio.Desc{Addr: hg, Len: 16, Flags: virtio.DescFlagNext, Next: 1})
			for i := 1; i < 1023; i++ {
				virtio.WriteDesc(big[i*16:], virtio.Desc{Addr: buf, Len: 512, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: uint16(i + 1)})
			}
			virtio.WriteDesc(big[1023*16:], virtio.Desc{Addr: buf, Len: 512, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: 1024})
			virtio.WriteDesc(big[1024*16:], virtio.Desc{Addr: st, Len: 1, Flags: virtio.DescFlagWrite})
			return []virtio.Desc{{Addr: bg, Len: 1025 * 16, Flags: virtio.DescFlagIndirect}}
		}, noStatus},
		{"write beyond capacity", 3, func(idx []uint16, st uint64) []virtio.Desc {
			_, h := hdr(virtio.BlkTypeOut, 1<<20/512-1)
			return []virtio.Desc{
				{Addr: h, Len: 16, Flags: virtio.DescFlagNext, Next: idx[1]},
				{Addr: data(4096), Len: 4096, Flags: virtio.DescFlagNext, Next: idx[2]},
				{Addr: st, Len: 1, Flags: virtio.DescFlagWrite},
			}
		}, ioErr},
		{"discard segment of bad size", 3, func(idx []uint16, st uint64) []virtio.Desc {
			_, h := hdr(virtio.BlkTypeDiscard, 0)
			return []virtio.Desc{
				{Addr: h, Len: 16, Flags: virtio.DescFlagNext, Next: idx[1]},
				{Addr: data(512), Len: 24, Flags: virtio.DescFlagNext, Next: idx[2]},
				{Addr: st, Len: 1, Flags: virtio.DescFlagWrite},
			}
		}, ioErr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(tc.n, tc.build)
			switch tc.want {
			case noStatus:
				if r.res.Len != 0 {
					t.Fatalf("used len %d, want 0 (no status byte)", r.res.Len)
				}
			case answered:
				if r.res.Len != 1 || r.status != 0xff {
					t.Fatalf("used len %d status %d, want IOERR in the last writable byte", r.res.Len, r.status)
				}
			default:
				if r.status != virtio.BlkStatusIOErr || r.res.Len != 1 {
					t.Fatalf("status %d (used len %d), want IOERR", r.status, r.res.Len)
				}
			}
			// The queue still serves.
			want := pattern(uint64(len(tc.name)), 4096)
			if err := c.WriteAt(ctx, 0, want, 8); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 4096)
			if err := c.ReadAt(ctx, 0, got, 8); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("queue broken after hostile request: %v", err)
			}
		})
	}
}

// TestHostileMessages sends malformed messages: each closes that connection
// (or, for unknown requests and semantic errors with NEED_REPLY, gets an
// error reply), and the export serves the next front end.
func TestHostileMessages(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true})
	ctx := testCtx(t)
	msg := func(code wire.ReqCode, flags uint32, payload []byte) []byte {
		return append(wire.Header{Code: code, Flags: flags, Size: uint32(len(payload))}.AppendTo(nil), payload...)
	}
	u64 := func(v uint64) []byte { return le.AppendUint64(nil, v) }
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	memfd, err := unix.MemfdCreate("t", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(memfd)
	unix.Ftruncate(memfd, 1<<20)
	twoRegions := wire.MemTable{Regions: []wire.MemRegion{{GPA: 0, Size: 4096, UserAddr: 0x10000}, {GPA: 8192, Size: 4096, UserAddr: 0x20000}}}.AppendTo(nil)
	for _, tc := range []struct {
		name string
		b    []byte
		fds  []int
	}{
		{"bad version", msg(wire.ReqGetFeatures, 2, nil), nil},
		{"unknown flags", msg(wire.ReqGetFeatures, wire.FlagVersion|0x100, nil), nil},
		{"reply flag on a request", msg(wire.ReqGetFeatures, wire.FlagVersion|wire.FlagReply, nil), nil},
		{"payload too large", wire.Header{Code: wire.ReqSetFeatures, Flags: wire.FlagVersion, Size: 0x2000}.AppendTo(nil), nil},
		{"short payload then close", append(wire.Header{Code: wire.ReqSetFeatures, Flags: wire.FlagVersion, Size: 8}.AppendTo(nil), 1, 2), nil},
		{"short header then close", []byte{1, 0, 0}, nil},
		{"SET_FEATURES of 4 bytes", msg(wire.ReqSetFeatures, wire.FlagVersion, []byte{1, 2, 3, 4}), nil},
		{"SET_FEATURES not offered", msg(wire.ReqSetFeatures, wire.FlagVersion, u64(1<<63)), nil},
		{"SET_VRING_KICK without fd", msg(wire.ReqSetVringKick, wire.FlagVersion, u64(0)), nil},
		{"SET_VRING_CALL with unknown bits", msg(wire.ReqSetVringCall, wire.FlagVersion, u64(1<<20)), []int{efd}},
		{"SET_VRING_KICK no-fd flag with an fd", msg(wire.ReqSetVringKick, wire.FlagVersion, u64(1<<8)), []int{efd}},
		{"GET_FEATURES with an fd", msg(wire.ReqGetFeatures, wire.FlagVersion, nil), []int{efd}},
		{"SET_MEM_TABLE with too few fds", msg(wire.ReqSetMemTable, wire.FlagVersion, twoRegions), []int{memfd}},
		{"SET_MEM_TABLE of 0 regions", msg(wire.ReqSetMemTable, wire.FlagVersion, make([]byte, 8)), nil},
		{"SET_MEM_TABLE of bad length", msg(wire.ReqSetMemTable, wire.FlagVersion, twoRegions[:40]), []int{memfd}},
		{"SET_MEM_TABLE overflowing region", msg(wire.ReqSetMemTable, wire.FlagVersion,
			wire.MemTable{Regions: []wire.MemRegion{{GPA: ^uint64(0) - 10, Size: 4096}}}.AppendTo(nil)), []int{memfd}},
		{"SET_MEM_TABLE overlapping regions", msg(wire.ReqSetMemTable, wire.FlagVersion,
			wire.MemTable{Regions: []wire.MemRegion{{GPA: 0, Size: 8192, UserAddr: 0x10000}, {GPA: 4096, Size: 4096, UserAddr: 0x40000}}}.AppendTo(nil)), []int{memfd, memfd}},
		{"SET_VRING_ADDR misaligned", msg(wire.ReqSetVringAddr, wire.FlagVersion, wire.VringAddr{Desc: 8}.AppendTo(nil)), nil},
		{"SET_VRING_NUM bad queue", msg(wire.ReqSetVringNum, wire.FlagVersion, wire.VringState{Index: 7, Num: 128}.AppendTo(nil)), nil},
		{"SET_VRING_NUM not a power of two", msg(wire.ReqSetVringNum, wire.FlagVersion, wire.VringState{Index: 0, Num: 100}.AppendTo(nil)), nil},
		{"SET_VRING_KICK before the ring is set up", msg(wire.ReqSetVringKick, wire.FlagVersion, u64(0)), []int{efd}},
		{"GET_VRING_BASE bad queue", msg(wire.ReqGetVringBase, wire.FlagVersion, wire.VringState{Index: 9}.AppendTo(nil)), nil},
		{"SET_INFLIGHT_FD not negotiated", msg(wire.ReqSetInflightFD, wire.FlagVersion, wire.InflightDesc{MmapSize: 4096, NumQueues: 1, QueueSize: 128}.AppendTo(nil)), []int{memfd}},
		{"GET_CONFIG of bad length", msg(wire.ReqGetConfig, wire.FlagVersion, make([]byte, 13)), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc, err := frontend.DialRaw(ctx, env.socket)
			if err != nil {
				t.Fatal(err)
			}
			defer rc.Close()
			if err := rc.Send(tc.b, tc.fds); err != nil {
				t.Fatal(err)
			}
			if tc.name == "short payload then close" || tc.name == "short header then close" {
				rc.CloseWrite()
			}
			_, _, fds, err := rc.Recv(5 * time.Second)
			wire.CloseFDs(fds)
			if !errors.Is(err, io.EOF) && !isReset(err) {
				t.Fatalf("connection not closed: %v", err)
			}
			// The export serves the next front end.
			c := env.dial(t, frontend.Config{})
			if err := c.WriteAt(ctx, 0, pattern(3, 512), 0); err != nil {
				t.Fatal(err)
			}
			c.Close()
		})
	}

	// With REPLY_ACK negotiated, unknown requests and failed requests that
	// ask for a reply are answered with a non-zero u64 and the connection
	// stays up.
	t.Run("error replies", func(t *testing.T) {
		rc, err := frontend.DialRaw(ctx, env.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		roundTrip := func(b []byte, fds []int) (wire.Header, []byte) {
			t.Helper()
			if err := rc.Send(b, fds); err != nil {
				t.Fatal(err)
			}
			h, p, rfds, err := rc.Recv(5 * time.Second)
			wire.CloseFDs(rfds)
			if err != nil {
				t.Fatalf("no reply: %v", err)
			}
			return h, p
		}
		roundTrip(msg(wire.ReqGetFeatures, wire.FlagVersion, nil), nil)
		if err := rc.Send(msg(wire.ReqSetProtocolFeatures, wire.FlagVersion, u64(wire.ProtocolReplyAck|wire.ProtocolConfig)), nil); err != nil {
			t.Fatal(err)
		}
		for _, b := range [][]byte{
			msg(wire.ReqCode(99), wire.FlagVersion|wire.FlagNeedReply, []byte{1, 2, 3}),
			msg(wire.ReqSendRARP, wire.FlagVersion|wire.FlagNeedReply, u64(0)),
			msg(wire.ReqSetVringNum, wire.FlagVersion|wire.FlagNeedReply, wire.VringState{Index: 0, Num: 3}.AppendTo(nil)),
			msg(wire.ReqSetVringEnable, wire.FlagVersion|wire.FlagNeedReply, wire.VringState{Index: 5, Num: 1}.AppendTo(nil)),
			msg(wire.ReqAddMemReg, wire.FlagVersion|wire.FlagNeedReply, wire.SingleMemRegion{Region: wire.MemRegion{GPA: 0, Size: 4096}}.AppendTo(nil)),
		} {
			var fds []int
			if wire.ReqCode(le.Uint32(b)) == wire.ReqAddMemReg {
				fds = []int{memfd}
			}
			h, p := roundTrip(b, fds)
			if !h.IsReply() || len(p) != 8 || le.Uint64(p) == 0 {
				t.Fatalf("request %v: reply %+v %x, want a non-zero u64", wire.ReqCode(le.Uint32(b)), h, p)
			}
		}
		// An unknown request without NEED_REPLY is logged and ignored.
		if err := rc.Send(msg(wire.ReqCode(77), wire.FlagVersion, nil), nil); err != nil {
			t.Fatal(err)
		}
		// GET_CONFIG beyond the config space: an empty reply.
		h, p := roundTrip(msg(wire.ReqGetConfig, wire.FlagVersion, wire.ConfigMsg{Offset: 90, Size: 10, Data: make([]byte, 10)}.AppendTo(nil)), nil)
		if h.Size != 0 || len(p) != 0 {
			t.Fatalf("GET_CONFIG beyond config space: %d bytes", h.Size)
		}
		// Any prefix of the config space is served.
		for _, n := range []uint32{8, 20, 60, 96} {
			h, p = roundTrip(msg(wire.ReqGetConfig, wire.FlagVersion, wire.ConfigMsg{Size: n, Data: make([]byte, n)}.AppendTo(nil)), nil)
			if h.Size != 12+n || le.Uint64(p[12:]) != 1<<20/512 {
				t.Fatalf("GET_CONFIG of %d bytes: reply of %d", n, h.Size)
			}
		}
		h, p = roundTrip(msg(wire.ReqGetQueueNum, wire.FlagVersion, nil), nil)
		if le.Uint64(p) != 1 {
			t.Fatalf("GET_QUEUE_NUM = %d", le.Uint64(p))
		}
	})
}

func isReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) && (errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EPIPE))
}

// TestHostileClientMessage breaks the protocol on a live connection with
// requests in flight: the connection closes, in-flight requests finish, and
// the client reconnects to a working export.
func TestHostileClientMessage(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true})
	c := env.dial(t, frontend.Config{})
	ctx := testCtx(t)
	if err := c.WriteAt(ctx, 0, pattern(9, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.RawRequest(wire.Header{Code: wire.ReqSetFeatures, Flags: wire.FlagVersion, Size: 3}, []byte{1, 2, 3}, nil, false); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "disconnect", func() bool { return !env.exp.Connected() })
	if err := c.Reconnect(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := c.ReadAt(ctx, 0, got, 0); err != nil || !bytes.Equal(got, pattern(9, 4096)) {
		t.Fatalf("after reconnect: %v", err)
	}
}

var _ = context.Background
