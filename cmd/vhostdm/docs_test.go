package main

import (
	"bytes"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/doccheck"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/metrics"
	"github.com/vhostdm/vhostdm/qmp"
)

// docs/REFERENCE.md must document every command, flag, configuration key,
// QMP command, event, target and metric: these tests fail when the code
// grows something the reference does not name.

func TestReferenceDocumentsCommandsAndFlags(t *testing.T) {
	doc := doccheck.Reference(t)
	var cmds []string
	for n := range commands {
		cmds = append(cmds, "vhostdm "+n)
		// Every flag the subcommand prints in its usage.
		var out bytes.Buffer
		commands[n].run([]string{"-h"}, &out, &out)
		for _, m := range regexp.MustCompile(`(?m)^\s+-([a-z][a-z0-9-]*)`).FindAllStringSubmatch(out.String(), -1) {
			if len(m[1]) == 1 {
				cmds = append(cmds, "-"+m[1])
			} else {
				cmds = append(cmds, "--"+m[1])
			}
		}
	}
	doccheck.MustMention(t, doc, "command or flag", cmds)
	var verbs []string
	for v := range ctlVerbs {
		verbs = append(verbs, "vhostdm ctl "+v)
	}
	doccheck.MustMention(t, doc, "ctl verb", verbs)
}

func TestReferenceDocumentsConfigKeys(t *testing.T) {
	doc := doccheck.Reference(t)
	var keys []string
	var walk func(prefix string, typ reflect.Type)
	walk = func(prefix string, typ reflect.Type) {
		if typ.Kind() == reflect.Slice {
			typ = typ.Elem()
		}
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i)
			tag := f.Tag.Get("toml")
			if f.Anonymous && tag == "" {
				walk(prefix, f.Type) // embedded keys, e.g. config.SocketPerm
				continue
			}
			if tag == "" || tag == "-" {
				continue
			}
			name := strings.Split(tag, ",")[0]
			ft := f.Type
			if ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct || ft.Kind() == reflect.Struct {
				walk(name+".", ft)
				continue
			}
			keys = append(keys, prefix+name)
		}
	}
	walk("", reflect.TypeOf(config.Config{}))
	if len(keys) < 15 {
		t.Fatalf("found only %d configuration keys: %v", len(keys), keys)
	}
	doccheck.MustMention(t, doc, "configuration key", keys)
}

func TestReferenceDocumentsQMP(t *testing.T) {
	doc := doccheck.Reference(t)
	s := qmp.NewServer(qmp.Config{Manager: mapper.NewManager(mapper.ManagerOptions{}),
		Extra: []qmp.ExtraCommand{{Name: "reload-config", Run: func(map[string]string) (any, error) { return nil, nil }}}})
	doccheck.MustMention(t, doc, "QMP command", s.CommandNames())
	doccheck.MustMention(t, doc, "QMP event", []string{qmp.EventDM, qmp.EventDeviceResized, qmp.EventBlockExportDeleted,
		qmp.EventVhostUserConnected, qmp.EventVhostUserDisconnected})
}

func TestReferenceDocumentsTargetsAndMetrics(t *testing.T) {
	doc := doccheck.Reference(t)
	var names []string
	for _, tt := range mapper.TargetTypes() {
		if !strings.Contains(tt.Name, "test") { // registered by tests
			names = append(names, tt.Name)
		}
	}
	doccheck.MustMention(t, doc, "target", names)
	mfs, err := metrics.New().Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var ms []string
	for _, mf := range mfs {
		if n := mf.GetName(); strings.HasPrefix(n, "vhostdm_") {
			ms = append(ms, n)
		}
	}
	// Vectors without samples yet and the collectors' names.
	for _, re := range []string{`"(vhostdm_[a-z_]+)"`, `"(repagent_hub_[a-z_]+)"`} {
		src, _ := os.ReadFile("../../metrics/metrics.go")
		src2, _ := os.ReadFile("../../metrics/repagent.go")
		for _, m := range regexp.MustCompile(re).FindAllStringSubmatch(string(src)+string(src2), -1) {
			if !slices.Contains(ms, m[1]) {
				ms = append(ms, m[1])
			}
		}
	}
	doccheck.MustMention(t, doc, "metric", ms)
}
