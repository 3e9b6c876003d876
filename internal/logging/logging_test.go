package logging

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestNew(t *testing.T) {
	var b bytes.Buffer
	log, err := New(&b, "warn", "json")
	if err != nil {
		t.Fatal(err)
	}
	log.Info("hidden")
	log.Warn("shown", "device", "root")
	var line map[string]any
	if err := json.Unmarshal(b.Bytes(), &line); err != nil || line["msg"] != "shown" || line["device"] != "root" {
		t.Fatalf("json line %q: %v", b.String(), err)
	}
	b.Reset()
	log, _ = New(&b, "debug", "text")
	log.Debug("d", "export", "x")
	if !strings.Contains(b.String(), "level=DEBUG msg=d export=x") {
		t.Fatalf("text line %q", b.String())
	}
	for _, c := range [][2]string{{"loud", "text"}, {"info", "xml"}} {
		if _, err := New(&b, c[0], c[1]); err == nil {
			t.Errorf("New(%q, %q) accepted", c[0], c[1])
		}
	}
}
