package main

import (
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/cephstore"
)

// volumeFlags collects repeated --volume NAME=PATH flags.
type volumeFlags []hub.SeedVolume

func (f *volumeFlags) String() string { return fmt.Sprint(*f) }

func (f *volumeFlags) Set(s string) error {
	name, path, ok := strings.Cut(s, "=")
	if !ok || name == "" || path == "" {
		return fmt.Errorf("want NAME=PATH, got %q", s)
	}
	*f = append(*f, hub.SeedVolume{Name: name, Path: path})
	return nil
}

// runSeed creates a VM in a store (no hub running on it) from existing
// images: the failback's first step at the old source site.
func runSeed(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("seed", flag.ContinueOnError)
	fs.SetOutput(stderr)
	store := fs.String("store", "", "the hub's store `DIR` (required; no hub may run on it)")
	vm := fs.String("vm", "", "the VM's `NAME` (required)")
	uuid := fs.String("uuid", "", "the VM's `UUID` as its agent says it (8-4-4-4-12 hex digits; default: learnt at the first connection)")
	var vols volumeFlags
	fs.Var(&vols, "volume", "`NAME=PATH`: volume NAME's replica starts as a copy of image PATH (repeat per volume)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *store == "" || *vm == "" || len(vols) == 0 || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: repagent-hub seed --store DIR --vm NAME [--uuid U] --volume NAME=PATH...")
		return 2
	}
	if cephstore.IsStore(*store) {
		fmt.Fprintln(stderr, "repagent-hub: seed: a Ceph store cannot be seeded yet (directory stores only)")
		return 1
	}
	if err := hub.Seed(*store, *vm, *uuid, 0, vols); err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 1
	}
	for _, v := range vols {
		fmt.Fprintf(stdout, "seeded %s/%s from %s: resynchronised by checksums when the agent connects\n", *vm, v.Name, v.Path)
	}
	return 0
}
