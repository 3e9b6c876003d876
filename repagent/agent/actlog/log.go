package actlog

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Config is the shape of a log and the volumes it covers.
type Config struct {
	// Volumes are the volumes of the VM, addressed by their index in
	// this slice in [Log.Begin] and the other methods.
	Volumes []Volume
	// ExtentSize is the extent size in bytes, a power of two
	// (default [DefaultExtentSize], 4 MiB).
	ExtentSize uint64
	// Extents is al-extents: how many extents of all volumes together
	// may be hot (default [DefaultExtents]). It bounds a resync after a
	// crash to Extents × ExtentSize bytes.
	Extents int
}

// Volume is one volume covered by the log.
type Volume struct {
	// Name identifies the volume across restarts (1..255 bytes).
	Name string
	// Size is the volume's size in bytes.
	Size uint64
}

func (c Config) geometry() (geometry, error) {
	es, n := c.ExtentSize, c.Extents
	if es == 0 {
		es = DefaultExtentSize
	}
	if n == 0 {
		n = DefaultExtents
	}
	g, err := newGeometry(es, n)
	if err != nil {
		return g, err
	}
	if len(c.Volumes) > MaxVolumes {
		return g, fmt.Errorf("%d volumes, at most %d", len(c.Volumes), MaxVolumes)
	}
	seen := make(map[string]bool, len(c.Volumes))
	for _, v := range c.Volumes {
		if len(v.Name) == 0 || len(v.Name) > 255 {
			return g, fmt.Errorf("volume name %q: length must be 1..255", v.Name)
		}
		if seen[v.Name] {
			return g, fmt.Errorf("volume %q listed twice", v.Name)
		}
		seen[v.Name] = true
		if v.Size>>g.shift > extentMask {
			return g, fmt.Errorf("volume %q: %d bytes is too large", v.Name, v.Size)
		}
	}
	if _, err := encodeHeader(header{geo: g, vols: toHeaderVols(c.Volumes, nil)}); err != nil {
		return g, err
	}
	return g, nil
}

func toHeaderVols(vs []Volume, full []bool) []volumeHeader {
	h := make([]volumeHeader, len(vs))
	for i, v := range vs {
		h[i] = volumeHeader{name: v.Name, size: v.Size}
		if full != nil && full[i] {
			h[i].flags = flagFullResync
		}
	}
	return h
}

// ErrClosed is returned by methods called after [Log.Close].
var ErrClosed = errors.New("activity log closed")

// Element states.
const (
	stateFree   = iota // holds no extent
	stateAdding        // assigned to an extent whose transaction is not durable yet
	stateHot           // the extent is durably recorded
)

// elem is one slot of the hot set (DRBD's lc_element).
type elem struct {
	key      uint64 // entry of the extent it holds in memory, or emptyEntry
	diskKey  uint64 // entry as the newest written transaction has it
	state    uint8
	held     bool
	inflight int32  // Begin without End
	lastSeq  uint64 // largest sequence number given to End
	prev     int32  // toward the most recently used
	next     int32  // toward the least recently used
}

type volState struct {
	name string
	size uint64
	full bool
}

// Log is an open activity log. Its methods may be called from any
// goroutine.
type Log struct {
	path  string
	geo   geometry
	epoch uint64
	f     *os.File

	mu      sync.Mutex
	cond    sync.Cond
	vols    []volState
	index   map[uint64]int32
	elems   []elem
	lruHead int32 // most recently used
	lruTail int32 // least recently used
	acked   uint64

	pending    []int32 // elements in stateAdding not yet in a transaction
	committing bool
	waiters    int // Begins waiting for an evictable element
	seq        uint64
	ctxCursor  int
	txbuf      []byte
	tx         txn
	err        error // sticky write error
	// beforeWrite, when set by a test, runs before each transaction's I/O.
	beforeWrite func()
	closed      bool
	stats       Stats
}

// Stats are counters of a Log since Open.
type Stats struct {
	// Hot is the number of hot extents now; Capacity is al-extents.
	Hot, Capacity int
	// Transactions is the number of transactions written, Extents the
	// number of cold extents they recorded, Evictions the number of hot
	// extents they cooled.
	Transactions, Extents, Evictions uint64
	// Waits counts Begins that waited for an evictable extent.
	Waits uint64
}

