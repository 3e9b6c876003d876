package mapper

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// Image locking. QEMU, qemu-img, qemu-nbd and qemu-storage-daemon mark the
// image files and block devices they open with open file description
// (OFD) locks on single bytes, so that two programs that would corrupt
// each other's view of an image do not use it at once (QEMU's
// block/file-posix.c, "image locking"): a shared lock on byte 100+i says
// "I hold permission i", one on byte 200+i says "I do not share
// permission i", where i is 0 for consistent reads, 1 for writes, 2 for
// writes that leave the content unchanged and 3 for resizing. Before
// using an image a program takes its own bytes, then tests (F_OFD_GETLK)
// whether another holds a byte that forbids what it wants. A guest disk
// in QEMU holds consistent read (and write, when writable) and does not
// share write: a second writer, a `qemu-img convert` into the image or a
// `qemu-img info` without -U then fails with "Failed to get ... lock. Is
// another process using the image?".
//
// vhostdm takes the same bytes for every file and block device its
// devices open, so that the QEMU tools refuse to write (or read without
// -U) an image vhostdm serves, and a vhostdm table over an image another
// vhostdm or a QEMU program is using fails to load. The locks are
// advisory: a program that does not take them (dd, cp, a database)
// writes anyway. They are held on a descriptor of their own per file
// (device and inode), shared by every device of the process, so that the
// process never conflicts with itself: a file opened read-only by one
// device and read-write by another holds the write bytes while a writer
// has it open.

// LockMode is whether a device's files carry QEMU's image locks (its
// locking option, as QEMU's file driver's).
type LockMode uint8

// The lock modes.
const (
	// LockAuto locks where the file system supports OFD locks and
	// goes without them elsewhere (logged).
	LockAuto LockMode = iota
	// LockOn locks, and fails the open where the file system cannot.
	LockOn
	// LockOff takes no locks.
	LockOff
)

// ParseLockMode parses "auto" (or ""), "on" or "off".
func ParseLockMode(s string) (LockMode, error) {
	switch s {
	case "", "auto":
		return LockAuto, nil
	case "on":
		return LockOn, nil
	case "off":
		return LockOff, nil
	}
	return LockAuto, Errorf(ErrInvalid, "locking %q: want \"auto\", \"on\" or \"off\"", s)
}

func (l LockMode) String() string {
	switch l {
	case LockOn:
		return "on"
	case LockOff:
		return "off"
	}
	return "auto"
}

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

// imageLock is the locks of one file: a descriptor of their own and the
// opens of the file that hold them.
type imageLock struct {
	fd      int // -1: the file system does not take OFD locks (LockAuto)
	path    string
	refs    int // opens holding the lock
	writers int // of which read-write
}

// imageLocks is the process's image locks, by file. It is a registry:
// every Manager of the process shares it, since OFD locks of two
// descriptors of one process conflict as those of two processes do.
var imageLocks = struct {
	mu   sync.Mutex
	byID map[fileID]*imageLock
}{byID: map[fileID]*imageLock{}}

