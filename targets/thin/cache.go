package thin

import "github.com/vhostdm/vhostdm/targets/thin/pdata"

// The default bound of a pool's metadata block cache, sized for the pool:
// the metadata the pool's whole mapping takes by the kernel's sizing
// guide for the metadata device (thin-provisioning.rst: 48 bytes per data
// block, which covers the mapping btrees and the space maps of a fully
// provisioned pool), in 4 KiB blocks, no less than cacheFloor and no more
// than cacheCap, and never more than the metadata device's blocks (a
// cache cannot hold more than there is).
const (
	metaBytesPerDataBlock = 48
	cacheFloor            = (1 << 20) / pdata.BlockSize   // 1 MiB
	cacheCap              = (128 << 20) / pdata.BlockSize // 128 MiB
)

// defaultCacheBlocks returns the default cache bound, in metadata blocks,
// of a pool of dataBlocks data blocks on metaBlocks metadata blocks.
func defaultCacheBlocks(dataBlocks, metaBlocks uint64) int {
	n := (dataBlocks*metaBytesPerDataBlock + pdata.BlockSize - 1) / pdata.BlockSize
	n = min(max(n, cacheFloor), cacheCap, metaBlocks)
	return int(max(n, 1))
}

// cacheBlocks is the cache bound in force: the configured bytes in whole
// blocks (at least one), or the default for the pool's size now.
func (p *pool) cacheBlocks() int {
	if p.cacheBytes > 0 {
		return int(max(p.cacheBytes/pdata.BlockSize, 1))
	}
	return defaultCacheBlocks(p.md.data.NrBlocks(), p.md.tm.SM.NrBlocks())
}

// applyCache bounds the metadata block cache to cacheBlocks, after the
// option changed or the pool grew. Called with p.mu.
func (p *pool) applyCache() {
	n := p.cacheBlocks()
	if n == p.cacheLimit {
		return
	}
	p.md.bm.SetCacheBlocks(n)
	if p.cacheLimit != 0 {
		p.log.Info("metadata cache bound changed", "blocks", n, "bytes", int64(n)*pdata.BlockSize, "configured", p.cacheBytes > 0)
	}
	p.cacheLimit = n
}

// SetMetadataCache sets the table's metadata cache option (bytes; 0: the
// default sized for the pool); the pool's live table applies it at once,
// another when it resumes.
func (t *poolTarget) SetMetadataCache(bytes int64) {
	p := t.p
	p.mu.Lock()
	defer p.mu.Unlock()
	t.cacheBytes = bytes
	if p.live == t {
		p.cacheBytes = bytes
		p.applyCache()
	}
}

// MetadataCache reports the bytes of clean metadata blocks the pool
// caches and the bound in force.
func (t *poolTarget) MetadataCache() (cached, limit int64) {
	p := t.p
	p.mu.Lock()
	defer p.mu.Unlock()
	clean, _, _ := p.md.bm.CacheStats()
	return int64(clean) * pdata.BlockSize, int64(p.cacheLimit) * pdata.BlockSize
}
