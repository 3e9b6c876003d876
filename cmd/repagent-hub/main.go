// Command repagent-hub is the replication hub: it accepts vhostdm agents,
// keeps one recovery volume per protected volume and serves QMP.
//
//	repagent-hub serve --listen ADDR --store DIR|ceph:POOL [--ceph-conf FILE] [--ceph-id NAME] [--qmp SOCK] [--retain 24h] [--retain-bytes SIZE] [--tls-cert F --tls-key F --tls-ca F (--authorize FILE | --allow-any-identity)] [--insecure]
//	repagent-hub status --qmp SOCK [--watch]
//	repagent-hub recover --vm NAME --out DIR (--qmp SOCK | --store DIR|ceph:POOL) [--at TIME | --seq N | --checkpoint NAME]
//	repagent-hub promote --vm NAME --out DIR --qmp SOCK [--at TIME | --seq N | --checkpoint NAME]
//	repagent-hub verify --vm NAME --qmp SOCK [--volume V] [--rate SIZE]
//	repagent-hub seed --store DIR|ceph:POOL --vm NAME [--uuid U] --volume NAME=PATH...
//	repagent-hub clones --store ceph:POOL [--vm NAME] [--purpose WHAT] [--older-than D] [--remove IMAGE... | --remove-all] [--json]
//
// QMP commands (besides vhostdm's query-version, query-commands, quit):
//
//	query-repagent                                  → [{"vm", "uuid", "connected", "peer", "volumes": [VolumeStatus], "journal"}]
//	repagent-failover-test {vm, dir, [at|seq|checkpoint]} → [{"volume", "device", "socket", "sectors"}]
//	repagent-failover-test-stop {vm, [keep]}        → {} (with keep: {"kept": [IMAGE]}, the copies left in place)
//	repagent-recover {vm, out, [at|seq|checkpoint]} → {"vm", "seq", "time", "pos", "volumes"}
//	repagent-promote {vm, out, [at|seq|checkpoint]} → as repagent-recover; the VM's replication stops
//	repagent-verify {vm, [volume], [rate]}          → {"vm", "volumes": [VolumeVerify]}
//
// Event REPAGENT_VOLUME_STATE {vm, volume, state, previous, reason} is sent
// when a volume changes state (syncing, protecting, disconnected,
// failover-test).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vhostdm/vhostdm/internal/qmpclient"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/cmd/repagent-hub/internal/failover"
	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/logging"
	"github.com/vhostdm/vhostdm/internal/sdnotify"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/metrics"
	"github.com/vhostdm/vhostdm/qmp"
	"github.com/vhostdm/vhostdm/repagent/hub"
	"github.com/vhostdm/vhostdm/repagent/hub/cephstore"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/repagent/wire"
)

// Version is the hub's version, reported by QMP's query-version.
const Version = "0.1.0"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// command is a subcommand of repagent-hub.
type command struct {
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

// commands holds the subcommands by name.
var commands = map[string]command{
	"serve":   {"run the hub", func(args []string, _, stderr io.Writer) int { return runServe(args, stderr) }},
	"status":  {"print the hub's volumes over QMP", runStatus},
	"recover": {"materialise a VM's volumes at a consistent point, with a vhostdm TOML", runRecover},
	"promote": {"make a VM's volumes at a consistent point the new sources (stops its replication), with a vhostdm TOML", runPromote},
	"verify":  {"compare a VM's sources with their replicas by per-region checksums (online verify)", runVerify},
	"seed":    {"create a VM in a store from existing images, resynchronised by checksums when its agent connects (failback)", runSeed},
	"clones":  {"list and remove the recovered volumes (RBD clones) recover, promote and failover tests made in a Ceph store", runClones},
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "-h", "--help", "help":
		usage(stdout)
		return 0
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "repagent-hub: unknown command %q\n", args[0])
		return 2
	}
	return c.run(args[1:], stdout, stderr)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: repagent-hub COMMAND [flags]\n\ncommands:")
	for _, n := range slices.Sorted(maps.Keys(commands)) {
		fmt.Fprintf(w, "  %-7s %s\n", n, commands[n].summary)
	}
}

