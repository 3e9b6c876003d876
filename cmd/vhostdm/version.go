package main

import (
	"fmt"
	"io"
	"runtime/debug"
)

// Version is the release version; builds from a checkout add the VCS revision.
const Version = "0.1.0"

func init() {
	register("version", "print the version", func(args []string, stdout, stderr io.Writer) int {
		fmt.Fprintf(stdout, "vhostdm %s%s\n", Version, revision())
		return 0
	})
}

func revision() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			return " (" + s.Value[:12] + ")"
		}
	}
	return ""
}
