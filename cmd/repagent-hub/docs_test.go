package main

import (
	"bytes"
	"log/slog"
	"regexp"
	"testing"

	"github.com/vhostdm/vhostdm/internal/doccheck"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/qmp"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// These tests extend cmd/vhostdm/docs_test.go's drift check to
// repagent-hub: docs/REFERENCE.md must name every subcommand, flag, QMP
// command and event of the hub.

func TestReferenceDocumentsHubCommandsAndFlags(t *testing.T) {
	doc := doccheck.Reference(t)
	var names []string
	for n, c := range commands {
		names = append(names, "repagent-hub "+n)
		var out bytes.Buffer
		c.run([]string{"-h"}, &out, &out)
		flags := regexp.MustCompile(`(?m)^\s+-([a-z][a-z0-9-]*)`).FindAllStringSubmatch(out.String(), -1)
		if len(flags) == 0 {
			t.Errorf("repagent-hub %s -h lists no flags:\n%s", n, out.String())
		}
		for _, m := range flags {
			names = append(names, "--"+m[1])
		}
	}
	if len(names) < 10 {
		t.Fatalf("found only %v", names)
	}
	doccheck.MustMention(t, doc, "repagent-hub command or flag", names)
}

func TestReferenceDocumentsHubQMP(t *testing.T) {
	doc := doccheck.Reference(t)
	h, err := hub.New(hub.Config{Store: t.TempDir(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	m := mapper.NewManager(mapper.ManagerOptions{})
	defer m.Close()
	s := qmp.NewServer(qmp.Config{Manager: m, Extra: Commands(h, slog.New(slog.DiscardHandler))})
	doccheck.MustMention(t, doc, "repagent-hub QMP command", s.CommandNames())
	doccheck.MustMention(t, doc, "repagent-hub QMP event", []string{EventVolumeState})
}
