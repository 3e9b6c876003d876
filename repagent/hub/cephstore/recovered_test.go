//go:build ceph

package cephstore

import "testing"

// TestSplitRecovered: recovered volume names split into VM, volume and
// replica; names that are not one are refused.
func TestSplitRecovered(t *testing.T) {
	for _, c := range []struct {
		img, vm, vol, replica string
		ok                    bool
	}{
		{"vhostdm-hub.vm1.root.rec-dne200wsxpcz", "vm1", "root", "vhostdm-hub.vm1.root", true},
		{"vhostdm-hub.web%2E1.disk.0.rec-abc", "web.1", "disk.0", "vhostdm-hub.web%2E1.disk.0", true},
		{"vhostdm-hub.vm1.a.rec-b.rec-c", "vm1", "a.rec-b", "vhostdm-hub.vm1.a.rec-b", true},
		{"vhostdm-hub.vm1.root", "", "", "", false},
		{"vhostdm-hub.vm1.rec-x", "", "", "", false},
		{"vhostdm-hub.vm1.root.rec-", "", "", "", false},
		{"other.vm1.root.rec-x", "", "", "", false},
		{"vhostdm-hub.index", "", "", "", false},
	} {
		vm, vol, rep, ok := splitRecovered(c.img)
		if ok != c.ok || vm != c.vm || vol != c.vol || rep != c.replica {
			t.Errorf("splitRecovered(%q) = %q %q %q %v, want %q %q %q %v", c.img, vm, vol, rep, ok, c.vm, c.vol, c.replica, c.ok)
		}
	}
	if got := dec(enc("vm.1 %x")); got != "vm.1 %x" {
		t.Errorf("dec(enc) = %q", got)
	}
}
