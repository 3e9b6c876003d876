package mapper

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
)

// Line is one parsed line of table text.
type Line struct {
	Num    int // 1-based line number in the text
	Start  uint64
	Length uint64
	Type   string
	Args   []string
}

// Params returns the line's arguments joined by spaces.
func (l Line) Params() string { return strings.Join(l.Args, " ") }

// String formats the line as dmsetup prints it.
func (l Line) String() string {
	return formatLine(l.Start, l.Length, l.Type, l.Params())
}

func formatLine(start, length uint64, typ, params string) string {
	return fmt.Sprintf("%d %d %s %s", start, length, typ, params)
}

// ParseTable parses table text: one target per line, `<start> <length>
// <type> [args...]`, sectors in decimal. Blank lines and lines whose first
// non-blank character is '#' are skipped, as dmsetup does. It checks the
// table-wide rules (first line at 0, no gaps or overlaps, positive lengths,
// known types, singletons) but does not run constructors; BuildTable does.
func ParseTable(text string) ([]Line, error) {
	var lines []Line
	var end uint64
	for i, raw := range strings.Split(text, "\n") {
		num := i + 1
		f := strings.Fields(raw)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		if len(f) < 3 {
			return nil, lineErr(num, "want <start> <length> <target> [args...], got %d field(s)", len(f))
		}
		start, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil || f[0][0] == '+' {
			return nil, lineErr(num, "start %q: not a number", f[0])
		}
		length, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil || f[1][0] == '+' {
			return nil, lineErr(num, "length %q: not a number", f[1])
		}
		switch {
		case length == 0:
			return nil, lineErr(num, "zero-length target")
		case start > MaxSector || length > MaxSector || start+length > MaxSector:
			return nil, lineErr(num, "target %d+%d: beyond the largest device (%d sectors)", start, length, uint64(MaxSector))
		case len(lines) == 0 && start != 0:
			return nil, lineErr(num, "first target starts at %d, must start at 0", start)
		case start > end:
			return nil, lineErr(num, "gap in table: starts at %d, previous target ends at %d", start, end)
		case start < end:
			return nil, lineErr(num, "overlap in table: starts at %d, previous target ends at %d", start, end)
		}
		tt, err := LookupTarget(f[2])
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", num, err)
		}
		lines = append(lines, Line{Num: num, Start: start, Length: length, Type: tt.Name, Args: f[3:]})
		end = start + length
	}
	if len(lines) == 0 {
		return nil, Errorf(ErrInvalid, "empty table")
	}
	for _, l := range lines {
		tt, _ := LookupTarget(l.Type)
		if tt.Features&Singleton != 0 && len(lines) > 1 {
			return nil, lineErr(l.Num, "target type %s must appear alone in table", l.Type)
		}
	}
	return lines, nil
}

func lineErr(num int, format string, args ...any) error {
	return Errorf(ErrInvalid, "line %d: %s", num, fmt.Sprintf(format, args...))
}

// Table is a validated, constructed table: targets tiling [0, Size()).
// A Table is immutable once built; its targets serve I/O concurrently.
type Table struct {
	lines   []Line
	targets []Target
	ends    []uint64 // ends[i] = lines[i].Start + lines[i].Length
	// index narrows Find: index[b] is the line covering sector
	// b<<shift, the first sector of bucket b (with indexWhole set when
	// that line covers the whole bucket), and index[len-1] is the last
	// line. The line of a sector in bucket b is between index[b] and
	// index[b+1]. See buildIndex.
	index []uint32
	shift uint
	// pass holds, for each line whose target is a Passthrough, its
	// backend and the difference between backend and device sectors:
	// TryMap's reads and writes go to the backend from this compact
	// array, without loading the target (nil if no line is one).
	pass []passLine
	// whole holds, for each bucket of the index that one Passthrough
	// line covers whole, that line's backend and difference (nil if no
	// bucket is): a request inside such a bucket costs TryMap one
	// cache line, this entry.
	whole    []passLine
	readOnly bool
	opened   []Backend
}

// passLine is a line of a Table whose target is a Passthrough: a device
// sector s of the line, below end (as ends[i]), is backend sector s+delta
// (modulo 2^64) of b; b is nil for a line of another target. 32 bytes:
// one cache line holds all that TryMap reads of a line.
type passLine struct {
	end   uint64
	delta uint64
	b     Backend
}

