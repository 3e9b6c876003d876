package vhost

import "testing"

// ringLayouts are the virtqueue layouts the ring and queue tests run on.
var ringLayouts = []struct {
	name   string
	packed bool
}{{"split", false}, {"packed", true}}

// forEachLayout runs f as a subtest per ring layout.
func forEachLayout(t *testing.T, f func(t *testing.T, packed bool)) {
	for _, l := range ringLayouts {
		t.Run(l.name, func(t *testing.T) { f(t, l.packed) })
	}
}
