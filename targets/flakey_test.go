package targets_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/test/oracle"
)

// TestFlakeyGolden replays the kernel's answers recorded in testdata/flakey.
func TestFlakeyGolden(t *testing.T) { oracle.CheckGolden(t, "testdata/flakey") }

func TestFlakeyConformance(t *testing.T) {
	m, _ := memManager(t, 1<<20, "a", "b")
	d, err := m.CreateTable("fl", "", false, "0 300 flakey a 0 3600 0\n300 500 flakey b 8 3600 0 1 drop_writes")
	if err != nil {
		t.Fatal(err)
	}
	conform(t, m, d, 1, mapper.StatusTable)
}

// TestFlakeyDown checks each down-interval behaviour with a table that is
// always down (up 0), against one that is always up.
func TestFlakeyDown(t *testing.T) {
	m, set := memManager(t, 1<<20, "a")
	orig := bytes.Repeat([]byte{0x11}, 4096)
	newer := bytes.Repeat([]byte{0x22}, 4096)
	reset := func() {
		up, err := m.CreateTable("up", "", false, "0 64 flakey a 0 3600 0")
		if err != nil {
			t.Fatal(err)
		}
		mustSubmit(t, up, mapper.OpWrite, 0, 8, orig)
		m.Remove("up", true)
	}
	read := func(d *mapper.Device) ([]byte, error) {
		b := make([]byte, 4096)
		return b, submit(t, d, mapper.OpRead, 0, 8, b)
	}
	for _, tc := range []struct {
		features   string
		readErr    bool   // reads fail
		writeErr   bool   // writes fail
		afterWrite []byte // what the disk holds after a write of newer
		readByte   int    // 0-based index of the byte reads corrupt, or -1
	}{
		{"", true, true, orig, -1},
		{"1 drop_writes", false, false, orig, -1},
		{"1 error_writes", false, true, orig, -1},
		{"5 corrupt_bio_byte 100 r 7 0", false, false, newer, 99},
		{"5 corrupt_bio_byte 3 w 7 0", false, false, corrupted(newer, 2, 7), -1},
		{"5 corrupt_bio_byte 3 w 7 131072", false, false, newer, -1},      // flags REQ_FUA: only FUA writes
		{"5 corrupt_bio_byte 5000 w 7 0", false, false, newer, -1},        // beyond the request
		{"6 drop_writes corrupt_bio_byte 1 r 9 0", false, false, orig, 0}, // drops writes, corrupts reads
	} {
		t.Run(strings.ReplaceAll(tc.features, " ", "_"), func(t *testing.T) {
			reset()
			d, err := m.CreateTable("down", "", false, "0 64 flakey a 0 0 3600 "+tc.features)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Remove("down", true)
			got, err := read(d)
			if (err != nil) != tc.readErr {
				t.Fatalf("read: err %v, want failure %v", err, tc.readErr)
			}
			if err != nil && !errors.Is(err, mapper.ErrIO) {
				t.Errorf("read error %v is not an I/O error", err)
			}
			if err == nil {
				want := orig
				if tc.readByte >= 0 {
					want = corrupted(orig, tc.readByte, 0)
					want[tc.readByte] = got[tc.readByte]
					if got[tc.readByte] == orig[tc.readByte] {
						t.Errorf("byte %d not corrupted", tc.readByte)
					}
				}
				if !bytes.Equal(got, want) {
					t.Errorf("read returned other data than the disk's (and the corrupted byte)")
				}
			}
			src := bytes.Clone(newer)
			err = submit(t, d, mapper.OpWrite, 0, 8, src)
			if (err != nil) != tc.writeErr {
				t.Fatalf("write: err %v, want failure %v", err, tc.writeErr)
			}
			if !bytes.Equal(src, newer) {
				t.Error("the submitter's buffer was modified")
			}
			if disk := set.Get("a").Bytes()[:4096]; !bytes.Equal(disk, tc.afterWrite) {
				t.Errorf("disk after write: % x..., want % x...", disk[:8], tc.afterWrite[:8])
			}
			ferr := submit(t, d, mapper.OpFlush, 0, 0, nil)
			if (ferr != nil) != (tc.features == "" || tc.features == "1 error_writes") {
				t.Errorf("flush: %v", ferr)
			}
		})
	}
}

func corrupted(b []byte, i int, v byte) []byte {
	c := bytes.Clone(b)
	c[i] = v
	return c
}

func TestFlakeyErrors(t *testing.T) {
	m, _ := memManager(t, 1<<20, "a")
	for _, tc := range []struct{ table, want string }{
		{"0 8 flakey a 0 1", "want at least 4 arguments <dev> <offset> <up> <down>, got 3"},
		{"0 8 flakey a 0 4294967295 1", "up interval 4294967295 + down interval 1: overflows 32 bits"},
		{"0 8 flakey a 0 1 1 1 drop_writes extra", `too many arguments: unexpected "extra"`},
		{"0 8 flakey a 0 1 1 3 corrupt_bio_byte 1 r", "feature corrupt_bio_byte: want 4 arguments <Nth_byte> <r|w> <value> <flags>, got 2"},
		{"0 8 flakey nosuch 0 1 1", "open nosuch: no such memory backend"},
	} {
		_, err := m.CreateTable("e", "", false, tc.table)
		if err == nil || !strings.HasSuffix(err.Error(), "flakey: "+tc.want) {
			t.Errorf("%s: got %v, want ...flakey: %s", tc.table, err, tc.want)
		}
	}
}
