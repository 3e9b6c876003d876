package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/cephstore"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// parsePoint turns the point arguments (at most one set) into a
// selector: --at TIME (RFC 3339), --seq N, --checkpoint NAME; none is
// the newest consistent point.
func parsePoint(at, seq, checkpoint string) (journal.Selector, error) {
	n := 0
	for _, s := range []string{at, seq, checkpoint} {
		if s != "" {
			n++
		}
	}
	switch {
	case n > 1:
		return journal.Selector{}, errors.New("give at most one of at, seq and checkpoint")
	case at != "":
		t, err := time.Parse(time.RFC3339Nano, at)
		if err != nil {
			return journal.Selector{}, fmt.Errorf("at %q: want an RFC 3339 time (2006-01-02T15:04:05Z): %w", at, err)
		}
		return journal.AtTime(t), nil
	case seq != "":
		v, err := strconv.ParseUint(seq, 10, 64)
		if err != nil || v == 0 {
			return journal.Selector{}, fmt.Errorf("seq %q: want a sequence number above 0", seq)
		}
		return journal.AtSeq(v), nil
	case checkpoint != "":
		if !journal.ValidName(checkpoint) {
			return journal.Selector{}, fmt.Errorf("checkpoint %q: not a valid name", checkpoint)
		}
		return journal.AtCheckpoint(checkpoint), nil
	}
	return journal.Newest(), nil
}

// Recovered is the answer of the repagent-recover QMP command and what
// `repagent-hub recover` prints.
type Recovered struct {
	VM      string            `json:"vm"`
	Seq     uint64            `json:"seq"`
	Time    time.Time         `json:"time"`
	Pos     int64             `json:"pos"`
	Volumes []RecoveredVolume `json:"volumes"`
	UUID    string            `json:"uuid,omitempty"`   // the VM's UUID at the hub
	Config  string            `json:"config,omitempty"` // the vhostdm TOML written
	Mode    string            `json:"mode,omitempty"`   // "qmp" (a running hub) or "offline" (the store)
}

// RecoveredVolume is one materialised volume.
type RecoveredVolume struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
	Path string `json:"path"`
}

func toRecovered(vm string, r journal.Recovered) Recovered {
	out := Recovered{VM: vm, Seq: r.Point.Seq, Time: r.Point.Time, Pos: r.Point.Pos, Volumes: []RecoveredVolume{}}
	for _, v := range r.Volumes {
		out.Volumes = append(out.Volumes, RecoveredVolume{Name: v.Name, Size: v.Size, Path: v.Path})
	}
	return out
}

func runRecover(args []string, stdout, stderr io.Writer) int {
	return recoverOrPromote("recover", args, stdout, stderr)
}

// runPromote is recover through the running hub's repagent-promote: the
// VM's agent is refused from then on and its replicas stay as they are.
func runPromote(args []string, stdout, stderr io.Writer) int {
	return recoverOrPromote("promote", args, stdout, stderr)
}

