// Package pdata is the kernel's persistent-data library (drivers/md/
// persistent-data) in Go, on-disk compatible with it: a block manager over
// a metadata Backend (4096-byte blocks with crc32c checksums salted per
// block type), a transaction manager that shadows (copies on write) every
// block it changes and reuses no block freed in the running transaction,
// in-memory space maps with the kernel's on-disk form (2-bit counts in
// bitmap blocks, an index, a ref-count btree for counts of 3 and more), and
// a copy-on-write btree with arbitrary value sizes.
//
// The central type is [TM]. Nothing written since the last commit is
// reachable from the last superblock, so a crash at any point leaves the
// previous committed state intact; the caller writes its superblock after
// [TM.Flush] and flushes again. A TM and everything built on it is not safe
// for concurrent use: the caller serialises (thin's pool holds one mutex).
//
// Layout facts come from ../shared/reference/dm-formats.md §4; the kernel's
// persistent-data/*.c were read for semantics only.
package pdata

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"

	"github.com/hashicorp/golang-lru/v2/simplelru"

	"github.com/vhostdm/vhostdm/mapper"
)

// BlockSize is the size of every metadata block in bytes.
const BlockSize = 4096

// Checksum salts, XORed into the crc32c of each block type: part of the
// on-disk format.
const (
	SuperblockSalt = 160774
	NodeSalt       = 121107
	IndexSalt      = 160478
	BitmapSalt     = 240779
)

// Kind is what a metadata block holds; it selects the checksum salt.
type Kind uint8

// Block kinds.
const (
	KindSuper Kind = iota
	KindNode
	KindIndex
	KindBitmap
)

var salts = [...]uint32{KindSuper: SuperblockSalt, KindNode: NodeSalt, KindIndex: IndexSalt, KindBitmap: BitmapSalt}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var le = binary.LittleEndian

// Checksum returns the checksum of a block as the kernel computes it:
// crc32c with seed ~0 and no final inversion over b[4:], XOR salt.
func Checksum(b []byte, salt uint32) uint32 {
	return ^crc32.Checksum(b[4:], castagnoli) ^ salt
}

// blocknrOffset is where every block kind but the superblock keeps its own
// location (the superblock's is at 8 too).
const blocknrOffset = 8

// DefaultCacheBlocks bounds the clean blocks a new BM keeps: 4096 blocks,
// 16 MiB, until its user sets its own bound with [BM.SetCacheBlocks]
// (thin's pools size it for the pool). A thin pool's metadata can be
// 16 GiB, so an unbounded cache would grow with every block the pool
// ever reads.
const DefaultCacheBlocks = 4096

// BM is a block manager: a cache of metadata blocks over a backend.
// Blocks read are checked (checksum, location) once; blocks changed are
// kept dirty until WriteDirty stamps and writes them. Dirty blocks stay in
// memory until written (they are bounded by the running transaction);
// clean blocks are kept in a least-recently-used cache of at most
// [DefaultCacheBlocks] (or [BM.SetCacheBlocks]) blocks and read again
// from the device after eviction.
type BM struct {
	dev      mapper.Backend
	nrBlocks uint64

	clean    *simplelru.LRU[uint64, []byte]
	dirty    map[uint64]dirtyBlock
	inflight map[uint64][]byte // stamped by TakeDirty, being written
	reads    uint64            // blocks read from the device
}

// BlockWrite is one stamped block of a transaction being committed: its
// buffer is immutable until [BM.Landed].
type BlockWrite struct {
	B   uint64
	Buf []byte
}

// dirtyBlock is a block changed in the running transaction.
type dirtyBlock struct {
	buf  []byte
	kind Kind
}

// NewBM returns a block manager over dev holding nrBlocks blocks.
func NewBM(dev mapper.Backend, nrBlocks uint64) *BM {
	bm := &BM{dev: dev, nrBlocks: nrBlocks, dirty: map[uint64]dirtyBlock{}, inflight: map[uint64][]byte{}}
	bm.SetCacheBlocks(DefaultCacheBlocks)
	return bm
}

// SetCacheBlocks bounds the clean blocks kept in memory to n (at least 1),
// dropping the least recently used ones beyond it.
func (bm *BM) SetCacheBlocks(n int) {
	n = max(n, 1)
	if bm.clean == nil {
		bm.clean, _ = simplelru.NewLRU[uint64, []byte](n, nil)
		return
	}
	bm.clean.Resize(n)
}

// CacheStats reports the clean blocks cached, the dirty blocks held and
// the blocks read from the device since the BM was made.
func (bm *BM) CacheStats() (clean, dirty int, reads uint64) {
	return bm.clean.Len(), len(bm.dirty), bm.reads
}

// NrBlocks returns the number of blocks of the metadata device.
func (bm *BM) NrBlocks() uint64 { return bm.nrBlocks }

// Extend grows the blocks the BM serves to nr (a metadata device that
// grew); it never shrinks.
func (bm *BM) Extend(nr uint64) { bm.nrBlocks = max(bm.nrBlocks, nr) }

