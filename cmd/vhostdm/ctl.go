package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vhostdm/vhostdm/internal/qmpclient"
)

// vhostdm ctl is dmsetup over QMP: the same verbs and, where dmsetup has
// one, the same output, so that scripts written for dmsetup read it.
// Where vhostdm has no equivalent of a kernel notion the output differs,
// as documented on each verb:
//
//   - info leaves out "Read Ahead:" and "Major, minor:" (a vhostdm device
//     has no block device node and no device number);
//   - ls prints "NAME\t(SIZE sectors)" where dmsetup prints
//     "NAME\t(MAJOR:MINOR)";
//   - reload is load, suspend and resume in one step (dmsetup's reload is
//     a synonym of load), which is what reloading a running VM's disk needs.
//
// Errors go to stderr as "vhostdm ctl: ..." with exit status 1.

func init() { register("ctl", "control a running vhostdm over QMP", runCtl) }

// ctlDialTimeout bounds connecting to the QMP socket.
const ctlDialTimeout = 5 * time.Second

// ctlVerb is one verb of vhostdm ctl.
type ctlVerb struct {
	args  string // usage after the verb
	help  string
	min   int // positional arguments
	max   int // -1: any number
	raw   int // positional arguments after which the rest is taken verbatim (0: none)
	flags map[string]bool
	run   func(c *ctlConn, a *ctlArgs) error
}

// ctlArgs are a verb's parsed arguments.
type ctlArgs struct {
	pos   []string
	flags map[string]string // bool flags have "true"
	stdin io.Reader
	out   io.Writer
	ctx   context.Context
}

func (a *ctlArgs) has(name string) bool { _, ok := a.flags[name]; return ok }

// Flags: true takes a value.
var ctlVerbs = map[string]*ctlVerb{
	"create": {args: "NAME [--table TABLE] [--uuid UUID] [--readonly] [--notable]",
		help: "create a device; the table is read from stdin without --table or --notable",
		min:  1, max: 1, flags: map[string]bool{"table": true, "uuid": true, "readonly": false, "notable": false}, run: ctlCreate},
	"load": {args: "NAME [--table TABLE]", help: "load a table into the inactive slot (stdin without --table)",
		min: 1, max: 1, flags: map[string]bool{"table": true}, run: ctlLoad("dm-load")},
	"reload": {args: "NAME [--table TABLE]", help: "load a table and make it live (load, suspend, resume)",
		min: 1, max: 1, flags: map[string]bool{"table": true}, run: ctlLoad("dm-reload")},
	"suspend": {args: "NAME [--noflush]", help: "hold new I/O and wait for I/O in flight",
		min: 1, max: 1, flags: map[string]bool{"noflush": false}, run: ctlSuspend},
	"resume": {args: "NAME", help: "make the inactive table live and release held I/O",
		min: 1, max: 1, run: ctlSimple("dm-resume")},
	"remove": {args: "NAME [--force]", help: "remove a device",
		min: 1, max: 1, flags: map[string]bool{"force": false}, run: ctlRemove},
	"message": {args: "NAME SECTOR MESSAGE...", help: "send a message to the target covering SECTOR",
		min: 3, max: -1, raw: 2, run: ctlMessage},
	"table": {args: "[NAME] [--showkeys] [--inactive]", help: "print tables as dmsetup table does",
		max: 1, flags: map[string]bool{"showkeys": false, "inactive": false}, run: ctlLines("dm-table")},
	"status": {args: "[NAME] [--inactive]", help: "print status lines as dmsetup status does",
		max: 1, flags: map[string]bool{"inactive": false}, run: ctlLines("dm-status")},
	"info": {args: "[NAME]", help: "print device information as dmsetup info does",
		max: 1, run: ctlInfo},
	"ls": {help: "list devices and their sizes", run: ctlLs},
	"export-add": {args: "ID NODE-NAME SOCKET [--writable] [--num-queues N] [--logical-block-size BYTES] [--serial SERIAL] [--socket-owner USER] [--socket-group GROUP] [--socket-mode MODE]",
		help: "export a device over vhost-user-blk on SOCKET",
		min:  3, max: 3, flags: map[string]bool{"writable": false, "num-queues": true, "logical-block-size": true, "serial": true,
			"socket-owner": true, "socket-group": true, "socket-mode": true}, run: ctlExportAdd},
	"export-del": {args: "ID [--mode safe|hard]", help: "remove an export",
		min: 1, max: 1, flags: map[string]bool{"mode": true}, run: ctlExportDel},
	"exports": {help: "list exports", run: ctlExports},
	"events":  {help: "print events as JSON lines until interrupted", run: ctlEvents},
	"version": {help: "print client and server versions", run: ctlVersion},
	"reload-config": {help: "re-read the daemon's configuration file and apply what changed (as SIGHUP)",
		run: func(c *ctlConn, a *ctlArgs) error { return c.run("reload-config", nil, nil) }},
}

