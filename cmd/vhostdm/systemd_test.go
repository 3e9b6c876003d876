package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestSystemdUnits checks the example units with systemd-analyze verify,
// with the daemons' paths pointed at an executable that exists here.
func TestSystemdUnits(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze (Debian package systemd) is needed to check the units: %v", err)
	}
	dir := t.TempDir()
	for _, name := range []string{"vhostdm@.service", "repagent-hub.service"} {
		b, err := os.ReadFile(filepath.Join("../../examples/systemd", name))
		if err != nil {
			t.Fatal(err)
		}
		text := strings.NewReplacer("/usr/local/bin/vhostdm", "/bin/true", "/usr/local/bin/repagent-hub", "/bin/true").Replace(string(b))
		unit := name
		if strings.Contains(name, "@") {
			unit = strings.Replace(name, "@", "@vm1", 1)
		}
		p := filepath.Join(dir, unit)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(sa, "verify", "--man=no", p).CombinedOutput()
		// Lines about the host's own units are not ours.
		var ours []string
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, unit) || strings.Contains(l, name) {
				ours = append(ours, l)
			}
		}
		if err != nil || len(ours) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", name, err, out)
		}
	}
}
