//go:build ceph

package cephstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
)

// Built reports whether this binary was built with Ceph support.
const Built = true

// Backend is the hub's store in a Ceph pool (see the package comment).
type Backend struct {
	cfg  Config
	log  *slog.Logger
	conn *rados.Conn
	io   *rados.IOContext // shared: librados I/O contexts are thread-safe

	// ops counts the RADOS operations the store issued itself (librbd's
	// for the replica images not included); segAppends the journal's
	// group-commit writes among them.
	ops, segAppends atomic.Uint64

	mu    sync.Mutex
	known map[string]bool   // VMs in the index
	held  map[string]string // VM → the cookie of the lease this hub holds on it
}

// Open connects to the cluster and opens the pool. The pool must exist.
func Open(c Config, log *slog.Logger) (hub.Backend, error) {
	return OpenBackend(c, log)
}

// OpenBackend is Open returning the concrete type (tests read its
// counters).
func OpenBackend(c Config, log *slog.Logger) (*Backend, error) {
	if log == nil {
		log = slog.Default()
	}
	if c.Lease <= 0 {
		c.Lease = 15 * time.Second
	}
	conn, err := ceph.Connect(ceph.Config{Conf: c.Conf, ID: c.ID, Keyring: c.Keyring})
	if err != nil {
		return nil, err
	}
	io, err := conn.OpenIOContext(c.Pool)
	if err != nil {
		conn.Shutdown()
		if errors.Is(err, rados.ErrNotFound) {
			return nil, fmt.Errorf("ceph store: pool %q not found (create it and run rbd pool init on it)", c.Pool)
		}
		return nil, fmt.Errorf("ceph store: pool %q: %w", c.Pool, err)
	}
	b := &Backend{cfg: c, log: log, conn: conn, io: io, known: map[string]bool{}, held: map[string]string{}}
	// A first read proves the key's caps on the pool now, not at the
	// first agent.
	if _, err := b.omapAll(indexObj, vmKey); err != nil {
		b.Close()
		return nil, fmt.Errorf("ceph store: pool %q: read %s: %w", c.Pool, indexObj, explain(err))
	}
	return b, nil
}

// explain adds what a permission error means.
func explain(err error) error {
	if isErrno(err, unix.EPERM) || isErrno(err, unix.EACCES) {
		return fmt.Errorf("permission denied (the hub's key needs mon 'profile rbd' and osd 'profile rbd pool=POOL'): %w", err)
	}
	return err
}

func isErrno(err error, e unix.Errno) bool {
	var ce interface{ ErrorCode() int }
	if errors.As(err, &ce) {
		return unix.Errno(-ce.ErrorCode()) == e
	}
	var en unix.Errno
	return errors.As(err, &en) && en == e
}

func notFound(err error) bool {
	var oe rados.OperationError
	if errors.As(err, &oe) {
		return oe.OpError != nil && notFound(oe.OpError)
	}
	return errors.Is(err, rados.ErrNotFound) || errors.Is(err, rbd.ErrNotFound) || isErrno(err, unix.ENOENT)
}

// String implements hub.Backend.
func (b *Backend) String() string { return Scheme + ":" + b.cfg.Pool }

// Ops returns the RADOS operations the store issued itself (not those
// librbd issues for the replica images) and, among them, the journal's
// segment writes (one per group commit).
func (b *Backend) Ops() (total, segmentWrites uint64) { return b.ops.Load(), b.segAppends.Load() }

// Close implements hub.Backend.
func (b *Backend) Close() error {
	b.io.Destroy()
	b.conn.Shutdown()
	return nil
}

// omapAll returns the omap entries of oid whose keys start with pfx (a
// missing object has none).
func (b *Backend) omapAll(oid, pfx string) (map[string][]byte, error) {
	b.ops.Add(1)
	m, err := b.io.GetAllOmapValues(oid, "", pfx, 512)
	if notFound(err) {
		return map[string][]byte{}, nil
	}
	return m, err
}

// omapGet returns one omap value, nil when missing.
func (b *Backend) omapGet(oid, key string) ([]byte, error) {
	b.ops.Add(1)
	op := rados.CreateReadOp()
	defer op.Release()
	step := op.GetOmapValuesByKeys([]string{key})
	if err := op.Operate(b.io, oid, rados.OperationNoFlag); err != nil {
		if notFound(err) {
			return nil, nil
		}
		return nil, err
	}
	kv, err := step.Next()
	if err != nil || kv == nil {
		return nil, err
	}
	return append([]byte{}, kv.Value...), nil
}

