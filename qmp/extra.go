package qmp

import "strconv"

// ExtraCommand is a command that the program embedding the server adds to
// vhostdm's set, such as the replication hub's query-repagent. Its
// arguments are strings (OptionalBool ones booleans): Required ones must
// be present, Optional ones may be; any other argument is refused before
// Run is called, as for the built-in commands. Run's error becomes a GenericError with its text.
type ExtraCommand struct {
	Name     string
	Required []string
	Optional []string
	// OptionalBool are optional boolean parameters, handed to Run as
	// "true" or "false".
	OptionalBool []string
	Mutates      bool // logged at info level, as the dm-* commands that change state
	Run          func(args map[string]string) (any, error)
}

// addExtra adds cfg.Extra to the command table; an extra command does not
// replace a built-in one.
func (s *Server) addExtra(m map[string]*command) {
	for _, e := range s.cfg.Extra {
		if _, builtin := m[e.Name]; builtin || e.Name == "" || e.Run == nil {
			continue
		}
		var params []param
		for _, n := range e.Required {
			params = append(params, req(n, kString))
		}
		for _, n := range e.Optional {
			params = append(params, opt(n, kString))
		}
		bools := map[string]bool{}
		for _, n := range e.OptionalBool {
			params = append(params, opt(n, kBool))
			bools[n] = true
		}
		run := e.Run
		m[e.Name] = &command{name: e.Name, mutates: e.Mutates, params: params, run: func(c *client, a args) (any, error) {
			sa := make(map[string]string, len(a))
			for k := range a {
				if bools[k] {
					sa[k] = strconv.FormatBool(a.flag(k))
				} else {
					sa[k] = a.str(k)
				}
			}
			return run(sa)
		}}
	}
}