// TableOptions are the settings of BuildTable.
type TableOptions struct {
	Device   string                                         // name of the device, for constructors and events
	ReadOnly bool                                           // open backends read-only and refuse writes
	Opener   Opener                                         // resolves backend names
	Event    func(target, kind string, data map[string]any) // receives target events
	Logger   *slog.Logger                                   // for targets' own warnings
	// Shared holds state shared between tables (Manager.Shared).
	Shared func(key any, mk func() any) any
	// MetadataCache is the device's metadata cache option in bytes (0:
	// the targets' defaults), see [MetadataCacher].
	MetadataCache int64
}

// tableOpener opens one table's backends. A mapper device the table names
// more than once counts as one open of it, as the kernel's dm_get_device
// shares one reference per table: `info` shows the kernel's open count.
// A file the table names more than once by the same name is one handle:
// the lines of a 1000-line table over one image share one backend object,
// so that their requests touch the same memory (the open file is shared
// between tables anyway, see Manager.openShared).
type tableOpener struct {
	inner Opener
	held  map[*Device]bool
	files map[fileUse]*fileHandle
	built bool // construction is over: no more sharing of files
}

// fileUse is how a line names a file: the name and the mode.
type fileUse struct {
	name     string
	readOnly bool
}

func (o *tableOpener) OpenBackend(name string, readOnly bool) (Backend, error) {
	b, err := o.inner.OpenBackend(name, readOnly)
	if err != nil {
		return b, err
	}
	switch h := b.(type) {
	case *deviceBackend:
		if o.held[h.d] {
			h.once.Do(h.d.Close) // the table's first open holds it
		}
		o.held[h.d] = true
	case *fileHandle:
		if o.built {
			break
		}
		u := fileUse{name, readOnly}
		if first := o.files[u]; first != nil && first.key == h.key {
			h.Close() // the first handle holds the file
			return first, nil
		}
		o.files[u] = h
	}
	return b, nil
}

// BuildTable parses text and constructs every target. Nothing is kept if any
// line fails: targets already built are closed and their backends released.
// Errors name the line: "line 2: striped: chunk size "7": must be ...".
func BuildTable(text string, o TableOptions) (*Table, error) {
	lines, err := ParseTable(text)
	if err != nil {
		return nil, err
	}
	t := &Table{lines: lines, readOnly: o.ReadOnly}
	opener := o.Opener
	if opener != nil {
		to := &tableOpener{inner: opener, held: map[*Device]bool{}, files: map[fileUse]*fileHandle{}}
		// Backends opened later (a ploop message adding an image) are
		// the target's own to close: they are never shared.
		defer func() { to.built = true }()
		opener = to
	}
	for _, l := range lines {
		tt, _ := LookupTarget(l.Type)
		c := &Ctx{Device: o.Device, Start: l.Start, Length: l.Length, ReadOnly: o.ReadOnly, opener: opener,
			log: o.Logger, shared: o.Shared, MetadataCache: o.MetadataCache}
		if o.Event != nil {
			typ := tt.Name
			c.event = func(kind string, data map[string]any) { o.Event(typ, kind, data) }
		}
		tg, err := newTarget(tt, c, l.Args)
		t.opened = append(t.opened, c.opened...)
		if err == nil {
			t.targets = append(t.targets, tg)
			err = checkAreas(tg)
		}
		if err != nil {
			t.Close()
			if !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrBusy) {
				err = WithClass(err, ErrInvalid)
			}
			return nil, fmt.Errorf("line %d: %s: %w", l.Num, l.Type, err)
		}
		t.ends = append(t.ends, l.Start+l.Length)
	}
	t.buildIndex()
	t.buildPass()
	return t, nil
}

// buildPass fills t.pass from the targets that are Passthroughs, and
// t.whole for the index's buckets that one of them covers whole. A
// request inside such a bucket (on a table of linear lines that are
// multiples of the bucket size, the common case) then costs TryMap one
// cache line, its bucket's entry of whole; a request elsewhere costs the
// index's and pass's, where the ends search and the call of the line's
// target added entries of ends and targets and the target object, one
// after the other: lines that the page-cache copy of every request
// evicts, so a 1000-line table paid for them and a one-line table did not
// (docs/PERFORMANCE.md, row 5).
func (t *Table) buildPass() {
	var pass []passLine
	for i, tg := range t.targets {
		p, ok := tg.(Passthrough)
		if !ok {
			continue
		}
		b, bsector := p.Passthrough()
		if b == nil {
			continue
		}
		if pass == nil {
			pass = make([]passLine, len(t.targets))
		}
		pass[i] = passLine{end: t.ends[i], delta: bsector - t.lines[i].Start, b: b}
	}
	t.pass = pass
	if pass == nil || t.index == nil {
		return
	}
	var whole []passLine
	for b, v := range t.index[:len(t.index)-1] {
		if v&indexWhole == 0 || pass[v&^indexWhole].b == nil {
			continue
		}
		if whole == nil {
			whole = make([]passLine, len(t.index)-1)
		}
		whole[b] = pass[v&^indexWhole]
	}
	t.whole = whole
}

