package hub

import (
	"encoding/binary"
	"errors"
	"io"
	"sync"

	"github.com/vhostdm/vhostdm/repagent/wire"
)

// frameReader reads a connection's frames into large buffers (arenas)
// that are used again once every frame in them was handled: a frame's
// payload is a slice of the arena it arrived in, read from the socket
// straight into place (one copy, the kernel's), and the hub touches no
// fresh memory per frame (on a virtual machine each fresh page costs a
// page fault, more than copying it). Until SetMaxPayload is called (after
// HELLO) it reads into a small buffer only.
type frameReader struct {
	r   io.Reader
	max uint32
	cur *arena
	// rpos: the next frame starts here in cur.buf; wpos: bytes read so
	// far end here.
	rpos, wpos int

	done  <-chan struct{} // the connection ended: stop waiting for arenas
	free  chan *arena     // pooled arenas no batch uses
	count int             // pooled arenas taken (reader only)
	// spare holds the arenas of ended connections, for the next ones
	// (shared by a hub's connections; may be nil).
	spare chan *arena

	mu     sync.Mutex // guards arena.refs and closed
	closed bool       // the reader is done: freed arenas go to spare

	batches sync.Pool // *frameBatch, released
}

// arena is a buffer frames are read into; refs counts the batches (and
// the reader, while it is the current arena) still using it.
type arena struct {
	buf    []byte
	refs   int // fr.mu
	pooled bool
	fr     *frameReader
}

// hold takes one more reference on a, for the journal (SubmitRef): the
// journal writes a write's data from the arena and calls Release.
func (a *arena) hold() {
	a.fr.mu.Lock()
	a.refs++
	a.fr.mu.Unlock()
}

// Release drops a reference taken with hold.
func (a *arena) Release() { a.fr.release(a) }

const (
	// arenaSize is the size of the pooled arenas; a larger frame gets an
	// arena of its own.
	arenaSize = 8 << 20
	// maxArenas bounds the pooled arenas of a connection: the reader
	// waits for the engine when all are in use.
	maxArenas = 8
	// maxSpareArenas bounds the arenas a hub keeps for connections to
	// come.
	maxSpareArenas = 16
	// helloArena is the buffer before HELLO.
	helloArena = wire.HeaderSize + wire.MaxHelloPayload
)

// newFrameReader returns a reader of frames of up to maxPayload bytes
// from r; it stops waiting for a free arena when done is closed. spare
// (may be nil) lends it the arenas of ended connections and takes its own
// back after close.
func newFrameReader(r io.Reader, maxPayload uint32, done <-chan struct{}, spare chan *arena) *frameReader {
	fr := &frameReader{r: r, max: maxPayload, done: done, free: make(chan *arena, maxArenas), spare: spare}
	fr.cur = &arena{buf: make([]byte, helloArena), refs: 1, fr: fr}
	return fr
}

// SetMaxPayload changes the bound of later frames' payloads
// (DefaultMaxPayload when 0).
func (fr *frameReader) SetMaxPayload(n uint32) {
	if n == 0 {
		n = wire.DefaultMaxPayload
	}
	fr.max = n
}

// complete reports whether a whole frame is already buffered.
func (fr *frameReader) complete() bool {
	n := fr.wpos - fr.rpos
	if n < wire.HeaderSize {
		return false
	}
	// The payload length (ReadFrame checks the whole header).
	l := binary.LittleEndian.Uint32(fr.cur.buf[fr.rpos+16:])
	return l > fr.max || n >= wire.HeaderSize+int(l)
}

// ReadFrame reads the next frame; its payload stays valid until the batch
// holding the arena (see take) is released. Errors are those of
// wire.Reader.ReadFrame.
func (fr *frameReader) ReadFrame() (wire.Frame, error) {
	if err := fr.fill(wire.HeaderSize, true); err != nil {
		return wire.Frame{}, err
	}
	h, err := wire.ParseHeader(fr.cur.buf[fr.rpos:fr.rpos+wire.HeaderSize], fr.max)
	if err != nil {
		return wire.Frame{}, err
	}
	total := wire.HeaderSize + int(h.Len)
	if err := fr.fill(total, false); err != nil {
		return wire.Frame{}, err
	}
	p := fr.cur.buf[fr.rpos+wire.HeaderSize : fr.rpos+total : fr.rpos+total]
	fr.rpos += total
	return wire.Frame{Header: h, Payload: p}, nil
}