func runCtl(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return ctlMain(ctx, args, os.Stdin, stdout, stderr)
}

func ctlUsage(w io.Writer) {
	fmt.Fprintln(w, "usage: vhostdm ctl [--qmp SOCKET] VERB [ARGS]\n\nSOCKET defaults to $VHOSTDM_QMP.\n\nverbs:")
	names := make([]string, 0, len(ctlVerbs))
	for n := range ctlVerbs {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		v := ctlVerbs[n]
		fmt.Fprintf(w, "  %s %s\n        %s\n", n, v.args, v.help)
	}
}

// ctlMain runs vhostdm ctl; ctx ends "events".
func ctlMain(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 1 && (args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
		ctlUsage(stdout)
		return 0
	}
	sock, name, a, err := ctlParse(args)
	if err != nil {
		fmt.Fprintf(stderr, "vhostdm ctl: %v\n", err)
		fmt.Fprintln(stderr, "run 'vhostdm ctl --help' for usage")
		return 1
	}
	if sock == "" {
		sock = os.Getenv("VHOSTDM_QMP")
	}
	if sock == "" {
		fmt.Fprintln(stderr, "vhostdm ctl: no QMP socket: use --qmp SOCKET or set VHOSTDM_QMP")
		return 1
	}
	a.stdin, a.out, a.ctx = stdin, stdout, ctx
	c, err := ctlConnect(sock)
	if err != nil {
		fmt.Fprintf(stderr, "vhostdm ctl: %v\n", err)
		return 1
	}
	err = ctlVerbs[name].run(c, a)
	c.close()
	if err != nil {
		msg := err.Error()
		if !strings.HasPrefix(msg, name+" ") { // "reload vm0: line 2: ..." names the verb already
			msg = name + ": " + msg
		}
		fmt.Fprintf(stderr, "vhostdm ctl: %s\n", msg)
		return 1
	}
	return 0
}

// ctlParse splits args into the socket, the verb and its arguments. Options
// may come before or after the verb and its positional arguments, as
// --name VALUE or --name=VALUE (one dash works too); "--" ends options.
func ctlParse(args []string) (sock, name string, a *ctlArgs, err error) {
	a = &ctlArgs{flags: map[string]string{}}
	var v *ctlVerb
	sawSock := false
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if v != nil && v.raw > 0 && len(a.pos) >= v.raw {
			a.pos = append(a.pos, args[i:]...)
			break
		}
		if arg == "--" {
			if v == nil && i+1 < len(args) {
				i++
				name = args[i]
				if v = ctlVerbs[name]; v == nil {
					return "", "", nil, fmt.Errorf("unknown verb %q", name)
				}
			}
			a.pos = append(a.pos, args[i+1:]...)
			break
		}
		if len(arg) < 2 || arg[0] != '-' {
			if v == nil {
				name = arg
				if v = ctlVerbs[name]; v == nil {
					return "", "", nil, fmt.Errorf("unknown verb %q", name)
				}
				continue
			}
			a.pos = append(a.pos, arg)
			continue
		}
		opt, val, hasVal := strings.Cut(strings.TrimLeft(arg, "-"), "=")
		takesValue, known := false, false
		if opt == "qmp" {
			takesValue, known = true, true
		} else if v != nil {
			takesValue, known = v.flags[opt]
		}
		if !known {
			if v == nil {
				return "", "", nil, fmt.Errorf("unknown option %s before the verb", arg)
			}
			return "", "", nil, fmt.Errorf("%s: unknown option %s", name, arg)
		}
		switch {
		case takesValue && !hasVal:
			if i+1 >= len(args) {
				return "", "", nil, fmt.Errorf("option --%s needs a value", opt)
			}
			i++
			val = args[i]
		case !takesValue && hasVal:
			return "", "", nil, fmt.Errorf("option --%s takes no value", opt)
		case !takesValue:
			val = "true"
		}
		if opt == "qmp" {
			if sawSock {
				return "", "", nil, errors.New("option --qmp given twice")
			}
			sock, sawSock = val, true
			continue
		}
		if _, dup := a.flags[opt]; dup {
			return "", "", nil, fmt.Errorf("%s: option --%s given twice", name, opt)
		}
		a.flags[opt] = val
	}
	if v == nil {
		return "", "", nil, errors.New("no verb given")
	}
	if len(a.pos) < v.min || (v.max >= 0 && len(a.pos) > v.max) {
		return "", "", nil, fmt.Errorf("usage: vhostdm ctl %s %s", name, v.args)
	}
	return sock, name, a, nil
}

