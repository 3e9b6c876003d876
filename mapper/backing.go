package mapper

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io/fs"
	"slices"
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
	// Size is a regular file's size in bytes; Mtime and Ctime its last
	// modification and status change. A write to the file moves both;
	// only Ctime cannot be set back from user space. A block device's
	// node does not change when the device is written: for one, only a
	// change of device shows.
	Size         int64
	Mtime, Ctime time.Time
}

// SameStorage reports whether f and g are the same file or block device.
func (f BackingFile) SameStorage(g BackingFile) bool {
	return f.Dev == g.Dev && f.Ino == g.Ino && f.Block == g.Block
}

// Unchanged reports whether f and g are the same storage with the same
// size and times: nothing wrote a regular file between the two looks.
func (f BackingFile) Unchanged(g BackingFile) bool {
	return f.SameStorage(g) && f.Size == g.Size && f.Mtime.Equal(g.Mtime) && f.Ctime.Equal(g.Ctime)
}

// Backing returns what d's live table maps now; the files are looked at
// (fstat) at the call.
func (d *Device) Backing() (Backing, error) {
	var out Backing
	h := sha256.New()
	seen := map[*Device]bool{}
	files := map[*fileBackend]bool{}
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
		for _, b := range t.opened {
			switch b := b.(type) {
			case *deviceBackend:
				if err := walk(b.d); err != nil {
					return err
				}
			case *fileHandle:
				if files[b.fileBackend] {
					continue
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
		}
		return nil
	}
	d.mu.Lock()
	err := walk(d)
	d.mu.Unlock()
	if err != nil {
		return Backing{}, err
	}
	h.Sum(out.Table[:0])
	return out, nil
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
		return f
	}
	f.Size = st.Size
	f.Mtime = time.Unix(st.Mtim.Unix())
	f.Ctime = time.Unix(st.Ctim.Unix())
	return f
}
