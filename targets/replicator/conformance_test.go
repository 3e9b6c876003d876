package replicator_test

import (
	"fmt"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	_ "github.com/vhostdm/vhostdm/targets"
	_ "github.com/vhostdm/vhostdm/targets/replicator"
)

func TestConformance(t *testing.T) {
	// m0 is the replication log; m1 the local device, m2 and m3 its copies
	// at a sync and an async site.
	rep := func(t *testing.T, m *mapper.Manager, b []string) {
		if _, err := m.CreateTable("rep", "", false, fmt.Sprintf(
			"0 8 replicator ringbuffer 4 %s 0 auto 2048 blockdev 1 0 blockdev 2 1 sync blockdev 4 2 async ios 100", b[0])); err != nil {
			t.Fatal(err)
		}
	}
	mappertest.RunTarget(t, "replicator-dev", mappertest.TargetCase{
		Backends: 4, BackendBytes: 2 << 20, Stores: true, RecoversOnRestart: true, Setup: rep,
		Table: func(b []string) string {
			return fmt.Sprintf("0 2048 replicator-dev /dev/mapper/rep 1 0 1 %s nolog 0 1 1 %s core 1 64 2 1 %s core 1 64", b[1], b[2], b[3])
		},
	})
}
