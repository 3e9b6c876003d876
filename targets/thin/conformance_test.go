package thin_test

import (
	"fmt"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

func TestConformance(t *testing.T) {
	pool := func(t *testing.T, m *mapper.Manager, b []string) {
		// 1 MiB of metadata, 4 MiB of data in 64 KiB blocks.
		p, err := m.CreateTable("pool", "", false, fmt.Sprintf("0 8192 thin-pool %s %s 128 0", b[0], b[1]))
		if err != nil {
			t.Fatal(err)
		}
		for _, msg := range [][]string{{"create_thin", "0"}, {"create_thin", "1"}, {"create_snap", "2", "1"}} {
			if _, err := p.Message(0, msg); err != nil {
				t.Fatalf("%v: %v", msg, err)
			}
		}
	}
	mappertest.RunTarget(t, "thin", mappertest.TargetCase{
		Backends: 2, BackendBytes: 4 << 20, Stores: true, ZeroesOnDiscard: true, Setup: pool,
		Table: func([]string) string { return "0 2048 thin /dev/mapper/pool 0" },
	})
	// A snapshot of a thin device shares its origin's blocks: writes break
	// the sharing.
	mappertest.RunTarget(t, "thin-snapshot", mappertest.TargetCase{
		Backends: 2, BackendBytes: 4 << 20, Stores: true, ZeroesOnDiscard: true, Setup: pool,
		Table: func([]string) string { return "0 2048 thin /dev/mapper/pool 2" },
	})
	// The pool's data device itself, as the thin-pool target passes it.
	mappertest.RunTarget(t, "thin-pool", mappertest.TargetCase{
		Backends: 2, BackendBytes: 4 << 20, Stores: true,
		Table: func(b []string) string { return fmt.Sprintf("0 8192 thin-pool %s %s 128 0", b[0], b[1]) },
	})
}
