package qmp

import (
	"bytes"
	"encoding/json"
	"fmt"
	"runtime/debug"
	"slices"
	"strings"

	"github.com/vhostdm/vhostdm/internal/unixsock"
	"github.com/vhostdm/vhostdm/mapper"
)

// command is one QMP command: its parameters (the wire contract) and its
// handler, which runs only with arguments that passed parseArgs.
type command struct {
	name    string
	params  []param
	mutates bool // logged at Info level
	run     func(c *client, a args) (any, error)
}

// empty is the return of commands that return nothing: {}.
var empty = struct{}{}

func (s *Server) commands() map[string]*command {
	list := []*command{
		{name: "qmp_capabilities", params: []param{{name: "enable", kind: kStrings, opt: true}}, run: cmdCapabilities},
		{name: "query-version", run: cmdQueryVersion},
		{name: "query-commands", run: cmdQueryCommands},
		{name: "quit", mutates: true, run: nil}, // handled in handle: it acts after its reply
		{name: "dm-create", mutates: true, params: []param{req("name", kString), opt("table", kString), opt("uuid", kString), opt("readonly", kBool), opt("metadata-cache", kUint64), opt("locking", kString)}, run: cmdCreate},
		{name: "dm-load", mutates: true, params: []param{req("name", kString), req("table", kString)}, run: cmdLoad},
		{name: "dm-suspend", mutates: true, params: []param{req("name", kString), opt("noflush", kBool)}, run: cmdSuspend},
		{name: "dm-resume", mutates: true, params: []param{req("name", kString)}, run: cmdResume},
		{name: "dm-reload", mutates: true, params: []param{req("name", kString), req("table", kString)}, run: cmdReload},
		{name: "dm-remove", mutates: true, params: []param{req("name", kString), opt("force", kBool)}, run: cmdRemove},
		{name: "dm-message", mutates: true, params: []param{req("name", kString), req("sector", kUint64), req("message", kString)}, run: cmdMessage},
		{name: "dm-table", params: []param{opt("name", kString), opt("showkeys", kBool), opt("inactive", kBool)}, run: cmdTable},
		{name: "dm-status", params: []param{opt("name", kString), opt("inactive", kBool)}, run: cmdStatus},
		{name: "dm-info", params: []param{req("name", kString)}, run: cmdInfo},
		{name: "dm-list", run: cmdList},
		{name: "block-export-add", mutates: true, params: []param{
			{name: "type", kind: kString, enum: []string{"vhost-user-blk", "nbd"}},
			req("id", kString), req("node-name", kString),
			{name: "addr", kind: kObject, opt: true, sub: []param{
				{name: "type", kind: kString, enum: []string{"unix", "inet"}},
				opt("path", kString), opt("host", kString), opt("port", kString),
			}},
			opt("writable", kBool), opt("num-queues", kUint16), opt("logical-block-size", kUint64), opt("serial", kString),
			opt("socket-owner", kString), opt("socket-group", kString), opt("socket-mode", kString),
			opt("name", kString), opt("description", kString), opt("bitmaps", kStrings), opt("tls-creds", kString),
			opt("tls-verify-peer", kBool),
		}, run: cmdExportAdd},
		{name: "block-export-del", mutates: true, params: []param{req("id", kString), {name: "mode", kind: kString, opt: true, enum: []string{"safe", "hard"}}}, run: cmdExportDel},
		{name: "query-block-exports", run: cmdQueryExports},
	}
	m := make(map[string]*command, len(list))
	for _, c := range list {
		m[c.name] = c
	}
	for _, c := range append(bitmapCommands(), transactionCommand()) {
		m[c.name] = c
	}
	s.addExtra(m)
	return m
}

