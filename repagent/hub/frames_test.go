package hub

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/vhostdm/vhostdm/repagent/wire"
)

// TestFrameReader: frames of every size read through the arenas arrive
// whole and intact (also those cut by an arena's end), their payloads stay
// valid until their batch is released, arenas are used again once
// released (never more than maxArenas of a connection), the pre-HELLO
// bound holds, and a stream cut inside a frame is an unexpected EOF.
func TestFrameReader(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	var stream []byte
	var want [][]byte
	stream = wire.AppendFrame(stream, &wire.Hello{MaxVersion: wire.MaxVersion, Session: 1, Name: "vm"})
	for i := range 150 {
		n := []int{512, 4096, 65536, 1 << 20, 3<<20 + 512}[rng.IntN(5)]
		data := make([]byte, n)
		for k := 0; k < n; k += 8 {
			binary.LittleEndian.PutUint64(data[k:], rng.Uint64())
		}
		want = append(want, data)
		stream = wire.AppendFrame(stream, &wire.ProtectedWrite{Seq: uint64(i + 1), Volume: 1, Sectors: uint32(n / 512), Data: [][]byte{data}})
	}
	done := make(chan struct{})
	defer close(done)
	spare := make(chan *arena, maxSpareArenas)
	// A reader that returns short reads, as a socket does.
	fr := newFrameReader(&choppy{r: bytes.NewReader(stream), rng: rng}, wire.MaxHelloPayload, done, spare)
	f, err := fr.ReadFrame()
	if err != nil || f.Cmd != wire.CmdHello {
		t.Fatalf("hello: %v %v", f.Cmd, err)
	}
	fr.SetMaxPayload(0)
	var held []*frameBatch
	got := 0
	for got < len(want) {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("frame %d: %v", got, err)
		}
		b := fr.batch()
		b.frames = append(b.frames, f)
		for fr.complete() && got+len(b.frames) < len(want) {
			f, err := fr.ReadFrame()
			if err != nil {
				t.Fatal(err)
			}
			b.frames = append(b.frames, f)
		}
		fr.seal(b)
		held = append(held, b)
		got += len(b.frames)
		if len(held) > 2 { // the oldest batch is handled: check and release it
			checkBatch(t, held[0], want)
			held[0].release()
			held = held[1:]
		}
	}
	for _, b := range held {
		checkBatch(t, b, want)
		b.release()
	}
	if fr.count > maxArenas {
		t.Fatalf("%d arenas taken, at most %d", fr.count, maxArenas)
	}
	if _, err := fr.ReadFrame(); !errors.Is(err, io.EOF) {
		t.Fatalf("at the end: %v, want EOF", err)
	}
	fr.close()
	if len(spare) == 0 {
		t.Fatal("no arena handed to the hub's spares at close")
	}

	// Before HELLO nothing larger than a HELLO is read.
	big := wire.AppendFrame(nil, &wire.ProtectedWrite{Seq: 1, Volume: 1, Sectors: 8, Data: [][]byte{make([]byte, 4096)}})
	fr = newFrameReader(bytes.NewReader(big), wire.MaxHelloPayload, done, nil)
	if _, err := fr.ReadFrame(); !errors.Is(err, wire.ErrMalformed) {
		t.Fatalf("large frame before hello: %v, want malformed", err)
	}
	// Cut inside a frame.
	fr = newFrameReader(bytes.NewReader(big[:len(big)-1]), wire.DefaultMaxPayload, done, nil)
	if _, err := fr.ReadFrame(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("cut frame: %v, want unexpected EOF", err)
	}
}

func checkBatch(t *testing.T, b *frameBatch, want [][]byte) {
	t.Helper()
	for _, f := range b.frames {
		m, err := wire.Decode(f)
		if err != nil {
			t.Fatal(err)
		}
		pw := m.(*wire.ProtectedWrite)
		if !bytes.Equal(pw.Data[0], want[pw.Seq-1]) {
			t.Fatalf("frame %d: payload differs", pw.Seq)
		}
	}
}

// choppy returns what its reader has in random short reads.
type choppy struct {
	r   io.Reader
	rng *rand.Rand
}

func (c *choppy) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1+c.rng.IntN(min(len(p), 2<<20))]
	}
	return c.r.Read(p)
}
