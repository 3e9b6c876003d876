package thin_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	_ "github.com/vhostdm/vhostdm/targets/thin"
)

// env is a pool over two files and its active thin devices, with the
// model of what they hold.
type env struct {
	t          testing.TB
	meta, data string
	bs         int    // sectors per data block
	nrBlocks   int    // data blocks
	virt       uint64 // sectors of each thin device
	features   string
	poolOpts   mapper.DeviceOptions // the pool device's options
	m          *mapper.Manager
	pool       *mapper.Device
	thins      map[uint64]*mapper.Device
	model      *model
	evMu       sync.Mutex
	events     []mapper.Event
}

// eventKinds returns the kinds of the events raised so far.
func (e *env) eventKinds() []string {
	e.evMu.Lock()
	defer e.evMu.Unlock()
	var k []string
	for _, ev := range e.events {
		k = append(k, ev.Device+":"+ev.Kind)
	}
	return k
}

func newEnv(t testing.TB, bs, nrBlocks int, metaBytes int64, features string) *env {
	return newEnvOpts(t, bs, nrBlocks, metaBytes, features, mapper.DeviceOptions{})
}

// newEnvOpts is newEnv with the pool device's options.
func newEnvOpts(t testing.TB, bs, nrBlocks int, metaBytes int64, features string, opts mapper.DeviceOptions) *env {
	dir := t.TempDir()
	e := &env{t: t, meta: filepath.Join(dir, "meta.img"), data: filepath.Join(dir, "data.img"), bs: bs, nrBlocks: nrBlocks,
		virt: uint64(bs) * 256, features: features, poolOpts: opts, thins: map[uint64]*mapper.Device{},
		model: &model{devs: map[uint64]map[uint64][]byte{}}}
	mkfile(t, e.meta, metaBytes)
	mkfile(t, e.data, int64(bs)*512*int64(nrBlocks))
	e.start()
	t.Cleanup(func() {
		if e.m != nil {
			e.m.Close()
		}
	})
	return e
}

func mkfile(t testing.TB, p string, size int64) {
	t.Helper()
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
}

func (e *env) poolTable() string {
	return fmt.Sprintf("0 %d thin-pool %s %s %d 0%s", e.bs*e.nrBlocks, e.meta, e.data, e.bs, e.features)
}

// start makes a manager, loads the pool and activates every device.
func (e *env) start() {
	e.t.Helper()
	e.m = mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler),
		Events: func(ev mapper.Event) {
			e.evMu.Lock()
			e.events = append(e.events, ev)
			e.evMu.Unlock()
		}})
	var err error
	if e.pool, err = e.m.CreateTableWith("pool", "", e.poolOpts, e.poolTable()); err != nil {
		e.t.Fatal(err)
	}
	e.thins = map[uint64]*mapper.Device{}
	for _, id := range slices.Sorted(maps.Keys(e.model.devs)) {
		e.activate(id)
	}
}

// stop closes everything (committing the pool).
func (e *env) stop() {
	e.t.Helper()
	if err := e.m.Close(); err != nil {
		e.t.Fatal(err)
	}
	e.m = nil
}

func (e *env) activate(id uint64) *mapper.Device {
	e.t.Helper()
	d, err := e.m.CreateTable(fmt.Sprintf("t%d", id), "", false, fmt.Sprintf("0 %d thin /dev/mapper/pool %d", e.virt, id))
	if err != nil {
		e.t.Fatal(err)
	}
	e.thins[id] = d
	return d
}

func (e *env) msg(args ...string) error {
	_, err := e.pool.Message(0, args)
	return err
}

func (e *env) mustMsg(args ...string) {
	e.t.Helper()
	if err := e.msg(args...); err != nil {
		e.t.Fatalf("message %v: %v", args, err)
	}
}

func submit(t testing.TB, d *mapper.Device, op mapper.Op, sector uint64, data []byte) {
	t.Helper()
	r := &mapper.Request{Op: op, Sector: sector, Sectors: uint64(len(data)) / 512}
	if op == mapper.OpRead || op == mapper.OpWrite {
		r.Data = [][]byte{data}
	}
	if err := d.Submit(r); err != nil {
		t.Fatalf("%s: %s at %d: %v", d.Name(), op, sector, err)
	}
}

