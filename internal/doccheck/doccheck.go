// Package doccheck holds the drift checks that keep docs/REFERENCE.md in
// step with the code: the tests of both daemons ask it whether the
// reference names every command, flag, key, QMP command, event and metric
// they have.
package doccheck

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Reference returns the text of docs/REFERENCE.md.
func Reference(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("doccheck: cannot locate the source tree")
	}
	b, err := os.ReadFile(filepath.Join(filepath.Dir(file), "..", "..", "docs", "REFERENCE.md"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// MustMention fails t for every name that doc does not show as code
// (`name`); what says what kind of thing the names are.
func MustMention(t testing.TB, doc, what string, names []string) {
	t.Helper()
	for _, n := range names {
		if !strings.Contains(doc, "`"+n+"`") {
			t.Errorf("docs/REFERENCE.md does not document %s `%s`", what, n)
		}
	}
}
