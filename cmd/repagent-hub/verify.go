package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"

	"github.com/vhostdm/vhostdm/repagent/hub"
)

// runVerify asks the running hub for an online verify (repagent-verify)
// and prints its report. Exit status: 0 when source and replica match, 3
// when regions differ, 1 on error, 2 on a usage error.
func runVerify(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	vm := fs.String("vm", "", "the VM's `NAME` (required)")
	volume := fs.String("volume", "", "verify only volume `V` (default: every protected volume)")
	rate := fs.String("rate", "", "hash at most `SIZE` of the source per second (e.g. 100m; default unlimited)")
	sock := fs.String("qmp", "", "the running hub's QMP socket `PATH` (required)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *vm == "" || *sock == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: repagent-hub verify --vm NAME --qmp SOCK [--volume V] [--rate SIZE] [--json]")
		return 2
	}
	mon, err := dialQMP(*sock)
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 1
	}
	defer mon.Close()
	a := map[string]string{"vm": *vm}
	if *volume != "" {
		a["volume"] = *volume
	}
	if *rate != "" {
		a["rate"] = *rate
	}
	cmd, _ := json.Marshal(map[string]any{"execute": "repagent-verify", "arguments": a})
	raw, err := mon.Run(cmd)
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: verify: %v\n", err)
		return 1
	}
	var r struct {
		Return hub.VerifyReport `json:"return"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		fmt.Fprintf(stderr, "repagent-hub: verify: %v\n", err)
		return 1
	}
	if *asJSON {
		b, _ := json.MarshalIndent(r.Return, "", "  ")
		fmt.Fprintf(stdout, "%s\n", b)
	} else {
		fmt.Fprint(stdout, FormatVerify(r.Return))
	}
	for _, v := range r.Return.Volumes {
		if v.Mismatches > 0 {
			return 3
		}
	}
	return 0
}

// FormatVerify prints a verify report: one line per volume, then the
// byte ranges of the regions that differ.
func FormatVerify(r hub.VerifyReport) string {
	var s string
	for _, v := range r.Volumes {
		s += fmt.Sprintf("%s/%s: %s compared in %.1fs, %d mismatching regions (%s), %d skipped\n", r.VM, v.Volume,
			size(v.VerifiedBytes), v.Seconds, v.Mismatches, size(v.MismatchBytes), v.Skipped)
		for _, m := range v.MismatchRanges {
			s += fmt.Sprintf("    differs: bytes %d-%d (%s)\n", m.Offset, m.Offset+m.Length-1, size(m.Length))
		}
	}
	return s
}
