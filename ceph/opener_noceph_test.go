//go:build !ceph

package ceph

import (
	"errors"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// TestPlainBuildRefusesRBD: without the ceph tag an rbd: name fails with
// the reason, and a malformed one still says what is wrong with it.
func TestPlainBuildRefusesRBD(t *testing.T) {
	o := NewOpener(Config{}, nil)
	defer o.Close()
	_, err := o.Open("rbd:vms/root", false)
	if !errors.Is(err, ErrNotBuilt) || !strings.Contains(err.Error(), "rbd:vms/root: this vhostdm was built without Ceph support") {
		t.Fatalf("Open = %v; want ErrNotBuilt naming the image", err)
	}
	if _, err := o.Open("rbd:vms", false); !errors.Is(err, mapper.ErrInvalid) {
		t.Fatalf("Open of a malformed name = %v; want ErrInvalid", err)
	}
}
