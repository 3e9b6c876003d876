package mapper_test

import (
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// FuzzParseTable feeds arbitrary text to the table parser and builder: they
// must never panic, and a table that builds must print TABLE lines that
// parse back to the same lines.
func FuzzParseTable(f *testing.F) {
	for _, s := range []string{
		"0 2048 linear a 0",
		"0 1024 linear a 0\n1024 1024 striped 2 8 b 0 c 0",
		"0 8 zero\n8 8 error",
		"# c\n\n0 8 zero",
		"0 0 zero",
		"1 8 zero",
		"0 18446744073709551615 zero",
		"0 8 striped 1 8 a 0",
		"0 8 linear a 18446744073709551615",
	} {
		f.Add(s)
	}
	set := newFuzzSet()
	m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: discard()})
	f.Fuzz(func(t *testing.T, text string) {
		lines, err := mapper.ParseTable(text)
		if err != nil {
			return
		}
		if lines[0].Start != 0 {
			t.Fatalf("parsed table starts at %d", lines[0].Start)
		}
		tab, err := mapper.BuildTable(text, mapper.TableOptions{Device: "fuzz", Opener: m})
		if err != nil {
			return
		}
		defer tab.Close()
		var out []string
		for _, l := range tab.Status(mapper.StatusTable) {
			out = append(out, l.String())
		}
		tab2, err := mapper.BuildTable(strings.Join(out, "\n"), mapper.TableOptions{Device: "fuzz", Opener: m})
		if err != nil {
			t.Fatalf("TABLE output does not load back: %v\n%s", err, strings.Join(out, "\n"))
		}
		defer tab2.Close()
		for i, l := range tab2.Status(mapper.StatusTable) {
			if l.String() != out[i] {
				t.Fatalf("line %d changed on reload: %q vs %q", i, l.String(), out[i])
			}
		}
	})
}
