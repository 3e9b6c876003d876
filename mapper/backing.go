package mapper

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Backing says what a device's live table maps: enough to tell, after the
// daemon stopped and started again, whether the device still reaches the
// same storage and whether that storage was written in between. The
// replication agent compares it across restarts and reloads: a protected
// volume whose backing changed cannot trust its replica (see
// repagent/agent).
type Backing struct {
	// Table is a SHA-256 over the live table's lines (start, length,
	// target type and arguments) and, depth first, those of the devices
	// it stacks on: two devices with equal Table map the same way. The
	// digest, not the text, is kept, since arguments may hold keys.
	Table [sha256.Size]byte
	// Files are the files and block devices the tables open, in the
	// order first opened, each once.
	Files []BackingFile
	// Opaque names the backends of other kinds (a scheme such as rbd:),
	// whose content cannot be identified from here.
	Opaque []string
}

// BackingFile is a file or block device a table opens.
type BackingFile struct {
	Path string
	// Dev and Ino identify a regular file (st_dev, st_ino); a block
	// device has Block set, Dev its device number (st_rdev) and Ino 0.
	Dev, Ino uint64
	Block    bool
	// Size is the file's or block device's size in bytes.
	Size int64
	// Mtime and Ctime are a regular file's last modification and
	// status change. A write to the file moves both; only Ctime cannot
	// be set back from user space.
	Mtime, Ctime time.Time
	// Written is a block device's count of 512-byte sectors written and
	// discarded since the host started, as the kernel's I/O statistics
	// give it (/sys/dev/block/MAJ:MIN/stat), and Boot the host's boot
	// identifier (/proc/sys/kernel/random/boot_id) when it was read.
	// Every write to the device moves the count, whoever makes it and
	// through whichever node, but a restart of the host starts it again;
	// a block device's node keeps its times when the device is written.
	// Boot is empty where the count cannot be read.
	Written uint64 `json:",omitempty"`
	Boot    string `json:",omitempty"`
}

// SameStorage reports whether f and g are the same file or block device.
func (f BackingFile) SameStorage(g BackingFile) bool {
	return f.Dev == g.Dev && f.Ino == g.Ino && f.Block == g.Block
}

// Comparable reports whether f and g, two looks at the same storage, can
// tell whether it was written in between: always for a regular file; for
// a block device only within one run of the host, whose write count they
// both hold.
func (f BackingFile) Comparable(g BackingFile) bool {
	return !f.Block || f.Boot != "" && f.Boot == g.Boot
}

// Unchanged reports whether f and g are the same storage with the same
// size and, for a regular file, the same times, for a block device the
// same write count: nothing wrote it between the two looks (which must be
// Comparable).
func (f BackingFile) Unchanged(g BackingFile) bool {
	return f.SameStorage(g) && f.Size == g.Size && f.Mtime.Equal(g.Mtime) && f.Ctime.Equal(g.Ctime) &&
		f.Written == g.Written && f.Boot == g.Boot
}

// Backing returns what d's live table maps now; the files are looked at
// (fstat) at the call.
func (d *Device) Backing() (Backing, error) {
	var out Backing
	h := sha256.New()
	files := map[*fileBackend]bool{}
	err := d.walkBackends(func(t *Table) {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(t.lines)))
		h.Write(n[:])
		for _, l := range t.lines {
			fmt.Fprintf(h, "%d %d %q", l.Start, l.Length, l.Type)
			for _, a := range l.Args {
				fmt.Fprintf(h, " %q", a)
			}
			h.Write([]byte{'\n'})
		}
	}, func(b Backend) error {
		switch b := b.(type) {
		case *fileHandle:
			if files[b.fileBackend] {
				return nil
			}
			files[b.fileBackend] = true
			f, err := b.fileBackend.backingFile()
			if err != nil {
				return err
			}
			out.Files = append(out.Files, f)
		default:
			if !slices.Contains(out.Opaque, b.Name()) {
				out.Opaque = append(out.Opaque, b.Name())
			}
		}
		return nil
	})
	if err != nil {
		return Backing{}, err
	}
	h.Sum(out.Table[:0])
	return out, nil
}