// handle runs one framed message and returns the reply, whether the client
// has just completed capabilities negotiation, and what to do once the
// reply is written. Checks follow QEMU's qmp_dispatch: the input's shape,
// then negotiation, then the command, then its arguments.
func (c *client) handle(raw []byte) (r response, negotiate bool, after func()) {
	if !json.Valid(raw) {
		var v any
		err := json.Unmarshal(raw, &v)
		return response{Error: genericf("JSON parse error, %v", err)}, false, nil
	}
	if raw[0] != '{' {
		return response{Error: genericf("QMP input must be a JSON object")}, false, nil
	}
	var members map[string]json.RawMessage
	if err := json.Unmarshal(raw, &members); err != nil {
		return response{Error: genericf("JSON parse error, %v", err)}, false, nil
	}
	r.ID = members["id"]
	keys := make([]string, 0, len(members))
	for k := range members {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v := bytes.TrimSpace(members[k])
		switch k {
		case "execute":
			if len(v) == 0 || v[0] != '"' {
				r.Error = genericf("QMP input member 'execute' must be a string")
				return r, false, nil
			}
		case "arguments":
			if len(v) == 0 || v[0] != '{' {
				r.Error = genericf("QMP input member 'arguments' must be an object")
				return r, false, nil
			}
		case "id":
		default: // including "exec-oob": the oob capability is not offered
			r.Error = genericf("QMP input member '%s' is unexpected", k)
			return r, false, nil
		}
	}
	if _, ok := members["execute"]; !ok {
		r.Error = genericf("QMP input lacks member 'execute'")
		return r, false, nil
	}
	var name string
	json.Unmarshal(members["execute"], &name)

	negotiated := c.commandMode
	switch {
	case !negotiated && name != "qmp_capabilities":
		r.Error = &Error{Class: ClassCommandNotFound, Desc: "Expecting capabilities negotiation with 'qmp_capabilities'"}
		return r, false, nil
	case negotiated && name == "qmp_capabilities":
		r.Error = &Error{Class: ClassCommandNotFound, Desc: "Capabilities negotiation is already complete, command ignored"}
		return r, false, nil
	}
	cmd, ok := c.s.cmds[name]
	if !ok {
		r.Error = &Error{Class: ClassCommandNotFound, Desc: fmt.Sprintf("The command %s has not been found", name)}
		return r, false, nil
	}
	a, err := parseArgs(members["arguments"], cmd.params, "")
	if err != nil {
		r.Error = errorFor(err)
		return r, false, nil
	}
	if name == "quit" {
		c.log.Info("quit requested")
		r.Return = empty
		return r, false, c.s.quit
	}
	ret, err := c.run(cmd, a)
	if err != nil {
		r.Error = errorFor(err)
		return r, false, nil
	}
	r.Return = ret
	return r, name == "qmp_capabilities", nil
}

// run calls a command's handler, logging the outcome; a panic (a bug in a
// target, say) becomes a GenericError instead of taking the daemon down.
func (c *client) run(cmd *command, a args) (ret any, err error) {
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("command panicked", "command", cmd.name, "panic", p, "stack", string(debug.Stack()))
			ret, err = nil, genericf("internal error in %s: %v", cmd.name, p)
		}
	}()
	ret, err = cmd.run(c, a)
	level := c.log.Debug
	if cmd.mutates {
		level = c.log.Info
	}
	if err != nil {
		level("command failed", "command", cmd.name, "name", a.str("name"), "err", err)
	} else {
		level("command done", "command", cmd.name, "name", a.str("name"))
	}
	return ret, err
}

func (s *Server) quit() {
	if s.cfg.OnQuit != nil {
		go s.cfg.OnQuit()
		return
	}
	go s.Close()
}

func cmdCapabilities(c *client, a args) (any, error) {
	// No capability is offered: any in "enable" is refused, "oob" (which
	// QEMU knows) as unavailable, others as unknown values.
	if en := a.list("enable"); len(en) > 0 {
		if en[0] == "oob" {
			return nil, genericf("Capability 'oob' not available")
		}
		return nil, genericf("Parameter 'enable[0]' does not accept value '%s'", en[0])
	}
	return empty, nil
}

func cmdQueryVersion(c *client, a args) (any, error) { return c.s.version, nil }

type commandInfo struct {
	Name string `json:"name"`
}

func cmdQueryCommands(c *client, a args) (any, error) {
	out := make([]commandInfo, 0, len(c.s.cmds))
	for n := range c.s.cmds {
		out = append(out, commandInfo{n})
	}
	slices.SortFunc(out, func(x, y commandInfo) int { return strings.Compare(x.Name, y.Name) })
	return out, nil
}

// device looks up the device a command names.
func (c *client) device(name string) (*mapper.Device, error) {
	d, err := c.s.cfg.Manager.Get(name)
	return d, lookupErr(err)
}

