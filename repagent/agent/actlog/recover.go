package actlog

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Range is a byte range of a volume.
type Range struct {
	Off, Len uint64
}

// Recovery is what [Open] found in the log: per volume of the [Config], what
// the agent must resync.
type Recovery struct {
	// Clean is true when the log was closed clean: nothing is dirty.
	Clean bool
	// Err is nil when the log was trusted; otherwise it wraps
	// [ErrUntrusted] and says why, and every volume is Full.
	Err error
	// Volumes has one entry per volume of the Config, in its order.
	Volumes []VolumeRecovery
}

// VolumeRecovery is the resync one volume needs.
type VolumeRecovery struct {
	Name string
	// Full is true when the whole volume must be resynchronised; Reason
	// says why.
	Full   bool
	Reason string
	// Ranges are the extents that were hot, merged, in the new log's
	// extent size, clipped to the volume (none when Full).
	Ranges []Range
	// Bytes is the sum of the lengths of Ranges, or the volume size when
	// Full.
	Bytes uint64
}

// replayed is the state a trusted log holds.
type replayed struct {
	hdr     header
	entries []uint64
	clean   bool
	lastSeq uint64
}

// readLog reads and replays the log file f.
func readLog(f *os.File) (*replayed, error) {
	hb := make([]byte, blockSize)
	if _, err := f.ReadAt(hb, 0); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("header: file shorter than %d bytes", blockSize)
		}
		return nil, fmt.Errorf("read header: %w", err)
	}
	h, err := decodeHeader(hb)
	if err != nil {
		return nil, err
	}
	ring := make([]byte, blockSize*h.geo.slots)
	if n, err := f.ReadAt(ring, blockSize); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("geometry: ring of %d slots needs %d bytes, file has %d", h.geo.slots, len(ring), n)
		}
		return nil, fmt.Errorf("read ring: %w", err)
	}
	txns := make([]*txn, h.geo.slots)
	var newest *txn
	for pos := range txns {
		t, err := decodeSlot(ring[pos*blockSize:(pos+1)*blockSize], &h, pos)
		if err != nil {
			continue // a torn, stale or corrupt slot: its neighbours decide
		}
		txns[pos] = t
		if newest == nil || t.seq > newest.seq {
			newest = t
		}
	}
	if newest == nil {
		return nil, fmt.Errorf("no valid transaction in %d slots", h.geo.slots)
	}
	// Walk back over consecutive transaction numbers.
	oldest := newest.seq
	for n := 1; n < h.geo.slots && oldest > 1; n++ {
		t := txns[(oldest-1)%uint64(h.geo.slots)]
		if t == nil || t.seq != oldest-1 {
			break
		}
		oldest--
	}
	r := &replayed{hdr: h, entries: make([]uint64, h.geo.extents), lastSeq: newest.seq, clean: newest.kind == kindClean}
	known := make([]bool, h.geo.extents)
	for s := oldest; s <= newest.seq; s++ {
		t := txns[s%uint64(h.geo.slots)]
		if t.kind == kindClean {
			for i := range r.entries {
				r.entries[i], known[i] = emptyEntry, true
			}
		}
		for _, u := range t.updates {
			r.entries[u.elem], known[u.elem] = u.entry, true
		}
		for i, e := range t.context {
			j := (int(t.ctxStart) + i) % h.geo.extents
			r.entries[j], known[j] = e, true
		}
	}
	if n := len(known) - countTrue(known); n > 0 {
		return nil, fmt.Errorf("transactions %d..%d leave %d of %d elements unknown (torn or corrupt slots)", oldest, newest.seq, n, h.geo.extents)
	}
	return r, nil
}

func countTrue(b []bool) int {
	n := 0
	for _, v := range b {
		if v {
			n++
		}
	}
	return n
}

// Open opens the activity log at path for the volumes of cfg, creating it if
// it does not exist, and reports what the agent must resync (see the
// package documentation). It always leaves a fresh, trusted log behind: the
// recovered extents are hot and held (release each with [Log.Clean] once the
// hub has acknowledged its resync), and Full volumes stay flagged until
// [Log.FullResyncDone]. Open fails only when cfg is invalid or the new log
// cannot be written.
func Open(path string, cfg Config) (*Log, *Recovery, error) {
	geo, err := cfg.geometry()
	if err != nil {
		return nil, nil, fmt.Errorf("activity log %s: %w", path, err)
	}
	rec := &Recovery{Volumes: make([]VolumeRecovery, len(cfg.Volumes))}
	for i, v := range cfg.Volumes {
		rec.Volumes[i].Name = v.Name
	}
	var old *replayed
	epoch := uint64(time.Now().UnixNano())
	f, err := os.Open(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		rec.Err = fmt.Errorf("%w: %s does not exist", ErrUntrusted, path)
	case err != nil:
		rec.Err = fmt.Errorf("%w: %w", ErrUntrusted, err)
	default:
		old, err = readLog(f)
		f.Close()
		if err != nil {
			rec.Err = fmt.Errorf("%w: %s: %w", ErrUntrusted, path, err)
		} else {
			epoch = old.hdr.epoch + 1
			rec.Clean = old.clean
		}
	}

	l := newLog(path, cfg, geo)
	if old == nil {
		for i := range rec.Volumes {
			rec.Volumes[i].Full, rec.Volumes[i].Reason = true, rec.Err.Error()
		}
	} else {
		l.install(old, rec)
	}
	for i := range rec.Volumes {
		v := &rec.Volumes[i]
		if v.Full {
			l.vols[i].full = true
			v.Ranges, v.Bytes = nil, cfg.Volumes[i].Size
		}
	}
	if err := l.create(epoch); err != nil {
		return nil, nil, fmt.Errorf("activity log %s: %w", path, err)
	}
	return l, rec, nil
}