// Read returns block b, checked as kind. The slice is the cached block:
// callers must not change it unless they own the block in the running
// transaction (see TM.Shadow).
func (bm *BM) Read(b uint64, kind Kind) ([]byte, error) {
	if d, ok := bm.dirty[b]; ok {
		return d.buf, nil
	}
	if buf, ok := bm.inflight[b]; ok {
		return buf, nil
	}
	if buf, ok := bm.clean.Get(b); ok {
		return buf, nil
	}
	if b >= bm.nrBlocks {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata block %d beyond the device's %d blocks", b, bm.nrBlocks)
	}
	buf := make([]byte, BlockSize)
	if err := bm.dev.ReadAt([][]byte{buf}, int64(b)*BlockSize); err != nil {
		return nil, err
	}
	if got, want := le.Uint32(buf), Checksum(buf, salts[kind]); got != want {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata block %d: checksum %#x, want %#x", b, got, want)
	}
	if got := le.Uint64(buf[blocknrOffset:]); got != b {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata block %d: says it is block %d", b, got)
	}
	bm.reads++
	bm.clean.Add(b, buf)
	return buf, nil
}

// New returns a zeroed buffer for block b, marked dirty as kind.
func (bm *BM) New(b uint64, kind Kind) []byte {
	buf := make([]byte, BlockSize)
	bm.clean.Remove(b)
	bm.dirty[b] = dirtyBlock{buf: buf, kind: kind}
	return buf
}

// Dirty marks block b as changed; buf must be the slice Read returned for
// it and nothing may have been read or made since (a clean block can be
// evicted by the next Read or New).
func (bm *BM) Dirty(b uint64, kind Kind) {
	if d, ok := bm.dirty[b]; ok {
		d.kind = kind
		bm.dirty[b] = d
		return
	}
	buf, ok := bm.clean.Peek(b)
	if !ok {
		panic(fmt.Sprintf("pdata: Dirty of block %d that is not cached", b))
	}
	bm.clean.Remove(b)
	bm.dirty[b] = dirtyBlock{buf: buf, kind: kind}
}

// TakeDirty stamps every dirty block with its location and checksum and
// hands them over for writing: until [BM.Landed] they stay readable
// (unchanged: the next transaction shadows them) while
// [BM.WriteBlocks] writes them without the caller's lock.
func (bm *BM) TakeDirty() []BlockWrite {
	w := make([]BlockWrite, 0, len(bm.dirty))
	for b, d := range bm.dirty {
		buf := d.buf
		le.PutUint64(buf[blocknrOffset:], b)
		le.PutUint32(buf, Checksum(buf, salts[d.kind]))
		bm.inflight[b] = buf
		w = append(w, BlockWrite{B: b, Buf: buf})
	}
	clear(bm.dirty)
	return w
}

// WriteBlocks writes blocks taken by TakeDirty. It touches no state of the
// BM but its backend, so it runs concurrently with reads and changes of
// the next transaction; the caller flushes the backend.
func (bm *BM) WriteBlocks(w []BlockWrite) error {
	for _, x := range w {
		if err := bm.dev.WriteAt([][]byte{x.Buf}, int64(x.B)*BlockSize); err != nil {
			return fmt.Errorf("write metadata block %d: %w", x.B, err)
		}
	}
	return nil
}

// Landed moves blocks written by WriteBlocks to the clean cache.
func (bm *BM) Landed(w []BlockWrite) {
	for _, x := range w {
		if buf, ok := bm.inflight[x.B]; ok && &buf[0] == &x.Buf[0] {
			delete(bm.inflight, x.B)
			if _, ok := bm.dirty[x.B]; !ok {
				bm.clean.Add(x.B, x.Buf)
			}
		}
	}
}

// WriteDirty writes every dirty block at once (TakeDirty, WriteBlocks,
// Landed); the caller flushes the backend.
func (bm *BM) WriteDirty() error {
	w := bm.TakeDirty()
	if err := bm.WriteBlocks(w); err != nil {
		return err
	}
	bm.Landed(w)
	return nil
}

// Forget drops every cached block, so that the next reads see the device
// (after a failed commit the cache may hold changes that never landed).
func (bm *BM) Forget() {
	bm.clean.Purge()
	clear(bm.dirty)
	clear(bm.inflight)
}

// Flush flushes the metadata backend.
func (bm *BM) Flush() error { return bm.dev.Flush() }

// ReadRaw reads block b without checks (the superblock, which the caller
// checks, and a fresh device's first block).
func (bm *BM) ReadRaw(b uint64) ([]byte, error) {
	buf := make([]byte, BlockSize)
	if err := bm.dev.ReadAt([][]byte{buf}, int64(b)*BlockSize); err != nil {
		return nil, err
	}
	return buf, nil
}

// WriteRaw stamps buf's checksum as kind (its location is the caller's)
// and writes it at block b, bypassing the cache.
func (bm *BM) WriteRaw(b uint64, kind Kind, buf []byte) error {
	le.PutUint32(buf, Checksum(buf, salts[kind]))
	if err := bm.dev.WriteAt([][]byte{buf}, int64(b)*BlockSize); err != nil {
		return fmt.Errorf("write metadata block %d: %w", b, err)
	}
	return nil
}
