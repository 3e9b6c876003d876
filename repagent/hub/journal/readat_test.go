package journal

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestReadVolume: a volume read at a point of the write order holds the
// writes numbered below it and none from it on (sequence numbers counted
// only from the sure position on), overlays the base image, and refuses
// when the base images passed the sure position; HoldApply keeps the
// applier behind a position.
func TestReadVolume(t *testing.T) {
	dir := t.TempDir()
	j := mustOpen(t, dir, Options{NoApplier: true})
	defer j.Close()
	ctx := context.Background()
	fill := func(c byte) []byte { return bytes.Repeat([]byte{c}, 4096) }
	if _, err := j.Append(ctx, Record{Kind: KindVolume, Volume: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	// A previous agent session numbered up to 90.
	if _, err := j.Append(ctx, Record{Kind: KindWrite, Volume: "v", Offset: 0, Data: fill('a'), Seq: 90, HasSeq: true}); err != nil {
		t.Fatal(err)
	}
	sure := j.End()
	for i, c := range []byte("bcde") {
		if _, err := j.Append(ctx, Record{Kind: KindWrite, Volume: "v", Offset: int64(i%2) * 4096, Data: fill(c), Seq: 100 + uint64(i), HasSeq: true}); err != nil {
			t.Fatal(err)
		}
	}
	end := j.End()
	read := func(before uint64) []byte {
		t.Helper()
		buf := make([]byte, 3*4096)
		if err := j.ReadVolume(ctx, "v", []Range{{Off: 0, Buf: buf}}, sure, before, end); err != nil {
			t.Fatal(err)
		}
		return buf
	}
	want := func(a, b byte) []byte { return append(append(fill(a), fill(b)...), make([]byte, 4096)...) }
	if got := read(100); !bytes.Equal(got, want('a', 0)) {
		t.Errorf("before 100: only the old session's write: got %q...", got[:1])
	}
	if got := read(101); !bytes.Equal(got, want('b', 0)) {
		t.Error("before 101: want b")
	}
	if got := read(103); !bytes.Equal(got, want('d', 'c')) {
		t.Error("before 103: want d, c")
	}
	if got := read(1000); !bytes.Equal(got, want('d', 'e')) {
		t.Error("everything: want d, e")
	}
	// The applier held at sure applies nothing past it.
	release := j.HoldApply(sure)
	if err := j.ApplyNow(); err != nil {
		t.Fatal(err)
	}
	if got := read(101); !bytes.Equal(got, want('b', 0)) {
		t.Error("after a held apply: want b")
	}
	release()
	if err := j.ApplyNow(); err != nil {
		t.Fatal(err)
	}
	err := j.ReadVolume(ctx, "v", []Range{{Off: 0, Buf: make([]byte, 512)}}, sure, 101, end)
	if !errors.Is(err, ErrBeforeWindow) {
		t.Errorf("read after the base passed sure: %v", err)
	}
}

// TestSeed: the images become base images of a journal that opens with
// their volumes and data; seeding over a journal is refused.
func TestSeed(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	data := bytes.Repeat([]byte("seed"), 1<<16)
	os.WriteFile(src, data, 0o600)
	jdir := filepath.Join(dir, "vm")
	if err := Seed(jdir, []SeedImage{{Name: "root", Path: src}}); err != nil {
		t.Fatal(err)
	}
	if err := Seed(jdir, []SeedImage{{Name: "root", Path: src}}); err == nil {
		t.Error("seeding over a journal: no error")
	}
	os.WriteFile(filepath.Join(dir, "odd.raw"), []byte("x"), 0o600)
	if err := Seed(filepath.Join(dir, "vm2"), []SeedImage{{Name: "odd", Path: filepath.Join(dir, "odd.raw")}}); err == nil {
		t.Error("seeding an image of 1 byte: no error")
	}
	j := mustOpen(t, jdir, Options{ApplyInterval: time.Hour})
	defer j.Close()
	if v := j.Volumes(); len(v) != 1 || v[0].Name != "root" || v[0].Size != int64(len(data)) {
		t.Fatalf("volumes %+v", v)
	}
	buf := make([]byte, len(data))
	if err := j.ReadVolume(context.Background(), "root", []Range{{Buf: buf}}, 0, 1, j.End()); err != nil || !bytes.Equal(buf, data) {
		t.Errorf("seeded volume reads back differently (%v)", err)
	}
}
