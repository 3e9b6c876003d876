package pdata

import (
	"fmt"
	"slices"

	"github.com/vhostdm/vhostdm/mapper"
)

// EntriesPerBitmap is how many 2-bit counts one bitmap block holds: the
// block after its 16-byte header {csum, not_used, blocknr}.
const EntriesPerBitmap = (BlockSize - 16) * 4

// MaxMetadataBitmaps is how many bitmaps the metadata space map's single
// index block can name (disk_metadata_index: 255 entries).
const MaxMetadataBitmaps = 255

// MaxMetadataBlocks is the largest metadata space map (the kernel's
// DM_SM_METADATA_MAX_BLOCKS).
const MaxMetadataBlocks = MaxMetadataBitmaps * EntriesPerBitmap

// SpaceMap holds the reference count of every block of a device (the
// metadata device, or the pool's data device) in memory, and its on-disk
// form: bitmaps of 2-bit counts (3 meaning "see the ref-count tree"), an
// index of the bitmaps (a single block for the metadata space map, a
// btree for the data space map) and a btree of the counts of 3 and more.
//
// A block whose count fell to zero in the running transaction is not
// handed out again before the commit has landed: the last committed
// state may still use it.
type SpaceMap struct {
	meta bool

	counts   []uint32
	used     []uint32            // per bitmap: entries with a nonzero count
	freed    map[uint64]struct{} // count fell to 0 in this transaction
	freedOld map[uint64]struct{} // freed in the transaction being committed
	reserved map[uint64]struct{} // handed out by Reserve, not yet counted
	dirty    map[uint64]struct{} // bitmaps to rewrite at commit
	rcDirty  map[uint64]struct{} // blocks whose ref-count tree entry may change
	cursor   uint64
	nrAlloc  uint64

	// On-disk form, as of the last commit (or shadowed in this one).
	bitmaps   []uint64 // location of each bitmap, 0 before its first commit
	nfb       []uint32 // none_free_before hint per bitmap
	indexRoot uint64   // metadata: the index block; data: the index btree's root
	rcRoot    uint64

	// OnFree, if set, is called when a block's count falls to zero.
	OnFree func(b uint64)

	// OnLow, if set, is called when an Alloc leaves LowThreshold or fewer
	// blocks free and the Alloc before it left more: edge triggered, as
	// the kernel's metadata space map threshold.
	OnLow        func(free uint64)
	LowThreshold uint64
	lowSeen      bool
	lowLast      uint64
}

// NewSpaceMap returns a space map of nr blocks, all free, whose on-disk
// form is made by the first commit. meta selects the metadata variant.
func NewSpaceMap(nr uint64, meta bool) *SpaceMap {
	sm := &SpaceMap{meta: meta, freed: map[uint64]struct{}{}, freedOld: map[uint64]struct{}{}, reserved: map[uint64]struct{}{},
		dirty: map[uint64]struct{}{}, rcDirty: map[uint64]struct{}{}}
	sm.Extend(nr)
	return sm
}

// NrBlocks returns the number of blocks the map covers.
func (sm *SpaceMap) NrBlocks() uint64 { return uint64(len(sm.counts)) }

// NrAllocated returns the number of blocks with a nonzero count.
func (sm *SpaceMap) NrAllocated() uint64 { return sm.nrAlloc }

// NrFree returns the number of blocks with a zero count.
func (sm *SpaceMap) NrFree() uint64 { return sm.NrBlocks() - sm.nrAlloc }

// NrReserved returns the number of blocks held by Reserve.
func (sm *SpaceMap) NrReserved() uint64 { return uint64(len(sm.reserved)) }

// Extend grows the map to nr blocks; it never shrinks.
func (sm *SpaceMap) Extend(nr uint64) {
	old := uint64(len(sm.counts))
	if nr <= old {
		return
	}
	sm.counts = append(sm.counts, make([]uint32, nr-old)...)
	nb := (nr + EntriesPerBitmap - 1) / EntriesPerBitmap
	for i := uint64(len(sm.bitmaps)); i < nb; i++ {
		sm.bitmaps = append(sm.bitmaps, 0)
		sm.nfb = append(sm.nfb, 0)
		sm.used = append(sm.used, 0)
		sm.dirty[i] = struct{}{}
	}
}

