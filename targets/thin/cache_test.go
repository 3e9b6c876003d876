package thin_test

import (
	"bytes"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// cacheWorkload maps n blocks of device 1 (a 4 KiB write at the start of
// each, in a shuffled order), restarts the pool (an empty cache), and
// reads every one back in another order, comparing with what was written.
// Its mapping tree has far more than 16 blocks.
func cacheWorkload(t *testing.T, e *env, n int) {
	t.Helper()
	e.virt = uint64(e.bs) * uint64(n)
	e.mustMsg("create_thin", "1")
	e.model.devs[1] = map[uint64][]byte{}
	e.activate(1)
	rng := rand.New(rand.NewPCG(5, 23))
	for _, vb := range rng.Perm(n) {
		e.write(1, uint64(vb)*uint64(e.bs), pattern(rng, 4096))
	}
	e.stop()
	e.start()
	buf := make([]byte, 4096)
	for _, vb := range rng.Perm(n) {
		submit(t, e.thins[1], mapper.OpRead, uint64(vb)*uint64(e.bs), buf)
		if !bytes.Equal(buf, e.model.devs[1][uint64(vb)][:4096]) {
			t.Fatalf("block %d reads back different", vb)
		}
	}
}

// TestMetadataCacheConfigured gives a pool a 64 KiB metadata cache
// (DeviceOptions.MetadataCache, the TOML device.metadata-cache): after
// provisioning and reading back 3000 blocks, whose mapping btree spans
// far more than 16 metadata blocks, the pool holds at most 16 clean
// blocks and reads what was written; the same workload on a pool with
// the default bound caches more than 16 blocks (so the workload touches
// more than the configured bound).
func TestMetadataCacheConfigured(t *testing.T) {
	const n = 3000
	small := newEnvOpts(t, 128, n, 8<<20, " 1 skip_block_zeroing", mapper.DeviceOptions{MetadataCache: 64 << 10})
	cacheWorkload(t, small, n)
	cached, limit, ok := small.pool.MetadataCacheStats()
	if !ok || limit != 64<<10 || cached > 64<<10 || cached == 0 {
		t.Fatalf("pool with metadata-cache 64 KiB: %d bytes cached, bound %d (ok %v); want a bound of 65536 and at most that cached", cached, limit, ok)
	}
	dflt := newEnv(t, 128, n, 8<<20, " 1 skip_block_zeroing")
	cacheWorkload(t, dflt, n)
	cached, limit, _ = dflt.pool.MetadataCacheStats()
	if cached <= 64<<10 {
		t.Fatalf("pool with the default bound (%d bytes): %d bytes cached after the workload; want more than 64 KiB", limit, cached)
	}
	t.Logf("same workload: %d bytes cached with the default bound of %d, at most 65536 with metadata-cache 64 KiB", cached, limit)
}

// TestMetadataCacheDefault checks the default bound against its rule
// (48 bytes per data block in 4 KiB blocks, 1 MiB to 128 MiB, at most the
// metadata device): pools of two sizes get two bounds, a pool whose
// metadata device is smaller than the rule gets the device's size, and a
// pool that grows gets a larger bound.
func TestMetadataCacheDefault(t *testing.T) {
	limitOf := func(e *env) int64 {
		t.Helper()
		_, limit, ok := e.pool.MetadataCacheStats()
		if !ok {
			t.Fatal("the pool reports no metadata cache")
		}
		return limit
	}
	smallPool := newEnv(t, 128, 1024, 4<<20, "")
	if got := limitOf(smallPool); got != 1<<20 {
		t.Fatalf("pool of 1024 data blocks: bound %d, want the floor, 1 MiB", got)
	}
	big := newEnv(t, 128, 1<<20, 64<<20, "") // 64 GiB of data (sparse): 48 MiB of mappings
	if got := limitOf(big); got != 48<<20 {
		t.Fatalf("pool of 2^20 data blocks: bound %d, want 48 MiB", got)
	}
	capped := newEnv(t, 128, 1<<20, 8<<20, "")
	if got := limitOf(capped); got != 8<<20 {
		t.Fatalf("pool of 2^20 data blocks on 8 MiB of metadata: bound %d, want the metadata device's 8 MiB", got)
	}
	huge := newEnv(t, 2048, 4<<20, 256<<20, "") // 4 TiB in 1 MiB blocks: 192 MiB of mappings
	if got := limitOf(huge); got != 128<<20 {
		t.Fatalf("pool of 2^22 data blocks: bound %d, want the cap, 128 MiB", got)
	}
	// Grow the small pool's data to 2^18 blocks and its metadata to 16 MiB.
	smallPool.nrBlocks = 1 << 18
	if err := os.Truncate(smallPool.data, int64(smallPool.bs)*512*int64(smallPool.nrBlocks)); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(smallPool.meta, 16<<20); err != nil {
		t.Fatal(err)
	}
	if err := smallPool.pool.Reload(smallPool.poolTable()); err != nil {
		t.Fatal(err)
	}
	if got := limitOf(smallPool); got != 12<<20 {
		t.Fatalf("pool grown to 2^18 data blocks: bound %d, want 12 MiB", got)
	}
}

// TestMetadataCacheChange changes a running pool's metadata cache with
// Device.SetMetadataCache (what a configuration reload does): the bound
// and the blocks cached shrink at once, a table reload keeps the option,
// 0 restores the default, and a device without a pool refuses it.
func TestMetadataCacheChange(t *testing.T) {
	const n = 3000
	e := newEnv(t, 128, n, 8<<20, " 1 skip_block_zeroing")
	cacheWorkload(t, e, n)
	cached, dflt, _ := e.pool.MetadataCacheStats()
	if cached <= 64<<10 {
		t.Fatalf("%d bytes cached before the change; the workload should cache more than 64 KiB", cached)
	}
	if err := e.pool.SetMetadataCache(64 << 10); err != nil {
		t.Fatal(err)
	}
	if cached, limit, _ := e.pool.MetadataCacheStats(); limit != 64<<10 || cached > 64<<10 {
		t.Fatalf("after setting 64 KiB: %d bytes cached, bound %d", cached, limit)
	}
	if err := e.pool.Reload(e.poolTable()); err != nil {
		t.Fatal(err)
	}
	if _, limit, _ := e.pool.MetadataCacheStats(); limit != 64<<10 {
		t.Fatalf("after a table reload: bound %d, want the option's 65536 still", limit)
	}
	if got := e.pool.MetadataCache(); got != 64<<10 {
		t.Fatalf("device option %d after the reload, want 65536", got)
	}
	if err := e.pool.SetMetadataCache(0); err != nil {
		t.Fatal(err)
	}
	if _, limit, _ := e.pool.MetadataCacheStats(); limit != dflt {
		t.Fatalf("after restoring the default: bound %d, want %d", limit, dflt)
	}
	err := e.thins[1].SetMetadataCache(64 << 10)
	if err == nil || !strings.Contains(err.Error(), "no target of its table keeps a metadata cache") {
		t.Fatalf("metadata cache on a thin device: %v", err)
	}
	if err := e.pool.SetMetadataCache(-1); err == nil {
		t.Fatal("a negative metadata cache was accepted")
	}
}