func (b *Backend) omapSet(oid, key string, val []byte) error {
	b.ops.Add(1)
	if len(val) == 0 {
		val = []byte("{}")
	}
	return b.io.SetOmap(oid, map[string][]byte{key: val})
}

// VMs implements hub.Backend.
func (b *Backend) VMs() (map[string][]string, error) {
	idx, err := b.omapAll(indexObj, vmKey)
	if err != nil {
		return nil, fmt.Errorf("%s: list VMs: %w", b, explain(err))
	}
	out := map[string][]string{}
	for k := range idx {
		vm := strings.TrimPrefix(k, vmKey)
		vols, err := b.omapAll(vmObject(vm), volKey)
		if err != nil {
			return nil, fmt.Errorf("%s: vm %s: %w", b, vm, explain(err))
		}
		names := []string{}
		for v := range vols {
			names = append(names, strings.TrimPrefix(v, volKey))
		}
		out[vm] = names
		b.mu.Lock()
		b.known[vm] = true
		b.mu.Unlock()
	}
	return out, nil
}

// GetVM implements hub.Backend.
func (b *Backend) GetVM(vm string) ([]byte, error) { return b.omapGet(indexObj, vmKey+vm) }

// PutVM implements hub.Backend.
func (b *Backend) PutVM(vm string, data []byte) error {
	if err := b.omapSet(indexObj, vmKey+vm, data); err != nil {
		return fmt.Errorf("%s: vm %s: %w", b, vm, explain(err))
	}
	b.mu.Lock()
	b.known[vm] = true
	b.mu.Unlock()
	return nil
}

// ensureVM puts vm in the index if it is not known there.
func (b *Backend) ensureVM(vm string) error {
	b.mu.Lock()
	known := b.known[vm]
	b.mu.Unlock()
	if known {
		return nil
	}
	cur, err := b.GetVM(vm)
	if err != nil {
		return err
	}
	if cur == nil {
		return b.PutVM(vm, []byte("{}"))
	}
	b.mu.Lock()
	b.known[vm] = true
	b.mu.Unlock()
	return nil
}

// GetVolume implements hub.Backend.
func (b *Backend) GetVolume(vm, vol string) ([]byte, error) {
	return b.omapGet(vmObject(vm), volKey+vol)
}

// PutVolume implements hub.Backend: one omap key of the VM's object,
// replaced atomically by an operation that asserts this hub's lease on
// the VM (writeState); without it, it fails wrapping ErrNotHeld.
func (b *Backend) PutVolume(vm, vol string, data []byte) error {
	if err := b.ensureVM(vm); err != nil {
		return fmt.Errorf("%s: vm %s: %w", b, vm, explain(err))
	}
	if len(data) == 0 {
		data = []byte("{}")
	}
	if err := b.writeState(vm, "", stateWrite{set: map[string][]byte{volKey + vol: data}}); err != nil {
		return fmt.Errorf("%s: vm %s volume %s: write state: %w", b, vm, vol, explain(err))
	}
	return nil
}

// writeState applies w to VM vm's object in one operation that asserts,
// in the OSD, that this hub holds the VM's lock: with cookie (the lease of
// the VM's journal store), else the lease this hub holds on the VM, else
// a lock taken for this write alone (refused while another hub holds the
// VM). A hub that lost the VM's lease changes nothing: ErrNotHeld.
func (b *Backend) writeState(vm, cookie string, w stateWrite) error {
	oid := vmObject(vm)
	if cookie == "" {
		b.mu.Lock()
		cookie = b.held[vm]
		b.mu.Unlock()
	}
	if cookie != "" {
		b.ops.Add(1)
		return operateLocked(b.io, oid, cookie, w)
	}
	var c [8]byte
	rand.Read(c[:])
	cookie = "w" + hex.EncodeToString(c[:])
	b.ops.Add(1)
	ret, err := b.io.LockExclusive(oid, lockName, cookie, "repagent-hub state write", b.cfg.Lease, nil)
	if err != nil {
		return fmt.Errorf("lock %s: %w", oid, err)
	}
	if ret != 0 {
		return fmt.Errorf("%w: %s is held by another hub", ErrNotHeld, oid)
	}
	b.ops.Add(2)
	err = operateLocked(b.io, oid, cookie, w)
	if _, uerr := b.io.Unlock(oid, lockName, cookie); err == nil && uerr != nil {
		err = fmt.Errorf("unlock %s: %w", oid, uerr)
	}
	return err
}

