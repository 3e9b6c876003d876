//go:build !ceph

package ceph

import (
	"fmt"
	"log/slog"

	"github.com/vhostdm/vhostdm/mapper"
)

// Built reports whether this binary was built with Ceph support.
const Built = false

// Opener opens rbd: names; in this build every Open fails with ErrNotBuilt.
type Opener struct{}

// NewOpener returns an Opener for the cluster c describes.
func NewOpener(c Config, log *slog.Logger) *Opener { return &Opener{} }

// Open fails: this binary was built without Ceph support.
func (o *Opener) Open(name string, readOnly bool) (mapper.Backend, error) {
	if _, err := ParseSpec(name); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("%s: %w", name, ErrNotBuilt)
}

// Close does nothing.
func (o *Opener) Close() error { return nil }
