package ceph

import (
	"errors"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

func TestParseSpec(t *testing.T) {
	good := map[string]Spec{
		"rbd:vms/root":         {Pool: "vms", Image: "root"},
		"rbd:vms/root@s1":      {Pool: "vms", Image: "root", Snap: "s1"},
		"rbd:vms/ns1/root":     {Pool: "vms", Namespace: "ns1", Image: "root"},
		"rbd:vms/ns1/root@s.2": {Pool: "vms", Namespace: "ns1", Image: "root", Snap: "s.2"},
	}
	for name, want := range good {
		got, err := ParseSpec(name)
		if err != nil || got != want {
			t.Errorf("ParseSpec(%q) = %+v, %v; want %+v", name, got, err, want)
		}
		if got.String() != name {
			t.Errorf("%q: String() = %q", name, got.String())
		}
	}
	bad := map[string]string{
		"rbd:":              "no pool and image",
		"rbd:vms":           "no pool and image",
		"rbd:/root":         "empty pool name",
		"rbd:vms/":          "empty image name",
		"rbd:vms//root":     "empty namespace",
		"rbd:a/b/c/d":       "no pool and image",
		"rbd:vms/root@":     "empty snapshot name",
		"rbd:vms/root@a@b":  "snapshot name with",
		"rbd:vms/root@a/b":  "snapshot name with",
		"rbd:vms/ro\x01ot":  "control character",
		"file:/var/lib/img": "not an rbd: name",
	}
	for name, want := range bad {
		_, err := ParseSpec(name)
		if err == nil || !strings.Contains(err.Error(), want) || !errors.Is(err, mapper.ErrInvalid) {
			t.Errorf("ParseSpec(%q) = %v; want an invalid-argument error containing %q", name, err, want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	dir := t.TempDir()
	errs := Config{ID: "client.vhostdm", Conf: dir + "/missing.conf", Keyring: dir}.Validate()
	if e := errs["id"]; e == nil || !strings.Contains(e.Error(), `without "client."`) {
		t.Errorf("id error = %v", e)
	}
	if e := errs["conf"]; e == nil || !strings.Contains(e.Error(), "no such file") {
		t.Errorf("conf error = %v", e)
	}
	if e := errs["keyring"]; e == nil || !strings.Contains(e.Error(), "not a regular file") {
		t.Errorf("keyring error = %v", e)
	}
	if errs := (Config{ID: "a b"}).Validate(); errs["id"] == nil {
		t.Error("an id with a space was accepted")
	}
	if errs := (Config{}).Validate(); len(errs) != 0 {
		t.Errorf("the empty config: %v", errs)
	}
}