// Replica implements hub.Backend.
func (b *Backend) Replica(vm, vol string) string {
	return "rbd:" + b.cfg.Pool + "/" + imageName(vm, vol)
}

// Journal implements hub.Backend.
func (b *Backend) Journal(vm string) journal.Store {
	return &vmStore{b: b, vm: vm, obj: vmObject(vm)}
}

// vmStore is one VM's journal.Store.
type vmStore struct {
	b   *Backend
	vm  string
	obj string

	mu     sync.Mutex
	lost   error  // the lease was lost: nothing more is written
	cookie string // of the held lease; its writes of state assert it
}

func (s *vmStore) String() string { return s.b.String() + "/" + s.obj }

func (s *vmStore) check() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lost
}

// write changes the VM object under the store's lease (writeState).
func (s *vmStore) write(w stateWrite) error {
	s.mu.Lock()
	lost, cookie := s.lost, s.cookie
	s.mu.Unlock()
	if lost != nil {
		return lost
	}
	return s.b.writeState(s.vm, cookie, w)
}

// lease is a held RADOS lock on the VM's object, renewed in the
// background.
type lease struct {
	s      *vmStore
	cookie string
	stop   chan struct{}
	done   chan struct{}
}

// Lock implements journal.Store: an exclusive RADOS lock on the VM's
// object with a lease (Config.Lease), renewed every third of it. A lock
// another client holds is waited for up to Config.LockWait (a hub that
// died: its lease ends), then it is ErrInUse.
func (s *vmStore) Lock() (io.Closer, error) {
	if err := s.b.ensureVM(s.vm); err != nil {
		return nil, explain(err)
	}
	var c [8]byte
	rand.Read(c[:])
	l := &lease{s: s, cookie: hex.EncodeToString(c[:]), stop: make(chan struct{}), done: make(chan struct{})}
	deadline := time.Now().Add(s.b.cfg.LockWait)
	for {
		s.b.ops.Add(1)
		ret, err := s.b.io.LockExclusive(s.obj, lockName, l.cookie, "repagent-hub", s.b.cfg.Lease, nil)
		if err != nil {
			return nil, fmt.Errorf("lock %s: %w", s, explain(err))
		}
		if ret == 0 {
			break
		}
		if time.Now().After(deadline) {
			who := ""
			if li, err := s.b.io.ListLockers(s.obj, lockName); err == nil && li != nil {
				for _, h := range li.Clients {
					who += " " + h
				}
			}
			return nil, fmt.Errorf("%w: %s is held by another hub (%s) until its lease of %v ends", journal.ErrInUse, s, strings.TrimSpace(who), s.b.cfg.Lease)
		}
		time.Sleep(250 * time.Millisecond)
	}
	s.mu.Lock()
	s.cookie = l.cookie
	s.mu.Unlock()
	s.b.mu.Lock()
	s.b.held[s.vm] = l.cookie
	s.b.mu.Unlock()
	go l.renew()
	return l, nil
}

func (l *lease) renew() {
	defer close(l.done)
	b := l.s.b
	t := time.NewTicker(b.cfg.Lease / 3)
	defer t.Stop()
	// LIBRADOS_LOCK_FLAG_MUST_RENEW: a lease that ended (expired, or
	// broken) is lost, never silently taken again: another hub may have
	// held the VM meanwhile.
	renew := byte(2)
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		b.ops.Add(1)
		ret, err := b.io.LockExclusive(l.s.obj, lockName, l.cookie, "repagent-hub", b.cfg.Lease, &renew)
		if err == nil && ret != 0 {
			err = fmt.Errorf("lock held by another client (%d)", ret)
		}
		if err != nil {
			l.s.mu.Lock()
			if l.s.lost == nil {
				l.s.lost = fmt.Errorf("%s: the hub's lease on the VM was lost: %w", l.s, err)
				b.log.Error("ceph store: lease lost; the VM's journal is not written any more", "vm", l.s.vm, "err", err)
			}
			l.s.mu.Unlock()
		}
	}
}

