// Package cephstore keeps the repagent hub's journals, replicas and state
// in a Ceph cluster: `repagent-hub serve --store ceph:POOL`.
//
// In pool POOL (every name starts with "vhostdm-hub."):
//
//	vhostdm-hub.index          omap: "vm.NAME" → the VM's identity (JSON)
//	vhostdm-hub.vm.VM          data: the journal's applied state (JSON,
//	                           replaced with one write_full: atomic);
//	                           omap: "vol.NAME" → a volume's hub state,
//	                           "seg.%016x" → the journal's segment index;
//	                           lock "vhostdm-hub": the owning hub's lease;
//	                           every write of this object asserts it
//	                           (cls lock assert_locked, same operation)
//	vhostdm-hub.vm.VM.seg.%016x  a journal segment (FORMAT.md's bytes):
//	                           one RADOS write per group commit, at the
//	                           segment's end, guarded by the object's
//	                           version
//	vhostdm-hub.VM.VOLUME      RBD image: the volume's replica (the
//	                           journal's base image), layering only
//	vhostdm-hub.VM.VOLUME@pos-N  RBD snapshot of the replica at applied
//	                           position N, taken for a recovery
//	vhostdm-hub.VM.VOLUME.rec-T  RBD clone of such a snapshot: a volume
//	                           recovered at a point, served as rbd:POOL/IMAGE
//
// VM is the VM's name with every byte outside [A-Za-z0-9_-] written %XX,
// so that VM and VOLUME never run together.
//
// The code that talks to Ceph is built only with the build tag "ceph";
// without it, Open fails naming the tag.
package cephstore

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Scheme is the prefix of a Ceph store name: ceph:POOL.
const Scheme = "ceph"

// Config says which cluster and pool hold the store.
type Config struct {
	// Pool is the RADOS pool (initialised for RBD).
	Pool string
	// Conf is the ceph.conf; "" is librados's default search.
	Conf string
	// ID is the client id without "client."; "" is "admin".
	ID string
	// Keyring is the client's keyring; "" is what the conf says.
	Keyring string
	// Lease is how long a hub's hold on a VM lasts without renewal
	// (renewed every third of it); a hub that died is replaced after it.
	// Default 15 s.
	Lease time.Duration
	// LockWait is how long opening a VM's journal waits for another
	// holder's lease to end. Default 0: fail at once.
	LockWait time.Duration
}

// IsStore reports whether a --store value names a Ceph store.
func IsStore(s string) bool { return strings.HasPrefix(s, Scheme+":") }

// ParseStore parses ceph:POOL.
func ParseStore(s string) (pool string, err error) {
	rest, ok := strings.CutPrefix(s, Scheme+":")
	if !ok {
		return "", fmt.Errorf("%q: not a ceph:POOL store", s)
	}
	if rest == "" || strings.ContainsAny(rest, "/@ \t\n") {
		return "", fmt.Errorf("%q: want ceph:POOL (a pool name, no '/', '@' or spaces)", s)
	}
	return rest, nil
}

// ErrNotBuilt is Open's error in a binary built without the "ceph" tag.
var ErrNotBuilt = errors.New("this repagent-hub was built without Ceph support: build it with -tags ceph (cgo, Debian's librados-dev and librbd-dev) to use --store ceph:POOL")

// ErrNotHeld: a write of a VM's state was refused because this hub does
// not hold the VM's lease (it was lost, or another hub holds the VM);
// nothing was written.
var ErrNotHeld = errors.New("ceph store: this hub does not hold the VM's lease")
