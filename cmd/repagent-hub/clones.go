package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/cephstore"
)

// stringsFlag collects a repeated flag.
type stringsFlag []string

func (f *stringsFlag) String() string { return strings.Join(*f, ",") }

func (f *stringsFlag) Set(s string) error {
	if s == "" {
		return errors.New("empty value")
	}
	*f = append(*f, s)
	return nil
}

// runClones lists the recovered volumes a Ceph store holds (RBD clones
// made by recover, promote and failover tests) and removes those asked
// for, refusing any a client has open.
func runClones(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("clones", flag.ContinueOnError)
	fs.SetOutput(stderr)
	store := fs.String("store", "", "the hub's store ceph:`POOL` (required)")
	var cf cephFlags
	cf.add(fs)
	vm := fs.String("vm", "", "only the recovered volumes of VM `NAME`")
	purpose := fs.String("purpose", "", "only those made by `WHAT`: recover, failover-test, promote (or \"none\": unlabelled)")
	olderThan := fs.Duration("older-than", 0, "only those made more than `DURATION` ago")
	var remove stringsFlag
	fs.Var(&remove, "remove", "remove the recovered volume `IMAGE` (rbd:POOL/IMAGE or IMAGE; repeat); refused while a client has it open")
	removeAll := fs.Bool("remove-all", false, "remove every listed recovered volume no client has open, except promoted VMs' volumes (name those with --remove)")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *store == "" || fs.NArg() != 0 || (len(remove) > 0 && *removeAll) {
		fmt.Fprintln(stderr, "usage: repagent-hub clones --store ceph:POOL [--ceph-conf FILE] [--ceph-id NAME] [--vm NAME] [--purpose WHAT] [--older-than DURATION] [--remove IMAGE... | --remove-all] [--json]")
		return 2
	}
	if !cephstore.IsStore(*store) {
		fmt.Fprintf(stderr, "repagent-hub: clones: %s is a directory store: its recovered volumes are the files in the --out directory of recover and promote (remove them with rm) and a failover test's copies are removed when it ends\n", *store)
		return 2
	}
	be, err := cf.open(*store, nil, false)
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: --store %s: %v\n", *store, err)
		return 1
	}
	defer be.Close()
	rs, ok := be.(hub.RecoveryStore)
	if !ok {
		fmt.Fprintf(stderr, "repagent-hub: clones: %s keeps no recovered volumes\n", *store)
		return 1
	}
	all, err := rs.ListRecovered()
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: clones: %v\n", err)
		return 1
	}
	var list []hub.RecoveredImage
	for _, ri := range all {
		if (*vm == "" || ri.VM == *vm) && (*purpose == "" || ri.Purpose == *purpose || *purpose == "none" && ri.Purpose == "") &&
			(*olderThan == 0 || time.Since(ri.Created) > *olderThan) {
			list = append(list, ri)
		}
	}
	pool, _ := cephstore.ParseStore(*store)
	var targets []string
	switch {
	case *removeAll:
		for _, ri := range list {
			if ri.Purpose == hub.PurposePromote {
				fmt.Fprintf(stderr, "repagent-hub: clones: %s is a promoted VM's volume: kept (name it with --remove to remove it)\n", ri.Name)
				continue
			}
			targets = append(targets, ri.Name)
		}
	case len(remove) > 0:
		for _, n := range remove {
			if !strings.HasPrefix(n, "rbd:") {
				n = "rbd:" + pool + "/" + n
			}
			targets = append(targets, n)
		}
	default:
		if *asJSON {
			if list == nil {
				list = []hub.RecoveredImage{}
			}
			b, _ := json.MarshalIndent(list, "", "  ")
			fmt.Fprintf(stdout, "%s\n", b)
			return 0
		}
		printClones(stdout, list)
		return 0
	}
	removed, code := []string{}, 0
	for _, n := range targets {
		if err := rs.RemoveRecovered(n); err != nil {
			fmt.Fprintf(stderr, "repagent-hub: clones: %v\n", err)
			code = 1
			continue
		}
		removed = append(removed, n)
		if !*asJSON {
			fmt.Fprintf(stdout, "removed %s\n", n)
		}
	}
	if *asJSON {
		b, _ := json.MarshalIndent(map[string][]string{"removed": removed}, "", "  ")
		fmt.Fprintf(stdout, "%s\n", b)
	}
	return code
}

// printClones prints the recovered volumes as a table.
func printClones(w io.Writer, list []hub.RecoveredImage) {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tVM\tVOLUME\tPURPOSE\tCREATED\tSIZE\tIN USE BY")
	for _, ri := range list {
		p := ri.Purpose
		if p == "" {
			p = "-"
		}
		use := "-"
		if len(ri.Watchers) > 0 {
			use = strings.Join(ri.Watchers, ",")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", ri.Name, ri.VM, ri.Volume, p, ri.Created.Format(time.RFC3339), size(uint64(ri.Size)), use)
	}
	tw.Flush()
}