func (l *lease) Close() error {
	close(l.stop)
	<-l.done
	b := l.s.b
	b.mu.Lock()
	if b.held[l.s.vm] == l.cookie {
		delete(b.held, l.s.vm)
	}
	b.mu.Unlock()
	l.s.mu.Lock()
	if l.s.cookie == l.cookie {
		l.s.cookie = ""
	}
	l.s.mu.Unlock()
	l.s.b.ops.Add(1)
	_, err := l.s.b.io.Unlock(l.s.obj, lockName, l.cookie)
	return err
}

// Segments implements journal.Store: the segment index in the VM
// object's omap.
func (s *vmStore) Segments() ([]int64, error) {
	m, err := s.b.omapAll(s.obj, segKey)
	if err != nil {
		return nil, explain(err)
	}
	var out []int64
	for k := range m {
		v, err := strconv.ParseInt(strings.TrimPrefix(k, segKey), 16, 64)
		if err != nil || v < 0 {
			return nil, fmt.Errorf("%w: %s: bad segment key %q", journal.ErrCorrupt, s, k)
		}
		out = append(out, v)
	}
	return out, nil
}

func (s *vmStore) SegmentName(start int64) string { return s.b.String() + "/" + segObject(s.vm, start) }

// CreateSegment implements journal.Store: the index key first, then the
// object, so that an object is never left outside the index (an indexed
// segment whose object is missing reads as empty: a creation cut short).
func (s *vmStore) CreateSegment(start int64) (journal.Segment, error) {
	if err := s.write(stateWrite{set: map[string][]byte{fmt.Sprintf("%s%016x", segKey, start): []byte("1")}}); err != nil {
		return nil, explain(err)
	}
	seg, err := s.openSegment(start)
	if err != nil {
		return nil, err
	}
	s.b.ops.Add(2)
	if err := seg.io.Create(seg.oid, rados.CreateIdempotent); err != nil {
		seg.Close()
		return nil, explain(err)
	}
	if err := seg.io.Truncate(seg.oid, 0); err != nil {
		seg.Close()
		return nil, explain(err)
	}
	if seg.ver, err = seg.io.GetLastVersion(); err != nil {
		seg.Close()
		return nil, err
	}
	seg.size = 0
	return seg, nil
}

func (s *vmStore) OpenSegment(start int64) (journal.Segment, error) {
	seg, err := s.openSegment(start)
	if err != nil {
		return nil, err
	}
	s.b.ops.Add(1)
	st, err := seg.io.Stat(seg.oid)
	switch {
	case notFound(err):
		return seg, nil
	case err != nil:
		seg.Close()
		return nil, explain(err)
	}
	seg.size = int64(st.Size)
	if seg.ver, err = seg.io.GetLastVersion(); err != nil {
		seg.Close()
		return nil, err
	}
	return seg, nil
}

// openSegment returns a segment handle with its own I/O context, whose
// last version is then this segment's.
func (s *vmStore) openSegment(start int64) (*segment, error) {
	io, err := s.b.conn.OpenIOContext(s.b.cfg.Pool)
	if err != nil {
		return nil, explain(err)
	}
	return &segment{s: s, io: io, oid: segObject(s.vm, start)}, nil
}

func (s *vmStore) RemoveSegment(start int64) error {
	if err := s.check(); err != nil {
		return err
	}
	s.b.ops.Add(1)
	if err := s.b.io.Delete(segObject(s.vm, start)); err != nil && !notFound(err) {
		return explain(err)
	}
	if err := s.write(stateWrite{rm: []string{fmt.Sprintf("%s%016x", segKey, start)}}); err != nil {
		return explain(err)
	}
	return nil
}

// SyncSegments implements journal.Store: RADOS acknowledges an operation
// once every replica has it.
func (s *vmStore) SyncSegments() error { return nil }

func (s *vmStore) StateName() string { return s.String() }

func (s *vmStore) GetState() ([]byte, error) {
	s.b.ops.Add(1)
	st, err := s.b.io.Stat(s.obj)
	if notFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, explain(err)
	}
	if st.Size == 0 {
		return nil, nil
	}
	buf := make([]byte, st.Size)
	s.b.ops.Add(1)
	n, err := s.b.io.Read(s.obj, buf, 0)
	if err != nil {
		return nil, explain(err)
	}
	return buf[:n], nil
}

// PutState implements journal.Store: write_full replaces the object's
// data in one atomic operation, which asserts the store's lease.
func (s *vmStore) PutState(data []byte) error {
	if err := s.write(stateWrite{full: data}); err != nil {
		return explain(err)
	}
	return nil
}

