package hub

import (
	"errors"
	"time"
)

// Purposes a recovered volume is labelled with (RecoveryStore).
const (
	PurposeRecover      = "recover"       // repagent-hub recover
	PurposeFailoverTest = "failover-test" // a failover test's volume, removed when the test ends unless kept
	PurposePromote      = "promote"       // a promoted VM's new source: never removed in bulk
)

// RecoveryStore is a Backend whose recovered volumes live in the store
// itself (the Ceph store's RBD clones of replica snapshots) rather than
// in the directory Materialize is given: removing that directory does
// not remove them, so the hub labels what it makes and removes a failover
// test's volumes through it, and `repagent-hub clones` lists and removes
// the rest.
type RecoveryStore interface {
	// LabelRecovered records on a recovered volume, named as
	// journal.Image.Name says, what made it (a Purpose constant) and for
	// which VM.
	LabelRecovered(name, vm, purpose string) error
	// ListRecovered returns the recovered volumes the hub made in the
	// store, in name order.
	ListRecovered() ([]RecoveredImage, error)
	// RemoveRecovered removes one recovered volume by name (and the
	// replica snapshot it was cloned from when no other clone uses it).
	// A volume a client has open (vhostdm serving it: a watcher on the
	// image) is refused with an error wrapping ErrRecoveredInUse; a name
	// that is not a recovered volume of this store is refused too.
	RemoveRecovered(name string) error
}

// ErrRecoveredInUse is RemoveRecovered's error for a volume a client has
// open.
var ErrRecoveredInUse = errors.New("the recovered volume is open by a client (a vhostdm serving it)")

// RecoveredImage describes one recovered volume in a RecoveryStore.
type RecoveredImage struct {
	Name     string    `json:"name"`     // rbd:POOL/IMAGE
	VM       string    `json:"vm"`       // the VM it recovers
	Volume   string    `json:"volume"`   // the volume it recovers
	Parent   string    `json:"parent"`   // the replica snapshot it was cloned from (rbd:POOL/IMAGE@SNAP)
	Purpose  string    `json:"purpose"`  // a Purpose constant; "" when unlabelled (made by an older hub, or cut short)
	Created  time.Time `json:"created"`  // when it was made
	Size     int64     `json:"size"`     // bytes
	Watchers []string  `json:"watchers"` // the clients that have it open (addresses); empty: not in use
}

// label labels the recovered volumes of rec when the hub's store keeps
// them (a RecoveryStore); a failure is logged, never fatal (the volume is
// listed unlabelled).
func (h *Hub) label(vm string, names []string, purpose string) {
	rs, ok := h.cfg.Backend.(RecoveryStore)
	if !ok {
		return
	}
	for _, n := range names {
		if err := rs.LabelRecovered(n, vm, purpose); err != nil {
			h.log.Warn("labelling a recovered volume", "vm", vm, "volume", n, "purpose", purpose, "err", err)
		}
	}
}