// fill makes n bytes from rpos available in cur, moving the partial
// frame to another arena when it does not fit. first: nothing of the
// frame was read yet (an end of stream is io.EOF, not unexpected).
func (fr *frameReader) fill(n int, first bool) error {
	if fr.wpos-fr.rpos >= n {
		return nil
	}
	if len(fr.cur.buf)-fr.rpos < n {
		if err := fr.move(n); err != nil {
			return err
		}
	}
	for fr.wpos-fr.rpos < n {
		k, err := fr.r.Read(fr.cur.buf[fr.wpos:])
		fr.wpos += k
		if fr.wpos-fr.rpos >= n {
			return nil
		}
		if err != nil {
			if errors.Is(err, io.EOF) && (!first || fr.wpos > fr.rpos) {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}

// move continues in an arena with room for n bytes, carrying over the
// bytes of the frame read so far.
func (fr *frameReader) move(n int) error {
	var next *arena
	if fr.max <= wire.MaxHelloPayload && n <= helloArena {
		// Before HELLO: nothing large.
		next = &arena{buf: make([]byte, helloArena), fr: fr}
	} else {
		var err error
		if next, err = fr.get(n); err != nil {
			return err
		}
	}
	next.refs = 1
	fr.wpos = copy(next.buf, fr.cur.buf[fr.rpos:fr.wpos])
	fr.rpos = 0
	fr.release(fr.cur)
	fr.cur = next
	return nil
}

// get returns a free arena of at least n bytes, waiting for one when all
// of the connection's are in use.
func (fr *frameReader) get(n int) (*arena, error) {
	if n > arenaSize {
		return &arena{buf: make([]byte, n), fr: fr}, nil
	}
	select {
	case a := <-fr.free:
		return a, nil
	default:
	}
	if fr.count < maxArenas {
		fr.count++
		select {
		case a := <-fr.spare: // nil: never
			a.fr = fr
			return a, nil
		default:
		}
		return &arena{buf: make([]byte, arenaSize), pooled: true, fr: fr}, nil
	}
	select {
	case a := <-fr.free:
		return a, nil
	case <-fr.done:
		return nil, errors.New("connection closed")
	}
}

// batch returns an empty batch to read frames into.
func (fr *frameReader) batch() *frameBatch {
	if b, ok := fr.batches.Get().(*frameBatch); ok {
		return b
	}
	return &frameBatch{fr: fr}
}

// seal hands the frames read since the last seal over as batch b, which
// takes a reference on the current arena (frames of earlier arenas were
// handed over before the reader moved on).
func (fr *frameReader) seal(b *frameBatch) *frameBatch {
	fr.mu.Lock()
	fr.cur.refs++
	fr.mu.Unlock()
	b.arena = fr.cur
	return b
}

// release drops one reference on a.
func (fr *frameReader) release(a *arena) {
	fr.mu.Lock()
	a.refs--
	last, closed := a.refs == 0, fr.closed
	fr.mu.Unlock()
	if last && a.pooled {
		if closed {
			fr.giveBack(a)
		} else {
			fr.free <- a // never blocks: it has room for every pooled arena
		}
	}
}

// giveBack hands an arena to the hub's spares, or to the garbage
// collector when they are full.
func (fr *frameReader) giveBack(a *arena) {
	select {
	case fr.spare <- a: // nil: never
	default:
	}
}

// close ends the reader: its free arenas, and those freed from now on,
// go to the hub's spares.
func (fr *frameReader) close() {
	fr.mu.Lock()
	fr.closed = true
	fr.mu.Unlock()
	fr.release(fr.cur)
	for {
		select {
		case a := <-fr.free:
			fr.giveBack(a)
		default:
			return
		}
	}
}

// frameBatch is frames read together, handed to the engine at once.
type frameBatch struct {
	frames []wire.Frame
	arena  *arena
	fr     *frameReader
}

// release gives the batch's buffer back once nothing refers to its
// frames' payloads any more.
func (b *frameBatch) release() {
	if b.arena != nil {
		b.fr.release(b.arena)
		b.arena = nil
	}
	clear(b.frames)
	b.frames = b.frames[:0]
	b.fr.batches.Put(b)
}