func cmdCreate(c *client, a args) (any, error) {
	m := c.s.cfg.Manager
	o := mapper.DeviceOptions{ReadOnly: a.flag("readonly")}
	var err error
	if o.Locking, err = mapper.ParseLockMode(a.str("locking")); err != nil {
		return nil, err
	}
	if a.has("metadata-cache") {
		return empty, createWithMetadataCache(m, a, o)
	}
	if a.has("table") {
		_, err = m.CreateTableWith(a.str("name"), a.str("uuid"), o, a.str("table"))
	} else {
		_, err = m.CreateWith(a.str("name"), a.str("uuid"), o)
	}
	return empty, err
}

// createWithMetadataCache is dm-create with a metadata cache bound (and
// the options o): the table must have a target that keeps one
// (thin-pool); otherwise nothing is left behind.
func createWithMetadataCache(m *mapper.Manager, a args, o mapper.DeviceOptions) error {
	n := a.uint("metadata-cache")
	if n > mapper.MaxMetadataCache {
		return mapper.Errorf(mapper.ErrInvalid, "metadata-cache %d bytes: more than %d", n, int64(mapper.MaxMetadataCache))
	}
	if err := mapper.CheckMetadataCache(int64(n)); err != nil {
		return err
	}
	if !a.has("table") {
		return mapper.Errorf(mapper.ErrInvalid, "metadata-cache needs a table with a thin-pool line")
	}
	name := a.str("name")
	d, err := m.CreateTableWith(name, a.str("uuid"), o, a.str("table"))
	if err != nil {
		return err
	}
	if err := d.SetMetadataCache(int64(n)); err != nil {
		m.Remove(name, true)
		return fmt.Errorf("create %s: %w", name, err)
	}
	return nil
}

func cmdLoad(c *client, a args) (any, error) {
	d, err := c.device(a.str("name"))
	if err != nil {
		return nil, err
	}
	if err := d.Load(a.str("table")); err != nil {
		return nil, fmt.Errorf("load %s: %w", d.Name(), err)
	}
	return empty, nil
}

func cmdSuspend(c *client, a args) (any, error) {
	d, err := c.device(a.str("name"))
	if err != nil {
		return nil, err
	}
	return empty, d.Suspend(a.flag("noflush"))
}

func cmdResume(c *client, a args) (any, error) {
	d, err := c.device(a.str("name"))
	if err != nil {
		return nil, err
	}
	return empty, d.Resume()
}

func cmdReload(c *client, a args) (any, error) {
	d, err := c.device(a.str("name"))
	if err != nil {
		return nil, err
	}
	if err := d.Reload(a.str("table")); err != nil {
		return nil, fmt.Errorf("reload %s: %w", d.Name(), err)
	}
	return empty, nil
}

func cmdRemove(c *client, a args) (any, error) {
	return empty, lookupErr(c.s.cfg.Manager.Remove(a.str("name"), a.flag("force")))
}

type messageReply struct {
	Reply string `json:"reply"`
}

func cmdMessage(c *client, a args) (any, error) {
	d, err := c.device(a.str("name"))
	if err != nil {
		return nil, err
	}
	reply, err := d.Message(a.uint("sector"), strings.Fields(a.str("message")))
	if err != nil {
		return nil, err
	}
	return messageReply{reply}, nil
}

// tableLine is one line of dm-table or dm-status.
type tableLine struct {
	Start  uint64 `json:"start"`
	Length uint64 `json:"length"`
	Target string `json:"target"`
	Params string `json:"params"`
}

// deviceLines is one device's entry in dm-table and dm-status.
type deviceLines struct {
	Name  string      `json:"name"`
	Lines []tableLine `json:"lines"`
}

