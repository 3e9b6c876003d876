package ploop_test

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

var rewrite = flag.Bool("rewrite", false, "rewrite testdata/ploop from the results")

// TestGolden replays testdata/ploop: a small command language over one
// device, with images named relative to a fresh directory ($D):
//
//	touch <image>                   create an empty image file
//	load <table>                    create or reload the device
//	status | table                  print INFO or TABLE
//	message <words...>              print the reply or the error
//	write <sector> <count> <byte>   fill sectors with a byte
//	read <sector> <count>           print the distinct bytes read
//	discard <sector> <count>        discard sectors
//	wait-merge                      wait for a background merge to end
//	remove                          remove the device
//
// There is no kernel to record from (dm-ploop is not in mainline): the
// expected output is ours, reviewed; -rewrite regenerates it.
func TestGolden(t *testing.T) {
	path := filepath.Join("testdata", "ploop")
	src, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	m := newManager(t)
	var d *mapper.Device
	var out strings.Builder
	blocks := strings.Split(string(src), "\n\n")
	for _, blk := range blocks {
		cmdText, _, _ := strings.Cut(blk, "\n----\n")
		lines := strings.Split(strings.TrimSpace(cmdText), "\n")
		var header []string
		for len(lines) > 0 && strings.HasPrefix(lines[0], "#") {
			header = append(header, lines[0])
			lines = lines[1:]
		}
		for _, h := range header {
			out.WriteString(h + "\n")
		}
		if len(lines) == 0 {
			out.WriteString("\n")
			continue
		}
		cmd := lines[0]
		w := strings.Fields(strings.ReplaceAll(cmd, "$D", dir))
		var res string
		switch w[0] {
		case "touch":
			emptyFile(t, dir, w[1])
			res = "ok"
		case "load":
			table := strings.Join(w[1:], " ")
			var err error
			if d == nil {
				d, err = m.CreateTable("g", "", false, table)
			} else {
				err = d.Reload(table)
			}
			res = "ok"
			if err != nil {
				res = "error: " + err.Error()
				if d != nil && len(d.Status(mapper.StatusTable, false)) == 0 {
					m.Remove("g", true)
					d = nil
				}
			}
		case "status":
			res = status(d, mapper.StatusInfo)
		case "table":
			res = status(d, mapper.StatusTable)
		case "message":
			r, err := d.Message(0, w[1:])
			res = "reply: " + r
			if err != nil {
				res = "error: " + err.Error()
			}
		case "write", "read":
			s, _ := strconv.ParseUint(w[1], 10, 64)
			n, _ := strconv.ParseUint(w[2], 10, 64)
			buf := make([]byte, n*512)
			if w[0] == "write" {
				b, _ := strconv.ParseUint(w[3], 0, 8)
				copy(buf, bytes.Repeat([]byte{byte(b)}, len(buf)))
				err = d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: n, Data: [][]byte{buf}})
				res = "ok"
			} else {
				err = d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: s, Sectors: n, Data: [][]byte{buf}})
				var seen []string
				has := map[byte]bool{}
				for _, b := range buf {
					if !has[b] {
						has[b] = true
						seen = append(seen, fmt.Sprintf("%#02x", b))
					}
				}
				res = strings.Join(seen, " ")
			}
			if err != nil {
				res = "error: " + err.Error()
			}
		case "discard":
			s, _ := strconv.ParseUint(w[1], 10, 64)
			n, _ := strconv.ParseUint(w[2], 10, 64)
			res = "ok"
			if err := d.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: s, Sectors: n}); err != nil {
				res = "error: " + err.Error()
			}
		case "wait-merge":
			for strings.Contains(strings.Fields(status(d, mapper.StatusInfo))[3], "m") {
				time.Sleep(time.Millisecond)
			}
			res = "ok"
		case "remove":
			res = "ok"
			if err := m.Remove("g", false); err != nil {
				res = "error: " + err.Error()
			}
			d = nil
		default:
			t.Fatalf("unknown command %q", w[0])
		}
		res = strings.ReplaceAll(res, dir, "$D")
		fmt.Fprintf(&out, "%s\n----\n%s\n\n", cmd, res)
	}
	got := strings.TrimRight(out.String(), "\n") + "\n"
	if *rewrite {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	if got != string(src) {
		t.Fatalf("testdata/ploop differs; run with -rewrite and review the diff:\n%s", got)
	}
}