func recoverOrPromote(verb string, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(verb, flag.ContinueOnError)
	fs.SetOutput(stderr)
	vm := fs.String("vm", "", "the VM's `NAME` (required)")
	out := fs.String("out", "", "`DIR` for the recovered images and vm.toml (required; must not hold images)")
	sock := fs.String("qmp", "", "the running hub's QMP socket `PATH`")
	store := new(string)
	if verb == "recover" {
		store = fs.String("store", "", "the hub's store `DIR` (or ceph:POOL), opened directly when no hub runs on it")
	}
	var cf cephFlags
	cf.add(fs)
	at := fs.String("at", "", "the newest consistent point at or before `TIME` (RFC 3339)")
	seq := fs.String("seq", "", "the consistent point that ends with sequence number `N`")
	cp := fs.String("checkpoint", "", "the named checkpoint `NAME`")
	protectTo := fs.String("protect-to", "", "make vm.toml protect every volume to the hub at `ADDR` (host:port; failback to the old source site)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *vm == "" || *out == "" || (*sock == "") == (*store == "") || fs.NArg() != 0 {
		if verb == "recover" {
			fmt.Fprintln(stderr, "usage: repagent-hub recover --vm NAME --out DIR (--qmp SOCK | --store DIR|ceph:POOL) [--ceph-conf FILE] [--ceph-id NAME] [--at TIME | --seq N | --checkpoint NAME]")
		} else {
			fmt.Fprintln(stderr, "usage: repagent-hub promote --vm NAME --out DIR --qmp SOCK [--at TIME | --seq N | --checkpoint NAME]")
		}
		return 2
	}
	sel, err := parsePoint(*at, *seq, *cp)
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 2
	}
	dir, err := filepath.Abs(*out)
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 1
	}
	var rec Recovered
	if *sock != "" {
		rec, err = recoverQMP(*sock, "repagent-"+verb, *vm, dir, *at, *seq, *cp)
		rec.Mode = "qmp"
	} else {
		rec, err = recoverOffline(*store, &cf, *vm, dir, sel)
		rec.Mode = "offline"
	}
	if err == nil {
		rec.Config, err = writeRecoveredConfig(dir, rec, *protectTo, cf)
	}
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %s: %v\n", verb, err)
		return 1
	}
	b, _ := json.MarshalIndent(rec, "", "  ")
	fmt.Fprintf(stdout, "%s\n", b)
	return 0
}

