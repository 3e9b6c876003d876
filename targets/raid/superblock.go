package raid

import (
	"encoding/binary"
	"math"
)

// The metadata devices hold the kernel's formats, so that arrays move
// between vhostdm and dm-raid (drivers/md/dm-raid.c 1.15, md-bitmap.h):
//
//	byte 0     struct dm_raid_superblock ("DmRd", little-endian; the
//	           rest of the first 4 KiB is zero)
//	byte 4096  bitmap_super_t ("bitm", version 4, 256 bytes)
//	byte 4352  the write-intent bitmap: bit i of the bitmap (byte i/8,
//	           bit i%8) set = region i may differ between the members
//
// dm_raid_superblock (148 bytes) field offsets:
//
//	0 magic 0x64526D44          4 compat_features (1: v1.9.0 fields)
//	8 num_devices               12 array_position
//	16 events                   24 failed_devices (bits 0..63)
//	32 disk_recovery_offset     40 array_resync_offset
//	48 level  52 layout  56 stripe_sectors  60 flags (reshape)
//	64 reshape_position         72 new_level 76 new_layout
//	80 new_stripe_sectors       84 delta_disks
//	88 array_sectors  96 data_offset  104 new_data_offset  112 sectors
//	120 extended_failed_devices[3] (bits 64..255)  144 incompat_features
//
// bitmap_super_t field offsets:
//
//	0 magic 0x6d746962  4 version  8 uuid[16]  24 events
//	32 events_cleared   40 sync_size (sectors per device)  48 state
//	52 chunksize (bytes per region)  56 daemon_sleep (seconds)
//	60 write_behind  64 sectors_reserved  68 nodes  72 cluster_name[64]
const (
	sbMagic          = 0x64526D44
	sbSize           = 148
	sbFeatureV190    = 1
	sbFlagReshape    = 1 | 2 // SB_FLAG_RESHAPE_ACTIVE | SB_FLAG_RESHAPE_BACKWARDS
	maxSector        = math.MaxUint64
	bitmapSBOffset   = 4096
	bitmapSBSize     = 256
	bitmapMagic      = 0x6d746962
	bitmapVersion    = 4 // BITMAP_MAJOR_HI
	bitmapVersionLo  = 3 // BITMAP_MAJOR_LO, still read by md
	bitmapStale      = 1 << 1
	bitmapCounterMax = 1<<14 - 1 // COUNTER_MAX: largest write_behind md accepts
)

// superblock is a decoded dm_raid_superblock.
type superblock struct {
	compat, numDevices, position uint32
	events                       uint64
	failed                       [4]uint64 // failed_devices, then the extended ones
	diskRecovery, arrayResync    uint64
	level, layout, stripe, flags uint32
	reshapePos                   uint64
	newLevel, newLayout          uint32
	newStripe, deltaDisks        uint32
	arraySectors                 uint64
	dataOffset, newDataOffset    uint64
	sectors                      uint64
	incompat                     uint32
}

// decodeSuperblock parses b (at least sbSize bytes); ok is false without
// the magic.
func decodeSuperblock(b []byte) (s superblock, ok bool) {
	le := binary.LittleEndian
	if le.Uint32(b) != sbMagic {
		return s, false
	}
	s.compat = le.Uint32(b[4:])
	s.numDevices = le.Uint32(b[8:])
	s.position = le.Uint32(b[12:])
	s.events = le.Uint64(b[16:])
	s.failed[0] = le.Uint64(b[24:])
	s.diskRecovery = le.Uint64(b[32:])
	s.arrayResync = le.Uint64(b[40:])
	s.level = le.Uint32(b[48:])
	s.layout = le.Uint32(b[52:])
	s.stripe = le.Uint32(b[56:])
	if s.compat&sbFeatureV190 == 0 {
		// Before v1.9.0: no reshape fields; the array is as it stands.
		s.reshapePos = maxSector
		s.newLevel, s.newLayout, s.newStripe = s.level, s.layout, s.stripe
		return s, true
	}
	s.flags = le.Uint32(b[60:])
	s.reshapePos = le.Uint64(b[64:])
	s.newLevel = le.Uint32(b[72:])
	s.newLayout = le.Uint32(b[76:])
	s.newStripe = le.Uint32(b[80:])
	s.deltaDisks = le.Uint32(b[84:])
	s.arraySectors = le.Uint64(b[88:])
	s.dataOffset = le.Uint64(b[96:])
	s.newDataOffset = le.Uint64(b[104:])
	s.sectors = le.Uint64(b[112:])
	for i := range 3 {
		s.failed[i+1] = le.Uint64(b[120+8*i:])
	}
	s.incompat = le.Uint32(b[144:])
	return s, true
}

