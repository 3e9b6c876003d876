package harness

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// The host-side model of device-mapper tables: where each sector of a
// device lives in the backing files, for the targets the e2e configs use
// (linear, striped, zero). It follows the kernel's dm-linear and dm-stripe
// mapping; all units in this file are 512-byte sectors.

// Segment is one table line.
type Segment struct {
	Start, Len int64
	Target     string
	Args       []string
}

// ParseTable parses table text (no validation beyond what the model needs).
func ParseTable(text string) ([]Segment, error) {
	var segs []Segment
	for i, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		if len(f) < 3 {
			return nil, fmt.Errorf("line %d: want <start> <length> <target> [args]", i+1)
		}
		start, err1 := strconv.ParseInt(f[0], 10, 64)
		n, err2 := strconv.ParseInt(f[1], 10, 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("line %d: bad start or length", i+1)
		}
		segs = append(segs, Segment{Start: start, Len: n, Target: f[2], Args: f[3:]})
	}
	return segs, nil
}

// piece is where a run of a segment's sectors lives: a backing path (a
// file or /dev/mapper/NAME) and sector there, or zeros if path is "".
type piece struct {
	path   string
	sector int64
	n      int64
}

// mapRun maps sector x of the segment (relative to its start) and returns
// the longest run from there that is contiguous in one backing.
func (s Segment) mapRun(x int64) (piece, error) {
	left := s.Len - x
	switch s.Target {
	case "zero":
		return piece{n: left}, nil
	case "linear":
		if len(s.Args) != 2 {
			return piece{}, fmt.Errorf("linear: want <dev> <offset>")
		}
		off, err := strconv.ParseInt(s.Args[1], 10, 64)
		if err != nil {
			return piece{}, fmt.Errorf("linear offset: %w", err)
		}
		return piece{path: s.Args[0], sector: off + x, n: left}, nil
	case "striped":
		n, chunk, devs, offs, err := s.striped()
		if err != nil {
			return piece{}, err
		}
		c := x / chunk
		stripe := c % n
		inStripe := c / n
		within := x % chunk
		return piece{path: devs[stripe], sector: offs[stripe] + inStripe*chunk + within, n: min(chunk-within, left)}, nil
	}
	return piece{}, fmt.Errorf("target %q is not in the e2e host model", s.Target)
}

func (s Segment) striped() (n, chunk int64, devs []string, offs []int64, err error) {
	if len(s.Args) < 2 {
		return 0, 0, nil, nil, fmt.Errorf("striped: want <#stripes> <chunk> (<dev> <offset>)+")
	}
	n, err = strconv.ParseInt(s.Args[0], 10, 64)
	if err != nil || n < 1 {
		return 0, 0, nil, nil, fmt.Errorf("striped: bad stripe count %q", s.Args[0])
	}
	chunk, err = strconv.ParseInt(s.Args[1], 10, 64)
	if err != nil || chunk < 1 {
		return 0, 0, nil, nil, fmt.Errorf("striped: bad chunk size %q", s.Args[1])
	}
	if int64(len(s.Args)) != 2+2*n {
		return 0, 0, nil, nil, fmt.Errorf("striped: %d stripes need %d device arguments", n, 2*n)
	}
	for i := int64(0); i < n; i++ {
		o, err := strconv.ParseInt(s.Args[3+2*i], 10, 64)
		if err != nil {
			return 0, 0, nil, nil, fmt.Errorf("striped: bad offset %q", s.Args[3+2*i])
		}
		devs = append(devs, s.Args[2+2*i])
		offs = append(offs, o)
	}
	return n, chunk, devs, offs, nil
}

// DeviceSectors returns the size of a device: the end of its last line.
func (c *Config) DeviceSectors(name string) (int64, error) {
	d, err := c.Device(name)
	if err != nil {
		return 0, err
	}
	segs, err := ParseTable(d.Table)
	if err != nil {
		return 0, fmt.Errorf("device %s: %w", name, err)
	}
	if len(segs) == 0 {
		return 0, fmt.Errorf("device %s: empty table", name)
	}
	last := segs[len(segs)-1]
	return last.Start + last.Len, nil
}

