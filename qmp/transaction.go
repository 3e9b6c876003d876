package qmp

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/vhostdm/vhostdm/mapper"
)

// transactionCommand is QEMU's transaction for the dirty bitmap actions,
// the form libvirt's backup API uses to start a new bitmap and stop the old
// one at one point: {"actions": [{"type": "block-dirty-bitmap-add", "data":
// {...}}, ...]}. Every action is checked against the bitmaps' states as
// the earlier actions leave them before any is applied (all or nothing),
// and they are applied while their devices are suspended, so that no write
// lands between two of them.
func transactionCommand() *command {
	return &command{name: "transaction", mutates: true, params: []param{
		{name: "actions", kind: kObjects},
		{name: "properties", kind: kObject, opt: true, sub: []param{
			{name: "completion-mode", kind: kString, opt: true, enum: []string{"individual", "grouped"}},
		}},
	}, run: cmdTransaction}
}

// txAction is one parsed action.
type txAction struct {
	cmd  *command
	args args
	dev  *mapper.Device
}

// simBitmap is a bitmap's state during the check of a transaction.
type simBitmap struct{ enabled, inconsistent, busy bool }

func cmdTransaction(c *client, a args) (any, error) {
	byName := map[string]*command{}
	for _, cmd := range bitmapCommands() {
		if cmd.name != "query-block" && cmd.name != "query-named-block-nodes" && cmd.name != "nbd-server-start" && cmd.name != "nbd-server-stop" {
			byName[cmd.name] = cmd
		}
	}
	var acts []txAction
	for i, raw := range a.objects("actions") {
		var members map[string]json.RawMessage
		if err := json.Unmarshal(raw, &members); err != nil {
			return nil, genericf("JSON parse error, %v", err)
		}
		for k := range members {
			if k != "type" && k != "data" {
				return nil, genericf("Parameter 'actions[%d].%s' is unexpected", i, k)
			}
		}
		var typ string
		if t := bytes.TrimSpace(members["type"]); len(t) == 0 || json.Unmarshal(t, &typ) != nil {
			return nil, genericf("Parameter 'actions[%d].type' is missing", i)
		}
		cmd, ok := byName[typ]
		if !ok {
			return nil, genericf("Parameter 'actions[%d].type' does not accept value '%s'", i, typ)
		}
		if _, ok := members["data"]; !ok {
			return nil, genericf("Parameter 'actions[%d].data' is missing", i)
		}
		da, err := parseArgs(members["data"], cmd.params, fmt.Sprintf("actions[%d].data.", i))
		if err != nil {
			return nil, err
		}
		d, err := c.bitmapNode(da.str("node"))
		if err != nil {
			return nil, err
		}
		acts = append(acts, txAction{cmd: cmd, args: da, dev: d})
	}
	if err := checkTransaction(acts); err != nil {
		return nil, err
	}
	var held []*mapper.Device
	for _, act := range acts {
		if !slices.Contains(held, act.dev) && !act.dev.Suspended() {
			if err := act.dev.Suspend(true); err != nil {
				resumeAll(held)
				return nil, genericf("%s", err.Error())
			}
			held = append(held, act.dev)
		}
	}
	defer resumeAll(held)
	for i, act := range acts {
		if _, err := act.cmd.run(c, act.args); err != nil {
			// Checked above: only a concurrent client can get here.
			return nil, genericf("transaction: action %d (%s) failed after %d applied: %v", i, act.cmd.name, i, err)
		}
	}
	return empty, nil
}

func resumeAll(devs []*mapper.Device) {
	for _, d := range devs {
		d.Resume()
	}
}

// checkTransaction runs the actions on a model of the bitmaps and returns
// the error the first failing one would give, with QEMU's texts.
func checkTransaction(acts []txAction) error {
	model := map[*mapper.Device]map[string]*simBitmap{}
	state := func(d *mapper.Device) map[string]*simBitmap {
		if m, ok := model[d]; ok {
			return m
		}
		m := map[string]*simBitmap{}
		for _, b := range d.Bitmaps() {
			m[b.Name()] = &simBitmap{enabled: b.Enabled(), inconsistent: b.Inconsistent(), busy: b.Busy()}
		}
		model[d] = m
		return m
	}
	usable := func(m map[string]*simBitmap, name string) (*simBitmap, error) {
		b, ok := m[name]
		switch {
		case !ok:
			return nil, genericf("Dirty bitmap '%s' not found", name)
		case b.busy:
			return nil, genericf("Bitmap '%s' is currently in use by another operation and cannot be used", name)
		case b.inconsistent:
			return nil, genericf("Bitmap '%s' is inconsistent and cannot be used", name)
		}
		return b, nil
	}
	for _, act := range acts {
		m := state(act.dev)
		name := act.args.str("name")
		switch act.cmd.name {
		case "block-dirty-bitmap-add":
			if name == "" {
				return genericf("Bitmap name cannot be empty")
			}
			if _, dup := m[name]; dup {
				return genericf("Bitmap already exists: %s", name)
			}
			if act.args.has("granularity") {
				if g := act.args.uint("granularity"); g < mapper.MinBitmapGranularity || g > mapper.MaxBitmapGranularity || g&(g-1) != 0 {
					return genericf("Granularity must be power of 2 between 512 and 2147483648")
				}
			}
			if act.args.flag("persistent") && !act.dev.CanPersistBitmaps() {
				return genericf("Cannot store persistent bitmap '%s': the daemon has no state directory", name)
			}
			m[name] = &simBitmap{enabled: !act.args.flag("disabled")}
		case "block-dirty-bitmap-remove":
			b, ok := m[name]
			if !ok {
				return genericf("Dirty bitmap '%s' not found", name)
			}
			if b.busy {
				return genericf("Bitmap '%s' is currently in use by another operation and cannot be used", name)
			}
			delete(m, name)
		case "block-dirty-bitmap-clear":
			if _, err := usable(m, name); err != nil {
				return err
			}
		case "block-dirty-bitmap-enable", "block-dirty-bitmap-disable":
			b, err := usable(m, name)
			if err != nil {
				return err
			}
			b.enabled = act.cmd.name == "block-dirty-bitmap-enable"
		case "block-dirty-bitmap-merge":
			if _, err := usable(m, act.args.str("target")); err != nil {
				return err
			}
			for _, s := range act.args.list("bitmaps") {
				b, ok := m[s]
				if !ok {
					return genericf("Dirty bitmap '%s' not found", s)
				}
				if b.inconsistent {
					return genericf("Bitmap '%s' is inconsistent and cannot be used", s)
				}
			}
		}
	}
	return nil
}
