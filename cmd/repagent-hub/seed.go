package main

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"

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
	store := fs.String("store", "", "the hub's store `DIR` or ceph:POOL (required; no hub may run on it, or with ceph:POOL hold the VM)")
	var cf cephFlags
	cf.add(fs)
	vm := fs.String("vm", "", "the VM's `NAME` (required)")
	uuid := fs.String("uuid", "", "the VM's `UUID` as its agent says it (8-4-4-4-12 hex digits; default: learnt at the first connection)")
	var vols volumeFlags
	fs.Var(&vols, "volume", "`NAME=PATH`: volume NAME's replica starts as a copy of image PATH (a file; with ceph:POOL also rbd:POOL/IMAGE[@SNAP]; repeat per volume)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *store == "" || *vm == "" || len(vols) == 0 || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: repagent-hub seed --store DIR|ceph:POOL [--ceph-conf FILE] [--ceph-id NAME] --vm NAME [--uuid U] --volume NAME=PATH...")
		return 2
	}
	var err error
	if cephstore.IsStore(*store) {
		err = seedCeph(*store, &cf, *vm, *uuid, vols)
	} else if err = cf.unused(); err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 2
	} else {
		err = hub.Seed(*store, *vm, *uuid, 0, vols)
	}
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 1
	}
	for _, v := range vols {
		fmt.Fprintf(stdout, "seeded %s/%s from %s: resynchronised by checksums when the agent connects\n", *vm, v.Name, v.Path)
	}
	return 0
}

// seedCeph seeds a VM in a Ceph store: each volume's source, a file or an
// RBD image (read through librbd, read-only), is written into its new
// RBD replica.
func seedCeph(store string, cf *cephFlags, vm, uuid string, vols []hub.SeedVolume) error {
	be, err := cf.open(store, nil, false)
	if err != nil {
		return fmt.Errorf("--store %s: %w", store, err)
	}
	defer be.Close()
	o := ceph.NewOpener(ceph.Config{Conf: cf.conf, ID: cf.id}, slog.New(slog.DiscardHandler))
	defer o.Close()
	var open mapper.OpenFunc = o.Open // the plain build's never opens
	var srcs []journal.SeedSource
	for _, v := range vols {
		var src io.ReaderAt
		var size int64
		if strings.HasPrefix(v.Path, ceph.Scheme+":") {
			b, err := open(v.Path, true)
			if err != nil {
				return fmt.Errorf("seed %s: %w", v.Name, err)
			}
			defer b.Close()
			if size, err = b.Size(); err != nil {
				return fmt.Errorf("seed %s: %s: %w", v.Name, v.Path, err)
			}
			src = backendReader{b}
		} else {
			f, err := os.Open(v.Path)
			if err != nil {
				return fmt.Errorf("seed %s: %w", v.Name, err)
			}
			defer f.Close()
			fi, err := f.Stat()
			if err != nil {
				return fmt.Errorf("seed %s: %w", v.Name, err)
			}
			if !fi.Mode().IsRegular() {
				return fmt.Errorf("seed %s: %s is not a regular file", v.Name, v.Path)
			}
			src, size = f, fi.Size()
		}
		srcs = append(srcs, journal.SeedSource{Name: v.Name, Size: size, Data: src})
	}
	return hub.SeedBackend(be, vm, uuid, 0, srcs)
}

// backendReader reads a mapper backend (an rbd: image) as an io.ReaderAt.
type backendReader struct{ b mapper.Backend }

func (r backendReader) ReadAt(p []byte, off int64) (int, error) {
	if err := r.b.ReadAt([][]byte{p}, off); err != nil {
		return 0, err
	}
	return len(p), nil
}
