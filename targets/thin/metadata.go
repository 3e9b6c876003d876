package thin

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/targets/thin/pdata"
)

// Superblock layout (block 0 of the metadata device; little-endian, part of
// the kernel's on-disk format, dm-thin-metadata.c's thin_disk_superblock):
//
//	0 csum | 4 flags | 8 blocknr | 16 uuid[16] | 32 magic | 40 version
//	44 time | 48 trans_id | 56 held_root | 64 data_space_map_root[128]
//	192 metadata_space_map_root[128] | 320 data_mapping_root
//	328 device_details_root | 336 data_block_size | 340 metadata_block_size
//	344 metadata_nr_blocks | 352 compat_flags | 356 compat_ro_flags
//	360 incompat_flags
const (
	sbMagic         = 27022010
	sbVersion       = 2
	flagNeedsCheck  = 1
	metaBlockSecs   = pdata.BlockSize / mapper.SectorSize
	timeBits        = 24
	detailsSize     = 24
	maxDevID        = 1<<24 - 1 // the kernel's MAX_DEV_ID
	maxDataBlockNr  = 1<<40 - 1 // a mapping keeps 40 bits of data block
	offFlags        = 4
	offMagic        = 32
	offVersion      = 40
	offTime         = 44
	offTransID      = 48
	offHeldRoot     = 56
	offDataSMRoot   = 64
	offMetaSMRoot   = 192
	offMappingRoot  = 320
	offDetailsRoot  = 328
	offDataBlkSize  = 336
	offMetaBlkSize  = 340
	offMetaNrBlocks = 344
	offIncompat     = 360
)

// device is one thin device's details and the root of its mapping tree.
type device struct {
	root            uint64
	mapped          uint64 // blocks
	transID         uint64
	creationTime    uint32
	snapshottedTime uint32
	changed         bool // details to write at commit
	touched         bool // its top-level path is shadowed in this transaction
	open            int  // thin targets using it
}

// metadata is a pool's metadata: the kernel's format, kept by pdata.
// Not safe for concurrent use; the pool's mutex guards it.
type metadata struct {
	bm      *pdata.BM
	tm      *pdata.TM
	data    *pdata.SpaceMap
	top     *pdata.Tree // dev id → mapping subtree root
	bottom  *pdata.Tree // virtual block → data block << 24 | time
	details *pdata.Tree // dev id → details

	flags       uint32
	time        uint32
	transID     uint64
	heldRoot    uint64
	mappingRoot uint64
	detailsRoot uint64
	blockSize   uint32 // sectors per data block
	metaBlocks  uint64

	devs    map[uint64]*device
	changed bool // anything to commit
}

func (md *metadata) initTrees() {
	md.bottom = &pdata.Tree{TM: md.tm, VT: pdata.ValueType{Size: 8,
		Inc: func(v []byte) error { return md.data.Inc(u64(v) >> timeBits) },
		Dec: func(v []byte) error { return md.data.Dec(u64(v) >> timeBits) }}}
	md.top = &pdata.Tree{TM: md.tm, VT: pdata.ValueType{Size: 8,
		Inc: func(v []byte) error { return md.tm.Inc(u64(v)) },
		Dec: func(v []byte) error { return md.bottom.Del(u64(v)) }}}
	md.details = &pdata.Tree{TM: md.tm, VT: pdata.ValueType{Size: detailsSize}}
}

// superblockZero reports whether the first block is all zeros: a fresh
// pool, formatted by the first load.
func superblockZero(buf []byte) bool {
	for _, b := range buf {
		if b != 0 {
			return false
		}
	}
	return true
}

// metaBlocksOf returns the metadata blocks of a device of size bytes, at
// most what one metadata space map can count.
func metaBlocksOf(size int64) uint64 {
	return min(uint64(size)/pdata.BlockSize, pdata.MaxMetadataBlocks)
}