// indexWhole marks an entry of the index whose line covers the whole
// bucket.
const indexWhole = 1 << 31

// buildIndex makes the lookup index of Find: the device cut into buckets
// of 2^shift sectors, the smallest power of two that makes at most two
// buckets per line (so the index takes 4 to 8 bytes per line), each bucket
// naming the line that covers its first sector, with indexWhole set when
// that line covers the whole bucket. On a table of equal lines, the
// common case, every bucket then falls inside one line or across two, and
// Find ends with at most one comparison, whatever the number of lines;
// with lines a multiple of the bucket size long and aligned to it (a
// table of equal power-of-two lines) every bucket is whole and Find reads
// nothing but the bucket's index entry, one cache line where a search of
// ends adds another (the page-cache copy of each request evicts both).
// Lines of very different lengths put many short lines in one bucket, and
// Find searches them in halves, as it would the whole table, only fewer.
func (t *Table) buildIndex() {
	n := uint64(len(t.ends))
	if n >= indexWhole {
		return // Find searches the whole table
	}
	size := t.Size()
	shift := uint(0)
	for (size-1)>>shift >= 2*n { // buckets: ((size-1)>>shift)+1 <= 2n
		shift++
	}
	buckets := (size-1)>>shift + 1
	index := make([]uint32, buckets+1)
	i := 0
	for b := range buckets {
		for t.ends[i] <= b<<shift {
			i++
		}
		index[b] = uint32(i)
		if t.ends[i] >= (b+1)<<shift {
			index[b] |= indexWhole
		}
	}
	index[buckets] = uint32(n - 1)
	t.index, t.shift = index, shift
}

// newTarget runs a constructor, turning a panic into an error: a table is
// user input and must never take the daemon down.
func newTarget(tt *TargetType, c *Ctx, args []string) (tg Target, err error) {
	defer func() {
		if p := recover(); p != nil {
			tg, err = nil, fmt.Errorf("constructor failed: %v", p)
		}
	}()
	tg, err = tt.New(c, args)
	if err == nil && tg == nil {
		err = errors.New("constructor returned no target")
	}
	return tg, err
}

// checkAreas checks that every area a target lists fits its backend.
func checkAreas(tg Target) error {
	al, ok := tg.(AreaLister)
	if !ok {
		return nil
	}
	return al.Areas(func(b Backend, start, length uint64) error {
		size, err := b.Size()
		if err != nil {
			return err
		}
		devSectors := uint64(size) >> SectorShift
		if start+length > devSectors || start+length < start {
			return fmt.Errorf("%s too small for target: start=%d, len=%d, dev_size=%d",
				b.Name(), start, length, devSectors)
		}
		return nil
	})
}

// Size returns the table's size in sectors.
func (t *Table) Size() uint64 { return t.ends[len(t.ends)-1] }

// Discards reports whether every target of the table serves OpDiscard and
// whether every one serves OpWriteZeroes (see Discarder).
func (t *Table) Discards() (discard, writeZeroes bool) {
	discard, writeZeroes = true, true
	for _, tg := range t.targets {
		if d, ok := tg.(Discarder); ok {
			discard = discard && d.Discards()
			writeZeroes = writeZeroes && d.WritesZeroes()
		}
	}
	return discard, writeZeroes
}

// Lines returns the parsed lines of the table.
func (t *Table) Lines() []Line { return t.lines }

// Targets returns the table's targets in order.
func (t *Table) Targets() []Target { return t.targets }

// ReadOnly reports whether the table was loaded read-only.
func (t *Table) ReadOnly() bool { return t.readOnly }

