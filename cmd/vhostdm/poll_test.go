package main

import (
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/config"
)

// TestExportPollUS: export.poll-us reaches the export's busy-polling
// setting; without it the export does not poll.
func TestExportPollUS(t *testing.T) {
	c, err := config.Parse([]byte(`version = 1
[[device]]
name = "z"
table = "0 8 zero"
[[export]]
id = "a"
device = "z"
socket = "a.sock"
poll-us = 30
[[export]]
id = "b"
device = "z"
socket = "b.sock"
`), "vm.toml", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if got := exportOptions(c, c.Exports[0]).Poll; got != 30*time.Microsecond {
		t.Errorf("poll-us = 30: Poll %v, want 30µs", got)
	}
	if got := exportOptions(c, c.Exports[1]).Poll; got != 0 {
		t.Errorf("no poll-us: Poll %v, want 0 (off)", got)
	}
}

// TestExportAdaptivePoll: adaptive polling is on unless the export says
// adaptive-poll = false; adaptive-poll = false with poll-us is accepted
// (the fixed poll replaces it anyway).
func TestExportAdaptivePoll(t *testing.T) {
	c, err := config.Parse([]byte(`version = 1
[[device]]
name = "z"
table = "0 8 zero"
[[export]]
id = "a"
device = "z"
socket = "a.sock"
[[export]]
id = "b"
device = "z"
socket = "b.sock"
adaptive-poll = false
[[export]]
id = "c"
device = "z"
socket = "c.sock"
adaptive-poll = true
[[export]]
id = "d"
device = "z"
socket = "d.sock"
adaptive-poll = false
poll-us = 20
`), "vm.toml", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []bool{false, true, false, true} {
		if got := exportOptions(c, c.Exports[i]).NoAdaptivePoll; got != want {
			t.Errorf("export %s: NoAdaptivePoll %v, want %v", c.Exports[i].ID, got, want)
		}
	}
}