// ctlConn is a negotiated QMP connection.
type ctlConn struct {
	mon *qmpclient.Client
}

func ctlConnect(sock string) (*ctlConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), ctlDialTimeout)
	defer cancel()
	mon, err := qmpclient.Dial(ctx, "unix", sock)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return &ctlConn{mon: mon}, nil
}

func (c *ctlConn) close() { c.mon.Close() }

// run executes a command and decodes its return into out (if not nil).
// The error is the server's desc.
func (c *ctlConn) run(cmd string, args map[string]any, out any) error {
	req := struct {
		Execute string         `json:"execute"`
		Args    map[string]any `json:"arguments,omitempty"`
	}{Execute: cmd, Args: args}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	raw, err := c.mon.Run(b)
	if err != nil {
		return err
	}
	if len(raw) == 0 {
		return errors.New("connection closed by the server")
	}
	var r struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return fmt.Errorf("bad reply: %w", err)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(r.Return, out); err != nil {
		return fmt.Errorf("bad reply to %s: %w", cmd, err)
	}
	return nil
}

// table returns the --table text, or stdin when there is none.
func (a *ctlArgs) table() (string, error) {
	if t, ok := a.flags["table"]; ok {
		return t, nil
	}
	b, err := io.ReadAll(a.stdin)
	if err != nil {
		return "", fmt.Errorf("reading the table from stdin: %w", err)
	}
	return string(b), nil
}

func ctlCreate(c *ctlConn, a *ctlArgs) error {
	args := map[string]any{"name": a.pos[0]}
	if u, ok := a.flags["uuid"]; ok {
		args["uuid"] = u
	}
	if a.has("readonly") {
		args["readonly"] = true
	}
	if !a.has("notable") {
		t, err := a.table()
		if err != nil {
			return err
		}
		// As dmsetup: empty input makes a device without a table.
		if strings.TrimSpace(t) != "" || a.has("table") {
			args["table"] = t
		}
	} else if a.has("table") {
		return errors.New("--table and --notable exclude each other")
	}
	return c.run("dm-create", args, nil)
}

func ctlLoad(cmd string) func(c *ctlConn, a *ctlArgs) error {
	return func(c *ctlConn, a *ctlArgs) error {
		t, err := a.table()
		if err != nil {
			return err
		}
		return c.run(cmd, map[string]any{"name": a.pos[0], "table": t}, nil)
	}
}

func ctlSimple(cmd string) func(c *ctlConn, a *ctlArgs) error {
	return func(c *ctlConn, a *ctlArgs) error {
		return c.run(cmd, map[string]any{"name": a.pos[0]}, nil)
	}
}

func ctlSuspend(c *ctlConn, a *ctlArgs) error {
	return c.run("dm-suspend", map[string]any{"name": a.pos[0], "noflush": a.has("noflush")}, nil)
}

func ctlRemove(c *ctlConn, a *ctlArgs) error {
	return c.run("dm-remove", map[string]any{"name": a.pos[0], "force": a.has("force")}, nil)
}

