//go:build ceph

package ceph

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/mapper"
)

// Built reports whether this binary was built with Ceph support.
const Built = true

// mountTimeout bounds the wait for the monitors when connecting, so that
// an unreachable cluster fails a table load instead of hanging it
// (librados's client_mount_timeout, seconds).
const mountTimeout = "15"

// Opener opens rbd: names as mapper backends over one cluster
// connection, made at the first Open. Every table line that names the
// same image (and snapshot, and mode) shares one open image, so their
// flushes coalesce and two writers in this process never fight over the
// image's exclusive lock. Its methods may be called concurrently.
type Opener struct {
	cfg Config
	log *slog.Logger

	mu     sync.Mutex
	conn   *rados.Conn
	ioctxs map[ioctxKey]*rados.IOContext
	images map[imageKey]*image
	closed bool
}

type ioctxKey struct{ pool, ns string }

type imageKey struct {
	spec     Spec
	readOnly bool
}

// NewOpener returns an Opener for the cluster c describes; c has been
// validated.
func NewOpener(c Config, log *slog.Logger) *Opener {
	if log == nil {
		log = slog.Default()
	}
	return &Opener{cfg: c, log: log, ioctxs: map[ioctxKey]*rados.IOContext{}, images: map[imageKey]*image{}}
}

// Open opens the image name (rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]). A
// snapshot opens only read-only. A missing pool, namespace, image or
// snapshot is mapper.ErrNotFound, a malformed name or a writable
// snapshot mapper.ErrInvalid, each naming what is wrong.
func (o *Opener) Open(name string, readOnly bool) (mapper.Backend, error) {
	s, err := ParseSpec(name)
	if err != nil {
		return nil, err
	}
	if s.Snap != "" && !readOnly {
		return nil, mapper.Errorf(mapper.ErrInvalid, "%s: snapshot %q is read-only: load the table read-only", name, s.Snap)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return nil, mapper.Errorf(mapper.ErrInvalid, "%s: the Ceph connection is closed", name)
	}
	key := imageKey{s, readOnly}
	img := o.images[key]
	if img == nil {
		if img, err = o.openImage(name, s, readOnly); err != nil {
			return nil, err
		}
		o.images[key] = img
	}
	img.refs++
	return &handle{image: img, name: name, o: o, key: key}, nil
}

// connect makes the cluster connection; o.mu is held.
func (o *Opener) connect() (*rados.Conn, error) {
	if o.conn != nil {
		return o.conn, nil
	}
	conn, err := Connect(o.cfg)
	if err != nil {
		return nil, err
	}
	o.log.Info("connected to the Ceph cluster", "client", "client."+o.cfg.id(), "conf", orDefault(o.cfg.Conf))
	o.conn = conn
	return conn, nil
}

// Connect connects to the cluster c describes, as client.ID with its
// keyring, giving up after 15 s without the monitors. The caller shuts
// the connection down. Errors say which client and conf, and what a
// permission error means.
func Connect(c Config) (*rados.Conn, error) {
	id := c.id()
	where := fmt.Sprintf("client.%s, conf %s", id, orDefault(c.Conf))
	conn, err := rados.NewConnWithUser(id)
	if err != nil {
		return nil, fmt.Errorf("ceph connection (%s): %w", where, err)
	}
	if c.Conf != "" {
		err = conn.ReadConfigFile(c.Conf)
	} else {
		err = conn.ReadDefaultConfigFile()
	}
	if err != nil {
		conn.Shutdown()
		return nil, fmt.Errorf("ceph connection (%s): read conf: %w", where, err)
	}
	if c.Keyring != "" {
		if err := conn.SetConfigOption("keyring", c.Keyring); err != nil {
			conn.Shutdown()
			return nil, fmt.Errorf("ceph connection (%s): keyring %s: %w", where, c.Keyring, err)
		}
	}
	if err := conn.SetConfigOption("client_mount_timeout", mountTimeout); err != nil {
		conn.Shutdown()
		return nil, fmt.Errorf("ceph connection (%s): %w", where, err)
	}
	if err := conn.Connect(); err != nil {
		conn.Shutdown()
		return nil, mapper.WithClass(fmt.Errorf("ceph connection (%s): connect: %w", where, explain(err)), mapper.ErrIO)
	}
	return conn, nil
}

func orDefault(conf string) string {
	if conf == "" {
		return "default"
	}
	return conf
}

// ioctx returns the I/O context of a pool and namespace; o.mu is held.
func (o *Opener) ioctx(name string, s Spec) (*rados.IOContext, error) {
	k := ioctxKey{s.Pool, s.Namespace}
	if io := o.ioctxs[k]; io != nil {
		return io, nil
	}
	conn, err := o.connect()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	io, err := conn.OpenIOContext(s.Pool)
	if err != nil {
		if errors.Is(err, rados.ErrNotFound) {
			return nil, mapper.Errorf(mapper.ErrNotFound, "%s: pool %q not found", name, s.Pool)
		}
		return nil, classify(fmt.Errorf("%s: pool %q: %w", name, s.Pool, explain(err)))
	}
	if s.Namespace != "" {
		exists, err := rbd.NamespaceExists(io, s.Namespace)
		if err != nil {
			io.Destroy()
			return nil, classify(fmt.Errorf("%s: namespace %q: %w", name, s.Namespace, explain(err)))
		}
		if !exists {
			io.Destroy()
			return nil, mapper.Errorf(mapper.ErrNotFound, "%s: namespace %q not found in pool %q", name, s.Namespace, s.Pool)
		}
		io.SetNamespace(s.Namespace)
	}
	o.ioctxs[k] = io
	return io, nil
}