// EventVolumeState is the QMP event of a volume state change.
const EventVolumeState = "REPAGENT_VOLUME_STATE"

func runServe(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:7070", "listen `ADDR` for agents")
	store := fs.String("store", "", "store `DIR` of recovery volumes and state, or ceph:POOL (RADOS objects and RBD images; the Ceph build) (required)")
	var cf cephFlags
	cf.add(fs)
	qmpSock := fs.String("qmp", "", "QMP unix socket `PATH`")
	var tf wire.TLSFiles
	fs.StringVar(&tf.Cert, "tls-cert", "", "TLS certificate `FILE` (PEM)")
	fs.StringVar(&tf.Key, "tls-key", "", "TLS key `FILE` (PEM)")
	fs.StringVar(&tf.CA, "tls-ca", "", "CA `FILE` that signs agent certificates (PEM)")
	insecure := fs.Bool("insecure", false, "allow plain TCP on a non-loopback address")
	authorize := fs.String("authorize", "", "`FILE` naming the VMs each agent certificate may claim (lines: IDENTITY VM...)")
	anyIdentity := fs.Bool("allow-any-identity", false, "with TLS and no --authorize: let any certificate the CA signed claim any VM")
	maxConns := fs.Int("max-conns", hub.DefaultMaxConns, "most agent connections open at once (`N`)")
	maxPerPeer := fs.Int("max-conns-per-peer", hub.DefaultMaxConnsPerPeer, "most connections open at once from one IP address (`N`)")
	name := fs.String("name", "", "hub name sent to agents (default: host name)")
	level := fs.String("log-level", "info", "log `LEVEL`: debug, info, warn or error")
	format := fs.String("log-format", "text", "log `FORMAT`: text or json")
	metricsAddr := fs.String("metrics", "", "serve Prometheus metrics on `ADDR` (host:port)")
	retain := fs.Duration("retain", 24*time.Hour, "keep journaled writes `DURATION` before applying them to the replicas (the point-in-time window; 0: apply promptly)")
	retainBytes := fs.String("retain-bytes", "0", "cap each VM's unapplied journal at `SIZE` (e.g. 10g; 0: no cap)")
	csumResync := fs.Bool("csum-resync", false, "resync by checksums where a full resync of a replica that holds data would read everything (an agent restarted without its activity log)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var rb uint64
	var err error
	if *retainBytes != "0" {
		rb, err = config.ParseSize(*retainBytes)
	}
	if err != nil || *retain < 0 {
		fmt.Fprintf(stderr, "repagent-hub: --retain %v / --retain-bytes %q: %v\n", *retain, *retainBytes, err)
		return 2
	}
	if *store == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: repagent-hub serve --listen ADDR --store DIR [--qmp SOCK] [--tls-cert F --tls-key F --tls-ca F (--authorize FILE | --allow-any-identity)] [--insecure]")
		return 2
	}
	log, err := logging.New(stderr, *level, *format)
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 2
	}
	if *maxConns < 1 || *maxPerPeer < 1 {
		fmt.Fprintln(stderr, "repagent-hub: --max-conns and --max-conns-per-peer must be at least 1")
		return 2
	}
	cfg := hub.Config{Store: *store, Name: *name, Logger: log, AllowAnyIdentity: *anyIdentity,
		MaxConns: *maxConns, MaxConnsPerPeer: *maxPerPeer, Retain: *retain, RetainBytes: int64(rb), CsumResync: *csumResync}
	if cephstore.IsStore(*store) {
		// Hubs share the pool: each VM is opened, and its lease taken,
		// when its agent attaches; a HELLO for a VM another hub holds
		// (or a crashed hub held, until its lease ends) is refused at
		// once and the agent tries its next hub.
		be, err := cf.open(*store, log, false)
		if err != nil {
			fmt.Fprintf(stderr, "repagent-hub: --store %s: %v\n", *store, err)
			return 1
		}
		cfg.Store, cfg.Backend, cfg.Shared = "", be, true
	} else if err := cf.unused(); err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 2
	}
	if tf.Set() {
		tc, err := tf.TLSConfig(true)
		if err != nil {
			fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
			return 1
		}
		cfg.TLS = tc
	}
	switch {
	case (*authorize != "" || *anyIdentity) && cfg.TLS == nil:
		fmt.Fprintln(stderr, "repagent-hub: --authorize and --allow-any-identity need TLS (--tls-cert, --tls-key, --tls-ca)")
		return 2
	case *authorize != "" && *anyIdentity:
		fmt.Fprintln(stderr, "repagent-hub: --authorize and --allow-any-identity exclude each other")
		return 2
	case cfg.TLS != nil && *authorize == "" && !*anyIdentity:
		fmt.Fprintln(stderr, "repagent-hub: with TLS, give --authorize FILE (which VMs each certificate may claim) or --allow-any-identity")
		return 2
	}
	if *authorize != "" {
		a, err := hub.LoadAuthorizations(*authorize)
		if err != nil {
			fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
			return 1
		}
		cfg.Authorize = a
	}
	var srv atomic.Pointer[qmp.Server]
	cfg.OnEvent = func(e hub.Event) {
		if s := srv.Load(); s != nil {
			s.Emit(EventVolumeState, map[string]string{"vm": e.VM, "volume": e.Volume, "state": e.State,
				"previous": e.Previous, "reason": e.Reason})
		}
	}
	h, err := hub.New(cfg)
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ln, err := h.Listen(*listen, *insecure)
	if err != nil {
		h.Close()
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 1
	}
	log.Info("listening for agents", "addr", ln.Addr().String(), "tls", cfg.TLS != nil, "store", *store)
	var m *mapper.Manager
	if *qmpSock != "" {
		ql, err := qmp.ListenUnix(*qmpSock)
		if err != nil {
			ln.Close()
			h.Close()
			fmt.Fprintf(stderr, "repagent-hub: qmp: %v\n", err)
			return 1
		}
		m = mapper.NewManager(mapper.ManagerOptions{Logger: log})
		fo := failover.Options{Log: log}
		if cfg.Shared {
			// The failover tests' volumes are RBD clones in the pool.
			fo.Ceph = &ceph.Config{Conf: cf.conf, ID: cf.id}
		}
		s := qmp.NewServer(qmp.Config{Manager: m, Logger: log, Version: Version, OnQuit: cancel, Extra: commandsWith(h, fo)})
		srv.Store(s)
		go func() {
			if err := s.Serve(ctx, ql); err != nil && !errors.Is(err, qmp.ErrServerClosed) {
				log.Error("qmp server stopped", "err", err)
			}
		}()
		log.Info("qmp listening", "socket", *qmpSock)
	}
	if *metricsAddr != "" {
		ml, err := metrics.Listen(*metricsAddr)
		if err != nil {
			ln.Close()
			h.Close()
			fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
			return 1
		}
		go func() {
			if err := metrics.Serve(ctx, ml, metrics.Hub(h), log); err != nil {
				log.Error("metrics endpoint stopped", "err", err)
			}
		}()
		log.Info("metrics listening", "addr", ml.Addr().String())
	}
	sdnotify.Notify(sdnotify.Ready, sdnotify.Status("listening on "+ln.Addr().String()))
	err = h.Serve(ctx, ln)
	sdnotify.Notify(sdnotify.Stopping)
	if s := srv.Load(); s != nil {
		s.Close()
	}
	h.Close()
	if m != nil {
		m.Close()
	}
	if err != nil {
		log.Error("stopped", "err", err)
		return 1
	}
	log.Info("stopped")
	return 0
}

