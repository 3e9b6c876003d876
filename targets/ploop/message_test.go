package ploop_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// TestStackMessages builds a stack with add_delta and snapshot, then
// exercises get_delta_name, notify_merged_forward (after copying a delta
// into the next one with qemu-img, as userspace would), flip_upper_deltas,
// update_delta_index and set_noresume.
func TestStackMessages(t *testing.T) {
	qimg := tool(t, "qemu-img", "qemu-utils")
	qio := tool(t, "qemu-io", "qemu-utils")
	dir := t.TempDir()
	const size = 4 << 20
	var imgs []string
	for i, b := range []byte{0x10, 0x20, 0x30} { // d0 oldest .. d2 newest
		p := fmt.Sprintf("%s/d%d.hds", dir, i)
		mustRun(t, qimg, "create", "-q", "-f", "parallels", p, "4M")
		mustRun(t, qio, "-f", "parallels", "-c", fmt.Sprintf("write -P %d %d 1M", b, i<<20), p)
		imgs = append(imgs, p)
	}
	top := emptyFile(t, dir, "top.hds")
	m := newManager(t)
	d := create(t, m, "s", fmt.Sprintf("0 %d ploop 11 %s %s", size/512, top, imgs[0]))
	message(t, d, "add_delta", imgs[1])
	message(t, d, "add_delta", imgs[2])
	want := make([]byte, size)
	for i, b := range []byte{0x10, 0x20, 0x30} {
		copy(want[i<<20:], bytes.Repeat([]byte{b}, 1<<20))
	}
	if s := diff(readAll(t, d), want); s != "" {
		t.Fatalf("after add_delta: %s", s)
	}
	if got := status(d, mapper.StatusTable); got != strings.Join([]string{"11", top, imgs[0], imgs[1], imgs[2]}, " ") {
		t.Fatalf("TABLE %q", got)
	}
	for l, wantName := range []string{imgs[0], imgs[1], imgs[2], top, ""} {
		if got := message(t, d, "get_delta_name", fmt.Sprint(l)); got != wantName {
			t.Errorf("get_delta_name %d = %q, want %q", l, got, wantName)
		}
	}
	// Refusals the kernel makes.
	for _, tc := range []struct {
		words []string
		want  string
	}{
		{[]string{"notify_merged_forward", "2"}, "merging forward into the top"},
		{[]string{"notify_merged_backward", "0"}, "nothing to merge backward"},
		{[]string{"notify_merged_forward", "3"}, "not a delta under the top"},
		{[]string{"set_noresume", "0"}, "already set"},
		{[]string{"update_delta_index", "0", "2:x;"}, `dst cluster "x": not a number`},
		{[]string{"push_backup_start", "abc", "0"}, "want 32 hex digits"},
		{[]string{"push_backup_write", "0123456789abcdef0123456789abcdef", "1:1"}, "no push backup is running"},
		{[]string{"resize", "10"}, "ploop only grows"},
		{[]string{"frobnicate"}, `unknown message "frobnicate"`},
		{[]string{"merge", "now"}, "merge: want merge"},
	} {
		_, err := d.Message(0, tc.words)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want %q", tc.words, err, tc.want)
		}
	}

	// Userspace copies d0's cluster into d1 (qemu-io writes d1 on the
	// side; d1 is only read by us), then tells us. The table holds QEMU's
	// image locks on its deltas: qemu-io, standing in for the ploop
	// tools (which take none), goes without them.
	mustRun(t, qio, "--image-opts", "-c", "write -P 16 0 1M", "driver=parallels,file.driver=file,file.locking=off,file.filename="+imgs[1])
	message(t, d, "notify_merged_forward", "0")
	if got := message(t, d, "get_delta_name", "0"); got != imgs[1] {
		t.Fatalf("delta 0 after notify_merged_forward %q", got)
	}
	if s := diff(readAll(t, d), want); s != "" {
		t.Fatalf("after notify_merged_forward: %s", s)
	}

	// update_delta_index: point d1's cluster 3 at its cluster holding 0x20.
	clu := batEntry(t, imgs[1], 1)
	message(t, d, "update_delta_index", "0", fmt.Sprintf("3:%d;", clu))
	copy(want[3<<20:], bytes.Repeat([]byte{0x20}, 1<<20))
	if s := diff(readAll(t, d), want); s != "" {
		t.Fatalf("after update_delta_index: %s", s)
	}

	// flip: d2 (empty top has nothing) becomes the writable top.
	message(t, d, "flip_upper_deltas")
	if got := status(d, mapper.StatusTable); !strings.HasPrefix(got, "11 "+imgs[2]+" ") {
		t.Fatalf("TABLE after flip %q", got)
	}
	submit(t, d, mapper.OpWrite, 0, bytes.Repeat([]byte{0x77}, 4096))
	copy(want, bytes.Repeat([]byte{0x77}, 4096))
	if s := diff(readAll(t, d), want); s != "" {
		t.Fatalf("after flip: %s", s)
	}

	message(t, d, "set_noresume", "1")
	if got := status(d, mapper.StatusInfo); !strings.Contains(got, " n ") {
		t.Errorf("INFO with noresume %q", got)
	}
	if err := d.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if err := d.Resume(); !errors.Is(err, mapper.ErrBusy) {
		t.Fatalf("resume with noresume: %v", err)
	}
	message(t, d, "set_noresume", "0")
	if err := d.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove("s", false); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, imgs[2])
}

// batEntry reads BAT entry c of a v2 image.
func batEntry(t *testing.T, img string, c int) uint32 {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [4]byte
	f.ReadAt(b[:], int64(64+4*c))
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}
