// Package ceph serves RBD images as mapper backends: a table names one as
// rbd:POOL/IMAGE, rbd:POOL/NAMESPACE/IMAGE or either with @SNAP (a
// snapshot, read-only), and an Opener reaches it through librbd.
//
// The librbd code is built only with the build tag "ceph" (it needs cgo
// and Debian's librados-dev and librbd-dev); without the tag, Open fails
// with ErrNotBuilt, so the plain build runs anywhere and says why an rbd:
// name cannot be served.
package ceph

import (
	"fmt"
	"os"
	"strings"

	"github.com/vhostdm/vhostdm/mapper"
)

// Scheme is the prefix of the backend names this package opens.
const Scheme = "rbd"

// ErrNotBuilt is the error of Open in a binary built without the "ceph"
// build tag.
var ErrNotBuilt = mapper.Errorf(mapper.ErrUnsupported, "this vhostdm was built without Ceph support (build it with -tags ceph)")

// Spec is a parsed rbd: backend name.
type Spec struct {
	Pool      string
	Namespace string // "" for the pool's default namespace
	Image     string
	Snap      string // "" for the image itself
}

// String returns the name as a table writes it.
func (s Spec) String() string {
	var b strings.Builder
	b.WriteString(Scheme + ":" + s.Pool + "/")
	if s.Namespace != "" {
		b.WriteString(s.Namespace + "/")
	}
	b.WriteString(s.Image)
	if s.Snap != "" {
		b.WriteString("@" + s.Snap)
	}
	return b.String()
}

// ParseSpec parses rbd:POOL/IMAGE[@SNAP] or rbd:POOL/NAMESPACE/IMAGE[@SNAP].
// Names are non-empty and hold no '/', '@', control characters or spaces.
func ParseSpec(name string) (Spec, error) {
	rest, ok := strings.CutPrefix(name, Scheme+":")
	if !ok {
		return Spec{}, mapper.Errorf(mapper.ErrInvalid, "%q: not an rbd: name", name)
	}
	bad := func(why string) (Spec, error) {
		return Spec{}, mapper.Errorf(mapper.ErrInvalid, "%q: %s; want rbd:POOL/IMAGE[@SNAP] or rbd:POOL/NAMESPACE/IMAGE[@SNAP]", name, why)
	}
	var s Spec
	path, snap, hasSnap := strings.Cut(rest, "@")
	if hasSnap {
		if snap == "" {
			return bad("empty snapshot name")
		}
		if strings.Contains(snap, "@") || strings.Contains(snap, "/") {
			return bad("snapshot name with '@' or '/'")
		}
		s.Snap = snap
	}
	parts := strings.Split(path, "/")
	switch len(parts) {
	case 2:
		s.Pool, s.Image = parts[0], parts[1]
	case 3:
		s.Pool, s.Namespace, s.Image = parts[0], parts[1], parts[2]
		if s.Namespace == "" {
			return bad("empty namespace")
		}
	default:
		return bad("no pool and image")
	}
	if s.Pool == "" {
		return bad("empty pool name")
	}
	if s.Image == "" {
		return bad("empty image name")
	}
	for _, r := range rest {
		if r <= ' ' || r == 0x7f {
			return bad("control character or space")
		}
	}
	return s, nil
}

// Config says how to reach the cluster: the [ceph] section of vhostdm's
// configuration.
type Config struct {
	// Conf is the ceph.conf to read; "" is librados's default search
	// ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf).
	Conf string `toml:"conf"`
	// ID is the client's id without "client." ("vhostdm" for
	// client.vhostdm); "" is "admin".
	ID string `toml:"id"`
	// Keyring is the keyring file holding the client's key; "" is what
	// the conf says, else /etc/ceph/ceph.client.ID.keyring.
	Keyring string `toml:"keyring"`
}

// MarkSnapPrefix begins the names of the snapshots that mark a protected
// image when vhostdm stops writing it (mapper.Marker): MarkSnapPrefix
// and the mark's tag. The next start compares the image with one and
// removes it; a tool that removes an image may remove these with it.
const MarkSnapPrefix = "vhostdm-stopped."

// DefaultID is the client id used when Config.ID is empty.
const DefaultID = "admin"

// Validate checks c: a valid id, and files that exist and are readable.
// Each error names the key ("id", "conf", "keyring").
func (c Config) Validate() map[string]error {
	errs := map[string]error{}
	if c.ID != "" {
		if strings.HasPrefix(c.ID, "client.") {
			errs["id"] = fmt.Errorf("%q: give the id without \"client.\" (%q)", c.ID, strings.TrimPrefix(c.ID, "client."))
		} else if strings.Trim(c.ID, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") != "" {
			errs["id"] = fmt.Errorf("%q: want letters, digits, '_', '.' or '-'", c.ID)
		}
	}
	for key, path := range map[string]string{"conf": c.Conf, "keyring": c.Keyring} {
		if path == "" {
			continue
		}
		f, err := os.Open(path)
		if err != nil {
			errs[key] = err
			continue
		}
		st, err := f.Stat()
		f.Close()
		if err == nil && !st.Mode().IsRegular() {
			errs[key] = fmt.Errorf("%s: not a regular file", path)
		}
	}
	return errs
}