// Find returns the index of the target covering sector, which must be
// below Size. The index (buildIndex) gives the first and the last line the
// sector's bucket touches, usually the same line or two neighbours; the
// search between them is a binary search without a branch on the
// comparison: with requests all over the device, a mispredicted branch at
// each step would cost more than the loads (BenchmarkTableLookup).
func (t *Table) Find(sector uint64) int {
	ends := t.ends
	base, n := 0, len(ends)
	if b := sector >> t.shift; b+1 < uint64(len(t.index)) {
		v := t.index[b]
		if v&indexWhole != 0 {
			return int(v &^ indexWhole)
		}
		base = int(v)
		n = int(t.index[b+1]&^indexWhole) - base + 1
	}
	// The answer, the first line ending after sector, is in
	// [base, base+n). Sectors are below 2^54 (MaxSector), so the
	// difference below cannot overflow: its sign bit says whether
	// ends[mid-1] <= sector, and becomes a mask of half or nothing.
	for n > 1 {
		half := n >> 1
		mid := base + half
		le := (int64(ends[mid-1]) - int64(sector) - 1) >> 63 // -1 when ends[mid-1] <= sector, else 0
		base += half & int(le)
		n -= half
	}
	return base
}

// Target returns target i with its start and length.
func (t *Table) Target(i int) (tg Target, start, length uint64) {
	return t.targets[i], t.lines[i].Start, t.lines[i].Length
}

// StatusLine is one line of `dmsetup status` or `dmsetup table`.
type StatusLine struct {
	Start  uint64
	Length uint64
	Type   string
	Params string
}

// String formats the line as dmsetup prints it: "0 2048 linear /a 0".
func (s StatusLine) String() string { return formatLine(s.Start, s.Length, s.Type, s.Params) }

// Status returns the table's status lines in the given form.
func (t *Table) Status(kind StatusKind) []StatusLine {
	out := make([]StatusLine, len(t.lines))
	for i, l := range t.lines {
		k := kind
		if k == StatusShowKeys {
			if _, ok := t.targets[i].(KeyHider); !ok {
				k = StatusTable
			}
		}
		out[i] = StatusLine{Start: l.Start, Length: l.Length, Type: l.Type, Params: t.targets[i].Status(k)}
	}
	return out
}

// Close closes every target, then every backend the constructors opened.
func (t *Table) Close() error {
	var errs []error
	for _, tg := range t.targets {
		errs = append(errs, tg.Close())
	}
	for _, b := range t.opened {
		errs = append(errs, b.Close())
	}
	t.targets, t.opened = nil, nil
	return errors.Join(errs...)
}

// Map performs r against the table, splitting it where it crosses target
// boundaries and completing the parts as one. r.Sector is relative to the
// device; r must lie inside the table and, for reads and writes, its data
// must be r.Sectors sectors long (Device.Submit checks both).
func (t *Table) Map(r *Request) error {
	if r.Op == OpFlush {
		return t.flush()
	}
	if r.Op.IsWrite() && t.readOnly {
		return ErrReadOnly
	}
	i := t.Find(r.Sector)
	// The start is the previous line's end: it shares a cache line with
	// ends[i], where t.lines[i] would be one more miss in a big table.
	var start uint64
	if i > 0 {
		start = t.ends[i-1]
	}
	if r.Sector+r.Sectors <= t.ends[i] {
		// The common case: no split, no allocation. Map sees a
		// target-relative sector for its duration.
		r.Sector -= start
		err := t.targets[i].Map(r)
		r.Sector += start
		return err
	}
	return t.mapSplit(r, i)
}

// mapSplit serves a request that crosses target boundaries, part by part.
func (t *Table) mapSplit(r *Request, i int) error {
	sector, left := r.Sector, r.Sectors
	off := 0
	var errs []error
	for left > 0 {
		n := min(left, t.ends[i]-sector)
		part := Request{Op: r.Op, Sector: sector - t.lines[i].Start, Sectors: n, Unmap: r.Unmap, FUA: r.FUA}
		if r.Data != nil {
			part.Data = SliceBufs(nil, r.Data, off, int(n<<SectorShift))
		}
		if err := t.targets[i].Map(&part); err != nil {
			errs = append(errs, err)
		}
		sector += n
		left -= n
		off += int(n << SectorShift)
		i++
	}
	return errors.Join(errs...)
}

// flush sends a flush to every target: through Flusher when the target has
// it, else through Map.
func (t *Table) flush() error {
	var errs []error
	for _, tg := range t.targets {
		var err error
		if f, ok := tg.(Flusher); ok {
			err = f.Flush()
		} else {
			err = tg.Map(&Request{Op: OpFlush})
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
