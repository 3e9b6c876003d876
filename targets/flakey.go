package targets

import (
	"fmt"
	"strings"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// flakey passes I/O on for <up interval> seconds, then misbehaves for
// <down interval> seconds, and so on, counted from when the table was
// loaded (kernel dm-flakey 1.5, used to test how filesystems survive
// failing and lying disks).
//
//	flakey <dev> <offset> <up_interval> <down_interval> [<#features> [drop_writes | error_writes] [corrupt_bio_byte <Nth_byte> <r|w> <value> <flags>]]
//
// While down, with no feature, every request fails with an I/O error.
// drop_writes acknowledges writes (and discards, write-zeroes and flushes)
// without doing them and lets reads through; error_writes fails them and
// lets reads through. corrupt_bio_byte <N> w <value> <flags> writes <value>
// as the Nth byte (from 1) of every write's data, and ... r ... puts it in
// the Nth byte of every read's data, for requests whose flags include all
// of <flags>; other requests pass. drop_writes and error_writes exclude
// each other and a corrupt_bio_byte on writes. Feature names are matched
// without regard to case, as the kernel does.
//
// <flags> is matched against the kernel 6.1 bio flags of the request: the
// operation (read 0, write 1, flush 1 with REQ_PREFLUSH, discard 3,
// write-zeroes 9) ORed with REQ_SYNC (1<<11) and REQ_FUA (1<<17) for FUA
// writes, REQ_PREFLUSH (1<<18) and REQ_SYNC for flushes, and REQ_NOUNMAP
// (1<<26) for write-zeroes that must not deallocate; 0 matches everything.
//
// INFO:  "" (empty).
// TABLE: "254:16 0 5 0 0", or "254:16 0 0 5 5 corrupt_bio_byte 32 w 1 0"
// (the feature count, then the features, always in this order).
//
// Unlike the kernel, which ignores arguments after the feature group,
// vhostdm refuses them; and a write is corrupted in a copy, never in the
// submitter's memory.
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "flakey", Version: [3]int{1, 5, 0}, New: newFlakey})
}

// Kernel 6.1 bio flag bits used by corrupt_bio_byte's <flags>.
const (
	reqOpWrite       = 1
	reqOpDiscard     = 3
	reqOpWriteZeroes = 9
	reqSync          = 1 << 11
	reqFUA           = 1 << 17
	reqPreflush      = 1 << 18
	reqNoUnmap       = 1 << 26
)

// flakeyNow is the clock of the up/down cycle; tests replace it.
var flakeyNow = time.Now

type flakey struct {
	dev      mapper.Backend
	offset   uint64    // sectors into dev
	length   uint64    // sectors
	up, down uint64    // seconds
	start    time.Time // when the table was loaded

	dropWrites, errorWrites bool
	corruptByte             uint64 // 1-based; 0 = feature off
	corruptWrite            bool   // w (else r)
	corruptValue            byte
	corruptFlags            uint64
}

func newFlakey(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) < 4 {
		return nil, fmt.Errorf("want at least 4 arguments <dev> <offset> <up> <down>, got %d", len(args))
	}
	a := mapper.NewArgs(args)
	path, _ := a.Next("device")
	t := &flakey{length: c.Length, start: flakeyNow()}
	var err error
	if t.offset, err = a.Sector("device offset"); err != nil {
		return nil, err
	}
	if t.offset+c.Length > mapper.MaxSector {
		return nil, fmt.Errorf("device offset %d + length %d: beyond the largest device", t.offset, c.Length)
	}
	if t.up, err = a.Uint("up interval", 0, 1<<32-1); err != nil {
		return nil, err
	}
	if t.down, err = a.Uint("down interval", 0, 1<<32-1); err != nil {
		return nil, err
	}
	switch {
	case t.up+t.down == 0:
		return nil, fmt.Errorf("up interval + down interval is zero")
	case t.up+t.down > 1<<32-1:
		return nil, fmt.Errorf("up interval %d + down interval %d: overflows 32 bits", t.up, t.down)
	}
	if err := t.parseFeatures(a); err != nil {
		return nil, err
	}
	if t.dev, err = c.Open(path); err != nil {
		return nil, err
	}
	return t, nil
}