// openMetadata reads the metadata on dev, or formats it when its first
// block is zero, for a pool of dataBlocks blocks of blockSize sectors.
func openMetadata(dev mapper.Backend, blockSize uint32, dataBlocks uint64) (*metadata, error) {
	size, err := dev.Size()
	if err != nil {
		return nil, err
	}
	nr := metaBlocksOf(size)
	if nr < 16 {
		return nil, fmt.Errorf("metadata device %s of %d bytes: too small", dev.Name(), size)
	}
	bm := pdata.NewBM(dev, nr)
	sb, err := bm.ReadRaw(0)
	if err != nil {
		return nil, err
	}
	if superblockZero(sb) {
		return formatMetadata(bm, blockSize, dataBlocks)
	}
	if got, want := getU32(sb, 0), pdata.Checksum(sb, pdata.SuperblockSalt); got != want {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "superblock checksum %#x, want %#x", got, want)
	}
	if m := getU64(sb, offMagic); m != sbMagic {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "superblock magic %d, want %d", m, sbMagic)
	}
	if v := getU32(sb, offVersion); v < 1 || v > sbVersion {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata version %d: only 1 and 2 are known", v)
	}
	if f := getU32(sb, offIncompat); f != 0 {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata has unknown incompatible features %#x", f)
	}
	md := &metadata{bm: bm, devs: map[uint64]*device{},
		flags: getU32(sb, offFlags), time: getU32(sb, offTime), transID: getU64(sb, offTransID),
		heldRoot: getU64(sb, offHeldRoot), mappingRoot: getU64(sb, offMappingRoot),
		detailsRoot: getU64(sb, offDetailsRoot), blockSize: getU32(sb, offDataBlkSize),
		metaBlocks: getU64(sb, offMetaNrBlocks)}
	if md.blockSize != blockSize {
		return nil, fmt.Errorf("data block size %d: the metadata says %d, and changing it is not supported", blockSize, md.blockSize)
	}
	metaRoot := pdata.DecodeRoot(sb[offMetaSMRoot:])
	if metaRoot.NrBlocks > nr {
		return nil, fmt.Errorf("metadata device (%d blocks) too small: expected %d", nr, metaRoot.NrBlocks)
	}
	bm = pdata.NewBM(dev, metaRoot.NrBlocks)
	md.bm = bm
	md.tm = pdata.NewTM(bm, nil)
	if md.tm.SM, err = pdata.LoadSpaceMap(md.tm, metaRoot, true); err != nil {
		return nil, fmt.Errorf("metadata space map: %w", err)
	}
	if md.data, err = pdata.LoadSpaceMap(md.tm, pdata.DecodeRoot(sb[offDataSMRoot:]), false); err != nil {
		return nil, fmt.Errorf("data space map: %w", err)
	}
	md.initTrees()
	err = md.details.Walk(md.detailsRoot, func(k uint64, v []byte) error {
		md.devs[k] = &device{mapped: getU64(v, 0), transID: getU64(v, 8), creationTime: getU32(v, 16), snapshottedTime: getU32(v, 20)}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("device details: %w", err)
	}
	err = md.top.Walk(md.mappingRoot, func(k uint64, v []byte) error {
		d := md.devs[k]
		if d == nil {
			return mapper.Errorf(mapper.ErrCorrupt, "mapping tree has device %d without details", k)
		}
		d.root = u64(v)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("mapping tree: %w", err)
	}
	for id, d := range md.devs {
		if d.root == 0 {
			return nil, mapper.Errorf(mapper.ErrCorrupt, "device %d has details but no mapping tree", id)
		}
	}
	if dataBlocks > md.data.NrBlocks() {
		md.data.Extend(dataBlocks)
		md.changed = true
	}
	return md, nil
}

// formatMetadata writes a new, empty pool and commits it.
func formatMetadata(bm *pdata.BM, blockSize uint32, dataBlocks uint64) (*metadata, error) {
	sm := pdata.NewSpaceMap(bm.NrBlocks(), true)
	if err := sm.Inc(0); err != nil { // the superblock
		return nil, err
	}
	md := &metadata{bm: bm, tm: pdata.NewTM(bm, sm), data: pdata.NewSpaceMap(dataBlocks, false),
		blockSize: blockSize, metaBlocks: bm.NrBlocks(), devs: map[uint64]*device{}}
	md.initTrees()
	var err error
	if md.mappingRoot, err = md.top.Empty(); err != nil {
		return nil, err
	}
	if md.detailsRoot, err = md.details.Empty(); err != nil {
		return nil, err
	}
	md.changed = true
	if err := md.commit(); err != nil {
		return nil, err
	}
	return md, nil
}

// commit writes changed details and the space maps, then the superblock,
// at once.
func (md *metadata) commit() error {
	if !md.changed {
		return nil
	}
	pc, err := md.prepare()
	if err != nil {
		return err
	}
	if err := pc.write(); err != nil {
		return err
	}
	pc.landed()
	return nil
}

// pendingCommit is a transaction that [metadata.prepare] closed: its
// blocks and superblock, to write without the pool's lock.
type pendingCommit struct {
	c  *pdata.Commit
	bm *pdata.BM
	sb []byte
}

// flushDetails writes the changed device details into the details tree.
func (md *metadata) flushDetails() error {
	for id, d := range md.devs {
		if !d.changed {
			continue
		}
		var v [detailsSize]byte
		putU64(v[:], 0, d.mapped)
		putU64(v[:], 8, d.transID)
		putU32(v[:], 16, d.creationTime)
		putU32(v[:], 20, d.snapshottedTime)
		var err error
		if md.detailsRoot, err = md.details.Insert(md.detailsRoot, id, v[:]); err != nil {
			return err
		}
		d.changed = false
	}
	return nil
}

// prepare ends the running transaction in memory: changed details go
// into their tree, the space maps into their blocks, and every changed
// block and the new superblock into the returned commit. The next
// transaction starts at once; the caller writes the commit (without the
// pool's lock) and then calls landed.
func (md *metadata) prepare() (*pendingCommit, error) {
	if err := md.flushDetails(); err != nil {
		return nil, err
	}
	c, err := md.tm.Prepare(md.data)
	if err != nil {
		return nil, err
	}
	for _, d := range md.devs {
		d.touched = false
	}
	md.changed = false
	return &pendingCommit{c: c, bm: md.bm, sb: md.superblock(c.MetaRoot, c.DataRoot)}, nil
}

// write writes the commit's blocks, flushes, then writes the superblock
// and flushes again: the transaction is committed when it returns nil.
func (pc *pendingCommit) write() error {
	if err := pc.c.Write(); err != nil {
		return err
	}
	if err := pc.bm.WriteRaw(0, pdata.KindSuper, pc.sb); err != nil {
		return err
	}
	return pc.bm.Flush()
}

// landed makes the written blocks clean cache entries and the blocks
// freed in the transaction reusable. Called with the pool's lock.
func (pc *pendingCommit) landed() { pc.c.Landed() }

// superblock returns the superblock of the state in memory, with the
// space maps' roots given.
func (md *metadata) superblock(metaRoot, dataRoot pdata.Root) []byte {
	sb := make([]byte, pdata.BlockSize)
	putU32(sb, offFlags, md.flags)
	putU64(sb, offMagic, sbMagic)
	putU32(sb, offVersion, sbVersion)
	putU32(sb, offTime, md.time)
	putU64(sb, offTransID, md.transID)
	putU64(sb, offHeldRoot, md.heldRoot)
	dataRoot.Encode(sb[offDataSMRoot:])
	metaRoot.Encode(sb[offMetaSMRoot:])
	putU64(sb, offMappingRoot, md.mappingRoot)
	putU64(sb, offDetailsRoot, md.detailsRoot)
	putU32(sb, offDataBlkSize, md.blockSize)
	putU32(sb, offMetaBlkSize, metaBlockSecs)
	putU64(sb, offMetaNrBlocks, md.metaBlocks)
	return sb
}

// errExists and errNoDevice are the kernel's -EEXIST and -ENODATA.
var (
	errExists   = errors.New("device already exists")
	errNoDevice = errors.New("no such device")
)

func (md *metadata) checkNewID(id uint64) error {
	if id > maxDevID {
		return mapper.Errorf(mapper.ErrInvalid, "device id %d: more than %d", id, maxDevID)
	}
	if _, ok := md.devs[id]; ok {
		return mapper.Errorf(mapper.ErrExists, "device id %d: %w", id, errExists)
	}
	return nil
}

func (md *metadata) createThin(id uint64) error {
	if err := md.checkNewID(id); err != nil {
		return err
	}
	root, err := md.bottom.Empty()
	if err != nil {
		return err
	}
	if md.mappingRoot, err = md.top.Set(md.mappingRoot, id, put64(root)); err != nil {
		return err
	}
	md.devs[id] = &device{root: root, transID: md.transID, creationTime: md.time, snapshottedTime: md.time, changed: true, touched: true}
	md.changed = true
	return nil
}

func (md *metadata) createSnap(id, origin uint64) error {
	if err := md.checkNewID(id); err != nil {
		return err
	}
	o := md.devs[origin]
	if o == nil {
		return mapper.Errorf(mapper.ErrNotFound, "origin device %d: %w", origin, errNoDevice)
	}
	if err := md.tm.Inc(o.root); err != nil {
		return err
	}
	var err error
	if md.mappingRoot, err = md.top.Set(md.mappingRoot, id, put64(o.root)); err != nil {
		return err
	}
	md.time++
	o.snapshottedTime, o.changed = md.time, true
	md.devs[id] = &device{root: o.root, mapped: o.mapped, transID: o.transID, creationTime: md.time,
		snapshottedTime: md.time, changed: true, touched: true}
	md.changed = true
	return nil
}

func (md *metadata) deleteDev(id uint64) error {
	d := md.devs[id]
	if d == nil {
		return mapper.Errorf(mapper.ErrNotFound, "device %d: %w", id, errNoDevice)
	}
	var err error
	if md.mappingRoot, _, err = md.top.Remove(md.mappingRoot, id); err != nil {
		return err
	}
	if md.detailsRoot, _, err = md.details.Remove(md.detailsRoot, id); err != nil {
		return err
	}
	delete(md.devs, id)
	md.changed = true
	return nil
}

// touch shadows the top-level path of d before its subtree changes, so
// that a top-level node shared with a metadata snapshot is copied (and
// its subtree roots counted) first.
func (md *metadata) touch(id uint64, d *device) error {
	if d.touched {
		return nil
	}
	var err error
	if md.mappingRoot, err = md.top.Set(md.mappingRoot, id, put64(d.root)); err != nil {
		return err
	}
	d.touched = true
	return nil
}

func (md *metadata) setRoot(id uint64, d *device, root uint64) error {
	if root == d.root {
		return nil
	}
	d.root = root
	var err error
	md.mappingRoot, err = md.top.Set(md.mappingRoot, id, put64(root))
	return err
}

// lookup returns the data block and time of virtual block vb of d.
func (md *metadata) lookup(d *device, vb uint64) (pb uint64, t uint32, ok bool, err error) {
	v, ok, err := md.bottom.Lookup(d.root, vb)
	if err != nil || !ok {
		return 0, 0, false, err
	}
	x := u64(v)
	return x >> timeBits, uint32(x & (1<<timeBits - 1)), true, nil
}

// insert maps vb of d to data block pb, whose count it takes over (the
// caller reserved or counted it). A previous mapping is released.
func (md *metadata) insert(id uint64, d *device, vb, pb uint64) error {
	if err := md.touch(id, d); err != nil {
		return err
	}
	_, had, err := md.bottom.Lookup(d.root, vb)
	if err != nil {
		return err
	}
	if err := md.data.Inc(pb); err != nil {
		return err
	}
	root, err := md.bottom.Insert(d.root, vb, put64(pb<<timeBits|uint64(md.time)&(1<<timeBits-1)))
	if err != nil {
		return err
	}
	if !had {
		d.mapped++
	}
	d.changed, md.changed = true, true
	return md.setRoot(id, d, root)
}

// remove unmaps vb of d, releasing its data block.
func (md *metadata) remove(id uint64, d *device, vb uint64) (bool, error) {
	if _, ok, err := md.bottom.Lookup(d.root, vb); err != nil || !ok {
		return false, err
	}
	if err := md.touch(id, d); err != nil {
		return false, err
	}
	root, _, err := md.bottom.Remove(d.root, vb)
	if err != nil {
		return false, err
	}
	d.mapped--
	d.changed, md.changed = true, true
	return true, md.setRoot(id, d, root)
}

// highest returns the highest mapped virtual block of d.
func (md *metadata) highest(d *device) (uint64, bool, error) {
	k, _, ok, err := md.bottom.Last(d.root)
	return k, ok, err
}

// reserveSnap takes a metadata snapshot: a copy of the committed
// superblock, holding references to the mapping and details trees.
func (md *metadata) reserveSnap() error {
	if md.heldRoot != 0 {
		return mapper.Errorf(mapper.ErrBusy, "pool metadata snapshot already exists: release it before taking another")
	}
	// The copy names the trees as they are now, details included; the
	// commit that follows the message writes them.
	if err := md.flushDetails(); err != nil {
		return err
	}
	b, buf, err := md.tm.NewBlock(pdata.KindSuper)
	if err != nil {
		return err
	}
	putU64(buf, offMagic, sbMagic)
	putU32(buf, offVersion, sbVersion)
	putU32(buf, offTime, md.time)
	putU64(buf, offTransID, md.transID)
	putU64(buf, offMappingRoot, md.mappingRoot)
	putU64(buf, offDetailsRoot, md.detailsRoot)
	putU32(buf, offDataBlkSize, md.blockSize)
	putU32(buf, offMetaBlkSize, metaBlockSecs)
	putU64(buf, offMetaNrBlocks, md.metaBlocks)
	if err := md.tm.Inc(md.mappingRoot); err != nil {
		return err
	}
	if err := md.tm.Inc(md.detailsRoot); err != nil {
		return err
	}
	for _, d := range md.devs {
		d.touched = false // the top level is shared now
	}
	md.heldRoot = b
	md.changed = true
	return nil
}

// releaseSnap drops the metadata snapshot.
func (md *metadata) releaseSnap() error {
	if md.heldRoot == 0 {
		return mapper.Errorf(mapper.ErrInvalid, "no pool metadata snapshot to release")
	}
	buf, err := md.bm.Read(md.heldRoot, pdata.KindSuper)
	if err != nil {
		return err
	}
	if err := md.top.Del(getU64(buf, offMappingRoot)); err != nil {
		return err
	}
	if err := md.details.Del(getU64(buf, offDetailsRoot)); err != nil {
		return err
	}
	if err := md.tm.Dec(md.heldRoot); err != nil {
		return err
	}
	md.heldRoot = 0
	md.changed = true
	return nil
}

func u64(v []byte) uint64 { return getU64(v, 0) }

func put64(v uint64) []byte {
	b := make([]byte, 8)
	putU64(b, 0, v)
	return b
}

func getU64(b []byte, off int) uint64 { return binary.LittleEndian.Uint64(b[off:]) }

func getU32(b []byte, off int) uint32 { return binary.LittleEndian.Uint32(b[off:]) }

func putU64(b []byte, off int, v uint64) { binary.LittleEndian.PutUint64(b[off:], v) }

func putU32(b []byte, off int, v uint32) { binary.LittleEndian.PutUint32(b[off:], v) }
