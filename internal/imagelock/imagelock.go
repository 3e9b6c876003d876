// Package imagelock takes QEMU's image locks on image files and block
// devices: vhostdm on every file its devices open, repagent-hub on the
// replicas it keeps.
//
// QEMU, qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon mark the
// images they open with open file description (OFD) locks on single
// bytes, so that two programs that would corrupt each other's view of an
// image do not use it at once (QEMU's block/file-posix.c, "image
// locking"): a shared lock on byte 100+i says "I hold permission i", one
// on byte 200+i says "I do not share permission i", where i is 0 for
// consistent reads, 1 for writes, 2 for writes that leave the content
// unchanged and 3 for resizing. Before using an image a program takes its
// own bytes, then tests (F_OFD_GETLK) whether another holds a byte that
// forbids what it wants. A guest disk in QEMU holds consistent read (and
// write, when writable) and does not share write: a second writer, a
// `qemu-img convert` into the image or one that reads it without -U then
// fails with "Failed to get ... lock. Is another process using the
// image?".
//
// Lock takes the same bytes as such a guest disk. The locks are advisory:
// a program that does not take them (dd, cp) writes anyway. They are held
// on a descriptor of their own per file (device and inode), shared by
// every user in the process, so that the process never conflicts with
// itself: a file opened read-only by one user and read-write by another
// holds the write byte while a writer has it.
package imagelock

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// Mode is whether an image carries the locks (QEMU's file driver's
// locking option).
type Mode uint8

// The modes.
const (
	// Auto locks where the file system supports OFD locks and goes
	// without them elsewhere (logged at INFO).
	Auto Mode = iota
	// On locks, and fails where the file system cannot.
	On
	// Off takes no locks.
	Off
)

// Parse parses "auto" (or ""), "on" or "off".
func Parse(s string) (Mode, error) {
	switch s {
	case "", "auto":
		return Auto, nil
	case "on":
		return On, nil
	case "off":
		return Off, nil
	}
	return Auto, fmt.Errorf("locking %q: want \"auto\", \"on\" or \"off\"", s)
}

func (m Mode) String() string {
	switch m {
	case On:
		return "on"
	case Off:
		return "off"
	}
	return "auto"
}

// ErrInUse is the class of the errors that say another process uses the
// image in a way that forbids this use.
var ErrInUse = errors.New("the image is in use")

// The permissions of QEMU's image locking and their lock bytes.
const (
	permConsistentRead = 0
	permWrite          = 1
	lockPermBase       = 100 // byte lockPermBase+i: permission i held
	lockSharedBase     = 200 // byte lockSharedBase+i: permission i not shared
)

// permName is QEMU's name of permission i, as its errors say it.
var permName = [...]string{permConsistentRead: "consistent read", permWrite: "write"}

// fileID is a file's identity: its device and inode.
type fileID struct{ dev, ino uint64 }

// lock is the locks of one file: a descriptor of their own and the users
// of the file that hold them.
type lock struct {
	fd      int // -1: the file system does not take OFD locks (Auto)
	name    string
	refs    int // users holding the lock
	writers int // of which writers
}

// registry is the process's locks, by file: OFD locks of two descriptors
// of one process conflict as those of two processes do, so every user in
// the process shares them.
var registry = struct {
	mu   sync.Mutex
	byID map[fileID]*lock
}{byID: map[fileID]*lock{}}

// Lock takes the image locks of the open file fd (name says which in
// errors and logs) for a reader, or a writer when write is set, and
// returns what releases them (nil for Off): call it after the user's last
// write. Another process that forbids this use gives an error wrapping
// ErrInUse that names the permission and the lock byte.
func Lock(fd int, name string, write bool, mode Mode, log *slog.Logger) (release func(), err error) {
	if mode == Off {
		return nil, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("%s: stat: %w", name, err)
	}
	id := fileID{uint64(st.Dev), st.Ino}
	registry.mu.Lock()
	defer registry.mu.Unlock()
	l := registry.byID[id]
	fresh := l == nil
	if fresh {
		if l, err = newLock(fd, name, mode, log); err != nil {
			return nil, err
		}
		registry.byID[id] = l
	}
	// The bytes are checked when they are taken: a later user of what
	// the process already holds has nothing new to check (another
	// process checks against these bytes when it comes).
	firstWriter := write && l.writers == 0 && l.fd >= 0
	if firstWriter {
		err = l.setWrite(true)
	}
	if err == nil && (fresh || firstWriter) {
		err = l.check(write || l.writers > 0)
		if err != nil && firstWriter {
			l.setWrite(false)
		}
	}
	if err != nil {
		if l.refs == 0 {
			l.close(id)
		}
		return nil, err
	}
	l.refs++
	if write {
		l.writers++
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			registry.mu.Lock()
			defer registry.mu.Unlock()
			l.refs--
			if write {
				l.writers--
				if l.writers == 0 && l.refs > 0 && l.fd >= 0 {
					l.setWrite(false) // unlocking cannot conflict
				}
			}
			if l.refs == 0 {
				l.close(id)
			}
		})
	}, nil
}

