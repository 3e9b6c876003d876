package thin_test

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// TestNoSpace fills a pool of 8 blocks: the low water mark event comes
// once, when an allocation finds 2 blocks free (the kernel checks before
// allocating), error_if_no_space fails the write that needs a ninth block and the
// pool reports out_of_data_space; a reload over a larger data device grows
// it, and the write goes through.
func TestNoSpace(t *testing.T) {
	e := newEnv(t, 128, 8, 1<<20, " 1 error_if_no_space")
	e.pool.Reload(strings.Replace(e.poolTable(), " 0 1 error", " 2 1 error", 1))
	e.mustMsg("create_thin", "1")
	e.model.devs[1] = map[uint64][]byte{}
	e.activate(1)
	blk := make([]byte, 128*512)
	for i := uint64(0); i < 8; i++ {
		blk[0] = byte(i + 1)
		e.write(1, i*128, blk)
		want := 0
		if i >= 6 {
			want = 1
		}
		if n := countKind(e.eventKinds(), "pool:low_water_mark"); n != want {
			t.Fatalf("after %d blocks: %d low water events, want %d", i+1, n, want)
		}
	}
	err := e.thins[1].Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 8 * 128, Sectors: 1, Data: [][]byte{blk[:512]}})
	if !errors.Is(err, mapper.ErrIO) {
		t.Fatalf("write to a full pool: %v, want an I/O error", err)
	}
	st := e.pool.Status(mapper.StatusInfo, false)[0].Params
	if want := "0 "; !strings.HasPrefix(st, want) || !strings.Contains(st, " 8/8 - out_of_data_space discard_passdown error_if_no_space - ") {
		t.Fatalf("full pool status %q", st)
	}
	// Grow the data device and the pool.
	if err := os.Truncate(e.data, 16*128*512); err != nil {
		t.Fatal(err)
	}
	e.nrBlocks = 16
	if err := e.pool.Reload(strings.Replace(e.poolTable(), " 0 1 error", " 2 1 error", 1)); err != nil {
		t.Fatal(err)
	}
	e.write(1, 8*128, blk)
	if st := e.pool.Status(mapper.StatusInfo, false)[0].Params; !strings.Contains(st, " 9/16 - rw ") {
		t.Fatalf("grown pool status %q", st)
	}
	e.verify()
	e.stop()
	judge(t, e.meta, e.data, e.bs, e.model)
}

func countKind(kinds []string, k string) int {
	n := 0
	for _, x := range kinds {
		if x == k {
			n++
		}
	}
	return n
}

// TestQueueIfNoSpace: without error_if_no_space a write to a full pool
// waits until the pool grows.
func TestQueueIfNoSpace(t *testing.T) {
	e := newEnv(t, 128, 4, 1<<20, "")
	e.mustMsg("create_thin", "1")
	e.model.devs[1] = map[uint64][]byte{}
	d := e.activate(1)
	blk := make([]byte, 128*512)
	for i := uint64(0); i < 4; i++ {
		e.write(1, i*128, blk)
	}
	done := make(chan error, 1)
	go func() {
		done <- d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 4 * 128, Sectors: 128, Data: [][]byte{make([]byte, 128*512)}})
	}()
	select {
	case err := <-done:
		t.Fatalf("write to a full pool returned %v, want it queued", err)
	case <-time.After(200 * time.Millisecond):
	}
	if st := e.pool.Status(mapper.StatusInfo, false)[0].Params; !strings.Contains(st, " out_of_data_space discard_passdown queue_if_no_space ") {
		t.Fatalf("status %q", st)
	}
	if err := os.Truncate(e.data, 8*128*512); err != nil {
		t.Fatal(err)
	}
	e.nrBlocks = 8
	// The pool device is suspended for the reload while the thin write
	// waits in the pool, as with the kernel.
	if err := e.pool.Reload(e.poolTable()); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("queued write still waiting after the pool grew")
	}
	e.model.devs[1][4] = make([]byte, 128*512)
	e.stop()
	judge(t, e.meta, e.data, e.bs, e.model)
}

// TestDiscardShared discards blocks shared with a snapshot: the space
// comes back only when the last device lets go, and passdown discards
// only then.
func TestDiscardShared(t *testing.T) {
	e := newEnv(t, 128, 64, 1<<20, "")
	e.mustMsg("create_thin", "1")
	e.model.devs[1] = map[uint64][]byte{}
	e.activate(1)
	blk := make([]byte, 128*512)
	for i := uint64(0); i < 10; i++ {
		blk[7] = byte(i + 1)
		e.write(1, i*128, blk)
	}
	e.snapshot(2, 1)
	e.activate(2)
	used := func() string {
		f := strings.Fields(e.pool.Status(mapper.StatusInfo, false)[0].Params)
		return f[2]
	}
	e.discard(1, 0, 10)
	if u := used(); u != "10/64" {
		t.Fatalf("after discarding the origin's shared blocks: %s used, want 10/64", u)
	}
	e.verify()
	e.discard(2, 0, 5)
	if u := used(); u != "5/64" {
		t.Fatalf("after discarding the snapshot's too: %s used, want 5/64", u)
	}
	e.remove(2)
	if u := used(); u != "0/64" {
		t.Fatalf("after deleting the snapshot: %s used, want 0/64", u)
	}
	e.verify()
	e.stop()
	judge(t, e.meta, e.data, e.bs, e.model)
}

