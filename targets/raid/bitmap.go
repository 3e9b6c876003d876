package raid

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// The write-intent bitmap lives on the metadata devices, the same copy on
// each. It is vhostdm's own format, not dm-raid's superblock and md bitmap:
//
//	byte 0     "VDMRAIDB"  magic
//	byte 8     u32 LE      version (1)
//	byte 12    u32 LE      device count
//	byte 16    u64 LE      region size in sectors
//	byte 24    u64 LE      region count
//	byte 32    u64 LE      per-device sectors
//	byte 4096  bitmap      one bit per region, bit i in byte i/8 at i%8; 1 = dirty
//
// A region's bit is set and flushed before the first write to it; it is
// cleared by the bitmap daemon (every daemon_sleep ms, default 5000) once
// no write to the region is in flight and the data devices were flushed
// since the last write. After a crash, only regions whose bit is set are
// resynced.

const (
	bitmapMagic          = "VDMRAIDB"
	bitmapVersion        = 1
	bitmapOffset         = 4096
	defaultRegionSize    = 8192
	defaultDaemonSleepMS = 5000
)

type bitmap struct {
	// Immutable.
	region uint64 // sectors
	count  uint64
	sleep  time.Duration
	fresh  bool // no valid bitmap was found

	mu      sync.Mutex
	bits    []byte   // as on disk
	pending []int32  // writes in flight per region
	gen     []uint32 // writes started per region
	resync  []byte   // regions to resync, from the bitmap found at load
	stop    chan struct{}
	done    chan struct{}
}

func (b *bitmap) sectors() uint64 {
	return (bitmapOffset + (b.count+7)/8 + mapper.SectorSize - 1) / mapper.SectorSize
}

// openBitmap reads the bitmap of the first metadata device that has one.
func openBitmap(r *raid) (*bitmap, error) {
	region := uint64(defaultRegionSize)
	if r.p.regionSize > 0 {
		region = uint64(r.p.regionSize)
	}
	for region < r.chunk || (r.devSectors+region-1)/region > 1<<21 {
		region *= 2
	}
	if r.p.regionSize > 0 && region != uint64(r.p.regionSize) {
		return nil, fmt.Errorf("region_size %d: smaller than chunk size %d or more than 2^21 regions", r.p.regionSize, r.chunk)
	}
	b := &bitmap{region: region, count: (r.devSectors + region - 1) / region, sleep: defaultDaemonSleepMS * time.Millisecond}
	if r.p.daemonSleep > 0 {
		b.sleep = time.Duration(r.p.daemonSleep) * time.Millisecond
	}
	nb := (b.count + 7) / 8
	b.bits, b.resync = make([]byte, nb), make([]byte, nb)
	b.pending, b.gen = make([]int32, b.count), make([]uint32, b.count)
	b.fresh = true
	for i, m := range r.devs {
		if m.meta == nil {
			continue
		}
		buf := make([]byte, bitmapOffset+nb)
		if err := m.meta.ReadAt([][]byte{buf}, 0); err != nil {
			return nil, fmt.Errorf("metadata device %d: %w", i, err)
		}
		if !bytes.Equal(buf[:8], []byte(bitmapMagic)) {
			continue
		}
		le := binary.LittleEndian
		if le.Uint32(buf[8:]) != bitmapVersion || le.Uint32(buf[12:]) != uint32(len(r.devs)) ||
			le.Uint64(buf[16:]) != b.region || le.Uint64(buf[24:]) != b.count || le.Uint64(buf[32:]) != r.devSectors {
			return nil, mapper.Errorf(mapper.ErrCorrupt, "metadata device %d: bitmap for another geometry (version %d, %d devices, region %d, %d regions, %d sectors)",
				i, le.Uint32(buf[8:]), le.Uint32(buf[12:]), le.Uint64(buf[16:]), le.Uint64(buf[24:]), le.Uint64(buf[32:]))
		}
		copy(b.bits, buf[bitmapOffset:])
		copy(b.resync, b.bits)
		b.fresh = false
		break
	}
	if !b.fresh && !r.p.sync {
		r.resyncCP = math.MaxUint64 // the bitmap says what to resync
	}
	if r.p.nosync {
		clear(b.resync)
	}
	return b, nil
}

