package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
)

// kind is the JSON type of a command parameter.
type kind int

const (
	kString kind = iota
	kBool
	kUint64 // a non-negative integer
	kUint16
	kObject  // nested parameters in sub
	kStrings // an array of strings
	kObjects // an array of objects, kept raw for the command to parse
)

// expected is the type name QEMU's errors use.
func (k kind) expected() string {
	switch k {
	case kString:
		return "string"
	case kBool:
		return "boolean"
	case kObject:
		return "object"
	case kStrings, kObjects:
		return "array"
	default:
		return "integer"
	}
}

// param describes one argument of a command: its name (part of the wire
// contract), type, whether it may be left out, allowed values of a string
// enum, and the members of an object.
type param struct {
	name string
	kind kind
	opt  bool
	enum []string
	sub  []param
}

func req(name string, k kind) param { return param{name: name, kind: k} }
func opt(name string, k kind) param { return param{name: name, kind: k, opt: true} }

// args holds validated arguments: string, bool, uint64, args or []string
// by parameter name. Absent optional parameters are absent.
type args map[string]any

func (a args) has(name string) bool      { _, ok := a[name]; return ok }
func (a args) str(name string) string    { s, _ := a[name].(string); return s }
func (a args) flag(name string) bool     { b, _ := a[name].(bool); return b }
func (a args) uint(name string) uint64   { n, _ := a[name].(uint64); return n }
func (a args) obj(name string) args      { o, _ := a[name].(args); return o }
func (a args) list(name string) []string { l, _ := a[name].([]string); return l }
func (a args) objects(name string) []json.RawMessage {
	l, _ := a[name].([]json.RawMessage)
	return l
}

// parseArgs checks raw (a JSON object, or empty for no arguments) against
// params as QEMU's input visitor does, before anything runs: unknown
// members, missing required ones and wrongly typed values are errors with
// QEMU's texts. prefix names the enclosing object ("addr.").
func parseArgs(raw json.RawMessage, params []param, prefix string) (args, error) {
	members := map[string]json.RawMessage{}
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &members); err != nil {
			return nil, genericf("JSON parse error, %v", err)
		}
	}
	names := make([]string, 0, len(members))
	for n := range members {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		if !slices.ContainsFunc(params, func(p param) bool { return p.name == n }) {
			return nil, genericf("Parameter '%s%s' is unexpected", prefix, n)
		}
	}
	a := args{}
	for _, p := range params {
		v, ok := members[p.name]
		if !ok {
			if p.opt {
				continue
			}
			return nil, genericf("Parameter '%s%s' is missing", prefix, p.name)
		}
		val, err := p.parse(v, prefix)
		if err != nil {
			return nil, err
		}
		a[p.name] = val
	}
	return a, nil
}

func (p param) parse(v json.RawMessage, prefix string) (any, error) {
	full := prefix + p.name
	bad := genericf("Invalid parameter type for '%s', expected: %s", full, p.kind.expected())
	v = bytes.TrimSpace(v)
	if len(v) == 0 {
		return nil, bad
	}
	switch p.kind {
	case kString:
		var s string
		if v[0] != '"' || json.Unmarshal(v, &s) != nil {
			return nil, bad
		}
		if p.enum != nil && !slices.Contains(p.enum, s) {
			return nil, genericf("Parameter '%s' does not accept value '%s'", full, s)
		}
		return s, nil
	case kBool:
		switch string(v) {
		case "true":
			return true, nil
		case "false":
			return false, nil
		}
		return nil, bad
	case kUint64, kUint16:
		if bytes.ContainsAny(v, ".eE") || !(v[0] == '-' || v[0] >= '0' && v[0] <= '9') {
			return nil, bad // a float, or not a number at all
		}
		bits := 64
		if p.kind == kUint16 {
			bits = 16
		}
		n, err := strconv.ParseUint(string(v), 10, bits)
		if err != nil {
			if _, ierr := strconv.ParseInt(string(v), 10, 64); ierr != nil && !errors.Is(err, strconv.ErrRange) {
				return nil, bad
			}
			return nil, genericf("Parameter '%s' expects uint%d", full, bits)
		}
		return n, nil
	case kObject:
		if v[0] != '{' {
			return nil, bad
		}
		return parseArgs(v, p.sub, full+".")
	case kObjects:
		var raw []json.RawMessage
		if v[0] != '[' || json.Unmarshal(v, &raw) != nil {
			return nil, bad
		}
		for i, e := range raw {
			if e = bytes.TrimSpace(e); len(e) == 0 || e[0] != '{' {
				return nil, genericf("Invalid parameter type for '%s[%d]', expected: object", full, i)
			}
		}
		return raw, nil
	case kStrings:
		var raw []json.RawMessage
		if v[0] != '[' || json.Unmarshal(v, &raw) != nil {
			return nil, bad
		}
		out := make([]string, 0, len(raw))
		for i, e := range raw {
			ep := param{name: p.name + "[" + strconv.Itoa(i) + "]", kind: kString, enum: p.enum}
			s, err := ep.parse(e, prefix)
			if err != nil {
				return nil, err
			}
			out = append(out, s.(string))
		}
		return out, nil
	}
	return nil, bad
}
