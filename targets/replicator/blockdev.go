package replicator

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// The blockdev site link: a site whose devices are block devices, files
// or mapper devices reachable from this host (iSCSI, FC, NBD, a local
// disk). Parameters:
//
//	<slink_nr> [sync|async [ios <N> | size <N>[s|k|m|g|t|p|e] | timeout <N>[s|m|h|d]]]
//
// with lvm2's spellings synchronous, asynchronous and data (for size)
// accepted as well and echoed back as given. Without a policy a site is
// sync. A bare size is in sectors, a bare timeout in seconds.
func init() {
	SiteLinkTypes.Register("blockdev", &SiteLinkType{Name: "blockdev", Version: [3]int{1, 0, 0}, New: newBlockdevLink})
}

// maxSlinkNr bounds site numbers.
const maxSlinkNr = 1023

type blockdevLink struct {
	nr     uint32
	policy Policy
	words  []string // the parameters as given, for TABLE
}

func newBlockdevLink(c *mapper.Ctx, args []string) (SiteLink, error) {
	if len(args) != 1 && len(args) != 2 && len(args) != 4 {
		return nil, fmt.Errorf("blockdev: want <slink_nr> [sync|async [ios|size|timeout <N>]], got %d parameters", len(args))
	}
	nr, err := mapper.ParseUint("slink number", args[0], 0, maxSlinkNr)
	if err != nil {
		return nil, err
	}
	l := &blockdevLink{nr: uint32(nr), policy: Policy{Sync: true}, words: args}
	if len(args) >= 2 {
		switch args[1] {
		case "sync", "synchronous":
		case "async", "asynchronous":
			l.policy.Sync = false
		default:
			return nil, fmt.Errorf("slink policy %q: not sync or async", args[1])
		}
	}
	if len(args) == 4 {
		if l.policy.Sync {
			return nil, fmt.Errorf("fall-behind %q: only async site links fall behind", args[2])
		}
		v := args[3]
		switch args[2] {
		case "ios":
			if l.policy.IOs, err = mapper.ParseUint("fall-behind ios", v, 1, 1<<32); err != nil {
				return nil, err
			}
		case "size", "data":
			if l.policy.Bytes, err = parseSize(v); err != nil {
				return nil, err
			}
		case "timeout":
			if l.policy.Timeout, err = parseTimeout(v); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("fall-behind %q: not ios, size or timeout", args[2])
		}
	}
	if l.nr == 0 && !l.policy.Sync {
		return nil, fmt.Errorf("slink policy %q: slink 0 (the local site) must be sync", args[1])
	}
	return l, nil
}

// parseSize parses "200m": a number with a unit s, k, m, g, t, p or e
// (sectors or powers of 1024 bytes); a bare number is sectors.
func parseSize(s string) (uint64, error) {
	num, unit := splitUnit(s)
	shift := map[string]uint{"": 9, "s": 9, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
	sh, ok := shift[strings.ToLower(unit)]
	if !ok {
		return 0, fmt.Errorf("fall-behind size %q: unit %q is not s, k, m, g, t, p or e", s, unit)
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil || n == 0 || n > (1<<63)>>sh {
		return 0, fmt.Errorf("fall-behind size %q: not a positive size", s)
	}
	return n << sh, nil
}

// parseTimeout parses "30s": a number with a unit s, m, h or d; a bare
// number is seconds.
func parseTimeout(s string) (int64, error) {
	num, unit := splitUnit(s)
	units := map[string]time.Duration{"": time.Second, "s": time.Second, "m": time.Minute, "h": time.Hour, "d": 24 * time.Hour}
	u, ok := units[strings.ToLower(unit)]
	if !ok {
		return 0, fmt.Errorf("fall-behind timeout %q: unit %q is not s, m, h or d", s, unit)
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil || n == 0 || n > uint64(1<<62)/uint64(u) {
		return 0, fmt.Errorf("fall-behind timeout %q: not a positive duration", s)
	}
	return int64(n) * int64(u), nil
}

func splitUnit(s string) (num, unit string) {
	i := len(s)
	for i > 0 && (s[i-1] < '0' || s[i-1] > '9') {
		i--
	}
	return s[:i], s[i:]
}

func (l *blockdevLink) Nr() uint32     { return l.nr }
func (l *blockdevLink) Policy() Policy { return l.policy }
func (l *blockdevLink) DevParams() int { return 1 }

func (l *blockdevLink) Table() string {
	return fmt.Sprintf("blockdev %d %s", len(l.words), strings.Join(l.words, " "))
}

func (l *blockdevLink) OpenDevice(c *mapper.Ctx, params []string) (SiteDevice, error) {
	if len(params) != 1 {
		return nil, fmt.Errorf("slink %d: blockdev devices take 1 parameter (dev_path), got %d", l.nr, len(params))
	}
	b, err := c.Open(params[0])
	if err != nil {
		return nil, fmt.Errorf("slink %d device %s: %w", l.nr, params[0], err)
	}
	return &blockdevDevice{b: b}, nil
}

// blockdevDevice is a Backend as a site device.
type blockdevDevice struct{ b mapper.Backend }

func (d *blockdevDevice) Apply(op mapper.Op, sector, sectors uint64, data []byte) error {
	off := int64(sector) << mapper.SectorShift
	n := int64(sectors) << mapper.SectorShift
	switch op {
	case mapper.OpWrite:
		return d.b.WriteAt([][]byte{data}, off)
	case mapper.OpDiscard:
		// Discard is replicated as zeroing, so that every site reads
		// the same afterwards whatever its storage does on discard.
		return d.b.WriteZeroes(off, n, true)
	case mapper.OpWriteZeroes:
		return d.b.WriteZeroes(off, n, false)
	}
	return fmt.Errorf("%s: cannot apply %s: %w", d.b.Name(), op, mapper.ErrUnsupported)
}

func (d *blockdevDevice) ReadAt(bufs [][]byte, off int64) error { return d.b.ReadAt(bufs, off) }
func (d *blockdevDevice) Flush() error                          { return d.b.Flush() }
func (d *blockdevDevice) Table() []string                       { return []string{d.b.Name()} }

func (d *blockdevDevice) Sectors() (uint64, error) {
	n, err := d.b.Size()
	return uint64(n) >> mapper.SectorShift, err
}

// backend returns the device's Backend, for the table's size checks.
func (d *blockdevDevice) backend() mapper.Backend { return d.b }