// ctlMessage prints the reply, if any, on a line of its own, as dmsetup.
func ctlMessage(c *ctlConn, a *ctlArgs) error {
	sector, err := strconv.ParseUint(a.pos[1], 10, 64)
	if err != nil {
		return fmt.Errorf("sector %q: not a number", a.pos[1])
	}
	var r struct {
		Reply string `json:"reply"`
	}
	if err := c.run("dm-message", map[string]any{"name": a.pos[0], "sector": sector, "message": strings.Join(a.pos[2:], " ")}, &r); err != nil {
		return err
	}
	if r.Reply != "" {
		fmt.Fprintln(a.out, r.Reply)
	}
	return nil
}

type ctlDeviceLines struct {
	Name  string `json:"name"`
	Lines []struct {
		Start  uint64 `json:"start"`
		Length uint64 `json:"length"`
		Target string `json:"target"`
		Params string `json:"params"`
	} `json:"lines"`
}

// ctlLines prints dm-table or dm-status as dmsetup table and status do:
// "START LENGTH TARGET PARAMS" per line (with the space before PARAMS even
// when they are empty), prefixed by "NAME: " when listing every device; a
// device without a table prints an empty line; "No devices found" when
// there are none.
func ctlLines(cmd string) func(c *ctlConn, a *ctlArgs) error {
	return func(c *ctlConn, a *ctlArgs) error {
		args := map[string]any{}
		all := len(a.pos) == 0
		if !all {
			args["name"] = a.pos[0]
		}
		for _, f := range []string{"showkeys", "inactive"} {
			if a.has(f) {
				args[f] = true
			}
		}
		var devs []ctlDeviceLines
		if err := c.run(cmd, args, &devs); err != nil {
			return err
		}
		if all && len(devs) == 0 {
			fmt.Fprintln(a.out, "No devices found")
			return nil
		}
		var b strings.Builder
		for _, d := range devs {
			prefix := ""
			if all {
				prefix = d.Name + ": "
			}
			if len(d.Lines) == 0 {
				b.WriteString(prefix + "\n")
			}
			for _, l := range d.Lines {
				fmt.Fprintf(&b, "%s%d %d %s %s\n", prefix, l.Start, l.Length, l.Target, l.Params)
			}
		}
		_, err := io.WriteString(a.out, b.String())
		return err
	}
}

type ctlInfoReply struct {
	Name          string `json:"name"`
	UUID          string `json:"uuid"`
	State         string `json:"state"`
	ReadOnly      bool   `json:"readonly"`
	LiveTable     bool   `json:"live-table"`
	InactiveTable bool   `json:"inactive-table"`
	OpenCount     int    `json:"open-count"`
	EventNr       uint32 `json:"event-nr"`
	TargetCount   int    `json:"target-count"`
}

// ctlInfo prints dmsetup info's long form for one device, or for every
// device when no name is given, each followed by an empty line. The
// "Read Ahead:" and "Major, minor:" lines are left out: a vhostdm device
// has no block device node.
func ctlInfo(c *ctlConn, a *ctlArgs) error {
	names := a.pos
	if len(names) == 0 {
		var list []struct {
			Name string `json:"name"`
		}
		if err := c.run("dm-list", nil, &list); err != nil {
			return err
		}
		if len(list) == 0 {
			fmt.Fprintln(a.out, "No devices found")
			return nil
		}
		for _, d := range list {
			names = append(names, d.Name)
		}
	}
	var b strings.Builder
	for _, n := range names {
		var i ctlInfoReply
		if err := c.run("dm-info", map[string]any{"name": n}, &i); err != nil {
			if len(a.pos) == 0 && strings.Contains(err.Error(), "not found") {
				continue // removed since dm-list
			}
			return err
		}
		state := i.State
		if i.ReadOnly {
			state += " (READ-ONLY)"
		}
		tables := "None"
		switch {
		case i.LiveTable && i.InactiveTable:
			tables = "LIVE & INACTIVE"
		case i.LiveTable:
			tables = "LIVE"
		case i.InactiveTable:
			tables = "INACTIVE"
		}
		fmt.Fprintf(&b, "Name:              %s\n", i.Name)
		fmt.Fprintf(&b, "State:             %s\n", state)
		fmt.Fprintf(&b, "Tables present:    %s\n", tables)
		fmt.Fprintf(&b, "Open count:        %d\n", i.OpenCount)
		fmt.Fprintf(&b, "Event number:      %d\n", i.EventNr)
		fmt.Fprintf(&b, "Number of targets: %d\n", i.TargetCount)
		if i.UUID != "" {
			fmt.Fprintf(&b, "UUID: %s\n", i.UUID)
		}
		b.WriteString("\n")
	}
	_, err := io.WriteString(a.out, b.String())
	return err
}

