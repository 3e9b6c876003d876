package qmp

import (
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the expected output of testdata transcripts")

// TestTranscripts replays the QMP sessions in testdata/. Each file is one
// connection to a fresh server:
//
//	# comment
//	-> RAW INPUT      sent verbatim with "\n"; then messages are read up to
//	                  and including the reply
//	+> RAW INPUT      sent verbatim with "\n"; nothing is read
//	<- MESSAGE        expected message (timestamps read as 0)
//	!connect ID       the fake export ID gets a front end
//	!emit DEV KIND    the server gets mapper event KIND for DEV; one
//	                  message is read
//
// The greeting is read first. With -rewrite the <- lines are regenerated;
// review the diff.
func TestTranscripts(t *testing.T) {
	files, err := filepath.Glob("testdata/*")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, f := range files {
		if fi, err := os.Stat(f); err != nil || fi.IsDir() {
			continue
		}
		n++
		t.Run(filepath.Base(f), func(t *testing.T) { runTranscript(t, f) })
	}
	if n == 0 {
		t.Fatal("no transcripts in testdata/")
	}
}

var stampRE = regexp.MustCompile(`"timestamp":\{"seconds":\d+,"microseconds":\d+\}`)

func normalize(line string) string {
	return stampRE.ReplaceAllString(line, `"timestamp":{"seconds":0,"microseconds":0}`)
}

func runTranscript(t *testing.T, path string) {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	e := startEnv(t, nil)
	c := e.dial()
	var out []string
	got := func(line string) { out = append(out, "<- "+normalize(line)) }
	got(c.recvLine())
	for _, line := range strings.Split(strings.TrimSuffix(string(data), "\n"), "\n") {
		switch {
		case strings.HasPrefix(line, "<- "):
			continue
		case strings.HasPrefix(line, "-> "):
			out = append(out, line)
			c.send(strings.TrimPrefix(line, "-> ") + "\n")
			for {
				m := c.recvLine()
				got(m)
				if !strings.HasPrefix(m, `{"event"`) {
					break
				}
			}
		case strings.HasPrefix(line, "+> "):
			out = append(out, line)
			c.send(strings.TrimPrefix(line, "+> ") + "\n")
		case strings.HasPrefix(line, "!connect "):
			out = append(out, line)
			e.exports.connect(strings.TrimPrefix(line, "!connect "))
		case strings.HasPrefix(line, "!emit "):
			out = append(out, line)
			f := strings.Fields(line)
			e.srv.MapperEvent(mapperEvent(f[1], f[2]))
			got(c.recvLine())
		case line == "" || strings.HasPrefix(line, "#"):
			out = append(out, line)
		default:
			t.Fatalf("%s: unknown line %q", path, line)
		}
	}
	want := strings.TrimSuffix(string(data), "\n")
	have := strings.Join(out, "\n")
	if *rewrite {
		if err := os.WriteFile(path, []byte(have+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	if have != want {
		wl, hl := strings.Split(want, "\n"), strings.Split(have, "\n")
		for i := 0; i < max(len(wl), len(hl)); i++ {
			var w, h string
			if i < len(wl) {
				w = wl[i]
			}
			if i < len(hl) {
				h = hl[i]
			}
			if w != h {
				t.Fatalf("%s:%d:\nwant %s\ngot  %s\n(run with -rewrite to regenerate, then review the diff)", path, i+1, w, h)
			}
		}
	}
}

// mapperEvent builds the event !emit raises.
func mapperEvent(dev, kind string) mapper.Event {
	if kind == mapper.EventResized {
		return mapper.Event{Device: dev, Kind: kind, Data: map[string]any{"old-size": uint64(2048), "new-size": uint64(4096)}}
	}
	return mapper.Event{Device: dev, Kind: kind, Data: map[string]any{"target": "qmptest", "level": 3}}
}