// walkBackends calls tab with the live table of d and, depth first, of
// every device it stacks on (each once), and leaf with each backend they
// open that is not a device; d.mu is held throughout.
func (d *Device) walkBackends(tab func(*Table), leaf func(Backend) error) error {
	seen := map[*Device]bool{}
	var walk func(x *Device) error
	walk = func(x *Device) error {
		if seen[x] {
			return nil
		}
		seen[x] = true
		t := x.live.Load()
		if t == nil {
			return fmt.Errorf("%s: %w", x.name, ErrNoTable)
		}
		if tab != nil {
			tab(t)
		}
		for _, b := range t.opened {
			if db, ok := b.(*deviceBackend); ok {
				if err := walk(db.d); err != nil {
					return err
				}
				continue
			}
			if err := leaf(b); err != nil {
				return err
			}
		}
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return walk(d)
}

// Marker is a Backend over storage that cannot be looked at as a file (an
// rbd: image) but can keep a mark of its contents: a later look tells
// whether anything wrote the storage since, whoever did. The replication
// agent marks a protected volume's storage when the daemon stops writing
// it and compares at the next start (see Device.MarkBacking).
type Marker interface {
	Backend
	// Mark makes every write completed so far durable and marks the
	// storage's contents as they are now, under tag (a mark with the
	// same tag is replaced). The token names the mark; "" when the
	// storage cannot change (a snapshot, a read-only open) and there
	// is nothing to compare.
	Mark(tag string) (token string, err error)
	// ChangedSince says how the storage changed since the mark token
	// ("" if it did not) and drops the mark. A mark that is gone
	// cannot be compared: that is said as a change.
	ChangedSince(token string) (string, error)
}

// BackingMark is the mark a Marker backend keeps of its storage.
type BackingMark struct {
	Backend string `json:"backend"` // the backend's Name
	Token   string `json:"token,omitempty"`
}

// MarkBacking marks, under tag, the storage of every Marker backend that
// d's live table (and the devices it stacks on) opens, each once by name:
// call it after the last write. Marks made before an error are returned
// with it. The device's lock is held meanwhile: a reload waits.
func (d *Device) MarkBacking(tag string) ([]BackingMark, error) {
	var marks []BackingMark
	err := d.walkMarkers(func(m Marker) error {
		tok, err := m.Mark(tag)
		if err != nil {
			return fmt.Errorf("mark %s: %w", m.Name(), err)
		}
		marks = append(marks, BackingMark{Backend: m.Name(), Token: tok})
		return nil
	})
	return marks, err
}

// walkMarkers calls fn with each Marker backend of d's live table and the
// devices it stacks on, once per name; d.mu is held throughout.
func (d *Device) walkMarkers(fn func(Marker) error) error {
	seen := map[string]bool{}
	return d.walkBackends(nil, func(b Backend) error {
		m, ok := b.(Marker)
		if !ok || seen[b.Name()] {
			return nil
		}
		seen[b.Name()] = true
		return fn(m)
	})
}

// ChangedSince compares the storage of d's Marker backends with marks
// (MarkBacking's) and drops them: it says how the storage changed, ""
// if it did not. A Marker backend without a mark cannot be compared and
// is said to have changed; a mark of a backend the table no longer opens
// is ignored (the table's digest tells that change).
func (d *Device) ChangedSince(marks []BackingMark) (string, error) {
	var why []string
	err := d.walkMarkers(func(m Marker) error {
		i := slices.IndexFunc(marks, func(x BackingMark) bool { return x.Backend == m.Name() })
		if i < 0 {
			why = append(why, fmt.Sprintf("vhostdm holds no mark of %s from when it stopped writing it: whether it was written since cannot be told", m.Name()))
			return nil
		}
		if marks[i].Token == "" {
			return nil // it cannot change
		}
		w, err := m.ChangedSince(marks[i].Token)
		if err != nil {
			return fmt.Errorf("compare %s with its mark: %w", m.Name(), err)
		}
		if w != "" {
			why = append(why, w)
		}
		return nil
	})
	return strings.Join(why, "; "), err
}

// backingFile describes the open file b.
func (b *fileBackend) backingFile() (BackingFile, error) {
	var st unix.Stat_t
	if err := unix.Fstat(b.fd, &st); err != nil {
		return BackingFile{}, fmt.Errorf("stat %s: %w", b.f.Name(), err)
	}
	return backingFileOf(b.f.Name(), &st), nil
}

// StatBacking describes the file or block device at path as Backing
// would, following symbolic links.
func StatBacking(path string) (BackingFile, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return BackingFile{}, &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	return backingFileOf(path, &st), nil
}

func backingFileOf(path string, st *unix.Stat_t) BackingFile {
	f := BackingFile{Path: path, Dev: uint64(st.Dev), Ino: st.Ino}
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		f.Block, f.Dev, f.Ino = true, uint64(st.Rdev), 0
		f.Size, f.Written, f.Boot = blockCounts(st.Rdev)
		return f
	}
	f.Size = st.Size
	f.Mtime = time.Unix(st.Mtim.Unix())
	f.Ctime = time.Unix(st.Ctim.Unix())
	return f
}

// Where blockCounts reads.
const (
	sysBlock = "/sys/dev/block"
	bootID   = "/proc/sys/kernel/random/boot_id"
)

// blockCounts returns the size in bytes of the block device rdev, the
// sectors written to and discarded from it since the host started, and
// the host's boot identifier; boot is "" when the counts cannot be read
// (no sysfs, a kernel without the statistics).
func blockCounts(rdev uint64) (size int64, written uint64, boot string) {
	dir := fmt.Sprintf("%s/%d:%d", sysBlock, unix.Major(rdev), unix.Minor(rdev))
	b, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return 0, 0, ""
	}
	// Documentation/block/stat.rst: field 7 is the sectors written, 14
	// (Linux 4.18 and later) the sectors discarded. Write-zeroes count
	// as writes.
	fields := strings.Fields(string(b))
	if len(fields) < 7 {
		return 0, 0, ""
	}
	for _, i := range []int{6, 13} {
		if i >= len(fields) {
			break
		}
		n, err := strconv.ParseUint(fields[i], 10, 64)
		if err != nil {
			return 0, 0, ""
		}
		written += n
	}
	sb, err := os.ReadFile(dir + "/size")
	if err != nil {
		return 0, 0, ""
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(sb)), 10, 64)
	if err != nil {
		return 0, 0, ""
	}
	id, err := os.ReadFile(bootID)
	if err != nil {
		return 0, 0, ""
	}
	return sectors * 512, written, strings.TrimSpace(string(id))
}
