package vhost

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	_ "github.com/vhostdm/vhostdm/targets/raid"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
)

// TestDiscardCapability: a linear export offers DISCARD and WRITE_ZEROES;
// a reload onto raid5 (which does not pass discards) announces a config
// change, and discards then complete with UNSUPP, not IOERR; the next
// front end is not offered DISCARD, but still WRITE_ZEROES.
func TestDiscardCapability(t *testing.T) {
	dir := t.TempDir()
	mk := func(name string, size int64) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
		return p
	}
	const sectors = 8192
	lin := mk("lin.img", sectors*512)
	r := []string{mk("r0", sectors*256), mk("r1", sectors*256), mk("r2", sectors*256)}
	raid5 := fmt.Sprintf("0 %d raid raid5_ls 2 64 nosync 3 - %s - %s - %s", sectors, r[0], r[1], r[2])
	m := mapper.NewManager(mapper.ManagerOptions{Logger: testLogger()})
	defer m.Close()
	dev, err := m.CreateTable("d", "", false, fmt.Sprintf("0 %d linear %s 0", sectors, lin))
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "d.sock")
	e, err := NewExport(ExportConfig{ID: "d", Socket: sock, Writable: true, Table: dev, Logger: testLogger()}, dev)
	if err != nil {
		t.Fatal(err)
	}
	go e.Serve(testCtx(t))
	defer e.Close()
	ctx := testCtx(t)
	c, err := frontend.Dial(ctx, frontend.Config{Socket: sock, MemSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if f := c.Features(); f&virtio.BlkFeatureDiscard == 0 || f&virtio.BlkFeatureWriteZeroes == 0 {
		t.Fatalf("linear export: features %#x lack DISCARD or WRITE_ZEROES", f)
	}
	if err := c.Discard(ctx, 0, 0, 128); err != nil {
		t.Fatalf("discard on linear: %v", err)
	}
	before := c.ConfigChanges()
	if err := dev.Reload(raid5); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "config change after the reload", func() bool { return c.ConfigChanges() > before })
	var se *frontend.StatusError
	if err := c.Discard(ctx, 0, 0, 128); !errors.As(err, &se) || se.Status != virtio.BlkStatusUnsupp {
		t.Fatalf("discard on raid5: %v, want UNSUPP", err)
	}
	if err := c.WriteZeroes(ctx, 0, 0, 128, false); err != nil {
		t.Fatalf("write-zeroes on raid5: %v", err)
	}
	c.Close()
	waitFor(t, "disconnect", func() bool { return !e.Connected() })
	c, err = frontend.Dial(ctx, frontend.Config{Socket: sock, MemSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if f := c.Features(); f&virtio.BlkFeatureDiscard != 0 || f&virtio.BlkFeatureWriteZeroes == 0 {
		t.Fatalf("raid5 export: features %#x, want WRITE_ZEROES without DISCARD", f)
	}
}