// Probe implements journal.Store: a write and a removal of a probe
// object.
func (s *vmStore) Probe(hook func(op, name string) error) error {
	if err := s.check(); err != nil {
		return err
	}
	oid := s.obj + ".probe"
	if err := hook("segment-write", oid); err != nil {
		return err
	}
	if err := hook("segment-sync", oid); err != nil {
		return err
	}
	s.b.ops.Add(2)
	if err := s.b.io.WriteFull(oid, make([]byte, 4096)); err != nil {
		return explain(err)
	}
	return s.b.io.Delete(oid)
}

// OpenImage implements journal.Store: the RBD image of a volume. A
// missing one, with create, is created by the first Resize with the
// volume's size.
func (s *vmStore) OpenImage(vol string, create bool) (journal.Image, error) {
	if err := s.check(); err != nil && create {
		return nil, err
	}
	name := imageName(s.vm, vol)
	img, err := rbd.OpenImage(s.b.io, name, rbd.NoSnapshot)
	if notFound(err) {
		if !create {
			return nil, fmt.Errorf("%s: %w", s.b.Replica(s.vm, vol), fs.ErrNotExist)
		}
		return &image{b: s.b, name: name, vm: s}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", s.b.Replica(s.vm, vol), explain(err))
	}
	return &image{b: s.b, name: name, img: img, vm: s}, nil
}

func (s *vmStore) SyncImages() error { return nil }

// Target implements journal.Store: recovered volumes are RBD clones of a
// snapshot of each replica at base (no data leaves the cluster), named
// vhostdm-hub.VM.VOLUME.rec-T; out only names the recovery in logs.
func (s *vmStore) Target(out string, base journal.Point) (journal.Target, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	return &target{s: s, snap: snapPoint + strconv.FormatInt(base.Pos, 10), tag: "rec-" + strconv.FormatInt(time.Now().UnixNano(), 36)}, nil
}

// segment is a journal segment object.
type segment struct {
	s    *vmStore
	io   *rados.IOContext // own context: GetLastVersion is this object's
	oid  string
	size int64
	ver  uint64 // the object's version after our last operation; 0: missing
}

func (g *segment) ReadAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		g.s.b.ops.Add(1)
		n, err := g.io.Read(g.oid, p[done:], uint64(off)+uint64(done))
		if notFound(err) {
			return done, io.EOF
		}
		if err != nil {
			return done, explain(err)
		}
		if n == 0 {
			return done, io.EOF
		}
		done += n
	}
	return done, nil
}

// Append writes b at the segment's end in one operation that asserts the
// object's version: a write of anyone else since (a hub that lost its
// lease) fails it instead of interleaving.
func (g *segment) Append(b []byte) error {
	if err := g.s.check(); err != nil {
		return err
	}
	op := rados.CreateWriteOp()
	defer op.Release()
	if g.ver != 0 {
		op.AssertVersion(g.ver)
	}
	op.Write(b, uint64(g.size))
	g.s.b.ops.Add(1)
	g.s.b.segAppends.Add(1)
	if err := op.Operate(g.io, g.oid, rados.OperationNoFlag); err != nil {
		return fmt.Errorf("write %s at %d: %w", g.oid, g.size, explain(err))
	}
	v, err := g.io.GetLastVersion()
	if err != nil {
		return err
	}
	g.ver = v
	g.size += int64(len(b))
	return nil
}

// Sync implements journal.Segment: a RADOS write is durable on every
// replica when it returns.
func (g *segment) Sync() error { return nil }

func (g *segment) Size() (int64, error) { return g.size, nil }

func (g *segment) Truncate(size int64) error {
	if err := g.s.check(); err != nil {
		return err
	}
	g.s.b.ops.Add(1)
	if err := g.io.Truncate(g.oid, uint64(size)); err != nil {
		return explain(err)
	}
	v, err := g.io.GetLastVersion()
	if err != nil {
		return err
	}
	g.ver, g.size = v, size
	return nil
}

func (g *segment) Close() error {
	g.io.Destroy()
	return nil
}

// image is an RBD image; img is nil until a Resize creates it.
type image struct {
	b    *Backend
	vm   *vmStore
	name string
	img  *rbd.Image
}

func (m *image) Name() string { return "rbd:" + m.b.cfg.Pool + "/" + m.name }

