package oracle

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// A dmsetup session file holds dmsetup commands and the real dmsetup's
// output for them in the kernel guest, recorded by `go test ./test/oracle
// -oracle.record` (the TestKernel guest run). vhostdm ctl, which takes the
// same command lines, is compared with it on the fields both print.
//
//	# comment
//	$ VERB ARGS...   a command line; words split at spaces, "..." quotes
//	                 with \n for a newline
//	1> LINE          the kernel's dmsetup stdout (recorded)
//	exit N           its exit status, when not 0 (recorded)
type Session struct {
	Header []string
	Cmds   []*SessionCmd
}

// SessionCmd is one command of a session and its recorded answer.
type SessionCmd struct {
	Line  int
	Text  string   // the command line as written, after "$ "
	Words []string // its words
	Out   []string // dmsetup's stdout lines
	Exit  int
}

// ParseSession reads a session file.
func ParseSession(path string) (*Session, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	s := &Session{}
	var cur *SessionCmd
	for i, line := range strings.Split(strings.TrimSuffix(string(data), "\n"), "\n") {
		switch {
		case strings.HasPrefix(line, "#") && cur == nil:
			s.Header = append(s.Header, line)
		case strings.HasPrefix(line, "#") || line == "":
		case strings.HasPrefix(line, "$ "):
			w, err := SplitWords(line[2:])
			if err != nil {
				return nil, fmt.Errorf("%s:%d: %w", path, i+1, err)
			}
			cur = &SessionCmd{Line: i + 1, Text: line[2:], Words: w}
			s.Cmds = append(s.Cmds, cur)
		case cur != nil && (strings.HasPrefix(line, "1> ") || line == "1>"):
			cur.Out = append(cur.Out, strings.TrimPrefix(strings.TrimPrefix(line, "1>"), " "))
		case cur != nil && strings.HasPrefix(line, "exit "):
			if cur.Exit, err = strconv.Atoi(line[5:]); err != nil {
				return nil, fmt.Errorf("%s:%d: %q: %w", path, i+1, line, err)
			}
		default:
			return nil, fmt.Errorf("%s:%d: unknown line %q", path, i+1, line)
		}
	}
	return s, nil
}

// Format returns the file text of s.
func (s *Session) Format() string {
	var b strings.Builder
	for _, h := range s.Header {
		b.WriteString(h + "\n")
	}
	for _, c := range s.Cmds {
		b.WriteString("$ " + c.Text + "\n")
		for _, l := range c.Out {
			b.WriteString("1> " + l + "\n")
		}
		if c.Exit != 0 {
			fmt.Fprintf(&b, "exit %d\n", c.Exit)
		}
	}
	return b.String()
}

// SplitWords splits a command line at spaces, honouring "..." with \n and
// \" escapes.
func SplitWords(s string) ([]string, error) {
	var words []string
	var w strings.Builder
	in, quoted := false, false
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case quoted && ch == '\\' && i+1 < len(s):
			i++
			if s[i] == 'n' {
				w.WriteByte('\n')
			} else {
				w.WriteByte(s[i])
			}
		case ch == '"':
			quoted, in = !quoted, true
		case ch == ' ' && !quoted:
			if in {
				words = append(words, w.String())
				w.Reset()
				in = false
			}
		default:
			w.WriteByte(ch)
			in = true
		}
	}
	if quoted {
		return nil, errors.New("unterminated quote")
	}
	if in {
		words = append(words, w.String())
	}
	return words, nil
}

// shellQuote quotes w for the guest's sh.
func shellQuote(w string) string {
	return "'" + strings.ReplaceAll(w, "'", `'\''`) + "'"
}

// SessionScript returns the guest shell lines that run s with dmsetup,
// printing "@@S <i> 1> <line>|" per stdout line and "@@S <i> exit <n>".
func SessionScript(s *Session) string {
	var b strings.Builder
	for i, c := range s.Cmds {
		q := make([]string, len(c.Words))
		for j, w := range c.Words {
			q[j] = shellQuote(w)
		}
		fmt.Fprintf(&b, "dmsetup %s >/tmp/so 2>/dev/null; echo \"@@S %d exit $?\"; sed 's/^/@@S %d 1> /; s/$/|/' /tmp/so; dmsetup mknodes >/dev/null 2>&1\n",
			strings.Join(q, " "), i, i)
	}
	return b.String()
}

var sessionLine = regexp.MustCompile(`^@@S (\d+) (1> |exit )(.*)$`)

// ParseSessionOutput fills the answers of s's commands from the guest's
// output; it reports commands the guest gave no answer for.
func ParseSessionOutput(s *Session, out string) ([]*SessionCmd, error) {
	got := make([]*SessionCmd, len(s.Cmds))
	for _, line := range strings.Split(out, "\n") {
		m := sessionLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		i, _ := strconv.Atoi(m[1])
		if i >= len(got) {
			continue
		}
		if got[i] == nil {
			got[i] = &SessionCmd{Line: s.Cmds[i].Line, Text: s.Cmds[i].Text, Words: s.Cmds[i].Words}
		}
		if m[2] == "exit " {
			got[i].Exit, _ = strconv.Atoi(strings.TrimSpace(m[3]))
		} else {
			got[i].Out = append(got[i].Out, strings.TrimSuffix(strings.TrimRight(m[3], "\r"), "|"))
		}
	}
	for i, g := range got {
		if g == nil {
			return nil, fmt.Errorf("line %d (%s): the guest gave no answer", s.Cmds[i].Line, s.Cmds[i].Text)
		}
	}
	return got, nil
}

var (
	infoName   = regexp.MustCompile(`^Name: +(\S+)$`)
	infoMajMin = regexp.MustCompile(`^Major, minor: +(\d+), (\d+)$`)
	devNumber  = regexp.MustCompile(`\b253:(\d+)\b`)
)

// Shared returns the fields of dmsetup's output that vhostdm ctl prints
// too: the lines of "info" without "Read Ahead:" and "Major, minor:"
// (vhostdm devices have no block device node), and table and status
// lines with the kernel's device numbers of mapper devices replaced by
// /dev/mapper/NAME, as vhostdm echoes the names tables use. names maps a
// mapper device's minor to its name; [Session.Names] finds it.
func Shared(out []string, names map[string]string) []string {
	var r []string
	for _, l := range out {
		if strings.HasPrefix(l, "Read Ahead:") || strings.HasPrefix(l, "Major, minor:") {
			continue
		}
		r = append(r, devNumber.ReplaceAllStringFunc(l, func(m string) string {
			if n, ok := names[strings.TrimPrefix(m, "253:")]; ok {
				return "/dev/mapper/" + n
			}
			return m
		}))
	}
	return r
}

// Names returns the minor to name map of the mapper devices whose info
// the session printed.
func (s *Session) Names() map[string]string {
	names := map[string]string{}
	for _, c := range s.Cmds {
		name := ""
		for _, l := range c.Out {
			if m := infoName.FindStringSubmatch(l); m != nil {
				name = m[1]
			} else if m := infoMajMin.FindStringSubmatch(l); m != nil && name != "" {
				names[m[2]] = name
			}
		}
	}
	return names
}