func newLog(path string, cfg Config, geo geometry) *Log {
	l := &Log{
		path:    path,
		geo:     geo,
		index:   make(map[uint64]int32, geo.extents),
		elems:   make([]elem, geo.extents),
		lruHead: -1,
		lruTail: -1,
		pending: make([]int32, 0, geo.extents),
		txbuf:   make([]byte, blockSize),
	}
	l.tx.updates = make([]update, 0, updatesPerTxn)
	l.tx.context = make([]uint64, 0, contextPerTxn)
	l.cond.L = &l.mu
	for _, v := range cfg.Volumes {
		l.vols = append(l.vols, volState{name: v.Name, size: v.Size})
	}
	for i := range l.elems {
		l.elems[i] = elem{key: emptyEntry, diskKey: emptyEntry}
		l.pushFront(int32(i))
	}
	return l
}

func (l *Log) encodeHeader() ([]byte, error) {
	vs := make([]volumeHeader, len(l.vols))
	for i, v := range l.vols {
		vs[i] = volumeHeader{name: v.name, size: v.size}
		if v.full {
			vs[i].flags = flagFullResync
		}
	}
	return encodeHeader(header{epoch: l.epoch, geo: l.geo, vols: vs})
}

// LRU list.

func (l *Log) unlink(i int32) {
	e := &l.elems[i]
	if e.prev >= 0 {
		l.elems[e.prev].next = e.next
	} else {
		l.lruHead = e.next
	}
	if e.next >= 0 {
		l.elems[e.next].prev = e.prev
	} else {
		l.lruTail = e.prev
	}
}

func (l *Log) pushFront(i int32) {
	e := &l.elems[i]
	e.prev, e.next = -1, l.lruHead
	if l.lruHead >= 0 {
		l.elems[l.lruHead].prev = i
	} else {
		l.lruTail = i
	}
	l.lruHead = i
}

func (l *Log) touch(i int32) {
	if l.lruHead != i {
		l.unlink(i)
		l.pushFront(i)
	}
}

// victim returns the least recently used element that may take a new
// extent, or -1.
func (l *Log) victim() int32 {
	for i := l.lruTail; i >= 0; i = l.elems[i].prev {
		e := &l.elems[i]
		if e.state == stateFree || (e.state == stateHot && e.inflight == 0 && !e.held && e.lastSeq <= l.acked) {
			return i
		}
	}
	return -1
}

// Token is a write admitted by [Log.Begin]; give it to [Log.End].
type Token struct {
	vol         int
	first, last uint64
	elem        int32 // the element of first when first == last, else -1
}

// ExtentSize returns the extent size in bytes.
func (l *Log) ExtentSize() uint64 { return l.geo.extentSize }

func (l *Log) extents(vol int, off, n uint64) (first, last uint64, err error) {
	if vol < 0 || vol >= len(l.vols) {
		return 0, 0, fmt.Errorf("activity log: volume %d does not exist", vol)
	}
	if n == 0 || off+n < off || off+n > l.vols[vol].size {
		return 0, 0, fmt.Errorf("activity log: volume %s: range %d+%d outside its %d bytes", l.vols[vol].name, off, n, l.vols[vol].size)
	}
	first, last = off>>l.geo.shift, (off+n-1)>>l.geo.shift
	if last-first >= uint64(l.geo.extents) {
		return 0, 0, fmt.Errorf("activity log: volume %s: range %d+%d spans more than al-extents (%d) extents", l.vols[vol].name, off, n, l.geo.extents)
	}
	return first, last, nil
}