// openImage opens an image; o.mu is held.
func (o *Opener) openImage(name string, s Spec, readOnly bool) (*image, error) {
	io, err := o.ioctx(name, s)
	if err != nil {
		return nil, err
	}
	snap := rbd.NoSnapshot
	if s.Snap != "" {
		snap = s.Snap
	}
	var img *rbd.Image
	if readOnly {
		img, err = rbd.OpenImageReadOnly(io, s.Image, snap)
	} else {
		img, err = rbd.OpenImage(io, s.Image, snap)
	}
	if err != nil {
		if errors.Is(err, rbd.ErrNotFound) {
			if s.Snap != "" && imageExists(io, s.Image) {
				return nil, mapper.Errorf(mapper.ErrNotFound, "%s: snapshot %q of image %q not found", name, s.Snap, s.Image)
			}
			return nil, mapper.Errorf(mapper.ErrNotFound, "%s: image %q not found in pool %q%s", name, s.Image, s.Pool, inNamespace(s))
		}
		return nil, classify(fmt.Errorf("%s: open image: %w", name, explain(err)))
	}
	size, err := img.GetSize()
	if err != nil {
		img.Close()
		return nil, classify(fmt.Errorf("%s: size: %w", name, explain(err)))
	}
	id, err := img.GetId()
	if err != nil {
		img.Close()
		return nil, classify(fmt.Errorf("%s: image id: %w", name, explain(err)))
	}
	b := &image{img: img, name: name, identity: identity{pool: io.GetPoolID(), ns: s.Namespace, id: id, snap: s.Snap}}
	b.size.Store(int64(size))
	o.log.Info("rbd image opened", "image", name, "size", size, "readonly", readOnly)
	return b, nil
}

func inNamespace(s Spec) string {
	if s.Namespace == "" {
		return ""
	}
	return fmt.Sprintf(" namespace %q", s.Namespace)
}

// imageExists reports whether the image opens without a snapshot.
func imageExists(io *rados.IOContext, name string) bool {
	img, err := rbd.OpenImageReadOnly(io, name, rbd.NoSnapshot)
	if err != nil {
		return false
	}
	img.Close()
	return true
}

// release drops one reference to an open image; the last closes it.
func (o *Opener) release(key imageKey) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	img := o.images[key]
	if img == nil {
		return nil
	}
	img.refs--
	if img.refs > 0 {
		return nil
	}
	delete(o.images, key)
	return img.close()
}

// Close closes the cluster connection. Backends still open are closed
// first (their writes flushed).
func (o *Opener) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return nil
	}
	o.closed = true
	var errs []error
	for k, img := range o.images {
		errs = append(errs, img.close())
		delete(o.images, k)
	}
	for k, io := range o.ioctxs {
		io.Destroy()
		delete(o.ioctxs, k)
	}
	if o.conn != nil {
		o.conn.Shutdown()
		o.conn = nil
	}
	return errors.Join(errs...)
}

// errnoOf returns the positive errno of a go-ceph error, or 0.
func errnoOf(err error) int {
	var ce interface{ ErrorCode() int }
	if errors.As(err, &ce) {
		if c := ce.ErrorCode(); c < 0 {
			return -c
		}
	}
	return 0
}

// explain adds a hint to a permission error: the client lacks caps.
func explain(err error) error {
	switch unix.Errno(errnoOf(err)) {
	case unix.EPERM, unix.EACCES:
		return fmt.Errorf("permission denied (the client's key or caps do not allow this; an RBD client needs mon 'profile rbd' and osd 'profile rbd pool=POOL'): %w", err)
	case unix.ETIMEDOUT:
		return fmt.Errorf("timed out reaching the monitors (is the cluster up and mon host right?): %w", err)
	}
	return err
}

// classify gives an error its mapper class by errno.
func classify(err error) error {
	switch unix.Errno(errnoOf(err)) {
	case unix.ENOENT:
		return mapper.WithClass(err, mapper.ErrNotFound)
	case unix.EPERM, unix.EACCES, unix.EINVAL:
		return mapper.WithClass(err, mapper.ErrInvalid)
	case unix.EBUSY:
		return mapper.WithClass(err, mapper.ErrBusy)
	}
	return mapper.WithClass(err, mapper.ErrIO)
}

// id returns the client id to connect as.
func (c Config) id() string {
	if c.ID == "" {
		return DefaultID
	}
	return c.ID
}
