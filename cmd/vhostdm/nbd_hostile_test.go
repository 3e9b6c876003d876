package main

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// rawNBD is a hand-made NBD client that can break the rules.
type rawNBD struct {
	t *testing.T
	c net.Conn
}

func dialRawNBD(t *testing.T, sock string) *rawNBD {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	return &rawNBD{t: t, c: c}
}

func (r *rawNBD) greeting() {
	r.t.Helper()
	var g [18]byte
	if _, err := io.ReadFull(r.c, g[:]); err != nil {
		r.t.Fatalf("greeting: %v", err)
	}
	if binary.BigEndian.Uint64(g[:]) != 0x4e42444d41474943 {
		r.t.Fatalf("greeting %x", g)
	}
}

func (r *rawNBD) send(parts ...any) error {
	var b bytes.Buffer
	for _, p := range parts {
		binary.Write(&b, binary.BigEndian, p)
	}
	_, err := r.c.Write(b.Bytes())
	return err
}

// option sends an option and returns the reply types up to the final one.
func (r *rawNBD) option(opt uint32, data []byte) ([]uint32, error) {
	if err := r.send(uint64(0x49484156454F5054), opt, uint32(len(data)), data); err != nil {
		return nil, err
	}
	var types []uint32
	for {
		var h [20]byte
		if _, err := io.ReadFull(r.c, h[:]); err != nil {
			return types, err
		}
		typ := binary.BigEndian.Uint32(h[12:])
		n := binary.BigEndian.Uint32(h[16:])
		if _, err := io.CopyN(io.Discard, r.c, int64(n)); err != nil {
			return types, err
		}
		types = append(types, typ)
		if typ == 1 || typ&(1<<31) != 0 {
			return types, nil
		}
	}
}

// goExport negotiates (fixed newstyle, no zeroes) and enters transmission
// on name with simple replies.
func (r *rawNBD) goExport(name string) {
	r.t.Helper()
	r.greeting()
	r.send(uint32(3))
	data := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	data = append(data, name...)
	data = append(data, 0, 0)
	types, err := r.option(7, data)
	if err != nil || types[len(types)-1] != 1 {
		r.t.Fatalf("GO %q: %v %v", name, types, err)
	}
}

// request sends a request header and reads a simple reply's error.
func (r *rawNBD) request(typ uint16, off uint64, length uint32, payload []byte) (uint32, error) {
	if err := r.send(uint32(0x25609513), uint16(0), typ, uint64(7), off, length, payload); err != nil {
		return 0, err
	}
	var h [16]byte
	if _, err := io.ReadFull(r.c, h[:]); err != nil {
		return 0, err
	}
	errno := binary.BigEndian.Uint32(h[4:])
	if errno == 0 && typ == 0 {
		io.CopyN(io.Discard, r.c, int64(length))
	}
	return errno, nil
}

// closed reports whether the server has closed the connection.
func (r *rawNBD) closed() bool {
	r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	_, err := r.c.Read(b[:])
	return err != nil
}

const nbdHostileConfig = `
[[device]]
name = "victim"
table = "0 8192 linear victim.img 0"

[[device]]
name = "other"
table = "0 8192 linear other.img 0"

[qmp]
socket = "qmp.sock"

[[export]]
id = "bad"
type = "nbd"
device = "victim"
socket = "bad.sock"
writable = true

[[export]]
id = "good"
type = "nbd"
device = "other"
socket = "good.sock"

[[export]]
id = "v0"
device = "other"
socket = "v.sock"
`