// lines returns the named device's lines, or every device's when the
// command has no name.
func (c *client) lines(a args, kind mapper.StatusKind) (any, error) {
	var devs []*mapper.Device
	if a.has("name") {
		d, err := c.device(a.str("name"))
		if err != nil {
			return nil, err
		}
		devs = []*mapper.Device{d}
	} else {
		devs = c.s.cfg.Manager.Devices()
	}
	hide := kind == mapper.StatusTable && !a.flag("showkeys")
	if kind == mapper.StatusTable && a.flag("showkeys") {
		kind = mapper.StatusShowKeys
	}
	out := make([]deviceLines, 0, len(devs))
	for _, d := range devs {
		dl := deviceLines{Name: d.Name(), Lines: []tableLine{}}
		for _, l := range d.Status(kind, a.flag("inactive")) {
			p := l.Params
			if hide {
				p = hideKeys(l.Type, p)
			}
			dl.Lines = append(dl.Lines, tableLine{Start: l.Start, Length: l.Length, Target: l.Type, Params: p})
		}
		out = append(out, dl)
	}
	return out, nil
}

func cmdTable(c *client, a args) (any, error)  { return c.lines(a, mapper.StatusTable) }
func cmdStatus(c *client, a args) (any, error) { return c.lines(a, mapper.StatusInfo) }

// hideKeys replaces key material in a TABLE line's parameters with zeros,
// as dmsetup does unless --showkeys: crypt's key (its second word) unless
// it is a kernel keyring reference (":..."), and the keys of integrity's
// internal_hash, journal_crypt and journal_mac. The mapper's TABLE form is
// the kernel's, with keys; this is the one place that hides them.
func hideKeys(target, params string) string {
	zero := func(p string, from int) string {
		end := strings.IndexByte(p[from:], ' ')
		if end < 0 {
			end = len(p) - from
		}
		return p[:from] + strings.Repeat("0", end) + p[from+end:]
	}
	switch target {
	case "crypt":
		sp := strings.IndexByte(params, ' ')
		if sp < 0 || strings.HasPrefix(params[sp+1:], ":") {
			return params
		}
		return zero(params, sp+1)
	case "integrity":
		for _, name := range []string{"internal_hash:", "journal_crypt:", "journal_mac:"} {
			i := strings.Index(params, name)
			if i < 0 {
				continue
			}
			i += len(name)
			j := strings.IndexAny(params[i:], " :")
			if j < 0 || params[i+j] != ':' {
				continue // no key given
			}
			params = zero(params, i+j+1)
		}
	}
	return params
}

// deviceInfo is dm-info's return.
type deviceInfo struct {
	Name          string `json:"name"`
	UUID          string `json:"uuid"`
	State         string `json:"state"` // ACTIVE or SUSPENDED
	ReadOnly      bool   `json:"readonly"`
	LiveTable     bool   `json:"live-table"`
	InactiveTable bool   `json:"inactive-table"`
	OpenCount     int    `json:"open-count"`
	Size          uint64 `json:"size"` // sectors
	EventNr       uint32 `json:"event-nr"`
	TargetCount   int    `json:"target-count"` // lines of the live table
}

func cmdInfo(c *client, a args) (any, error) {
	d, err := c.device(a.str("name"))
	if err != nil {
		return nil, err
	}
	i := d.Info()
	return deviceInfo{
		Name: i.Name, UUID: i.UUID, State: i.State(), ReadOnly: i.ReadOnly,
		LiveTable: i.LiveTable, InactiveTable: i.InactiveTable, OpenCount: i.OpenCount,
		Size: i.Size, EventNr: i.EventNr, TargetCount: len(d.Status(mapper.StatusTable, false)),
	}, nil
}

type listEntry struct {
	Name string `json:"name"`
	Size uint64 `json:"size"` // sectors
}

func cmdList(c *client, a args) (any, error) {
	devs := c.s.cfg.Manager.Devices()
	out := make([]listEntry, 0, len(devs))
	for _, d := range devs {
		out = append(out, listEntry{d.Name(), d.Size()})
	}
	return out, nil
}

// idWellFormed is QEMU's id_wellformed: a letter, then letters, digits,
// '-', '.' and '_'.
func idWellFormed(id string) bool {
	if id == "" || !isLetter(id[0]) {
		return false
	}
	for i := 1; i < len(id); i++ {
		b := id[i]
		if !isLetter(b) && !(b >= '0' && b <= '9') && b != '-' && b != '.' && b != '_' {
			return false
		}
	}
	return true
}