// install puts the extents of the old log into l's elements as hot and held,
// and fills rec with them.
func (l *Log) install(old *replayed, rec *Recovery) {
	byName := make(map[string]int, len(old.hdr.vols))
	for i, v := range old.hdr.vols {
		byName[v.name] = i
	}
	// Byte ranges per new volume.
	ranges := make([][]Range, len(l.vols))
	for i := range l.vols {
		oi, ok := byName[l.vols[i].name]
		switch {
		case !ok:
			rec.Volumes[i].Full, rec.Volumes[i].Reason = true, "volume was not in the activity log"
		case old.hdr.vols[oi].flags&flagFullResync != 0:
			rec.Volumes[i].Full, rec.Volumes[i].Reason = true, "a full resync was still pending when the agent stopped"
		}
	}
	for _, e := range old.entries {
		if e == emptyEntry {
			continue
		}
		name := old.hdr.vols[entryVol(e)].name
		for i := range l.vols {
			if l.vols[i].name == name && !rec.Volumes[i].Full {
				off := entryExt(e) << old.hdr.geo.shift
				ranges[i] = append(ranges[i], Range{off, old.hdr.geo.extentSize})
			}
		}
	}
	n := 0
	type ve struct {
		vol int
		ext uint64
	}
	var todo []ve
	for i := range l.vols {
		size := l.vols[i].size
		var exts []uint64
		for _, r := range ranges[i] {
			if r.Off >= size {
				continue
			}
			end := min(r.Off+r.Len, size)
			for x := r.Off >> l.geo.shift; x<<l.geo.shift < end; x++ {
				exts = append(exts, x)
			}
		}
		slices.Sort(exts)
		exts = slices.Compact(exts)
		if n+len(exts) > l.geo.extents {
			rec.Volumes[i].Full = true
			rec.Volumes[i].Reason = fmt.Sprintf("%d recovered extents do not fit al-extents %d", n+len(exts), l.geo.extents)
			continue
		}
		n += len(exts)
		v := &rec.Volumes[i]
		for _, x := range exts {
			todo = append(todo, ve{i, x})
			off := x << l.geo.shift
			r := Range{off, min(l.geo.extentSize, size-off)}
			if k := len(v.Ranges); k > 0 && v.Ranges[k-1].Off+v.Ranges[k-1].Len == r.Off {
				v.Ranges[k-1].Len += r.Len
			} else {
				v.Ranges = append(v.Ranges, r)
			}
			v.Bytes += r.Len
		}
	}
	for _, t := range todo {
		if rec.Volumes[t.vol].Full {
			continue
		}
		i := l.lruTail
		l.unlink(i)
		el := &l.elems[i]
		el.key, el.diskKey, el.state, el.held = entry(t.vol, t.ext), entry(t.vol, t.ext), stateHot, true
		l.index[el.key] = i
		l.pushFront(i)
	}
}

// create writes a fresh log file for l's state with the given epoch
// (temporary file, fsync, rename, fsync of the directory) and opens it.
func (l *Log) create(epoch uint64) error {
	l.epoch = epoch
	hb, err := l.encodeHeader()
	if err != nil {
		return err
	}
	buf := make([]byte, l.geo.fileSize())
	copy(buf, hb)
	// The first window of transactions names every element.
	w := window(l.geo.extents)
	var t txn
	for s := 1; s <= w; s++ {
		t = txn{seq: uint64(s), kind: kindUpdate}
		l.fillContext(&t)
		off := slotOffset(t.seq, l.geo.slots)
		encodeSlot(buf[off:off+blockSize], epoch, &t)
	}
	l.seq = uint64(w)
	dir := filepath.Dir(l.path)
	tmp, err := os.CreateTemp(dir, filepath.Base(l.path)+".new*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if _, err := tmp.Write(buf); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), l.path); err != nil {
		return err
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	f, err := os.OpenFile(l.path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	l.f = f
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