// TestConstructor checks the tables users get wrong.
func TestConstructor(t *testing.T) {
	e := newEnv(t, 128, 64, 1<<20, "")
	e.mustMsg("create_thin", "1")
	size := 64 * 128
	for _, c := range []struct{ table, want string }{
		{fmt.Sprintf("0 %d thin-pool %s %s 128", size, e.meta, e.data), "want <metadata dev> <data dev> <data block size> <low water mark> [<#features> <feature>...], got 3 argument(s)"},
		{fmt.Sprintf("0 %d thin-pool %s %s 64 0", size, e.meta, e.data), `data block size "64": must be 128 to 2097152`},
		{fmt.Sprintf("0 %d thin-pool %s %s 4194304 0", size, e.meta, e.data), `data block size "4194304": must be 128 to 2097152`},
		{fmt.Sprintf("0 %d thin-pool %s %s 192 0", size, e.meta, e.data), "data block size 192: not a multiple of 128 sectors"},
		{fmt.Sprintf("0 %d thin-pool %s %s 128 x", size, e.meta, e.data), `low water mark "x": not a number`},
		{fmt.Sprintf("0 %d thin-pool %s %s 128 0 1 fast", size, e.meta, e.data), `feature "fast": unrecognised pool feature`},
		{fmt.Sprintf("0 %d thin-pool %s %s 128 0 2 read_only", size, e.meta, e.data), "missing feature"},
		{fmt.Sprintf("0 %d thin-pool %s %s 256 0", size, e.meta, e.data), "data block size 256: the pool's is 128, and changing it is not supported"},
		{fmt.Sprintf("0 %d thin-pool %s %s 128 0", size/2, e.meta, e.data), "pool target (32 blocks) too small: expected 64"},
		{fmt.Sprintf("0 %d thin-pool %s %s 128 0", size*2, e.meta, e.data), "too small for target"},
		{"0 100 thin /dev/mapper/pool", "want <pool dev> <dev id> [<external origin dev>], got 1 argument(s)"},
		{"0 100 thin /dev/mapper/pool 5", "couldn't open thin internal device 5: no such device"},
		{"0 100 thin /dev/mapper/pool 16777216", `device id "16777216": must be 0 to 16777215`},
		{"0 100 thin /dev/mapper/nope 1", "not found"},
		{"0 100 thin " + e.data + " 1", "no thin-pool is active on it"},
	} {
		_, err := e.m.CreateTable("x", "", false, c.table)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.table, err, c.want)
		}
		if err == nil {
			e.m.Remove("x", true)
		}
	}
	// TABLE round-trips, with features.
	tbl := fmt.Sprintf("0 %d thin-pool %s %s 128 7 2 skip_block_zeroing error_if_no_space", size, e.meta, e.data)
	if err := e.pool.Reload(tbl); err != nil {
		t.Fatal(err)
	}
	if got := e.pool.Status(mapper.StatusTable, false)[0].String(); got != tbl {
		t.Errorf("table %q, want %q", got, tbl)
	}
	d := e.activate(1)
	if got := d.Status(mapper.StatusTable, false)[0].String(); got != "0 32768 thin /dev/mapper/pool 1" {
		t.Errorf("thin table %q", got)
	}
	if got := d.Status(mapper.StatusInfo, false)[0].Params; got != "0 -" {
		t.Errorf("empty thin status %q, want \"0 -\"", got)
	}
	if got := e.pool.Status(mapper.StatusInfo, false)[0].Params; !slices.Contains(strings.Fields(got), "skip_block_zeroing") && !strings.HasSuffix(got, " 64") {
		t.Errorf("pool status %q: want metadata low water mark 64 (a quarter of 256 blocks)", got)
	}
}

// TestReadOnly: a pool reloaded read_only, as the kernel's read-only
// mode, takes writes to blocks already mapped, fails writes that need a
// new block and messages, and completes discards without unmapping.
func TestReadOnly(t *testing.T) {
	e := newEnv(t, 128, 16, 1<<20, "")
	e.mustMsg("create_thin", "1")
	e.model.devs[1] = map[uint64][]byte{}
	d := e.activate(1)
	blk := make([]byte, 128*512)
	blk[9] = 1
	e.write(1, 0, blk)
	e.features = " 1 read_only"
	if err := e.pool.Reload(e.poolTable()); err != nil {
		t.Fatal(err)
	}
	if st := e.pool.Status(mapper.StatusInfo, false)[0].Params; !strings.Contains(st, " 1/16 - ro ") {
		t.Fatalf("read-only pool status %q", st)
	}
	blk[9] = 2
	e.write(1, 0, blk) // mapped: goes through
	if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 128, Sectors: 1, Data: [][]byte{blk[:512]}}); !errors.Is(err, mapper.ErrIO) {
		t.Fatalf("write needing a block in a read-only pool: %v, want an I/O error", err)
	}
	if err := d.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: 0, Sectors: 128}); err != nil {
		t.Fatalf("discard in a read-only pool: %v, want success (nothing unmapped)", err)
	}
	if err := e.msg("create_thin", "2"); err == nil {
		t.Fatal("create_thin in a read-only pool succeeded")
	}
	e.verify()
	e.features = ""
	if err := e.pool.Reload(e.poolTable()); err != nil {
		t.Fatal(err)
	}
	e.stop()
	judge(t, e.meta, e.data, e.bs, e.model)
}
