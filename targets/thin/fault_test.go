package thin_test

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

// usedDataBlocks returns the used data blocks of the pool's status line
// (<transaction> <used>/<total> meta <used>/<total> data ...).
func usedDataBlocks(t *testing.T, pool *mapper.Device) string {
	t.Helper()
	f := strings.Fields(pool.Status(mapper.StatusInfo, false)[0].Params)
	if len(f) < 3 {
		t.Fatalf("pool status %q", f)
	}
	return f[2]
}

// TestDataFaultFailsWrite injects failures of the data device while a
// write provisions a new block — zeroing the rest of the block, writing
// the guest's data, and copying a block shared with a snapshot: each time
// the write fails, no mapping is inserted (the block reads as before) and
// the pool's space map gets the block back.
func TestDataFaultFailsWrite(t *testing.T) {
	const nrBlocks = 64
	mems := map[string]*mappertest.Mem{"data": mappertest.NewMem("data", nrBlocks*crashBS*512),
		"meta": mappertest.NewMem("meta", 1<<20)}
	data := mems["data"]
	m := crashManager(mems, new(atomic.Bool))
	pool, err := m.CreateTable("pool", "", false, fmt.Sprintf("0 %d thin-pool meta data %d 0", nrBlocks*crashBS, crashBS))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Message(0, []string{"create_thin", "1"}); err != nil {
		t.Fatal(err)
	}
	d, err := m.CreateTable("t1", "", false, fmt.Sprintf("0 %d thin /dev/mapper/pool 1", 16*crashBS))
	if err != nil {
		t.Fatal(err)
	}
	bb := crashBS * 512
	read := func(dev *mapper.Device, vb uint64) []byte {
		t.Helper()
		buf := make([]byte, bb)
		submit(t, dev, mapper.OpRead, vb*crashBS, buf)
		return buf
	}
	sector := make([]byte, 512)
	for i := range sector {
		sector[i] = 0xa5
	}
	failing := func(what string, op mapper.Op, dev *mapper.Device, vb uint64, buf []byte, want []byte) {
		t.Helper()
		used := usedDataBlocks(t, pool)
		data.FailNth(op, 1)
		err := dev.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: vb * crashBS, Sectors: uint64(len(buf) / 512), Data: [][]byte{buf}})
		if !errors.Is(err, mapper.ErrIO) {
			t.Fatalf("%s: write with a failing data device returned %v, want an I/O error", what, err)
		}
		if got := usedDataBlocks(t, pool); got != used {
			t.Fatalf("%s: used data blocks %s after the failed write, %s before: the block leaked", what, got, used)
		}
		if got := read(dev, vb); !bytes.Equal(got, want) {
			t.Fatalf("%s: block %d changed by a write that failed", what, vb)
		}
	}
	zeros := make([]byte, bb)
	// A partial write into a new block: zeroing the rest fails.
	failing("zeroing", mapper.OpWriteZeroes, d, 0, sector, zeros)
	// A whole-block write into a new block: the data write fails.
	full := bytes.Repeat([]byte{0x3c}, bb)
	failing("data write", mapper.OpWrite, d, 1, full, zeros)

	// A block shared with a snapshot: the copy of the shared block fails.
	submit(t, d, mapper.OpWrite, 2*crashBS, full)
	if err := d.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Message(0, []string{"create_snap", "2", "1"}); err != nil {
		t.Fatal(err)
	}
	if err := d.Resume(); err != nil {
		t.Fatal(err)
	}
	failing("copy of a shared block", mapper.OpRead, d, 2, sector, full)
	// The snapshot still has the original, and the origin takes the
	// write once the device works again.
	snap, err := m.CreateTable("t2", "", false, fmt.Sprintf("0 %d thin /dev/mapper/pool 2", 16*crashBS))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(snap, 2), full) {
		t.Fatal("snapshot lost its block after a failed copy-on-write")
	}
	submit(t, d, mapper.OpWrite, 2*crashBS, sector)
	want := bytes.Clone(full)
	copy(want, sector)
	if !bytes.Equal(read(d, 2), want) {
		t.Fatal("origin block after a successful copy-on-write")
	}
	if !bytes.Equal(read(snap, 2), full) {
		t.Fatal("snapshot changed by its origin's write")
	}
	if got := usedDataBlocks(t, pool); !strings.HasPrefix(got, "2/") {
		t.Fatalf("used data blocks %s, want 2 (the shared block and the origin's copy)", got)
	}
}
