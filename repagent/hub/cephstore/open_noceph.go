//go:build !ceph

package cephstore

import (
	"log/slog"

	"github.com/vhostdm/vhostdm/repagent/hub"
)

// Built reports whether this binary was built with Ceph support.
const Built = false

// Open fails: this binary was built without Ceph support.
func Open(c Config, log *slog.Logger) (hub.Backend, error) { return nil, ErrNotBuilt }