// ReadAt implements io.ReaderAt; past the image's end it returns io.EOF
// (librbd refuses reads that start there).
func (m *image) ReadAt(p []byte, off int64) (int, error) {
	if m.img == nil {
		return 0, io.EOF
	}
	size, err := m.Size()
	if err != nil {
		return 0, err
	}
	if off >= size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), size-off))
	got, err := m.img.ReadAt(p[:n], off)
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return got, err
}

// WriteAt implements io.WriterAt. A write past the image's end grows the
// image first, as a file grows: an apply pass redone after a crash writes
// where a later resize of the same pass had already shrunk the image
// (librbd clips a write at the end and refuses one beyond it).
func (m *image) WriteAt(p []byte, off int64) (int, error) {
	if err := m.vm.check(); err != nil {
		return 0, err
	}
	if m.img == nil {
		return 0, fmt.Errorf("%s: not created", m.Name())
	}
	if len(p) == 0 {
		return 0, nil
	}
	size, err := m.Size()
	if err != nil {
		return 0, fmt.Errorf("%s: size: %w", m.Name(), explain(err))
	}
	if end := off + int64(len(p)); end > size {
		if err := m.img.Resize(uint64(end)); err != nil {
			return 0, fmt.Errorf("%s: grow from %d to %d for a write: %w", m.Name(), size, end, explain(err))
		}
	}
	return rbdWrite(m.img, p, off)
}

// rbdWrite is Image.WriteAt with librbd's own error: go-ceph reports every
// failed or short write as EPERM and returns librbd's result as the count.
func rbdWrite(img *rbd.Image, p []byte, off int64) (int, error) {
	n, err := img.WriteAt(p, off)
	switch {
	case err == nil:
		return n, nil
	case n < 0:
		return 0, fmt.Errorf("rbd_write of %d bytes at %d: %w", len(p), off, explain(unix.Errno(-n)))
	default:
		return n, fmt.Errorf("rbd_write of %d bytes at %d: %d written: %w", len(p), off, n, io.ErrShortWrite)
	}
}

func (m *image) Size() (int64, error) {
	if m.img == nil {
		return 0, nil
	}
	sz, err := m.img.GetSize()
	return int64(sz), err
}

// Resize implements journal.Image; a missing image is created with the
// size (features: layering, for the recovery clones).
func (m *image) Resize(size int64) error {
	if err := m.vm.check(); err != nil {
		return err
	}
	if m.img == nil {
		opts := rbd.NewRbdImageOptions()
		defer opts.Destroy()
		if err := opts.SetUint64(rbd.ImageOptionFeatures, rbd.FeatureLayering); err != nil {
			return err
		}
		err := rbd.CreateImage(m.b.io, m.name, uint64(size), opts)
		if isErrno(err, unix.EEXIST) {
			err = m.recreate(uint64(size), opts)
		}
		if err != nil {
			return fmt.Errorf("create %s: %w", m.Name(), explain(err))
		}
		img, err := rbd.OpenImage(m.b.io, m.name, rbd.NoSnapshot)
		if err != nil {
			return fmt.Errorf("open %s: %w", m.Name(), explain(err))
		}
		m.img = img
		if cur, err := img.GetSize(); err == nil && cur == uint64(size) {
			return nil
		}
	}
	return m.img.Resize(uint64(size))
}

// recreate handles an image name that exists but did not open: librbd
// creates an image in steps (directory entry, id object, header), and a
// hub killed between them leaves a name that neither opens nor can be
// created again. Nothing was ever written to such an image: remove what
// there is (rbd rm copes with a missing header) and create it anew. A
// whole image (created since) is kept.
func (m *image) recreate(size uint64, opts *rbd.ImageOptions) error {
	img, err := rbd.OpenImage(m.b.io, m.name, rbd.NoSnapshot)
	if err == nil {
		return img.Close()
	}
	if !notFound(err) {
		return fmt.Errorf("exists but does not open: %w", err)
	}
	m.b.log.Warn("ceph store: removing a half-created replica image (a creation cut short) to create it again", "image", m.Name())
	if err := rbd.RemoveImage(m.b.io, m.name); err != nil && !notFound(err) {
		return fmt.Errorf("remove the half-created image: %w", err)
	}
	return rbd.CreateImage(m.b.io, m.name, size, opts)
}

var zeroSector [512]byte

