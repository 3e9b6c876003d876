package config

import (
	"fmt"
	"strings"
)

// locator finds the line of a key in TOML text written in the usual style:
// [table] and [[array]] headers and `key = value` lines. It knows nothing of
// inline tables or dotted keys; keys it cannot place get line 0.
type locator struct {
	lines     map[string]int  // "device[1].table" -> line; "device[1]" -> header line
	multiline map[string]bool // key's value is a """ or ''' string
}

func locate(data []byte) *locator {
	l := &locator{lines: map[string]int{}, multiline: map[string]bool{}}
	count := map[string]int{}
	prefix := ""
	inString := ""
	for i, raw := range strings.Split(string(data), "\n") {
		num := i + 1
		s := strings.TrimSpace(raw)
		if inString != "" {
			if strings.Contains(s, inString) {
				inString = ""
			}
			continue
		}
		switch {
		case s == "" || s[0] == '#':
		case strings.HasPrefix(s, "[["):
			name := strings.TrimSpace(strings.Trim(strings.SplitN(s, "]]", 2)[0], "[ "))
			prefix = fmt.Sprintf("%s[%d]", name, count[name])
			count[name]++
			l.lines[prefix] = num
		case s[0] == '[':
			prefix = strings.TrimSpace(strings.Trim(strings.SplitN(s, "]", 2)[0], "[ "))
			l.lines[prefix] = num
		default:
			k, v, ok := strings.Cut(s, "=")
			if !ok {
				continue
			}
			key := strings.Trim(strings.TrimSpace(k), `"'`)
			if prefix != "" {
				key = prefix + "." + key
			}
			l.lines[key] = num
			v = strings.TrimSpace(v)
			for _, q := range []string{`"""`, `'''`} {
				if strings.HasPrefix(v, q) {
					l.multiline[key] = true
					if !strings.Contains(v[3:], q) {
						inString = q
					}
				}
			}
		}
	}
	return l
}

// line returns the line of key, else of the nearest enclosing table.
func (l *locator) line(key string) int {
	for key != "" {
		if n, ok := l.lines[key]; ok {
			return n
		}
		i := strings.LastIndexAny(key, ".")
		if i < 0 {
			return 0
		}
		key = key[:i]
	}
	return 0
}
