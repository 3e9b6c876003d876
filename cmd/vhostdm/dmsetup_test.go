package main

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/test/oracle"
)

// TestDmsetupKernel runs the command lines of testdata/dmsetup_kernel
// through vhostdm ctl and compares its output with the real dmsetup's,
// which the file holds as the kernel guest recorded it (go test
// ./test/oracle -run TestKernelDmsetup -oracle.record): the fields both print
// must be equal (oracle.Shared; trailing blanks aside), and the exit
// statuses must agree on success or failure.
func TestDmsetupKernel(t *testing.T) {
	const path = "testdata/dmsetup_kernel"
	s, err := oracle.ParseSession(path)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(s.Header, func(h string) bool { return strings.HasPrefix(h, "# kernel:") }) {
		t.Fatalf("%s has no kernel answers: record them with go test ./test/oracle -run TestKernelDmsetup -oracle.record", path)
	}
	names := s.Names()
	sock, _ := startCtlServer(t)
	for _, c := range s.Cmds {
		o, e, code := ctlRun(context.Background(), append([]string{"--qmp", sock}, c.Words...), "")
		want := trimRight(oracle.Shared(c.Out, names))
		got := trimRight(lines(o))
		if !slices.Equal(got, want) || (code == 0) != (c.Exit == 0) {
			t.Errorf("%s:%d: %s\nvhostdm ctl (exit %d, stderr %q):\n%s\ndmsetup (exit %d), shared fields:\n%s",
				path, c.Line, c.Text, code, e, quoteLines(got), c.Exit, quoteLines(want))
		}
	}
}

// trimRight drops trailing blanks: the kernel ends some TABLE lines with
// a space (flakey's, zero's), vhostdm not always; the fields are the same.
func trimRight(l []string) []string {
	r := make([]string, len(l))
	for i, s := range l {
		r[i] = strings.TrimRight(s, " ")
	}
	return r
}

func quoteLines(l []string) string {
	var b strings.Builder
	for _, s := range l {
		b.WriteString("\t" + strings.ReplaceAll(s, "\t", `\t`) + "|\n")
	}
	return b.String()
}