// Commands returns the hub's QMP commands.
func Commands(h *hub.Hub, log *slog.Logger) []qmp.ExtraCommand {
	return commandsWith(h, failover.Options{Log: log})
}

// commandsWith returns the hub's QMP commands; fo are the failover
// tests' options (with a Ceph store, the cluster its clones are served
// from).
func commandsWith(h *hub.Hub, fo failover.Options) []qmp.ExtraCommand {
	return []qmp.ExtraCommand{
		{Name: "query-repagent", Run: func(map[string]string) (any, error) { return h.Status(), nil }},
		{Name: "repagent-failover-test", Required: []string{"vm", "dir"}, Optional: []string{"at", "seq", "checkpoint"}, Mutates: true,
			Run: func(a map[string]string) (any, error) {
				sel, err := parsePoint(a["at"], a["seq"], a["checkpoint"])
				if err != nil {
					return nil, err
				}
				return failover.StartWith(h, a["vm"], a["dir"], sel, fo)
			}},
		{Name: "repagent-promote", Required: []string{"vm", "out"}, Optional: []string{"at", "seq", "checkpoint"}, Mutates: true,
			Run: materializeCommand(h, h.Promote)},
		{Name: "repagent-recover", Required: []string{"vm", "out"}, Optional: []string{"at", "seq", "checkpoint"}, Mutates: true,
			Run: materializeCommand(h, h.Recover)},
		{Name: "repagent-verify", Required: []string{"vm"}, Optional: []string{"volume", "rate"}, Mutates: true,
			Run: func(a map[string]string) (any, error) {
				o := hub.VerifyOptions{VM: a["vm"], Volume: a["volume"]}
				if r := a["rate"]; r != "" {
					n, err := config.ParseSize(r)
					if err != nil {
						return nil, fmt.Errorf("rate %q: want bytes per second (e.g. 100m): %w", r, err)
					}
					o.Rate = n
				}
				return h.Verify(context.Background(), o)
			}},
		{Name: "repagent-failover-test-stop", Required: []string{"vm"}, OptionalBool: []string{"keep"}, Mutates: true,
			Run: func(a map[string]string) (any, error) {
				if a["keep"] != "true" {
					return struct{}{}, failover.Stop(h, a["vm"])
				}
				kept, err := failover.End(h, a["vm"], true)
				if kept == nil {
					kept = []string{}
				}
				return map[string][]string{"kept": kept}, err
			}},
	}
}