// Begin admits a write of n bytes at byte offset off of volume vol. It
// returns once every extent the write touches is durably hot: at once when
// they already are (no I/O, no allocation), otherwise after the transaction
// recording them is written and fdatasync'd. The caller must not start the
// write before Begin returns and must call [Log.End] with the token after
// it completes, failed or not. Begin fails for a range outside the volume,
// after Close, and after a transaction could not be written (the agent must
// then treat the log as lost: fail or hold the write, and resync in full).
func (l *Log) Begin(vol int, off, n uint64) (Token, error) {
	first, last, err := l.extents(vol, off, n)
	if err != nil {
		return Token{}, err
	}
	tok := Token{vol, first, last, -1}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return Token{}, ErrClosed
	}
	if first == last {
		// The common case: one map lookup, no I/O, no allocation.
		if i, ok := l.index[entry(vol, first)]; ok && l.elems[i].state == stateHot {
			l.elems[i].inflight++
			l.touch(i)
			l.mu.Unlock()
			tok.elem = i
			return tok, nil
		}
	}
	hot := true
	for x := first; x <= last; x++ {
		i, ok := l.index[entry(vol, x)]
		if !ok || l.elems[i].state != stateHot {
			hot = false
			break
		}
	}
	if hot {
		for x := first; x <= last; x++ {
			i := l.index[entry(vol, x)]
			l.elems[i].inflight++
			l.touch(i)
		}
		l.mu.Unlock()
		return tok, nil
	}
	err = l.beginSlow(tok)
	if err == nil && first == last {
		tok.elem = l.index[entry(vol, first)]
	}
	l.mu.Unlock()
	return tok, err
}

// beginSlow assigns elements to the cold extents of tok and waits until a
// transaction has recorded them. Called with l.mu held.
func (l *Log) beginSlow(tok Token) error {
retry:
	for x := tok.first; x <= tok.last; x++ {
		key := entry(tok.vol, x)
		if i, ok := l.index[key]; ok {
			l.elems[i].inflight++
			l.touch(i)
			continue
		}
		if l.err != nil {
			l.release(tok, x)
			return l.err
		}
		v := l.victim()
		if v < 0 {
			// Every element is busy: give back what this write holds
			// (two writers each holding part of what they need must
			// not wait on each other) and wait for an eviction.
			l.release(tok, x)
			l.stats.Waits++
			l.waiters++
			l.cond.Wait()
			l.waiters--
			if l.closed {
				return ErrClosed
			}
			goto retry
		}
		e := &l.elems[v]
		if e.key != emptyEntry {
			delete(l.index, e.key)
		}
		*e = elem{key: key, diskKey: e.diskKey, state: stateAdding, inflight: 1, prev: e.prev, next: e.next}
		l.index[key] = v
		l.touch(v)
		l.pending = append(l.pending, v)
	}
	for {
		hot := true
		for x := tok.first; x <= tok.last; x++ {
			if l.elems[l.index[entry(tok.vol, x)]].state != stateHot {
				hot = false
				break
			}
		}
		if hot {
			return nil
		}
		if l.err != nil || l.closed {
			l.release(tok, tok.last+1)
			if l.err != nil {
				return l.err
			}
			return ErrClosed
		}
		if !l.committing && len(l.pending) > 0 {
			l.commit()
		} else {
			l.cond.Wait()
		}
	}
}

// release undoes the in-flight counts tok holds on extents first..end-1.
func (l *Log) release(tok Token, end uint64) {
	for x := tok.first; x < end; x++ {
		key := entry(tok.vol, x)
		i, ok := l.index[key]
		if !ok {
			continue
		}
		e := &l.elems[i]
		e.inflight--
		if e.state == stateAdding && e.inflight == 0 && l.err != nil {
			// Its transaction failed: the element holds nothing.
			delete(l.index, key)
			e.key, e.state = emptyEntry, stateFree
		}
	}
	if l.waiters > 0 {
		l.cond.Broadcast()
	}
}

// fillContext puts the next window of elements, as the disk has them, into
// t and advances the cursor.
func (l *Log) fillContext(t *txn) {
	n := min(contextPerTxn, l.geo.extents)
	t.ctxStart = uint32(l.ctxCursor)
	t.context = t.context[:0]
	for k := range n {
		t.context = append(t.context, l.elems[(l.ctxCursor+k)%l.geo.extents].diskKey)
	}
	l.ctxCursor = (l.ctxCursor + n) % l.geo.extents
}