// Zero implements journal.Image with a zero write-same (librbd turns it
// into a zeroing discard), bytes outside whole sectors written as zeroes.
func (m *image) Zero(off, n int64) error {
	if err := m.vm.check(); err != nil {
		return err
	}
	if m.img == nil {
		return fmt.Errorf("%s: not created", m.Name())
	}
	// Past the end there is nothing to zero (a file's fallocate keeps its
	// size too): a later growth reads as zeroes.
	size, err := m.Size()
	if err != nil {
		return fmt.Errorf("%s: size: %w", m.Name(), explain(err))
	}
	if off >= size {
		return nil
	}
	n = min(n, size-off)
	for n > 0 {
		if off%512 != 0 || n < 512 {
			c := min(n, 512-off%512)
			if _, err := rbdWrite(m.img, zeroSector[:c], off); err != nil {
				return err
			}
			off, n = off+c, n-c
			continue
		}
		c := min(n-n%512, 1<<30)
		got, err := m.img.WriteSame(uint64(off), uint64(c), zeroSector[:], 0)
		if err == nil && got != c {
			err = io.ErrShortWrite
		}
		if err != nil {
			return fmt.Errorf("%s: zero %d bytes at %d: %w", m.Name(), c, off, explain(err))
		}
		off, n = off+c, n-c
	}
	return nil
}

func (m *image) Sync() error {
	if m.img == nil {
		return nil
	}
	return m.img.Flush()
}

func (m *image) Close() error {
	if m.img == nil {
		return nil
	}
	return m.img.Close()
}

// target makes recovered volumes: clones of a snapshot of each replica.
type target struct {
	s    *vmStore
	snap string // pos-N: the replicas at the applied position
	tag  string // rec-T: this recovery
}

func (t *target) cloneName(vol string) string { return imageName(t.s.vm, vol) + "." + t.tag }

// CopyImage implements journal.Target: snapshot src (once per applied
// position: the replica does not change while Materialize holds the
// applier), protect it, clone it.
func (t *target) CopyImage(_ context.Context, vol string, src journal.Image, size int64) (journal.Image, error) {
	si, ok := src.(*image)
	if !ok || si.img == nil {
		return nil, fmt.Errorf("%s: not a replica image of this store", src.Name())
	}
	snap := si.img.GetSnapshot(t.snap)
	if _, err := si.img.CreateSnapshot(t.snap); err != nil && !isErrno(err, unix.EEXIST) {
		return nil, fmt.Errorf("snapshot %s@%s: %w", si.Name(), t.snap, explain(err))
	}
	if prot, err := snap.IsProtected(); err != nil {
		return nil, fmt.Errorf("snapshot %s@%s: %w", si.Name(), t.snap, explain(err))
	} else if !prot {
		if err := snap.Protect(); err != nil && !isErrno(err, unix.EBUSY) {
			return nil, fmt.Errorf("protect %s@%s: %w", si.Name(), t.snap, explain(err))
		}
	}
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := opts.SetUint64(rbd.ImageOptionFeatures, rbd.FeatureLayering); err != nil {
		return nil, err
	}
	name := t.cloneName(vol)
	if err := rbd.CloneImage(t.s.b.io, si.name, t.snap, t.s.b.io, name, opts); err != nil {
		if isErrno(err, unix.EEXIST) {
			return nil, fmt.Errorf("clone %s: %w", name, fs.ErrExist)
		}
		return nil, fmt.Errorf("clone %s@%s to %s: %w", si.Name(), t.snap, name, explain(err))
	}
	img, err := rbd.OpenImage(t.s.b.io, name, rbd.NoSnapshot)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", name, explain(err))
	}
	out := &image{b: t.s.b, vm: t.s, name: name, img: img}
	if cur, err := out.Size(); err == nil && cur != size {
		err = img.Resize(uint64(size))
		if err != nil {
			img.Close()
			return nil, err
		}
	}
	return out, nil
}

// CreateImage implements journal.Target: a volume added after the base
// is created by its first resize.
func (t *target) CreateImage(vol string) (journal.Image, error) {
	name := t.cloneName(vol)
	if img, err := rbd.OpenImage(t.s.b.io, name, rbd.NoSnapshot); err == nil {
		img.Close()
		return nil, fmt.Errorf("%s: %w", name, fs.ErrExist)
	}
	return &image{b: t.s.b, vm: t.s, name: name}, nil
}

func (t *target) Sync() error { return nil }

// LeaseErr implements hub.LeaseHolder: why the hub's lease on the VM was
// lost, or nil.
func (s *vmStore) LeaseErr() error { return s.check() }