func runStatus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sock := fs.String("qmp", "", "the hub's QMP socket `PATH` (required)")
	watch := fs.Bool("watch", false, "redraw every interval, with a progress bar per syncing volume")
	interval := fs.Duration("interval", time.Second, "redraw `INTERVAL` with --watch")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *sock == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: repagent-hub status --qmp SOCK [--watch]")
		return 2
	}
	mon, err := dialQMP(*sock)
	if err != nil {
		fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
		return 1
	}
	defer mon.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	for {
		st, err := queryRepagent(mon)
		if err != nil {
			fmt.Fprintf(stderr, "repagent-hub: %v\n", err)
			return 1
		}
		if *watch {
			fmt.Fprint(stdout, "\033[H\033[2J")
		}
		fmt.Fprint(stdout, FormatStatus(st, *watch))
		if !*watch {
			return 0
		}
		select {
		case <-ctx.Done():
			return 0
		case <-time.After(*interval):
		}
	}
}

// dialQMP connects to the hub's QMP socket.
func dialQMP(sock string) (*qmpclient.Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return qmpclient.Dial(ctx, "unix", sock)
}

func queryRepagent(mon *qmpclient.Client) ([]hub.VMStatus, error) {
	raw, err := mon.Run([]byte(`{"execute":"query-repagent"}`))
	if err != nil {
		return nil, fmt.Errorf("query-repagent: %w", err)
	}
	var r struct {
		Return []hub.VMStatus `json:"return"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, fmt.Errorf("query-repagent: %w", err)
	}
	return r.Return, nil
}

// FormatStatus prints the hub's status as a table; with bars, syncing
// volumes get a progress bar.
func FormatStatus(st []hub.VMStatus, bars bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-12s %-12s %-13s %7s %10s %16s %8s %12s\n", "VM", "VOLUME", "STATE", "SYNC", "RESYNC", "BACKLOG", "AGE", "APPLIED-SEQ")
	for _, vm := range st {
		for _, v := range vm.Volumes {
			fmt.Fprintf(&b, "%-12s %-12s %-13s %6.1f%% %10s %16s %7.1fs %12d\n", vm.VM, v.Volume, v.State,
				100*v.SyncProgress, size(v.ResyncBytes), fmt.Sprintf("%d/%s", v.BacklogIOs, size(v.BacklogBytes)),
				v.BacklogSeconds, v.AppliedSeq)
			if v.StoreError != "" {
				fmt.Fprintf(&b, "    store error: %s\n", v.StoreError)
				if v.StoreRetries > 0 {
					fmt.Fprintf(&b, "    store retries: %d failed (the hub keeps retrying with backoff)\n", v.StoreRetries)
				}
			}
			if v.CsumPendingBytes > 0 || v.CsumMatchedBytes > 0 || v.CsumDifferBytes > 0 {
				fmt.Fprintf(&b, "    checksum resync: %s to compare, %s equal (not read), %s different (read)\n",
					size(v.CsumPendingBytes), size(v.CsumMatchedBytes), size(v.CsumDifferBytes))
			}
			if lv := v.LastVerify; lv != nil {
				fmt.Fprintf(&b, "    last verify %s: %d mismatching regions of %s compared\n",
					lv.Start.UTC().Format(time.RFC3339), lv.Mismatches, size(lv.VerifiedBytes))
			}
			if bars && v.State == hub.StateSyncing {
				const width = 40
				n := int(v.SyncProgress * width)
				fmt.Fprintf(&b, "    [%s%s] %s of %s\n", strings.Repeat("#", n), strings.Repeat("-", width-n),
					size(v.SyncDoneBytes), size(v.SyncTotalBytes))
			}
		}
		if len(vm.Volumes) == 0 {
			fmt.Fprintf(&b, "%-12s %-12s %-13s\n", vm.VM, "-", "no volumes")
		}
		if j := vm.Journal; j != nil {
			state := "current"
			if j.Resyncing {
				state = "resync set open"
			}
			fmt.Fprintf(&b, "    consistent point: seq %d at %s, age %.1fs (%s); journal %s unapplied, window from seq %d",
				j.ConsistentSeq, j.ConsistentTime.Format(time.RFC3339Nano), j.ConsistentAge, state, size(uint64(max(j.Bytes, 0))), j.OldestSeq)
			if len(j.Checkpoints) > 0 {
				fmt.Fprintf(&b, "; checkpoints %s", strings.Join(j.Checkpoints, ","))
			}
			if j.StoreError != "" {
				fmt.Fprintf(&b, "; store error: %s", j.StoreError)
			}
			b.WriteString("\n")
		}
	}
	return b.String()
}

// size formats bytes with a binary unit.
func size(n uint64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return fmt.Sprintf("%dB", n)
	}
	f := float64(n)
	i := -1
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	return fmt.Sprintf("%.1f%ciB", f, units[i])
}

// materializeCommand is the QMP handler of repagent-recover and
// repagent-promote: it parses the point and the output directory and
// calls materialize (Hub.Recover or Hub.Promote) with them.
func materializeCommand(h *hub.Hub, materialize func(ctx context.Context, vm string, sel journal.Selector, out string) (journal.Recovered, error)) func(map[string]string) (any, error) {
	return func(a map[string]string) (any, error) {
		var uuid string
		for _, st := range h.Status() {
			if st.VM == a["vm"] {
				uuid = st.UUID
			}
		}
		sel, err := parsePoint(a["at"], a["seq"], a["checkpoint"])
		if err != nil {
			return nil, err
		}
		if !filepath.IsAbs(a["out"]) {
			return nil, fmt.Errorf("out %q: give an absolute path", a["out"])
		}
		r, err := materialize(context.Background(), a["vm"], sel, a["out"])
		if err != nil {
			return nil, err
		}
		rec := toRecovered(a["vm"], r)
		rec.UUID = uuid
		return rec, nil
	}
}
