package mapper

import "fmt"

// MetadataCacher is a target that keeps blocks of its on-disk metadata in
// memory (thin-pool: its mapping and device btrees) in a cache whose bound
// is the device's metadata cache option ([DeviceOptions.MetadataCache]).
type MetadataCacher interface {
	// SetMetadataCache bounds the cache to bytes (whole metadata blocks);
	// 0 restores the target's default bound. A target of a table that is
	// not live keeps the setting and applies it when it resumes.
	SetMetadataCache(bytes int64)
	// MetadataCache reports the bytes of clean metadata blocks cached now
	// and the bound in force.
	MetadataCache() (cached, limit int64)
}

// Bounds of a metadata cache option: no less than 16 blocks of 4 KiB, no
// more than the largest thin-pool metadata device (the kernel's 16 GiB).
const (
	MinMetadataCache = 64 << 10
	MaxMetadataCache = 16 << 30
)

// CheckMetadataCache reports whether bytes is a valid metadata cache
// option: 0 (the targets' defaults), or whole 4 KiB blocks from
// MinMetadataCache to MaxMetadataCache.
func CheckMetadataCache(bytes int64) error {
	if bytes == 0 || bytes >= MinMetadataCache && bytes <= MaxMetadataCache && bytes%4096 == 0 {
		return nil
	}
	return Errorf(ErrInvalid, "metadata cache %d bytes: want 0 or whole 4 KiB blocks from %d to %d", bytes, MinMetadataCache, MaxMetadataCache)
}

// MetadataCache returns the device's metadata cache option in bytes; 0
// leaves the bound to its targets' defaults.
func (d *Device) MetadataCache() int64 { return d.metaCache.Load() }

// SetMetadataCache changes the device's metadata cache option to bytes (0:
// the targets' defaults) and applies it at once to the targets of its
// live and inactive tables that keep a metadata cache; tables loaded later
// are built with it. A device whose tables have no such target refuses a
// bound and keeps its option (0 is always accepted).
func (d *Device) SetMetadataCache(bytes int64) error {
	if err := CheckMetadataCache(bytes); err != nil {
		return fmt.Errorf("%s: %w", d.name, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var cachers []MetadataCacher
	for _, t := range []*Table{d.live.Load(), d.inactive} {
		if t == nil {
			continue
		}
		for _, tg := range t.targets {
			if c, ok := tg.(MetadataCacher); ok {
				cachers = append(cachers, c)
			}
		}
	}
	if bytes != 0 && len(cachers) == 0 && (d.live.Load() != nil || d.inactive != nil) {
		return Errorf(ErrInvalid, "%s: no target of its table keeps a metadata cache (thin-pool does)", d.name)
	}
	d.metaCache.Store(bytes)
	for _, c := range cachers {
		c.SetMetadataCache(bytes)
	}
	d.log.Info("metadata cache set", "bytes", bytes)
	return nil
}

// MetadataCacheStats sums the metadata caches of the live table's targets:
// the bytes cached and their bounds; ok is false when no live target keeps
// a metadata cache.
func (d *Device) MetadataCacheStats() (cached, limit int64, ok bool) {
	t := d.live.Load()
	if t == nil {
		return 0, 0, false
	}
	for _, tg := range t.targets {
		if c, is := tg.(MetadataCacher); is {
			n, l := c.MetadataCache()
			cached, limit, ok = cached+n, limit+l, true
		}
	}
	return cached, limit, ok
}