// write writes data at sector of device id and updates the model.
func (e *env) write(id, sector uint64, data []byte) {
	e.t.Helper()
	submit(e.t, e.thins[id], mapper.OpWrite, sector, data)
	bb := uint64(e.bs) * 512
	dev := e.model.devs[id]
	for off := uint64(0); off < uint64(len(data)); {
		pos := sector*512 + off
		vb := pos / bb
		in := pos % bb
		n := min(bb-in, uint64(len(data))-off)
		if dev[vb] == nil {
			dev[vb] = make([]byte, bb)
		}
		copy(dev[vb][in:], data[off:off+n])
		off += n
	}
}

// discard discards whole blocks [vb, vb+n) of device id.
func (e *env) discard(id, vb, n uint64) {
	e.t.Helper()
	r := &mapper.Request{Op: mapper.OpDiscard, Sector: vb * uint64(e.bs), Sectors: n * uint64(e.bs)}
	if err := e.thins[id].Submit(r); err != nil {
		e.t.Fatal(err)
	}
	for i := vb; i < vb+n; i++ {
		delete(e.model.devs[id], i)
	}
}

// verify reads every active device whole and compares with the model.
func (e *env) verify() {
	e.t.Helper()
	bb := e.bs * 512
	for id, d := range e.thins {
		buf := make([]byte, e.virt*512)
		submit(e.t, d, mapper.OpRead, 0, buf)
		want := make([]byte, len(buf))
		for vb, c := range e.model.devs[id] {
			copy(want[int(vb)*bb:], c)
		}
		if !bytes.Equal(buf, want) {
			for i := 0; i < len(buf); i += bb {
				if !bytes.Equal(buf[i:i+bb], want[i:i+bb]) {
					e.t.Fatalf("device %d: block %d differs from the model", id, i/bb)
				}
			}
		}
	}
}

func (e *env) snapshot(id, origin uint64) {
	e.t.Helper()
	if o := e.thins[origin]; o != nil {
		if err := o.Suspend(false); err != nil {
			e.t.Fatal(err)
		}
		defer o.Resume()
	}
	e.mustMsg("create_snap", fmt.Sprint(id), fmt.Sprint(origin))
	c := map[uint64][]byte{}
	for vb, b := range e.model.devs[origin] {
		c[vb] = bytes.Clone(b)
	}
	e.model.devs[id] = c
}

func (e *env) remove(id uint64) {
	e.t.Helper()
	if e.thins[id] != nil {
		if err := e.m.Remove(fmt.Sprintf("t%d", id), false); err != nil {
			e.t.Fatal(err)
		}
		delete(e.thins, id)
	}
	e.mustMsg("delete", fmt.Sprint(id))
	delete(e.model.devs, id)
}

func pattern(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// TestModel runs seeded random sequences of writes, discards, flushes,
// thin and snapshot creation (snapshots of snapshots), deletion while
// blocks are shared, transaction ids, metadata snapshots and restarts
// against a model; thin_check and thin_dump judge the metadata at every
// restart and at the end.
func TestModel(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 42))
			e := newEnv(t, 128, 2048, 8<<20, "")
			next := uint64(1)
			held := false
			for step := 0; step < 400; step++ {
				ids := slices.Sorted(maps.Keys(e.model.devs))
				pick := func() uint64 { return ids[rng.IntN(len(ids))] }
				switch x := rng.IntN(100); {
				case len(ids) == 0 || x < 4 && len(ids) < 6:
					e.mustMsg("create_thin", fmt.Sprint(next))
					e.model.devs[next] = map[uint64][]byte{}
					e.activate(next)
					next++
				case x < 10 && len(ids) < 6:
					o := pick()
					e.snapshot(next, o)
					if rng.IntN(2) == 0 {
						e.activate(next)
					}
					next++
				case x < 13 && len(ids) > 1:
					e.remove(pick())
				case x < 60:
					id := pick()
					if e.thins[id] == nil {
						e.activate(id)
					}
					s := rng.Uint64N(e.virt - 8)
					n := 1 + rng.Uint64N(min(e.virt-s, 300))
					e.write(id, s, pattern(rng, int(n)*512))
				case x < 68:
					id := pick()
					if e.thins[id] == nil {
						e.activate(id)
					}
					vb := rng.Uint64N(256 - 4)
					e.discard(id, vb, 1+rng.Uint64N(4))
				case x < 78:
					for _, d := range e.thins {
						submit(t, d, mapper.OpFlush, 0, nil)
						break
					}
				case x < 82:
					e.mustMsg("set_transaction_id", fmt.Sprint(e.model.transID), fmt.Sprint(e.model.transID+1))
					e.model.transID++
				case x < 85:
					if held {
						e.mustMsg("release_metadata_snap")
					} else {
						e.mustMsg("reserve_metadata_snap")
					}
					held = !held
				case x < 87:
					e.verify()
					e.stop()
					judge(t, e.meta, e.data, e.bs, e.model)
					e.start()
				case x < 90:
					e.verify()
				default: // reads of a few blocks
					id := pick()
					if d := e.thins[id]; d != nil {
						vb := rng.Uint64N(256)
						buf := make([]byte, e.bs*512)
						submit(t, d, mapper.OpRead, vb*uint64(e.bs), buf)
						want := e.model.devs[id][vb]
						if want == nil {
							want = make([]byte, len(buf))
						}
						if !bytes.Equal(buf, want) {
							t.Fatalf("step %d: device %d block %d differs from the model", step, id, vb)
						}
					}
				}
			}
			e.verify()
			e.stop()
			judge(t, e.meta, e.data, e.bs, e.model)
			if held {
				thinCheck(t, e.meta, "--metadata-snap")
			}
		})
	}
}

