// Package unixsock creates the daemons' listening unix sockets (vhost-user
// exports, QMP) safely:
//
//   - A socket that answers a connect belongs to a running server and is
//     never replaced; only a stale socket file (connection refused) is.
//     Anything other than a socket at the path is an error.
//   - The socket has its configured owner, group and mode from the first
//     instant it is reachable at its path: it is bound inside a private
//     (0700) directory next to the path, chmod-ed and chown-ed there, and
//     then moved into place with a rename that never replaces a file. The
//     process umask is not touched, so concurrent goroutines are unaffected.
//   - Check and replace happen under an flock on the socket's directory, so
//     two daemons started at once cannot both take the same path.
//   - Close removes the socket file only while it is still this listener's
//     (same inode), never a newer server's socket.
package unixsock

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultMode is a socket's mode when none is configured: only the owner
// (the daemon's user, or Perm.Owner) may connect.
const DefaultMode fs.FileMode = 0o600

// ErrInUse is returned (wrapped, with syscall.EADDRINUSE) when a server
// answers on the socket path.
var ErrInUse = errors.New("a running server answers on this socket")

// Perm is the ownership and mode of a socket file. The zero value is the
// daemon's own user and group with DefaultMode.
type Perm struct {
	Owner string      // user name or numeric uid; "" keeps the daemon's
	Group string      // group name or numeric gid; "" keeps the daemon's
	Mode  fs.FileMode // permission bits (at most 0777); 0 is DefaultMode
}

// Check resolves p's user and group and checks its mode, as Listen will.
func (p Perm) Check() error {
	_, _, err := p.resolve()
	return err
}

func (p Perm) resolve() (uid, gid int, err error) {
	uid, gid = -1, -1
	if p.Mode&^fs.ModePerm != 0 {
		return 0, 0, fmt.Errorf("socket-mode %#o: only permission bits (at most 0777) are allowed", uint32(p.Mode))
	}
	if p.Owner != "" {
		if uid, err = LookupUser(p.Owner); err != nil {
			return 0, 0, err
		}
	}
	if p.Group != "" {
		if gid, err = LookupGroup(p.Group); err != nil {
			return 0, 0, err
		}
	}
	return uid, gid, nil
}

func (p Perm) mode() fs.FileMode {
	if p.Mode == 0 {
		return DefaultMode
	}
	return p.Mode
}

// ParseMode parses an octal permission mode such as "0660" or "660"; ""
// is DefaultMode.
func ParseMode(s string) (fs.FileMode, error) {
	if s == "" {
		return DefaultMode, nil
	}
	n, err := strconv.ParseUint(s, 8, 32)
	if err != nil || n > 0o777 {
		return 0, fmt.Errorf("socket-mode %q: want an octal mode from 0000 to 0777, such as \"0660\"", s)
	}
	if n == 0 {
		// Zero would mean "default" in Perm; nobody could connect anyway.
		return 0, fmt.Errorf("socket-mode %q: nobody could connect to the socket", s)
	}
	return fs.FileMode(n), nil
}

// LookupUser returns the uid of a user name or numeric uid.
func LookupUser(s string) (int, error) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return int(n), nil
	}
	u, err := user.Lookup(s)
	if err != nil {
		return 0, fmt.Errorf("socket-owner %q: no such user", s)
	}
	return strconv.Atoi(u.Uid)
}

// LookupGroup returns the gid of a group name or numeric gid.
func LookupGroup(s string) (int, error) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return int(n), nil
	}
	g, err := user.LookupGroup(s)
	if err != nil {
		return 0, fmt.Errorf("socket-group %q: no such group", s)
	}
	return strconv.Atoi(g.Gid)
}

// Listener is a listening unix socket created by Listen.
type Listener struct {
	*net.UnixListener
	path     string
	dev, ino uint64
	once     sync.Once
}

// Addr returns the socket's path (not the private name it was bound
// under).
func (l *Listener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

// Path returns the socket's path.
func (l *Listener) Path() string { return l.path }

// Close stops listening and removes the socket file if it is still this
// listener's.
func (l *Listener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() {
		unlock, lerr := lockDir(filepath.Dir(l.path))
		if lerr == nil {
			defer unlock()
		}
		var st unix.Stat_t
		if unix.Lstat(l.path, &st) == nil && st.Dev == l.dev && st.Ino == l.ino {
			os.Remove(l.path)
		}
	})
	return err
}

// probeTimeout bounds the connect that tells a live socket from a stale
// one.
const probeTimeout = 2 * time.Second

// Listen listens on the unix socket path with the ownership and mode of p
// (see the package documentation).
func Listen(path string, p Perm) (*Listener, error) {
	fail := func(err error) (*Listener, error) { return nil, fmt.Errorf("listen %s: %w", path, err) }
	if path == "" {
		return nil, errors.New("listen: empty socket path")
	}
	uid, gid, err := p.resolve()
	if err != nil {
		return fail(err)
	}
	dir := filepath.Dir(path)
	unlock, err := lockDir(dir)
	if err != nil {
		return fail(err)
	}
	defer unlock()
	if err := removeStale(path); err != nil {
		return fail(err)
	}
	tmpDir, err := os.MkdirTemp(dir, ".sock")
	if err != nil {
		return fail(err)
	}
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, "s")
	bindName := tmp
	if len(bindName) >= len(unix.RawSockaddrUnix{}.Path) {
		// A long directory: bind through the directory's fd, whose
		// /proc/self/fd name is short.
		df, err := os.Open(tmpDir)
		if err != nil {
			return fail(err)
		}
		defer df.Close()
		bindName = fmt.Sprintf("/proc/self/fd/%d/s", df.Fd())
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: bindName, Net: "unix"})
	if err != nil {
		return fail(err)
	}
	ln.SetUnlinkOnClose(false)
	ok := false
	defer func() {
		if !ok {
			ln.Close()
		}
	}()
	if err := os.Chmod(tmp, p.mode()); err != nil {
		return fail(err)
	}
	if uid != -1 || gid != -1 {
		if err := os.Lchown(tmp, uid, gid); err != nil {
			return fail(fmt.Errorf("set socket owner/group (%s:%s): %w", p.Owner, p.Group, err))
		}
	}
	if err := renameNoReplace(tmp, path); err != nil {
		return fail(err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		os.Remove(path)
		return fail(err)
	}
	ok = true
	return &Listener{UnixListener: ln, path: path, dev: st.Dev, ino: st.Ino}, nil
}

// removeStale removes a socket file at path that no server answers on.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return errors.New("exists and is not a socket")
	}
	c, err := net.DialTimeout("unix", path, probeTimeout)
	if err == nil {
		c.Close()
		return fmt.Errorf("%w (%w)", ErrInUse, syscall.EADDRINUSE)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		// EACCES, a timeout (a live server with a full backlog) ...:
		// the socket may be in use; leave it.
		return fmt.Errorf("cannot tell whether the existing socket is in use, leaving it: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// renameNoReplace moves from to to, failing if to exists.
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// A file system without RENAME_NOREPLACE: link fails on an
		// existing name, too.
		if err = os.Link(from, to); err == nil {
			return nil
		}
	}
	if errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("%s appeared while the socket was created: %w", to, fs.ErrExist)
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
	}
	return nil
}

// lockDir takes an exclusive flock on dir, held by every Listen and Close
// of a socket in it.
func lockDir(dir string) (func(), error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	for {
		err = unix.Flock(fd, unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "flock", Path: dir, Err: err}
	}
	return func() { unix.Close(fd) }, nil
}