// lockImage takes the image locks of the open file b (read-only or not)
// for mode, and returns what releases them (nil for LockOff). A file
// another process uses in a way that forbids this use is ErrBusy, naming
// the permission.
func lockImage(b *fileBackend, readOnly bool, mode LockMode, log *slog.Logger) (func(), error) {
	if mode == LockOff {
		return nil, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(b.fd, &st); err != nil {
		return nil, fmt.Errorf("%s: stat: %w", b.name, err)
	}
	id := fileID{uint64(st.Dev), st.Ino}
	imageLocks.mu.Lock()
	defer imageLocks.mu.Unlock()
	l := imageLocks.byID[id]
	if l == nil {
		var err error
		if l, err = newImageLock(b, mode, log); err != nil {
			return nil, err
		}
		imageLocks.byID[id] = l
	}
	if !readOnly && l.writers == 0 && l.fd >= 0 {
		if err := l.setWrite(true); err != nil {
			if l.refs == 0 {
				l.close(id)
			}
			return nil, err
		}
	}
	if err := l.check(!readOnly || l.writers > 0); err != nil {
		if !readOnly && l.writers == 0 && l.fd >= 0 {
			l.setWrite(false)
		}
		if l.refs == 0 {
			l.close(id)
		}
		return nil, err
	}
	l.refs++
	if !readOnly {
		l.writers++
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			imageLocks.mu.Lock()
			defer imageLocks.mu.Unlock()
			l.refs--
			if !readOnly {
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

// newImageLock opens a descriptor of b's file for its locks and takes the
// bytes every user holds: consistent read held, write not shared. Where
// the file system does not take OFD locks, LockAuto goes without (fd
// -1) and LockOn fails.
func newImageLock(b *fileBackend, mode LockMode, log *slog.Logger) (*imageLock, error) {
	// The same inode as b's, whatever happened to the path since.
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(b.fd), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		fd, err = unix.Open(b.name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: open for its image lock: %w", b.name, err)
	}
	l := &imageLock{fd: fd, path: b.name}
	for _, off := range []int64{lockPermBase + permConsistentRead, lockSharedBase + permWrite} {
		if err = setLock(fd, off, unix.F_RDLCK); err != nil {
			break
		}
	}
	switch {
	case err == nil:
		return l, nil
	case errors.Is(err, unix.EAGAIN):
		unix.Close(fd)
		return nil, Errorf(ErrBusy, "%s: the image is in use: another process holds a write lock on its lock bytes", b.name)
	case mode == LockAuto && (errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOLCK) || errors.Is(err, unix.EINVAL)):
		unix.Close(fd)
		log.Info("the file system does not take OFD locks: the image is served without QEMU's image locks", "path", b.name, "err", err)
		return &imageLock{fd: -1, path: b.name}, nil
	}
	unix.Close(fd)
	return nil, fmt.Errorf("%s: image lock (locking = \"on\"): %w", b.name, err)
}

// setWrite takes (or drops) the byte that says the process holds the
// write permission; imageLocks.mu held.
func (l *imageLock) setWrite(on bool) error {
	typ := int16(unix.F_UNLCK)
	if on {
		typ = unix.F_RDLCK
	}
	if err := setLock(l.fd, lockPermBase+permWrite, typ); err != nil {
		if errors.Is(err, unix.EAGAIN) {
			return Errorf(ErrBusy, "%s: the image is in use: another process holds a write lock on its lock bytes", l.path)
		}
		return fmt.Errorf("%s: image lock: %w", l.path, err)
	}
	return nil
}

// check tests, as QEMU does after taking its bytes, whether another
// process forbids what this one holds: a permission it does not share
// (consistent read; write when write is true), or one it holds that
// this process does not share (write). imageLocks.mu held.
func (l *imageLock) check(write bool) error {
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
			return fmt.Errorf("%s: image lock: %w", l.path, err)
		}
		if held {
			return Errorf(ErrBusy, "%s: the image is in use: another process does not share the %q permission (QEMU's image lock byte %d); stop it, or set locking = \"off\" on this device",
				l.path, permName[p], lockSharedBase+p)
		}
	}
	held, err := lockedByOther(l.fd, lockPermBase+permWrite)
	if err != nil {
		return fmt.Errorf("%s: image lock: %w", l.path, err)
	}
	if held {
		return Errorf(ErrBusy, "%s: the image is in use: another process holds the %q permission (QEMU's image lock byte %d); stop it, or set locking = \"off\" on this device",
			l.path, permName[permWrite], lockPermBase+permWrite)
	}
	return nil
}

// close releases the file's locks; imageLocks.mu held.
func (l *imageLock) close(id fileID) {
	if l.fd >= 0 {
		unix.Close(l.fd)
		l.fd = -1
	}
	delete(imageLocks.byID, id)
}

// setLock sets (typ F_RDLCK) or clears (F_UNLCK) an OFD lock on byte off
// of fd, without waiting.
func setLock(fd int, off int64, typ int16) error {
	fl := unix.Flock_t{Type: typ, Whence: 0, Start: off, Len: 1}
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
	fl := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: off, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &fl); err != nil {
		return false, err
	}
	return fl.Type != unix.F_UNLCK, nil
}
