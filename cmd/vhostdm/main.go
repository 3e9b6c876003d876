// Command vhostdm serves device-mapper tables to QEMU over vhost-user-blk.
//
//	vhostdm serve [-c FILE]      serve the configured devices and exports
//	vhostdm validate -c FILE     check a configuration and print a summary
//	vhostdm ctl --qmp SOCK VERB  control a running daemon (dmsetup's verbs)
//	vhostdm bench --socket PATH  drive any vhost-user-blk back end
//	vhostdm version              print the version
package main

import (
	"fmt"
	"io"
	"os"
	"slices"

	_ "github.com/vhostdm/vhostdm/targets" // linear, striped, zero, error, delay, flakey, crypt
	_ "github.com/vhostdm/vhostdm/targets/mirror"
	_ "github.com/vhostdm/vhostdm/targets/multipath"
	_ "github.com/vhostdm/vhostdm/targets/ploop"
	_ "github.com/vhostdm/vhostdm/targets/raid"
	_ "github.com/vhostdm/vhostdm/targets/replicator"
	_ "github.com/vhostdm/vhostdm/targets/snapshot"
	_ "github.com/vhostdm/vhostdm/targets/thin" // thin-pool, thin
)

// command is one subcommand. run returns the process exit status.
type command struct {
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

// commands holds the subcommands by name; each file registers its own in init.
var commands = map[string]command{}

func register(name, summary string, run func(args []string, stdout, stderr io.Writer) int) {
	if _, dup := commands[name]; dup {
		panic("vhostdm: command " + name + " registered twice")
	}
	commands[name] = command{summary: summary, run: run}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "vhostdm: unknown command %q\n", args[0])
		usage(stderr)
		return 2
	}
	return c.run(args[1:], stdout, stderr)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: vhostdm COMMAND [options]\n\ncommands:")
	var names []string
	for n := range commands {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-9s %s\n", n, commands[n].summary)
	}
}
