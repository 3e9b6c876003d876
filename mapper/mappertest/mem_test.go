package mappertest

import (
	"errors"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// A crash that drops writes is reported by the next flush of every handle
// opened before it, once; a crash that drops nothing, handles opened after
// it, the Mem itself and a Kill's restarted process see no error.
func TestCrashReportedToLiveHandles(t *testing.T) {
	set := NewSet(4096, "m")
	mem := set.Get("m")
	open := func() mapper.Backend {
		b, err := set.Open("m", false)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	h1, h2 := open(), open()
	mem.Crash() // nothing to drop
	if err := h1.Flush(); err != nil {
		t.Fatalf("flush after a crash that dropped nothing: %v", err)
	}
	if err := h1.WriteAt([][]byte{[]byte("lost")}, 0); err != nil {
		t.Fatal(err)
	}
	mem.Crash()
	h3 := open()
	if err := h3.Flush(); err != nil {
		t.Fatalf("flush of a handle opened after the crash: %v", err)
	}
	if err := mem.Flush(); err != nil {
		t.Fatalf("flush of the Mem itself: %v", err)
	}
	for _, h := range []mapper.Backend{h1, h2} {
		if err := h.Flush(); !errors.Is(err, mapper.ErrIO) {
			t.Fatalf("first flush after writes were lost: %v, want an I/O error", err)
		}
		if err := h.Flush(); err != nil {
			t.Fatalf("second flush after writes were lost: %v", err)
		}
	}
	if err := h1.WriteAt([][]byte{[]byte("kill")}, 0); err != nil {
		t.Fatal(err)
	}
	set.Kill()
	if err := h1.Flush(); err == nil {
		t.Fatal("flush of a killed process's handle succeeded")
	}
	if err := open().Flush(); err != nil {
		t.Fatalf("flush of the restarted process: %v", err)
	}
	if string(mem.Bytes()[:4]) != "\x00\x00\x00\x00" {
		t.Fatalf("unflushed writes survived: %q", mem.Bytes()[:4])
	}
}
