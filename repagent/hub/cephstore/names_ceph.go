//go:build ceph

package cephstore

import (
	"fmt"
	"strings"
)

// enc writes a VM name with every byte outside [A-Za-z0-9_-] as %XX.
func enc(vm string) string {
	var b strings.Builder
	for i := 0; i < len(vm); i++ {
		c := vm[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// Object and image names.
const (
	prefix    = "vhostdm-hub."
	indexObj  = prefix + "index"
	lockName  = "vhostdm-hub"
	vmKey     = "vm."
	volKey    = "vol."
	segKey    = "seg."
	snapPoint = "pos-"
)

func vmObject(vm string) string { return prefix + "vm." + enc(vm) }
func segObject(vm string, start int64) string {
	return fmt.Sprintf("%s.seg.%016x", vmObject(vm), start)
}
func imageName(vm, vol string) string { return prefix + enc(vm) + "." + vol }
