package thin_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

// cutBackend fails everything once cut: the old daemon's view of a disk
// after the power went.
type cutBackend struct {
	mapper.Backend
	cut *atomic.Bool
}

var errCut = errors.New("power cut")

func (b cutBackend) ReadAt(bufs [][]byte, off int64) error {
	if b.cut.Load() {
		return errCut
	}
	return b.Backend.ReadAt(bufs, off)
}

func (b cutBackend) WriteAt(bufs [][]byte, off int64) error {
	if b.cut.Load() {
		return errCut
	}
	return b.Backend.WriteAt(bufs, off)
}

func (b cutBackend) Flush() error {
	if b.cut.Load() {
		return errCut
	}
	return b.Backend.Flush()
}

func (b cutBackend) Discard(off, n int64) error {
	if b.cut.Load() {
		return errCut
	}
	return b.Backend.Discard(off, n)
}

func (b cutBackend) WriteZeroes(off, n int64, unmap bool) error {
	if b.cut.Load() {
		return errCut
	}
	return b.Backend.WriteZeroes(off, n, unmap)
}

const crashBS = 128 // sectors

func crashManager(mems map[string]*mappertest.Mem, cut *atomic.Bool) *mapper.Manager {
	return mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler),
		Open: func(name string, ro bool) (mapper.Backend, error) {
			b := mems[name]
			if b == nil {
				return nil, mapper.Errorf(mapper.ErrNotFound, "%s: no such memory backend", name)
			}
			return cutBackend{Backend: b, cut: cut}, nil
		}})
}

// TestCrash cuts the power after acknowledged flushes and unflushed
// writes, several times over the same disks: after each crash every
// block reads as acknowledged, or (for blocks written after the last
// flush) as written; the metadata passes thin_check.
func TestCrash(t *testing.T) {
	const nrBlocks, virtBlocks = 512, 96
	mems := map[string]*mappertest.Mem{"data": mappertest.NewMem("data", nrBlocks*crashBS*512),
		"meta": mappertest.NewMem("meta", 1<<20)}
	rng := rand.New(rand.NewPCG(5, 5))
	bb := crashBS * 512
	acked := map[uint64][]byte{}  // committed content of device 1
	var pending map[uint64][]byte // written after the last flush
	for round := 0; round < 6; round++ {
		var cut atomic.Bool
		m := crashManager(mems, &cut)
		pool, err := m.CreateTable("pool", "", false, fmt.Sprintf("0 %d thin-pool meta data %d 0", nrBlocks*crashBS, crashBS))
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if round == 0 {
			if _, err := pool.Message(0, []string{"create_thin", "1"}); err != nil {
				t.Fatal(err)
			}
		}
		d, err := m.CreateTable("t1", "", false, fmt.Sprintf("0 %d thin /dev/mapper/pool 1", virtBlocks*crashBS))
		if err != nil {
			t.Fatal(err)
		}
		// What survived the last crash.
		for vb := uint64(0); vb < virtBlocks; vb++ {
			buf := make([]byte, bb)
			submit(t, d, mapper.OpRead, vb*crashBS, buf)
			want := acked[vb]
			if want == nil {
				want = make([]byte, bb)
			}
			if p := pending[vb]; p != nil && bytes.Equal(buf, p) {
				acked[vb] = p
				continue
			}
			if !bytes.Equal(buf, want) {
				t.Fatalf("round %d: block %d is neither acknowledged nor pending data", round, vb)
			}
		}
		// Acknowledged writes: whole and partial blocks, a snapshot
		// (its message commits), discards, then a flush.
		cur := map[uint64][]byte{}
		for vb, b := range acked {
			cur[vb] = bytes.Clone(b)
		}
		for i := 0; i < 40; i++ {
			vb := rng.Uint64N(virtBlocks)
			in := rng.IntN(bb/512) * 512
			data := pattern(rng, min(bb-in, 512*(1+rng.IntN(200))))
			submit(t, d, mapper.OpWrite, vb*crashBS+uint64(in/512), data)
			if cur[vb] == nil {
				cur[vb] = make([]byte, bb)
			}
			copy(cur[vb][in:], data)
			if i == 20 && round%2 == 1 {
				d.Suspend(false)
				if _, err := pool.Message(0, []string{"create_snap", fmt.Sprint(round + 1), "1"}); err != nil {
					t.Fatal(err)
				}
				d.Resume()
			}
		}
		submit(t, d, mapper.OpDiscard, 10*crashBS, make([]byte, 2*bb))
		delete(cur, 10)
		delete(cur, 11)
		submit(t, d, mapper.OpFlush, 0, nil)
		acked = cur
		// Unacknowledged: each block written once at most.
		pending = map[uint64][]byte{}
		for i := 0; i < 20; i++ {
			vb := rng.Uint64N(virtBlocks)
			if pending[vb] != nil {
				continue
			}
			data := pattern(rng, bb)
			submit(t, d, mapper.OpWrite, vb*crashBS, data)
			pending[vb] = data
		}
		cut.Store(true)
		m.Close()
		mems["data"].Crash()
		mems["meta"].Crash()
		p := filepath.Join(t.TempDir(), "meta.img")
		if err := os.WriteFile(p, mems["meta"].Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		thinCheck(t, p)
	}
}