// recoverQMP asks the running hub to materialise the point.
func recoverQMP(sock, command, vm, dir, at, seq, cp string) (Recovered, error) {
	mon, err := dialQMP(sock)
	if err != nil {
		return Recovered{}, err
	}
	defer mon.Close()
	a := map[string]string{"vm": vm, "out": dir}
	for k, v := range map[string]string{"at": at, "seq": seq, "checkpoint": cp} {
		if v != "" {
			a[k] = v
		}
	}
	cmd, _ := json.Marshal(map[string]any{"execute": command, "arguments": a})
	raw, err := mon.Run(cmd)
	if err != nil {
		return Recovered{}, fmt.Errorf("%s: %w", command, err)
	}
	var r struct {
		Return Recovered `json:"return"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return Recovered{}, fmt.Errorf("%s: %w", command, err)
	}
	return r.Return, nil
}

// recoverOffline opens the VM's journal in the store directly; the
// journal's lock refuses it while a hub has it open. A Ceph store's
// recovered volumes are RBD clones in its pool.
func recoverOffline(store string, cf *cephFlags, vm, dir string, sel journal.Selector) (Recovered, error) {
	if wire.CheckName(vm) != nil {
		return Recovered{}, fmt.Errorf("vm %q: not a valid name", vm)
	}
	var be hub.Backend = hub.DirBackend(store)
	if cephstore.IsStore(store) {
		var err error
		if be, err = cf.open(store, nil, false); err != nil {
			return Recovered{}, err
		}
	} else if err := cf.unused(); err != nil {
		return Recovered{}, err
	}
	defer be.Close()
	js := be.Journal(vm)
	if st, err := js.GetState(); err != nil || st == nil {
		if err == nil {
			err = fs.ErrNotExist
		}
		return Recovered{}, fmt.Errorf("vm %q has no journal in %s: %w", vm, store, err)
	}
	j, err := journal.Open(js.String(), journal.Options{NoApplier: true, Store: js})
	if errors.Is(err, journal.ErrInUse) {
		return Recovered{}, fmt.Errorf("a hub has vm %q open: recover through its QMP socket (--qmp): %w", vm, err)
	}
	if err != nil {
		return Recovered{}, err
	}
	defer j.Close()
	r, err := j.Materialize(context.Background(), sel, dir)
	if err != nil {
		return Recovered{}, err
	}
	rec := toRecovered(vm, r)
	if rs, ok := be.(hub.RecoveryStore); ok {
		for _, v := range r.Volumes {
			if err := rs.LabelRecovered(v.Path, vm, hub.PurposeRecover); err != nil {
				return Recovered{}, fmt.Errorf("label %s (remove it with repagent-hub clones --remove): %w", v.Path, err)
			}
		}
	}
	if b, err := be.GetVM(vm); err == nil && b != nil {
		var meta struct {
			UUID string `json:"uuid"`
		}
		if json.Unmarshal(b, &meta) == nil && len(meta.UUID) == 32 {
			u := meta.UUID
			rec.UUID = u[:8] + "-" + u[8:12] + "-" + u[12:16] + "-" + u[16:20] + "-" + u[20:]
		}
	}
	return rec, nil
}

// writeRecoveredConfig writes DIR/vm.toml: one linear device and one
// writable vhost-user-blk export per recovered volume, and a QMP socket,
// checked with the config package before it is kept.
// With protectTo, the exports are protected to that hub ([repagent] with
// the VM's name and UUID): the failback to the old source site.
func writeRecoveredConfig(dir string, rec Recovered, protectTo string, cf cephFlags) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "# vhostdm configuration of vm %q recovered at sequence %d (%s)\n", rec.VM, rec.Seq, rec.Time.Format(time.RFC3339Nano))
	fmt.Fprintf(&b, "# written by repagent-hub recover; serve with: vhostdm serve -c %s\n\n", filepath.Join(dir, "vm.toml"))
	fmt.Fprintf(&b, "[qmp]\nsocket = %q\n", filepath.Join(dir, "vhostdm.qmp"))
	rbd := false
	for _, v := range rec.Volumes {
		rbd = rbd || strings.HasPrefix(v.Path, "rbd:")
	}
	if rbd {
		// The volumes are RBD clones in the hub's pool: vhostdm built
		// with -tags ceph serves them through librbd.
		b.WriteString("\n# the recovered volumes are RBD clones of snapshots of the replicas\n[ceph]\n")
		if cf.conf != "" {
			conf, err := filepath.Abs(cf.conf)
			if err != nil {
				return "", err
			}
			fmt.Fprintf(&b, "conf = %q\n", conf)
		}
		if cf.id != "" {
			fmt.Fprintf(&b, "id = %q\n", cf.id)
		}
	}
	if protectTo != "" {
		fmt.Fprintf(&b, "\n# failback: the volumes replicate to the old source site's hub, which\n# resynchronises them by checksums (repagent-hub seed there first)\n")
		fmt.Fprintf(&b, "[repagent]\nhub = %q\nvm = %q\n", protectTo, rec.VM)
		if rec.UUID != "" && rec.UUID != "00000000-0000-0000-0000-000000000000" {
			fmt.Fprintf(&b, "uuid = %q\n", rec.UUID)
		}
	}
	for i, v := range rec.Volumes {
		// The export id is the volume's name: protected, it reports
		// the same volume to a hub.
		name := v.Name
		fmt.Fprintf(&b, "\n# volume %s\n[[device]]\nname = %q\ntable = \"\"\"\n0 %d linear %s 0\n\"\"\"\n", v.Name, name, v.Size/wire.SectorSize, v.Path)
		fmt.Fprintf(&b, "\n[[export]]\nid = %q\ndevice = %q\nsocket = %q\nnum-queues = 1\nwritable = true\nlogical-block-size = 512\nserial = %q\n",
			name, name, filepath.Join(dir, fmt.Sprintf("volume-%d.sock", i)), serialOf(v.Name))
		if protectTo != "" {
			b.WriteString("protect = true\n")
		}
	}
	path := filepath.Join(dir, "vm.toml")
	if err := os.MkdirAll(dir, 0o700); err != nil { // a Ceph store's volumes are not in dir
		return "", err
	}
	if _, err := config.Parse([]byte(b.String()), path, dir); err != nil {
		return "", fmt.Errorf("the recovered configuration does not validate: %w", err)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return "", err
	}
	return path, nil
}

// serialOf fits a volume name into a virtio-blk serial (20 bytes).
func serialOf(name string) string {
	if len(name) > 20 {
		return name[:20]
	}
	return name
}
