package thin_test

import (
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// TestConcurrent writes from four goroutines (each its own blocks, some
// partial, some sharing blocks with a snapshot taken first) while another
// flushes and the device is suspended and resumed; then the content, the
// metadata (thin_check, thin_dump) and the model agree.
func TestConcurrent(t *testing.T) {
	e := newEnv(t, 128, 1024, 4<<20, "")
	e.mustMsg("create_thin", "1")
	e.model.devs[1] = map[uint64][]byte{}
	d := e.activate(1)
	rng := rand.New(rand.NewPCG(1, 2))
	for vb := uint64(0); vb < 256; vb += 3 {
		e.write(1, vb*128, pattern(rng, 128*512))
	}
	e.snapshot(2, 1)
	var mu sync.Mutex // guards the model
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := uint64(0); w < 4; w++ {
		wg.Add(1)
		go func(w uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(w, 3))
			for i := 0; i < 60; i++ {
				vb := w*64 + rng.Uint64N(64)
				in := rng.Uint64N(128)
				n := 1 + rng.Uint64N(128-in)
				data := pattern(rng, int(n*512))
				if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: vb*128 + in, Sectors: n, Data: [][]byte{data}}); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				b := e.model.devs[1][vb]
				if b == nil {
					b = make([]byte, 128*512)
					e.model.devs[1][vb] = b
				}
				copy(b[in*512:], data)
				mu.Unlock()
			}
		}(w)
	}
	var fw sync.WaitGroup
	fw.Add(1)
	go func() {
		defer fw.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
				t.Error(err)
				return
			}
			d.Suspend(false)
			d.Resume()
		}
	}()
	wg.Wait()
	close(stop)
	fw.Wait()
	e.verify()
	e.stop()
	judge(t, e.meta, e.data, e.bs, e.model)
}