// TestNBDHostileClients attacks one NBD export of the real daemon with
// garbage, oversized lengths, half-open negotiations and disconnects in
// the middle of requests. Each bad request fails alone or closes only its
// connection: the daemon stays up, the attacked export still serves a
// well-behaved client, the other export's copy is verified by nbdcopy,
// and SIGTERM (with attackers still connected) exits 0 within 5 s.
func TestNBDHostileClients(t *testing.T) {
	needTool(t, "nbdcopy", "libnbd-bin")
	needTool(t, "qemu-img", "qemu-utils")
	dir := t.TempDir()
	victim := randomFile(t, filepath.Join(dir, "victim.img"), 4<<20, 5)
	other := randomFile(t, filepath.Join(dir, "other.img"), 4<<20, 6)
	cfg := writeConfig(t, dir, nbdHostileConfig)
	c := startChild(t, cfg, filepath.Join(dir, "qmp.sock"), filepath.Join(dir, "bad.sock"), filepath.Join(dir, "good.sock"))
	bad := filepath.Join(dir, "bad.sock")

	// Garbage instead of client flags, and unknown client flags.
	g := dialRawNBD(t, bad)
	g.greeting()
	g.c.Write(bytes.Repeat([]byte{0xff}, 4096))
	if !g.closed() {
		t.Error("garbage client flags: connection not closed")
	}
	// Half-open negotiations that never finish, left open to the end.
	for i := 0; i < 8; i++ {
		h := dialRawNBD(t, bad)
		if i%2 == 0 {
			h.greeting()
			h.send(uint32(3), uint64(0x49484156454F5054), uint32(7)) // option header cut short
		}
	}
	// An option claiming 4 GiB of data closes the connection; one of
	// 100 KiB is refused with ERR_TOO_BIG and negotiation goes on.
	o := dialRawNBD(t, bad)
	o.greeting()
	o.send(uint32(3))
	o.send(uint64(0x49484156454F5054), uint32(7), uint32(0xffffffff))
	if !o.closed() {
		t.Error("4 GiB option: connection not closed")
	}
	o = dialRawNBD(t, bad)
	o.greeting()
	o.send(uint32(3))
	if types, err := o.option(7, make([]byte, 100<<10)); err != nil || types[0] != 1<<31|9 {
		t.Errorf("100 KiB option: replies %x, %v; want ERR_TOO_BIG", types, err)
	}
	if types, err := o.option(6, []byte{0, 0, 0, 9, 'x'}); err != nil || types[0] != 1<<31|3 {
		t.Errorf("malformed INFO: replies %x, %v; want ERR_INVALID", types, err)
	}
	if types, err := o.option(7, []byte{0, 0, 0, 3, 'n', 'o', 'p', 0, 0}); err != nil || types[0] != 1<<31|6 {
		t.Errorf("GO to a missing export: replies %x, %v; want ERR_UNKNOWN", types, err)
	}

	// Bad requests in transmission fail alone.
	r := dialRawNBD(t, bad)
	r.goExport("victim")
	for _, tc := range []struct {
		name   string
		typ    uint16
		off    uint64
		length uint32
		want   uint32
	}{
		{"read beyond the end", 0, 4 << 20, 512, 22},
		{"read with offset overflow", 0, ^uint64(0) - 100, 512, 22},
		{"read of 4 GiB", 0, 0, 0xfffffe00, 22},
		{"unaligned read", 0, 1, 512, 22},
		{"zero-length read", 0, 0, 0, 22},
		{"unknown command", 99, 0, 512, 22},
		{"trim beyond the end", 4, 4<<20 - 512, 1024, 28},
		{"block status without contexts", 7, 0, 512, 22},
		{"good read", 0, 4096, 4096, 0},
	} {
		errno, err := r.request(tc.typ, tc.off, tc.length, nil)
		if err != nil || errno != tc.want {
			t.Errorf("%s: errno %d, %v; want %d", tc.name, errno, err, tc.want)
		}
	}
	// A write larger than the advertised maximum closes the connection.
	r.send(uint32(0x25609513), uint16(0), uint16(1), uint64(8), uint64(0), uint32(0xffffffff))
	if !r.closed() {
		t.Error("4 GiB write: connection not closed")
	}
	// A write cut off in the middle of its payload, and a bad magic.
	m := dialRawNBD(t, bad)
	m.goExport("victim")
	m.send(uint32(0x25609513), uint16(0), uint16(1), uint64(9), uint64(0), uint32(65536), make([]byte, 1000))
	m.c.Close()
	m = dialRawNBD(t, bad)
	m.goExport("victim")
	m.send(uint32(0xdeadbeef), make([]byte, 24))
	if !m.closed() {
		t.Error("bad request magic: connection not closed")
	}

	// The daemon is up, the attacked export serves a good client, the
	// other export's bytes are right.
	select {
	case <-c.done:
		t.Fatalf("daemon exited: %v", c.err)
	default:
	}
	ref := filepath.Join(dir, "victim.ref")
	os.WriteFile(ref, victim, 0o644)
	tool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", ref, nbdURI(bad, "victim"))
	out := filepath.Join(dir, "other.copy")
	tool(t, "nbdcopy", nbdURI(filepath.Join(dir, "good.sock"), "other"), out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, other) {
		t.Error("the other export's copy differs")
	}
	code, took := c.signal(t, syscall.SIGTERM)
	if code != 0 || took > 5*time.Second {
		t.Fatalf("SIGTERM with attackers connected: exit %d after %v", code, took)
	}
	t.Logf("SIGTERM to exit: %v", took)
}
