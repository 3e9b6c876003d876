package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/cephstore"
)

// cephFlags are the flags of a --store ceph:POOL.
type cephFlags struct {
	conf, id string
	lease    time.Duration
}

func (c *cephFlags) add(fs *flag.FlagSet) {
	fs.StringVar(&c.conf, "ceph-conf", "", "with --store ceph:POOL: the ceph.conf `FILE` (monitors, keyring; default: librados's search)")
	fs.StringVar(&c.id, "ceph-id", "", "with --store ceph:POOL: the Ceph client `NAME` without \"client.\" (default admin)")
	fs.DurationVar(&c.lease, "ceph-lease", 15*time.Second, "with --store ceph:POOL: how long a VM stays this hub's after its last renewal (`DURATION`); a dead hub's VMs are taken by the hub their agents attach to once it ends")
}

// unused refuses the Ceph flags without a Ceph store.
func (c *cephFlags) unused() error {
	if c.conf != "" || c.id != "" {
		return errors.New("--ceph-conf and --ceph-id go with --store ceph:POOL")
	}
	return nil
}

// open opens the Ceph store; wait: wait for another holder's lease of a
// VM to end (a hub restarted after a crash) instead of failing at once.
func (c *cephFlags) open(store string, log *slog.Logger, wait bool) (hub.Backend, error) {
	pool, err := cephstore.ParseStore(store)
	if err != nil {
		return nil, err
	}
	if c.lease < time.Second {
		return nil, fmt.Errorf("--ceph-lease %v: at least 1s", c.lease)
	}
	cfg := cephstore.Config{Pool: pool, Conf: c.conf, ID: c.id, Lease: c.lease}
	if wait {
		cfg.LockWait = c.lease + 5*time.Second
	}
	return cephstore.Open(cfg, log)
}
