package vhost

import (
	"bytes"
	"fmt"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// TestResize grows the device: the export sends CONFIG_CHANGE_MSG on the
// back-end channel and GET_CONFIG shows the new capacity.
func TestResize(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true})
	if err := os.Truncate(env.backing, 4<<20); err != nil {
		t.Fatal(err)
	}
	changed := make(chan struct{}, 4)
	c := env.dial(t, frontend.Config{OnConfigChange: func() { changed <- struct{}{} }})
	ctx := testCtx(t)
	if c.ProtocolFeatures()&wire.ProtocolBackendReq == 0 {
		t.Fatal("BACKEND_REQ not negotiated")
	}
	if err := env.dev.Reload(fmt.Sprintf("0 %d linear %s 0", 4<<20/512, env.backing)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	case <-ctx.Done():
		t.Fatal("no CONFIG_CHANGE_MSG")
	}
	cfg, err := c.ReadConfig()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Capacity != 4<<20/512 {
		t.Fatalf("capacity %d after resize, want %d", cfg.Capacity, 4<<20/512)
	}
	// The new space is usable.
	if err := c.WriteAt(ctx, 0, pattern(5, 4096), 4<<20/512-8); err != nil {
		t.Fatal(err)
	}
}

// TestDirtyLog turns on dirty logging as QEMU does for migration and checks
// that data read into guest memory and the used ring are logged.
func TestDirtyLog(t *testing.T) { forEachLayout(t, testDirtyLog) }

func testDirtyLog(t *testing.T, packed bool) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true, NumQueues: 2})
	c := env.dial(t, frontend.Config{NumQueues: 2, Packed: packed})
	ctx := testCtx(t)
	if err := c.WriteAt(ctx, 1, pattern(1, 8192), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.StartDirtyLog(); err != nil {
		t.Fatal(err)
	}
	buf, err := c.Buf(3 * 4096)
	if err != nil {
		t.Fatal(err)
	}
	g, _ := c.GuestAddr(buf)
	// The device writes used elements into the used ring, or into the
	// descriptor ring of a packed one.
	usedGPA := c.UsedRingGPA
	if packed {
		usedGPA = c.DescRingGPA
	}
	if c.Dirty(g) || c.Dirty(usedGPA(1)) {
		t.Fatal("pages dirty before any write")
	}
	if err := c.ReadAt(ctx, 1, buf[:8192], 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf[:8192], pattern(1, 8192)) {
		t.Fatal("read differs")
	}
	if !c.Dirty(g) || !c.Dirty(g+4096) {
		t.Fatal("data pages not logged")
	}
	if c.Dirty(g + 8192) {
		t.Fatal("page beyond the data logged")
	}
	if !c.Dirty(usedGPA(1)) {
		t.Fatal("used ring not logged")
	}
	if c.Dirty(usedGPA(0)) {
		t.Fatal("idle queue's used ring logged")
	}
	// Writes to the device do not dirty their (device-readable) data.
	c.ClearDirtyLog()
	if err := c.WriteAt(ctx, 1, buf[:4096], 64); err != nil {
		t.Fatal(err)
	}
	if c.Dirty(g) {
		t.Fatal("device-readable buffer logged")
	}
	if !c.Dirty(usedGPA(1)) {
		t.Fatal("used ring not logged after a write")
	}
}

// TestWritethrough turns the write cache off with SET_CONFIG and checks the
// config space reports it.
func TestWritethrough(t *testing.T) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true})
	c := env.dial(t, frontend.Config{})
	ctx := testCtx(t)
	if c.Config().Writeback != 1 {
		t.Fatal("writeback cache not on by default")
	}
	if err := c.SetWriteback(false); err != nil {
		t.Fatal(err)
	}
	cfg, err := c.ReadConfig()
	if err != nil || cfg.Writeback != 0 {
		t.Fatalf("writeback %d after SET_CONFIG, %v", cfg.Writeback, err)
	}
	if err := c.WriteAt(ctx, 0, pattern(2, 4096), 0); err != nil {
		t.Fatal(err)
	}
	file, _ := os.ReadFile(env.backing)
	if !bytes.Equal(file[:4096], pattern(2, 4096)) {
		t.Fatal("write not in the file")
	}
}

// TestMemoryHotplug adds and removes a memory region while the rings run
// (ADD_MEM_REG / REM_MEM_REG): the queues pause, switch tables and go on.
func TestMemoryHotplug(t *testing.T) { forEachLayout(t, testMemoryHotplug) }

func testMemoryHotplug(t *testing.T, packed bool) {
	env := newTestEnv(t, 1<<20, ExportConfig{Writable: true, NumQueues: 2})
	c := env.dial(t, frontend.Config{NumQueues: 2, Packed: packed})
	ctx := testCtx(t)
	if c.ProtocolFeatures()&wire.ProtocolConfigureMemSlots == 0 {
		t.Fatal("CONFIGURE_MEM_SLOTS not negotiated")
	}
	fd, err := unix.MemfdCreate("hotplug", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, 1<<20); err != nil {
		t.Fatal(err)
	}
	region := wire.SingleMemRegion{Region: wire.MemRegion{GPA: 1 << 40, Size: 1 << 20, UserAddr: 1 << 44}}
	ack := func(code wire.ReqCode, fds []int) uint64 {
		t.Helper()
		p := region.AppendTo(nil)
		h, r, err := c.RawRequest(wire.Header{Code: code, Flags: wire.FlagVersion | wire.FlagNeedReply, Size: uint32(len(p))}, p, fds, true)
		if err != nil || h.Code != code || len(r) != 8 {
			t.Fatalf("%s: %+v %x %v", code, h, r, err)
		}
		return le.Uint64(r)
	}
	io := func(seed uint64) {
		t.Helper()
		for q := range 2 {
			if err := c.WriteAt(ctx, q, pattern(seed, 4096), uint64(q*8)); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 4096)
			if err := c.ReadAt(ctx, q, got, uint64(q*8)); err != nil || !bytes.Equal(got, pattern(seed, 4096)) {
				t.Fatalf("I/O after table change: %v", err)
			}
		}
	}
	io(1)
	if v := ack(wire.ReqAddMemReg, []int{fd}); v != 0 {
		t.Fatalf("ADD_MEM_REG answered %d", v)
	}
	io(2)
	// An overlapping region is refused and changes nothing.
	if v := ack(wire.ReqAddMemReg, []int{fd}); v == 0 {
		t.Fatal("overlapping ADD_MEM_REG accepted")
	}
	if v := ack(wire.ReqRemMemReg, nil); v != 0 {
		t.Fatalf("REM_MEM_REG answered %d", v)
	}
	io(3)
	if v := ack(wire.ReqRemMemReg, nil); v == 0 {
		t.Fatal("REM_MEM_REG of a region not in the table accepted")
	}
}