// commit writes one transaction of up to updatesPerTxn pending elements.
// Called with l.mu held; drops it during the I/O.
func (l *Log) commit() {
	l.committing = true
	n := min(len(l.pending), updatesPerTxn)
	t := &l.tx
	t.seq, t.kind = l.seq+1, kindUpdate
	t.updates = t.updates[:0]
	evicted := 0
	for _, i := range l.pending[:n] {
		e := &l.elems[i]
		if e.diskKey != emptyEntry {
			evicted++
		}
		e.diskKey = e.key
		t.updates = append(t.updates, update{elem: uint32(i), entry: e.key})
	}
	l.fillContext(t)
	encodeSlot(l.txbuf, l.epoch, t)
	off := slotOffset(t.seq, l.geo.slots)
	l.mu.Unlock()
	if l.beforeWrite != nil {
		l.beforeWrite()
	}
	err := l.writeSlot(off)
	l.mu.Lock()
	l.committing = false
	if err != nil {
		l.err = fmt.Errorf("activity log %s: transaction %d: %w", l.path, t.seq, err)
	} else {
		l.seq = t.seq
		for _, i := range l.pending[:n] {
			l.elems[i].state = stateHot
		}
		l.stats.Transactions++
		l.stats.Extents += uint64(n)
		l.stats.Evictions += uint64(evicted)
	}
	rest := copy(l.pending, l.pending[n:])
	l.pending = l.pending[:rest]
	l.cond.Broadcast()
}

func (l *Log) writeSlot(off int64) error {
	if _, err := l.f.WriteAt(l.txbuf, off); err != nil {
		return err
	}
	return unix.Fdatasync(int(l.f.Fd()))
}

// End ends a write admitted by [Log.Begin]. seq is the write sequence
// number under which the agent mirrors the write's data to the hub: the
// extents stay hot until [Log.Ack] has reached seq. Give 0 when there is
// nothing to wait for (a volume that is not mirrored, or a write that
// failed and changed nothing); a write whose data goes to the dirty bitmap
// instead is covered by [Log.Dirty], called before End.
func (l *Log) End(tok Token, seq uint64) {
	l.mu.Lock()
	wake := false
	for x := tok.first; x <= tok.last; x++ {
		// An element cannot change extent while a write into it is in
		// flight, so the token's element is still the extent's.
		i := tok.elem
		if i < 0 || int(i) >= len(l.elems) || l.elems[i].key != entry(tok.vol, x) {
			var ok bool
			if i, ok = l.index[entry(tok.vol, x)]; !ok {
				continue // not from Begin; nothing to do
			}
		}
		e := &l.elems[i]
		if e.inflight > 0 {
			e.inflight--
		}
		if seq > e.lastSeq {
			e.lastSeq = seq
		}
		wake = wake || e.inflight == 0
	}
	if wake && l.waiters > 0 {
		l.cond.Broadcast()
	}
	l.mu.Unlock()
}

// Waiting reports whether a [Log.Begin] waits for an extent to become
// evictable: for the hub's acknowledgement of earlier writes, which the
// caller should then send without delay.
func (l *Log) Waiting() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.waiters > 0
}

// Ack records that the hub has acknowledged every write with a sequence
// number up to seq: extents whose writes are all acknowledged may cool.
// Sequence numbers only grow; a smaller seq is ignored.
func (l *Log) Ack(seq uint64) {
	l.mu.Lock()
	if seq > l.acked {
		l.acked = seq
		if l.waiters > 0 {
			l.cond.Broadcast()
		}
	}
	l.mu.Unlock()
}

// Dirty holds the extents of the range hot until [Log.Clean]: the agent
// calls it when it records the range in its dirty bitmap rather than
// mirroring the writes (queue overflow, hub away). It makes cold extents hot
// first, like Begin.
func (l *Log) Dirty(vol int, off, n uint64) error {
	tok, err := l.Begin(vol, off, n)
	if err != nil {
		return err
	}
	l.mu.Lock()
	for x := tok.first; x <= tok.last; x++ {
		l.elems[l.index[entry(vol, x)]].held = true
	}
	l.mu.Unlock()
	l.End(tok, 0)
	return nil
}