// Count returns the count of b.
func (sm *SpaceMap) Count(b uint64) (uint32, error) {
	if b >= uint64(len(sm.counts)) {
		return 0, sm.beyond(b)
	}
	return sm.counts[b], nil
}

func (sm *SpaceMap) beyond(b uint64) error {
	what := "data"
	if sm.meta {
		what = "metadata"
	}
	return mapper.Errorf(mapper.ErrCorrupt, "%s block %d beyond the space map's %d blocks", what, b, len(sm.counts))
}

func (sm *SpaceMap) set(b uint64, c uint32) {
	old := sm.counts[b]
	sm.counts[b] = c
	bi := b / EntriesPerBitmap
	sm.dirty[bi] = struct{}{}
	if old >= 3 || c >= 3 {
		sm.rcDirty[b] = struct{}{}
	}
	switch {
	case old == 0 && c != 0:
		sm.nrAlloc++
		sm.used[bi]++
		delete(sm.reserved, b)
	case old != 0 && c == 0:
		sm.nrAlloc--
		sm.used[bi]--
		sm.freed[b] = struct{}{}
		if sm.OnFree != nil {
			sm.OnFree(b)
		}
	}
}

// Inc adds a reference to b.
func (sm *SpaceMap) Inc(b uint64) error {
	if b >= uint64(len(sm.counts)) {
		return sm.beyond(b)
	}
	sm.set(b, sm.counts[b]+1)
	return nil
}

// Dec drops a reference to b.
func (sm *SpaceMap) Dec(b uint64) error {
	if b >= uint64(len(sm.counts)) {
		return sm.beyond(b)
	}
	if sm.counts[b] == 0 {
		return mapper.Errorf(mapper.ErrCorrupt, "block %d: reference count already zero", b)
	}
	sm.set(b, sm.counts[b]-1)
	return nil
}

// ErrNoSpace is returned when no block is free.
var ErrNoSpace = fmt.Errorf("no free space: %w", mapper.ErrIO)

// Reserve finds a free block usable in this transaction and holds it
// (count still zero) until Inc counts it or Release gives it back.
func (sm *SpaceMap) Reserve() (uint64, error) {
	n := uint64(len(sm.counts))
	for tries := uint64(0); tries < n; tries++ {
		b := sm.cursor
		sm.cursor++
		if sm.cursor >= n {
			sm.cursor = 0
		}
		if sm.counts[b] != 0 {
			continue
		}
		if _, ok := sm.freed[b]; ok {
			continue
		}
		if _, ok := sm.freedOld[b]; ok {
			continue
		}
		if _, ok := sm.reserved[b]; ok {
			continue
		}
		sm.reserved[b] = struct{}{}
		return b, nil
	}
	return 0, ErrNoSpace
}

// Release gives back a block held by Reserve.
func (sm *SpaceMap) Release(b uint64) { delete(sm.reserved, b) }

// Alloc returns a free block with a count of one.
func (sm *SpaceMap) Alloc() (uint64, error) {
	b, err := sm.Reserve()
	if err != nil {
		return 0, err
	}
	sm.set(b, 1)
	if sm.OnLow != nil {
		free := sm.NrFree()
		if free <= sm.LowThreshold && !(sm.lowSeen && sm.lowLast <= sm.LowThreshold) {
			sm.OnLow(free)
		}
		sm.lowSeen, sm.lowLast = true, free
	}
	return b, nil
}

// Root is a space map's root as the superblock holds it (struct
// disk_sm_root, 32 of the 128 bytes reserved).
type Root struct {
	NrBlocks, NrAllocated, BitmapRoot, RefCountRoot uint64
}

// Encode writes r into the first 32 bytes of p.
func (r Root) Encode(p []byte) {
	le.PutUint64(p, r.NrBlocks)
	le.PutUint64(p[8:], r.NrAllocated)
	le.PutUint64(p[16:], r.BitmapRoot)
	le.PutUint64(p[24:], r.RefCountRoot)
}

