//go:build ceph

package e2e

import (
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vhostdm/vhostdm/internal/cephtest"
	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// The throwaway Ceph cluster of this package, started by the first test
// that needs it and stopped by TestMain (or by its watchdog if this
// process dies).
var ceph struct {
	once sync.Once
	c    *cephtest.Cluster
	err  error
}

func needCeph(t *testing.T) *cephtest.Cluster {
	t.Helper()
	ceph.once.Do(func() {
		ceph.c, ceph.err = cephtest.Start()
		if ceph.err == nil {
			t.Logf("ceph cluster up in %v", ceph.c.Bootstrap)
		}
	})
	if ceph.err != nil {
		t.Fatalf("the rbd: e2e tests need a throwaway Ceph cluster: %v", ceph.err)
	}
	return ceph.c
}

func stopCeph() {
	if ceph.c != nil {
		ceph.c.Stop()
	}
}

// TestRBDLinearGuest serves a linear table over an RBD image with
// `vhostdm serve` (built with -tags ceph) to a QEMU guest that writes the
// verify pattern with O_DIRECT and reads it back; after the daemon stops,
// rbd export of the image must hold exactly the guest's pattern.
func TestRBDLinearGuest(t *testing.T) {
	e := needEnv(t)
	c := needCeph(t)
	const (
		size                      = 32 << 20
		secs                      = size / 512
		seed, coverage, maxBlocks = 1807, 60, 64
	)
	img := c.CreateImage(t, cephtest.Pool, size)
	dir, sd := t.TempDir(), sockDir(t)
	cfg := &harness.Config{
		QMP:     harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{{Name: "root", Table: fmt.Sprintf("0 %d linear %s 0", secs, img)}},
		Exports: []harness.ExportConfig{{ID: "r0", Device: "root", Socket: filepath.Join(sd, "r0.sock"),
			NumQueues: 1, Writable: true, LogicalBlockSize: 512, Serial: "e2e-rbd"}},
		Extra: fmt.Sprintf("[ceph]\nconf = %q\nid = %q\nkeyring = %q\n", c.Conf, c.ID, c.Keyring),
	}
	p := startVhostdm(t, e, writeConfig(t, dir, cfg))
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepInfo, proto.StepVerify},
		Params: seedParams(seed, coverage, maxBlocks),
	})
	if di := info(t, run, "vda"); di.Sectors != secs {
		t.Errorf("guest capacity %d sectors, want %d", di.Sectors, secs)
	}
	p.Stop()
	if err := p.ExitErr(); err != nil {
		t.Errorf("vhostdm did not stop cleanly: %v\n%s", err, tail(p.Log(), 30))
	}
	data := c.Export(t, img)
	if len(data) != size {
		t.Fatalf("rbd export: %d bytes, want %d", len(data), size)
	}
	for _, err := range harness.CheckPlan(data, harness.PlanCheck{Seed: seed, Coverage: coverage, MaxBlocks: maxBlocks, ZeroElsewhere: true}) {
		t.Errorf("rbd export of %s: %v", img, err)
	}
}