// write puts the header and bitmap on every metadata device and flushes
// them; b.mu is held.
func (b *bitmap) write(r *raid) error {
	buf := make([]byte, bitmapOffset+len(b.bits))
	copy(buf, bitmapMagic)
	le := binary.LittleEndian
	le.PutUint32(buf[8:], bitmapVersion)
	le.PutUint32(buf[12:], uint32(len(r.devs)))
	le.PutUint64(buf[16:], b.region)
	le.PutUint64(buf[24:], b.count)
	le.PutUint64(buf[32:], r.devSectors)
	copy(buf[bitmapOffset:], b.bits)
	ok := 0
	var last error
	for _, m := range r.devs {
		if m.meta == nil {
			continue
		}
		err := m.meta.WriteAt([][]byte{buf}, 0)
		if err == nil {
			err = m.meta.Flush()
		}
		if err != nil {
			last = err
			continue
		}
		ok++
	}
	if ok == 0 {
		return mapper.Errorf(mapper.ErrIO, "write-intent bitmap: no metadata device written: %v", last)
	}
	return nil
}

// startWrite marks the region of device sector dsec dirty before a write.
func (b *bitmap) startWrite(r *raid, dsec uint64) error {
	i := dsec / b.region
	b.mu.Lock()
	defer b.mu.Unlock()
	b.pending[i]++
	b.gen[i]++
	if b.bits[i/8]&(1<<(i%8)) != 0 {
		return nil
	}
	b.bits[i/8] |= 1 << (i % 8)
	if err := b.write(r); err != nil {
		b.pending[i]--
		return err
	}
	return nil
}

// endWrite ends a write started by startWrite.
func (b *bitmap) endWrite(dsec uint64) {
	b.mu.Lock()
	b.pending[dsec/b.region]--
	b.mu.Unlock()
}

// needsResync reports whether the bitmap found at load had dirty regions.
func (b *bitmap) needsResync() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, v := range b.resync {
		if v != 0 {
			return true
		}
	}
	return false
}

// resyncWanted reports whether the region of device sector dsec is to be
// resynced.
func (b *bitmap) resyncWanted(dsec uint64) bool {
	i := dsec / b.region
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.resync[i/8]&(1<<(i%8)) != 0
}

// resyncDone forgets the regions to resync; the daemon clears their bits.
func (b *bitmap) resyncDone(r *raid) {
	b.mu.Lock()
	clear(b.resync)
	b.mu.Unlock()
}

// start writes the bitmap (creating it on fresh devices) and starts the
// daemon.
func (b *bitmap) start(r *raid) {
	b.mu.Lock()
	if err := b.write(r); err != nil {
		r.log.Warn("raid bitmap write failed", "err", err)
	}
	if b.stop == nil {
		b.stop, b.done = make(chan struct{}), make(chan struct{})
		go b.daemon(r, b.stop, b.done)
	}
	b.mu.Unlock()
}

func (b *bitmap) daemon(r *raid, stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(b.sleep)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			if err := b.sync(r); err != nil {
				r.log.Warn("raid bitmap update failed", "err", err)
			}
		}
	}
}

// sync clears the bits of regions with no write in flight and none
// started since the data devices were last flushed here.
func (b *bitmap) sync(r *raid) error {
	b.mu.Lock()
	type cand struct {
		i   uint64
		gen uint32
	}
	var cands []cand
	for i := range b.count {
		if b.bits[i/8]&(1<<(i%8)) != 0 && b.pending[i] == 0 && b.resync[i/8]&(1<<(i%8)) == 0 {
			cands = append(cands, cand{i, b.gen[i]})
		}
	}
	b.mu.Unlock()
	if len(cands) == 0 {
		return nil
	}
	if err := r.Flush(); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	changed := false
	for _, c := range cands {
		if b.pending[c.i] == 0 && b.gen[c.i] == c.gen {
			b.bits[c.i/8] &^= 1 << (c.i % 8)
			changed = true
		}
	}
	if !changed {
		return nil
	}
	return b.write(r)
}

// close stops the daemon.
func (b *bitmap) close(r *raid) {
	b.mu.Lock()
	stop, done := b.stop, b.done
	b.stop, b.done = nil, nil
	b.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}