// newLock opens a descriptor of fd's file for its locks and takes the
// bytes every user holds: consistent read held, write not shared. Where
// the file system does not take OFD locks, Auto goes without (fd -1) and
// On fails.
func newLock(fd int, name string, mode Mode, log *slog.Logger) (*lock, error) {
	// The same inode as fd's, whatever happened to the path since.
	lfd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(fd), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		lfd, err = unix.Open(name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: open for its image lock: %w", name, err)
	}
	for _, off := range []int64{lockPermBase + permConsistentRead, lockSharedBase + permWrite} {
		if err = setLock(lfd, off, unix.F_RDLCK); err != nil {
			break
		}
	}
	switch {
	case err == nil:
		return &lock{fd: lfd, name: name}, nil
	case errors.Is(err, unix.EAGAIN):
		unix.Close(lfd)
		return nil, fmt.Errorf("%s: %w: another process holds a write lock on its lock bytes", name, ErrInUse)
	case mode == Auto && (errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOLCK) || errors.Is(err, unix.EINVAL)):
		unix.Close(lfd)
		if log != nil {
			log.Info("the file system does not take OFD locks: the image goes without QEMU's image locks", "path", name, "err", err)
		}
		return &lock{fd: -1, name: name}, nil
	}
	unix.Close(lfd)
	return nil, fmt.Errorf("%s: image lock (locking = \"on\"): %w", name, err)
}

// setWrite takes (or drops) the byte that says the process holds the
// write permission; registry.mu held.
func (l *lock) setWrite(on bool) error {
	typ := int16(unix.F_UNLCK)
	if on {
		typ = unix.F_RDLCK
	}
	if err := setLock(l.fd, lockPermBase+permWrite, typ); err != nil {
		if errors.Is(err, unix.EAGAIN) {
			return fmt.Errorf("%s: %w: another process holds a write lock on its lock bytes", l.name, ErrInUse)
		}
		return fmt.Errorf("%s: image lock: %w", l.name, err)
	}
	return nil
}

// check tests, as QEMU does after taking its bytes, whether another
// process forbids what this one holds: a permission it does not share
// (consistent read; write when write is set), or one it holds that this
// process does not share (write). registry.mu held.
func (l *lock) check(write bool) error {
	if l.fd < 0 {
		return nil
	}
	perms := []int{permConsistentRead}
	if write {
		perms = append(perms, permWrite)
	}
	for _, p := range perms {
		held, err := lockedByOther(l.fd, lockSharedBase+int64(p))
		if err != nil {
			return fmt.Errorf("%s: image lock: %w", l.name, err)
		}
		if held {
			return fmt.Errorf("%s: %w: another process does not share the %q permission (QEMU's image lock byte %d)",
				l.name, ErrInUse, permName[p], lockSharedBase+p)
		}
	}
	held, err := lockedByOther(l.fd, lockPermBase+permWrite)
	if err != nil {
		return fmt.Errorf("%s: image lock: %w", l.name, err)
	}
	if held {
		return fmt.Errorf("%s: %w: another process holds the %q permission (QEMU's image lock byte %d)",
			l.name, ErrInUse, permName[permWrite], lockPermBase+permWrite)
	}
	return nil
}

// close releases the file's locks; registry.mu held.
func (l *lock) close(id fileID) {
	if l.fd >= 0 {
		unix.Close(l.fd)
		l.fd = -1
	}
	delete(registry.byID, id)
}

// setLock sets (typ F_RDLCK) or clears (F_UNLCK) an OFD lock on byte off
// of fd, without waiting.
func setLock(fd int, off int64, typ int16) error {
	fl := unix.Flock_t{Type: typ, Start: off, Len: 1}
	for {
		err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &fl)
		if err != unix.EINTR {
			return err
		}
	}
}

// lockedByOther reports whether another open file description holds a
// lock on byte off that an exclusive lock through fd would conflict with.
func lockedByOther(fd int, off int64) (bool, error) {
	fl := unix.Flock_t{Type: unix.F_WRLCK, Start: off, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &fl); err != nil {
		return false, err
	}
	return fl.Type != unix.F_UNLCK, nil
}
