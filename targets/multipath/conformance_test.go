package multipath_test

import (
	"fmt"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

func TestConformance(t *testing.T) {
	// Two paths to one disk, as two linear devices over the same backend.
	paths := func(t *testing.T, m *mapper.Manager, b []string) {
		for _, p := range []string{"p1", "p2"} {
			if _, err := m.CreateTable(p, "", false, fmt.Sprintf("0 2048 linear %s 0", b[0])); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, sel := range []string{"round-robin 0 2 1 /dev/mapper/p1 1 /dev/mapper/p2 1", "queue-length 0 2 1 /dev/mapper/p1 1 /dev/mapper/p2 1", "service-time 0 2 2 /dev/mapper/p1 1 1 /dev/mapper/p2 1 4"} {
		mappertest.RunTarget(t, "multipath-"+sel[:5], mappertest.TargetCase{
			Backends: 1, BackendBytes: 1 << 20, Stores: true, ZeroesOnDiscard: true, Setup: paths,
			Table: func([]string) string { return "0 2048 multipath 0 0 1 1 " + sel },
		})
	}
	// Two priority groups: I/O goes to the first; the second stands by.
	mappertest.RunTarget(t, "multipath-groups", mappertest.TargetCase{
		Backends: 1, BackendBytes: 1 << 20, Stores: true, ZeroesOnDiscard: true, Setup: paths,
		Table: func([]string) string {
			return "0 2048 multipath 1 queue_if_no_path 0 2 1 round-robin 0 1 1 /dev/mapper/p1 1 round-robin 0 1 1 /dev/mapper/p2 1"
		},
	})
}
