//go:build ceph

package main

import (
	"sync"
	"testing"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/internal/cephtest"
)

// Scaffolding shared by the Ceph tests of this package (helpers_test.go
// has the rest).

// One throwaway cluster for the Ceph tests of this package, started by
// the first; its watchdog removes it when the test process ends.
var (
	clusterOnce sync.Once
	cluster     *cephtest.Cluster
	clusterErr  error
)

func cephCluster(t *testing.T) *cephtest.Cluster {
	t.Helper()
	clusterOnce.Do(func() {
		cluster, clusterErr = cephtest.Start()
		if clusterErr == nil {
			t.Logf("cluster up in %.1fs", cluster.Bootstrap.Seconds())
		}
	})
	if clusterErr != nil {
		t.Fatalf("the Ceph tests need a throwaway cluster (scripts/setup.sh installs the packages): %v", clusterErr)
	}
	return cluster
}

// readRBD reads a whole image through the rbd: backend.
func readRBD(t *testing.T, o *ceph.Opener, name string) []byte {
	t.Helper()
	b, err := o.Open(name, true)
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	defer b.Close()
	size, err := b.Size()
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, size)
	if err := b.ReadAt([][]byte{buf}, 0); err != nil {
		t.Fatal(err)
	}
	return buf
}

// replicasOf returns the replica of each volume of hp's first VM.
func replicasOf(t *testing.T, hp *hubProc) map[string]string {
	t.Helper()
	st, err := hp.status()
	if err != nil {
		t.Fatal(err)
	}
	replica := map[string]string{}
	for _, v := range volumesIn(st) {
		replica[v.Volume] = v.Replica
	}
	return replica
}

// pause holds h's writer (between two writes) until the returned resume
// is called; resume may be called again (defer it so that a failing test
// lets the writer end).
func (h *history) pause() (resume func()) {
	h.gate.Lock()
	var once sync.Once
	return func() { once.Do(h.gate.Unlock) }
}
