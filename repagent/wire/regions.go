package wire

import (
	"time"

	"github.com/RoaringBitmap/roaring/v2"
)

// DefaultRegionSectors is the granularity of dirty tracking on both sides:
// 128 sectors, 64 KiB.
const DefaultRegionSectors = 128

// MaxTrackedRegions bounds a volume's region count so that region indexes
// fit the 32-bit bitmaps (with 64 KiB regions: 256 TiB).
const MaxTrackedRegions = 1 << 32

// RegionCount returns the number of regions of a volume of sectors.
func RegionCount(sectors uint64, regionSectors uint32) uint64 {
	rs := uint64(regionSectors)
	return (sectors + rs - 1) / rs
}

// AddSectors marks the regions that the sector range touches.
func AddSectors(bm *roaring.Bitmap, sector, sectors uint64, regionSectors uint32) {
	if sectors == 0 {
		return
	}
	rs := uint64(regionSectors)
	first := sector / rs
	last := (sector + sectors - 1) / rs
	bm.AddRange(first, last+1)
}

// ExtentsOf returns the runs of set bits in bm, in order.
func ExtentsOf(bm *roaring.Bitmap) []Extent {
	var out []Extent
	it := bm.ManyIterator()
	buf := make([]uint32, 1024)
	for {
		n := it.NextMany(buf)
		if n == 0 {
			return out
		}
		for _, x := range buf[:n] {
			v := uint64(x)
			if k := len(out); k > 0 && out[k-1].Start+out[k-1].Count == v {
				out[k-1].Count++
				continue
			}
			out = append(out, Extent{Start: v, Count: 1})
		}
	}
}

// AddExtents marks the regions of exts, given in units of fromSectors
// regions, in bm whose regions are toSectors; regions at or past limit
// (in bm's units) are ignored.
func AddExtents(bm *roaring.Bitmap, exts []Extent, fromSectors, toSectors uint32, limit uint64) {
	for _, e := range exts {
		s := e.Start * uint64(fromSectors)
		n := e.Count * uint64(fromSectors)
		first := s / uint64(toSectors)
		end := (s + n + uint64(toSectors) - 1) / uint64(toSectors)
		end = min(end, limit)
		if first < end {
			bm.AddRange(first, end)
		}
	}
}

// PeerTimeout is how long a connection may stay silent, or a write
// blocked, before the peer is taken as gone: four heartbeats, at least
// 2 s.
func PeerTimeout(heartbeat time.Duration) time.Duration {
	return max(4*heartbeat, 2*time.Second)
}