// parseFeatures reads the optional feature group as the kernel's
// parse_features does, refusing duplicates and conflicts by name.
func (t *flakey) parseFeatures(a *mapper.Args) error {
	if a.Len() == 0 {
		return nil
	}
	n, err := a.Uint("feature count", 0, 6)
	if err != nil {
		return err
	}
	if n > uint64(a.Len()) {
		return fmt.Errorf("feature count %d: only %d arguments follow", n, a.Len())
	}
	left := int(n)
	for left > 0 {
		name, _ := a.Next("feature")
		left--
		switch {
		case strings.EqualFold(name, "drop_writes"):
			if t.dropWrites {
				return fmt.Errorf("feature drop_writes duplicated")
			}
			if t.errorWrites {
				return fmt.Errorf("feature drop_writes conflicts with feature error_writes")
			}
			t.dropWrites = true
		case strings.EqualFold(name, "error_writes"):
			if t.errorWrites {
				return fmt.Errorf("feature error_writes duplicated")
			}
			if t.dropWrites {
				return fmt.Errorf("feature error_writes conflicts with feature drop_writes")
			}
			t.errorWrites = true
		case strings.EqualFold(name, "corrupt_bio_byte"):
			if left < 4 {
				return fmt.Errorf("feature corrupt_bio_byte: want 4 arguments <Nth_byte> <r|w> <value> <flags>, got %d", left)
			}
			left -= 4
			if t.corruptByte, err = a.Uint("corrupt_bio_byte byte", 1, 1<<32-1); err != nil {
				return err
			}
			dir, _ := a.Next("corrupt_bio_byte direction")
			switch {
			case strings.EqualFold(dir, "w"):
				t.corruptWrite = true
			case strings.EqualFold(dir, "r"):
				t.corruptWrite = false
			default:
				return fmt.Errorf("corrupt_bio_byte direction %q: must be r or w", dir)
			}
			v, err := a.Uint("corrupt_bio_byte value", 0, 255)
			if err != nil {
				return err
			}
			t.corruptValue = byte(v)
			if t.corruptFlags, err = a.Uint("corrupt_bio_byte flags", 0, 1<<32-1); err != nil {
				return err
			}
		default:
			return fmt.Errorf("feature %q: unknown", name)
		}
	}
	if t.corruptByte > 0 && t.corruptWrite {
		if t.dropWrites {
			return fmt.Errorf("drop_writes is incompatible with corrupt_bio_byte with the WRITE flag set")
		}
		if t.errorWrites {
			return fmt.Errorf("error_writes is incompatible with corrupt_bio_byte with the WRITE flag set")
		}
	}
	return a.Done()
}

// isDown reports whether the target is in a down interval: whole seconds
// since the table was loaded, modulo the cycle, past the up interval.
func (t *flakey) isDown() bool {
	elapsed := uint64(flakeyNow().Sub(t.start) / time.Second)
	return elapsed%(t.up+t.down) >= t.up
}

// opFlags returns the kernel bio flags corrupt_bio_byte's <flags> match.
func opFlags(r *mapper.Request) uint64 {
	switch r.Op {
	case mapper.OpWrite:
		if r.FUA {
			return reqOpWrite | reqSync | reqFUA
		}
		return reqOpWrite
	case mapper.OpFlush:
		return reqOpWrite | reqSync | reqPreflush
	case mapper.OpDiscard:
		return reqOpDiscard
	case mapper.OpWriteZeroes:
		if !r.Unmap {
			return reqOpWriteZeroes | reqNoUnmap
		}
		return reqOpWriteZeroes
	}
	return 0
}

func (t *flakey) corrupts(r *mapper.Request, write bool) bool {
	return t.corruptByte > 0 && t.corruptWrite == write && r.Data != nil &&
		opFlags(r)&t.corruptFlags == t.corruptFlags && t.corruptByte <= uint64(mapper.BufsLen(r.Data))
}

func (t *flakey) Map(r *mapper.Request) error {
	sector := t.offset + r.Sector
	if !t.isDown() {
		return mapper.MapBackend(t.dev, sector, r)
	}
	if r.Op == mapper.OpRead {
		if t.corruptByte == 0 && !t.dropWrites && !t.errorWrites {
			return mapper.Errorf(mapper.ErrIO, "flakey device is down")
		}
		if err := mapper.MapBackend(t.dev, sector, r); err != nil {
			return err
		}
		if t.corrupts(r, false) {
			t.corrupt(r.Data)
		}
		return nil
	}
	switch {
	case t.dropWrites:
		return nil
	case t.errorWrites:
		return mapper.Errorf(mapper.ErrIO, "flakey device is down: %s failed", r.Op)
	case t.corruptByte > 0:
		if t.corrupts(r, true) {
			// Corrupt a copy: the data belongs to the submitter.
			buf := make([]byte, mapper.BufsLen(r.Data))
			off := 0
			for _, b := range r.Data {
				off += copy(buf[off:], b)
			}
			t.corrupt([][]byte{buf})
			c := *r
			c.Data = [][]byte{buf}
			return mapper.MapBackend(t.dev, sector, &c)
		}
		return mapper.MapBackend(t.dev, sector, r)
	}
	return mapper.Errorf(mapper.ErrIO, "flakey device is down")
}

// corrupt sets the configured byte of bufs, whichever buffer it falls in.
func (t *flakey) corrupt(bufs [][]byte) {
	n := t.corruptByte - 1
	for _, b := range bufs {
		if n < uint64(len(b)) {
			b[n] = t.corruptValue
			return
		}
		n -= uint64(len(b))
	}
}

func (t *flakey) Status(kind mapper.StatusKind) string {
	if kind != mapper.StatusTable {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %d %d %d ", t.dev.Name(), t.offset, t.up, t.down)
	n := 0
	if t.dropWrites || t.errorWrites {
		n++
	}
	if t.corruptByte > 0 {
		n += 5
	}
	fmt.Fprintf(&b, "%d", n)
	if t.dropWrites {
		b.WriteString(" drop_writes")
	} else if t.errorWrites {
		b.WriteString(" error_writes")
	}
	if t.corruptByte > 0 {
		dir := 'r'
		if t.corruptWrite {
			dir = 'w'
		}
		fmt.Fprintf(&b, " corrupt_bio_byte %d %c %d %d", t.corruptByte, dir, t.corruptValue, t.corruptFlags)
	}
	return b.String()
}

func (t *flakey) Close() error { return nil }

// Areas lists the one area of the device the target uses.
func (t *flakey) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	return fn(t.dev, t.offset, t.length)
}