// encode writes s into b (at least sbSize bytes, zeroed), as the kernel's
// super_sync does: always with the v1.9.0 fields.
func (s *superblock) encode(b []byte) {
	le := binary.LittleEndian
	le.PutUint32(b, sbMagic)
	le.PutUint32(b[4:], sbFeatureV190)
	le.PutUint32(b[8:], s.numDevices)
	le.PutUint32(b[12:], s.position)
	le.PutUint64(b[16:], s.events)
	le.PutUint64(b[24:], s.failed[0])
	le.PutUint64(b[32:], s.diskRecovery)
	le.PutUint64(b[40:], s.arrayResync)
	le.PutUint32(b[48:], s.level)
	le.PutUint32(b[52:], s.layout)
	le.PutUint32(b[56:], s.stripe)
	le.PutUint32(b[60:], s.flags)
	le.PutUint64(b[64:], s.reshapePos)
	le.PutUint32(b[72:], s.newLevel)
	le.PutUint32(b[76:], s.newLayout)
	le.PutUint32(b[80:], s.newStripe)
	le.PutUint32(b[84:], s.deltaDisks)
	le.PutUint64(b[88:], s.arraySectors)
	le.PutUint64(b[96:], s.dataOffset)
	le.PutUint64(b[104:], s.newDataOffset)
	le.PutUint64(b[112:], s.sectors)
	for i := range 3 {
		le.PutUint64(b[120+8*i:], s.failed[i+1])
	}
	le.PutUint32(b[144:], s.incompat)
}

// isFailed reports whether device i is recorded as failed.
func (s *superblock) isFailed(i int) bool {
	return i < 256 && s.failed[i/64]&(1<<(i%64)) != 0
}

// bitmapSuper is a decoded bitmap_super_t.
type bitmapSuper struct {
	version                        uint32
	uuid                           [16]byte
	events, eventsCleared, syncSz  uint64
	state, chunkBytes, daemonSleep uint32
	writeBehind, reserved, nodes   uint32
}

// decodeBitmapSuper parses b (at least bitmapSBSize bytes); ok is false
// without the magic.
func decodeBitmapSuper(b []byte) (s bitmapSuper, ok bool) {
	le := binary.LittleEndian
	if le.Uint32(b) != bitmapMagic {
		return s, false
	}
	s.version = le.Uint32(b[4:])
	copy(s.uuid[:], b[8:24])
	s.events = le.Uint64(b[24:])
	s.eventsCleared = le.Uint64(b[32:])
	s.syncSz = le.Uint64(b[40:])
	s.state = le.Uint32(b[48:])
	s.chunkBytes = le.Uint32(b[52:])
	s.daemonSleep = le.Uint32(b[56:])
	s.writeBehind = le.Uint32(b[60:])
	s.reserved = le.Uint32(b[64:])
	s.nodes = le.Uint32(b[68:])
	return s, true
}

// encode writes s into b (at least bitmapSBSize bytes, zeroed).
func (s *bitmapSuper) encode(b []byte) {
	le := binary.LittleEndian
	le.PutUint32(b, bitmapMagic)
	le.PutUint32(b[4:], s.version)
	copy(b[8:24], s.uuid[:])
	le.PutUint64(b[24:], s.events)
	le.PutUint64(b[32:], s.eventsCleared)
	le.PutUint64(b[40:], s.syncSz)
	le.PutUint32(b[48:], s.state)
	le.PutUint32(b[52:], s.chunkBytes)
	le.PutUint32(b[56:], s.daemonSleep)
	le.PutUint32(b[60:], s.writeBehind)
	le.PutUint32(b[64:], s.reserved)
	le.PutUint32(b[68:], s.nodes)
}

// mdLevelLayout returns md's level and layout for the array: raid10's
// layout word from its geometry, the others' from the type.
func (r *raid) mdLevelLayout() (level, layout uint32) {
	if r.r10 != nil {
		return 10, r.r10.mdLayout()
	}
	return mdLevelLayout(r.typ)
}

// mdLevelLayout returns md's level and layout for a raid type, as dm-raid
// records them: raid4 is level 5 with PARITY_0; md's layout numbers skip
// 6 and 7 and start the raid6 "_6" layouts at 16.
func mdLevelLayout(t *raidType) (level, layout uint32) {
	if t.level == 1 || t.level == 0 {
		return uint32(t.level), 0
	}
	level = uint32(t.level)
	if t.level == 4 {
		level = 5
	}
	switch {
	case t.alg <= algParityN:
		layout = uint32(t.alg)
	case t.alg <= algRotatingNContinue:
		layout = uint32(t.alg-algRotatingZeroRestart) + 8
	default:
		layout = uint32(t.alg-algLeftAsymmetric6) + 16
	}
	return level, layout
}