func isLetter(b byte) bool { return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' }

func (c *client) exports() (Exports, error) {
	if c.s.cfg.Exports == nil {
		return nil, genericf("block exports are not available in this daemon")
	}
	return c.s.cfg.Exports, nil
}

func findExport(ex Exports, id string) (ExportInfo, bool) {
	for _, e := range ex.List() {
		if e.ID == id {
			return e, true
		}
	}
	return ExportInfo{}, false
}

func cmdExportAdd(c *client, a args) (any, error) {
	ex, err := c.exports()
	if err != nil {
		return nil, err
	}
	o := ExportOptions{
		Type: a.str("type"), ID: a.str("id"), NodeName: a.str("node-name"), Socket: a.obj("addr").str("path"),
		Writable: a.flag("writable"), NumQueues: 1, LogicalBlockSize: 512, Serial: a.str("serial"),
		SocketOwner: a.str("socket-owner"), SocketGroup: a.str("socket-group"),
	}
	if a.has("socket-mode") {
		mode, err := unixsock.ParseMode(a.str("socket-mode"))
		if err != nil {
			return nil, genericf("%v", err)
		}
		o.SocketMode = mode
	}
	if err := (unixsock.Perm{Owner: o.SocketOwner, Group: o.SocketGroup, Mode: o.SocketMode}).Check(); err != nil {
		return nil, genericf("%v", err)
	}
	if !idWellFormed(o.ID) {
		return nil, genericf("Invalid block export id")
	}
	if _, dup := findExport(ex, o.ID); dup {
		return nil, genericf("Block export id '%s' is already in use", o.ID)
	}
	if o.Type == "nbd" {
		return exportAddNBD(c, ex, a, o)
	}
	for _, k := range []string{"name", "description", "bitmaps", "tls-creds", "tls-verify-peer"} {
		if a.has(k) {
			return nil, genericf("Parameter '%s' is unexpected", k)
		}
	}
	if !a.has("addr") {
		return nil, genericf("Parameter 'addr' is missing")
	}
	if ad := a.obj("addr"); ad.str("type") == "unix" && !ad.has("path") {
		return nil, genericf("Parameter 'addr.path' is missing")
	} else if ad.str("type") != "unix" || ad.has("host") || ad.has("port") {
		return nil, genericf("vhost-user-blk exports listen on a unix socket: addr.type must be unix")
	}
	if a.has("num-queues") {
		if a.uint("num-queues") == 0 {
			return nil, genericf("num-queues must be greater than 0")
		}
		o.NumQueues = int(a.uint("num-queues"))
	}
	if a.has("logical-block-size") {
		n := a.uint("logical-block-size")
		if n < 512 || n > 2<<20 || n&(n-1) != 0 {
			return nil, genericf("logical-block-size %d: must be a power of 2 from 512 to 2097152", n)
		}
		o.LogicalBlockSize = uint32(n)
	}
	if o.Socket == "" {
		return nil, genericf("addr.path must not be empty")
	}
	d, err := c.s.cfg.Manager.Get(o.NodeName)
	if err != nil {
		// bdrv_lookup_bs(NULL, node_name): QEMU's text and class.
		return nil, genericf("Cannot find device='' nor node-name='%s'", o.NodeName)
	}
	if o.Writable && d.ReadOnly() {
		return nil, genericf("Cannot export read-only node as writable")
	}
	if err := ex.Add(o); err != nil {
		return nil, fmt.Errorf("block-export-add %s: %w", o.ID, err)
	}
	return empty, nil
}

func cmdExportDel(c *client, a args) (any, error) {
	ex, err := c.exports()
	if err != nil {
		return nil, err
	}
	id, mode := a.str("id"), a.str("mode")
	if mode == "" {
		mode = "safe"
	}
	e, ok := findExport(ex, id)
	switch {
	case !ok:
		return nil, genericf("Export '%s' is not found", id)
	case e.ShuttingDown:
		return nil, genericf("Export '%s' is already shutting down", id)
	}
	if err := ex.Del(id, mode); err != nil {
		return nil, fmt.Errorf("block-export-del %s: %w", id, err)
	}
	c.s.Emit(EventBlockExportDeleted, map[string]string{"id": id})
	return empty, nil
}

func cmdQueryExports(c *client, a args) (any, error) {
	if c.s.cfg.Exports == nil {
		return []ExportInfo{}, nil
	}
	list := c.s.cfg.Exports.List()
	if list == nil {
		list = []ExportInfo{}
	}
	return list, nil
}