// DecodeRoot reads a Root from p.
func DecodeRoot(p []byte) Root {
	return Root{le.Uint64(p), le.Uint64(p[8:]), le.Uint64(p[16:]), le.Uint64(p[24:])}
}

// Root returns the map's root as of the last commit.
func (sm *SpaceMap) Root() Root {
	return Root{NrBlocks: uint64(len(sm.counts)), NrAllocated: sm.nrAlloc, BitmapRoot: sm.indexRoot, RefCountRoot: sm.rcRoot}
}

// indexEntry is struct disk_index_entry: {u64 blocknr, u32 nr_free, u32
// none_free_before}.
const indexEntrySize = 16

func (sm *SpaceMap) indexEntry(i uint64) []byte {
	var e [indexEntrySize]byte
	le.PutUint64(e[:], sm.bitmaps[i])
	le.PutUint32(e[8:], EntriesPerBitmap-sm.used[i])
	le.PutUint32(e[12:], sm.nfb[i])
	return e[:]
}

func (sm *SpaceMap) rcTree(tm *TM) *Tree  { return &Tree{TM: tm, VT: ValueType{Size: 4}} }
func (sm *SpaceMap) idxTree(tm *TM) *Tree { return &Tree{TM: tm, VT: ValueType{Size: indexEntrySize}} }
func sortedKeys(m map[uint64]struct{}) []uint64 {
	ks := make([]uint64, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// stage moves the map's on-disk structures to blocks owned by this
// transaction and brings the ref-count tree up to date. It reports
// whether it changed anything (allocating metadata blocks).
func (sm *SpaceMap) stage(tm *TM) (bool, error) {
	progress := false
	if sm.rcRoot == 0 {
		r, err := sm.rcTree(tm).Empty()
		if err != nil {
			return false, err
		}
		sm.rcRoot, progress = r, true
	}
	if !sm.meta && sm.indexRoot == 0 {
		r, err := sm.idxTree(tm).Empty()
		if err != nil {
			return false, err
		}
		sm.indexRoot, progress = r, true
	}
	for _, i := range sortedKeys(sm.dirty) {
		if old := sm.bitmaps[i]; old == 0 || !tm.IsShadow(old) {
			b, err := tm.SM.Alloc()
			if err != nil {
				return false, err
			}
			tm.shadows[b] = struct{}{}
			if old != 0 {
				if err := tm.SM.Dec(old); err != nil {
					return false, err
				}
			}
			sm.bitmaps[i], progress = b, true
		}
	}
	for len(sm.rcDirty) > 0 {
		progress = true
		for _, b := range sortedKeys(sm.rcDirty) {
			delete(sm.rcDirty, b)
			var err error
			if c := sm.counts[b]; c >= 3 {
				var v [4]byte
				le.PutUint32(v[:], c)
				sm.rcRoot, err = sm.rcTree(tm).Insert(sm.rcRoot, b, v[:])
			} else {
				sm.rcRoot, _, err = sm.rcTree(tm).Remove(sm.rcRoot, b)
			}
			if err != nil {
				return false, err
			}
		}
	}
	if sm.meta && (sm.indexRoot == 0 || !tm.IsShadow(sm.indexRoot)) {
		b, err := tm.SM.Alloc()
		if err != nil {
			return false, err
		}
		tm.shadows[b] = struct{}{}
		if old := sm.indexRoot; old != 0 {
			if err := tm.SM.Dec(old); err != nil {
				return false, err
			}
		}
		sm.indexRoot, progress = b, true
	}
	return progress, nil
}

// writeBitmaps writes the dirty bitmaps' contents from the counts and
// their index entries (data: into the index btree).
func (sm *SpaceMap) writeBitmaps(tm *TM) error {
	for _, i := range sortedKeys(sm.dirty) {
		buf := tm.BM.New(sm.bitmaps[i], KindBitmap)
		first := i * EntriesPerBitmap
		last := min(first+EntriesPerBitmap, uint64(len(sm.counts)))
		nfb := uint32(EntriesPerBitmap)
		for b := first; b < last; b++ {
			c := min(sm.counts[b], 3)
			if c == 0 && nfb == EntriesPerBitmap {
				nfb = uint32(b - first)
			}
			j := 2 * (b - first)
			if c&2 != 0 {
				buf[16+j/8] |= 1 << (j % 8)
			}
			if c&1 != 0 {
				buf[16+(j+1)/8] |= 1 << ((j + 1) % 8)
			}
		}
		if nfb == EntriesPerBitmap && last-first < EntriesPerBitmap {
			nfb = uint32(last - first)
		}
		sm.nfb[i] = nfb
		if !sm.meta {
			var err error
			if sm.indexRoot, err = sm.idxTree(tm).Insert(sm.indexRoot, i, sm.indexEntry(i)); err != nil {
				return err
			}
		}
	}
	clear(sm.dirty)
	if sm.meta {
		if len(sm.bitmaps) > MaxMetadataBitmaps {
			return fmt.Errorf("metadata space map of %d bitmaps: more than %d", len(sm.bitmaps), MaxMetadataBitmaps)
		}
		buf := tm.BM.New(sm.indexRoot, KindIndex)
		for i := range sm.bitmaps {
			copy(buf[16+indexEntrySize*i:], sm.indexEntry(uint64(i)))
		}
	}
	return nil
}

// LoadSpaceMap reads a space map from its root.
func LoadSpaceMap(tm *TM, r Root, meta bool) (*SpaceMap, error) {
	if meta && r.NrBlocks > MaxMetadataBlocks {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata space map of %d blocks: more than %d", r.NrBlocks, MaxMetadataBlocks)
	}
	if r.NrBlocks > 1<<40 {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "space map of %d blocks: too large", r.NrBlocks)
	}
	sm := NewSpaceMap(r.NrBlocks, meta)
	clear(sm.dirty)
	sm.indexRoot, sm.rcRoot = r.BitmapRoot, r.RefCountRoot
	nb := uint64(len(sm.bitmaps))
	entries := make([][]byte, nb)
	if meta {
		buf, err := tm.BM.Read(r.BitmapRoot, KindIndex)
		if err != nil {
			return nil, err
		}
		for i := range entries {
			entries[i] = buf[16+indexEntrySize*i : 16+indexEntrySize*(i+1)]
		}
	} else {
		err := sm.idxTree(tm).Walk(r.BitmapRoot, func(k uint64, v []byte) error {
			if k >= nb {
				return mapper.Errorf(mapper.ErrCorrupt, "space map index names bitmap %d of %d", k, nb)
			}
			entries[k] = v
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	for i, e := range entries {
		if e == nil {
			return nil, mapper.Errorf(mapper.ErrCorrupt, "space map index lacks bitmap %d", i)
		}
		sm.bitmaps[i] = le.Uint64(e)
		sm.nfb[i] = le.Uint32(e[12:])
		buf, err := tm.BM.Read(sm.bitmaps[i], KindBitmap)
		if err != nil {
			return nil, err
		}
		first := uint64(i) * EntriesPerBitmap
		last := min(first+EntriesPerBitmap, r.NrBlocks)
		for b := first; b < last; b++ {
			j := 2 * (b - first)
			c := uint32(buf[16+j/8]>>(j%8)&1)<<1 | uint32(buf[16+(j+1)/8]>>((j+1)%8)&1)
			sm.counts[b] = c
			if c != 0 {
				sm.nrAlloc++
				sm.used[i]++
			}
		}
	}
	err := sm.rcTree(tm).Walk(r.RefCountRoot, func(k uint64, v []byte) error {
		if k >= r.NrBlocks || sm.counts[k] != 3 {
			return mapper.Errorf(mapper.ErrCorrupt, "ref-count tree names block %d, whose bitmap count is not 3", k)
		}
		sm.counts[k] = le.Uint32(v)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return sm, nil
}