// Clean releases the hold of [Log.Dirty] (or of recovery by [Open]) on
// every extent the range touches: the agent calls it when the hub has
// acknowledged the resync of those extents and no region of them is left in
// its dirty bitmap. Writes since, tied to sequence numbers by End, still
// keep an extent hot until acknowledged.
func (l *Log) Clean(vol int, off, n uint64) error {
	if vol < 0 || vol >= len(l.vols) {
		return fmt.Errorf("activity log: volume %d does not exist", vol)
	}
	if n == 0 || off+n < off || off+n > l.vols[vol].size {
		return fmt.Errorf("activity log: volume %s: range %d+%d outside its %d bytes", l.vols[vol].name, off, n, l.vols[vol].size)
	}
	first, last := off>>l.geo.shift, (off+n-1)>>l.geo.shift
	l.mu.Lock()
	for i := range l.elems {
		e := &l.elems[i]
		if e.key != emptyEntry && entryVol(e.key) == vol && entryExt(e.key) >= first && entryExt(e.key) <= last {
			e.held = false
		}
	}
	if l.waiters > 0 {
		l.cond.Broadcast()
	}
	l.mu.Unlock()
	return nil
}

// FullResyncDone clears the full-resync flag [Open] set on the volume,
// durably: the agent calls it when the volume's full resync has been
// acknowledged. Until then a crash reports the volume Full again.
func (l *Log) FullResyncDone(vol int) error {
	if vol < 0 || vol >= len(l.vols) {
		return fmt.Errorf("activity log: volume %d does not exist", vol)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	if !l.vols[vol].full {
		return nil
	}
	for l.committing {
		l.cond.Wait()
	}
	l.vols[vol].full = false
	hb, err := l.encodeHeader()
	if err == nil {
		if _, err = l.f.WriteAt(hb, 0); err == nil {
			err = unix.Fdatasync(int(l.f.Fd()))
		}
	}
	if err != nil {
		l.vols[vol].full = true
		return fmt.Errorf("activity log %s: header: %w", l.path, err)
	}
	return nil
}

// Hot returns the hot extents of each volume (indexed like
// Config.Volumes), as extent numbers in no particular order. Extents whose
// transaction is not durable yet are not included.
func (l *Log) Hot() [][]uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([][]uint64, len(l.vols))
	for i := range l.elems {
		e := &l.elems[i]
		if e.state == stateHot {
			v := entryVol(e.key)
			out[v] = append(out[v], entryExt(e.key))
		}
	}
	return out
}

// Stats returns the log's counters.
func (l *Log) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.stats
	s.Capacity = l.geo.extents
	for i := range l.elems {
		if l.elems[i].state == stateHot {
			s.Hot++
		}
	}
	return s
}

// Close closes the log. When nothing is unacknowledged — no write in
// flight, every End's sequence number acknowledged, nothing held — it first
// writes a clean transaction, so that the next [Open] reports nothing dirty,
// and returns true. Otherwise the hot set stays on disk for the next Open.
// Begins waiting for an extent fail with [ErrClosed].
func (l *Log) Close() (clean bool, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false, ErrClosed
	}
	for l.committing {
		l.cond.Wait()
	}
	l.closed = true
	l.cond.Broadcast()
	clean = l.err == nil && len(l.pending) == 0
	for i := range l.elems {
		e := &l.elems[i]
		if e.state == stateAdding || e.inflight > 0 || e.held || e.lastSeq > l.acked {
			clean = false
		}
	}
	if clean {
		t := &l.tx
		t.seq, t.kind, t.updates = l.seq+1, kindClean, t.updates[:0]
		for i := range l.elems {
			l.elems[i].diskKey = emptyEntry
		}
		l.fillContext(t)
		encodeSlot(l.txbuf, l.epoch, t)
		err = l.writeSlot(slotOffset(t.seq, l.geo.slots))
		if err != nil {
			clean = false
			err = fmt.Errorf("activity log %s: clean transaction: %w", l.path, err)
		}
	}
	if cerr := l.f.Close(); err == nil && cerr != nil {
		err = cerr
	}
	return clean, err
}