// ctlLs prints "NAME\t(SIZE sectors)" per device, in the shape of dmsetup
// ls's "NAME\t(MAJOR:MINOR)", or "No devices found".
func ctlLs(c *ctlConn, a *ctlArgs) error {
	var list []struct {
		Name string `json:"name"`
		Size uint64 `json:"size"`
	}
	if err := c.run("dm-list", nil, &list); err != nil {
		return err
	}
	if len(list) == 0 {
		fmt.Fprintln(a.out, "No devices found")
		return nil
	}
	var b strings.Builder
	for _, d := range list {
		fmt.Fprintf(&b, "%s\t(%d sectors)\n", d.Name, d.Size)
	}
	_, err := io.WriteString(a.out, b.String())
	return err
}

func ctlExportAdd(c *ctlConn, a *ctlArgs) error {
	args := map[string]any{
		"type": "vhost-user-blk", "id": a.pos[0], "node-name": a.pos[1],
		"addr": map[string]any{"type": "unix", "path": a.pos[2]},
	}
	if a.has("writable") {
		args["writable"] = true
	}
	for _, f := range []string{"num-queues", "logical-block-size"} {
		if v, ok := a.flags[f]; ok {
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return fmt.Errorf("--%s %q: not a number", f, v)
			}
			args[f] = n
		}
	}
	for _, f := range []string{"serial", "socket-owner", "socket-group", "socket-mode"} {
		if s, ok := a.flags[f]; ok {
			args[f] = s
		}
	}
	return c.run("block-export-add", args, nil)
}

func ctlExportDel(c *ctlConn, a *ctlArgs) error {
	args := map[string]any{"id": a.pos[0]}
	if m, ok := a.flags["mode"]; ok {
		args["mode"] = m
	}
	return c.run("block-export-del", args, nil)
}

// ctlExports prints "ID\tNODE-NAME\tTYPE" per export, with
// "\tshutting-down" when it is, or "No exports found".
func ctlExports(c *ctlConn, a *ctlArgs) error {
	var list []struct {
		Type         string `json:"type"`
		ID           string `json:"id"`
		NodeName     string `json:"node-name"`
		ShuttingDown bool   `json:"shutting-down"`
	}
	if err := c.run("query-block-exports", nil, &list); err != nil {
		return err
	}
	if len(list) == 0 {
		fmt.Fprintln(a.out, "No exports found")
		return nil
	}
	var b strings.Builder
	for _, e := range list {
		fmt.Fprintf(&b, "%s\t%s\t%s", e.ID, e.NodeName, e.Type)
		if e.ShuttingDown {
			b.WriteString("\tshutting-down")
		}
		b.WriteString("\n")
	}
	_, err := io.WriteString(a.out, b.String())
	return err
}

// ctlEvent is how events prints an event: QMP's own form, one per line.
type ctlEvent struct {
	Event     string         `json:"event"`
	Data      map[string]any `json:"data,omitempty"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// ctlEvents prints events as JSON lines until ctx ends (interrupt) or the
// server goes away.
func ctlEvents(c *ctlConn, a *ctlArgs) error {
	ctx, cancel := context.WithCancel(a.ctx)
	defer cancel()
	events := c.mon.Events()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				return errors.New("connection closed by the server")
			}
			out := ctlEvent{Event: ev.Event, Data: ev.Data}
			out.Timestamp.Seconds, out.Timestamp.Microseconds = ev.Timestamp.Seconds, ev.Timestamp.Microseconds
			b, err := json.Marshal(out)
			if err != nil {
				return err
			}
			if _, err := fmt.Fprintf(a.out, "%s\n", b); err != nil {
				return err
			}
		}
	}
}

func ctlVersion(c *ctlConn, a *ctlArgs) error {
	var v struct {
		Package string `json:"package"`
	}
	if err := c.run("query-version", nil, &v); err != nil {
		return err
	}
	fmt.Fprintf(a.out, "Client version:    %s\nServer version:    %s\n", Version, v.Package)
	return nil
}