// TestMessages checks the messages' errors against the kernel's.
func TestMessages(t *testing.T) {
	e := newEnv(t, 128, 64, 1<<20, "")
	e.mustMsg("create_thin", "1")
	cases := []struct {
		args []string
		want error
		text string
	}{
		{[]string{"create_thin", "1"}, mapper.ErrExists, "device id 1: device already exists"},
		{[]string{"create_snap", "1", "0"}, mapper.ErrExists, "device id 1: device already exists"},
		{[]string{"create_snap", "2", "7"}, mapper.ErrNotFound, "origin device 7: no such device"},
		{[]string{"create_thin", "16777216"}, mapper.ErrInvalid, `device id "16777216": must be 0 to 16777215`},
		{[]string{"create_thin"}, mapper.ErrInvalid, "create_thin: want 1 argument(s), got 0"},
		{[]string{"delete", "9"}, mapper.ErrNotFound, "device 9: no such device"},
		{[]string{"set_transaction_id", "5", "6"}, mapper.ErrInvalid, "mismatched transaction id: pool has 0, message says 5"},
		{[]string{"release_metadata_snap"}, mapper.ErrInvalid, "no pool metadata snapshot to release"},
		{[]string{"trim", "1", "100"}, mapper.ErrInvalid, `unrecognised thin pool target message "trim"`},
	}
	for _, c := range cases {
		err := e.msg(c.args...)
		if !errors.Is(err, c.want) || !strings.HasSuffix(err.Error(), ": "+c.text) {
			t.Errorf("message %v: %v, want %q (%v)", c.args, err, c.text, c.want)
		}
	}
	e.mustMsg("set_transaction_id", "0", "5")
	e.mustMsg("reserve_metadata_snap")
	if err := e.msg("reserve_metadata_snap"); !errors.Is(err, mapper.ErrBusy) {
		t.Errorf("second reserve_metadata_snap: %v", err)
	}
	d := e.activate(1)
	if err := e.msg("delete", "1"); !errors.Is(err, mapper.ErrBusy) {
		t.Errorf("delete of an open device: %v", err)
	}
	submit(t, d, mapper.OpWrite, 130, make([]byte, 1024))
	if got, want := d.Status(mapper.StatusInfo, false)[0].Params, "128 255"; got != want {
		t.Errorf("thin status %q, want %q", got, want)
	}
	if got, want := e.pool.Status(mapper.StatusInfo, false)[0].Params, "5 "; got[:2] != want {
		t.Errorf("pool status %q", got)
	}
	e.mustMsg("release_metadata_snap")
	e.model.transID = 5
	buf := make([]byte, 128*512)
	copy(buf[1024:], make([]byte, 1024))
	e.model.devs[1] = map[uint64][]byte{1: buf}
	e.stop()
	judge(t, e.meta, e.data, e.bs, e.model)
}