// ReadDevice reads sectors [sector, sector+n) of a device through the
// model from its backing files, as the guest would see them.
func (c *Config) ReadDevice(name string, sector, n int64) ([]byte, error) {
	out := make([]byte, n*512)
	if err := c.readDevice(name, sector, out, 0); err != nil {
		return nil, err
	}
	return out, nil
}

func (c *Config) readDevice(name string, sector int64, out []byte, depth int) error {
	if depth > 16 {
		return fmt.Errorf("device %s: stacking too deep", name)
	}
	d, err := c.Device(name)
	if err != nil {
		return err
	}
	segs, err := ParseTable(d.Table)
	if err != nil {
		return fmt.Errorf("device %s: %w", name, err)
	}
	for len(out) > 0 {
		var seg *Segment
		for i := range segs {
			if sector >= segs[i].Start && sector < segs[i].Start+segs[i].Len {
				seg = &segs[i]
				break
			}
		}
		if seg == nil {
			return fmt.Errorf("device %s: sector %d beyond the table", name, sector)
		}
		p, err := seg.mapRun(sector - seg.Start)
		if err != nil {
			return fmt.Errorf("device %s line at %d: %w", name, seg.Start, err)
		}
		k := min(p.n, int64(len(out))/512)
		part := out[:k*512]
		switch {
		case p.path == "":
			clear(part)
		case strings.HasPrefix(p.path, "/dev/mapper/"):
			if err := c.readDevice(strings.TrimPrefix(p.path, "/dev/mapper/"), p.sector, part, depth+1); err != nil {
				return err
			}
		default:
			if err := readFileAt(c.Path(p.path), part, p.sector*512); err != nil {
				return err
			}
		}
		out = out[k*512:]
		sector += k
	}
	return nil
}

// readFileAt reads len(p) bytes at off; beyond the end of the file reads
// zeros, as a sparse image that was never written there.
func readFileAt(path string, p []byte, off int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := f.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	return err
}

// Images returns every backing file the tables name (not /dev/mapper) with
// the size in bytes it needs, resolved against Dir.
func (c *Config) Images() (map[string]int64, error) {
	need := map[string]int64{}
	for _, d := range c.Devices {
		segs, err := ParseTable(d.Table)
		if err != nil {
			return nil, fmt.Errorf("device %s: %w", d.Name, err)
		}
		for _, s := range segs {
			add := func(path string, endSector int64) {
				if strings.HasPrefix(path, "/dev/") {
					return
				}
				p := c.Path(path)
				need[p] = max(need[p], endSector*512)
			}
			switch s.Target {
			case "linear":
				if len(s.Args) == 2 {
					if off, err := strconv.ParseInt(s.Args[1], 10, 64); err == nil {
						add(s.Args[0], off+s.Len)
					}
				}
			case "striped":
				n, _, devs, offs, err := s.striped()
				if err != nil {
					return nil, fmt.Errorf("device %s: %w", d.Name, err)
				}
				for i := range devs {
					add(devs[i], offs[i]+s.Len/n)
				}
			}
		}
	}
	return need, nil
}

// CreateImages creates missing backing files as sparse files of the size
// the tables need, and grows smaller ones. It returns the files it created.
func (c *Config) CreateImages() ([]string, error) {
	need, err := c.Images()
	if err != nil {
		return nil, err
	}
	var made []string
	for p, size := range need {
		fi, err := os.Stat(p)
		switch {
		case err == nil && fi.Size() >= size:
			continue
		case err == nil && !fi.Mode().IsRegular():
			continue
		case err != nil && !os.IsNotExist(err):
			return made, err
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return made, err
		}
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return made, err
		}
		err = f.Truncate(size)
		f.Close()
		if err != nil {
			return made, err
		}
		made = append(made, p)
	}
	return made, nil
}
