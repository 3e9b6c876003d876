package wire

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

// sampleMessages has one message of every command, with every flag used.
func sampleMessages() []Message {
	data := pattern(1, 2*SectorSize)
	return []Message{
		&Hello{MaxVersion: 1, Session: 0x1122334455667788, UUID: [16]byte{1, 2, 3}, Name: "vm1"},
		&Hello{Reply: true, MaxVersion: 3, Session: 9, Name: "hub-1"},
		&ProtectedWrite{Seq: 7, Volume: 1, Sector: 8, Sectors: 2, Data: [][]byte{data[:SectorSize], data[SectorSize:]}},
		&ProtectedWrite{Seq: 8, Volume: 1, Sector: 0, Sectors: 1 << 20, Zeroes: true},
		&ProtectedWrite{Seq: 9, Volume: 2, Sector: 5, Sectors: 3, Discard: true},
		&ProtectedWrite{Seq: 10, Volume: 2, Sector: 5, Sectors: 3, Status: StatusIOError},
		&ReportVolumes{Gen: 7, Volumes: []VolumeInfo{{Name: "root0", Sectors: 2048, Protect: true, Changed: true}, {Name: "data", Sectors: 1, ReadOnly: true, RemoteWrite: true}}},
		&ReportVolumes{},
		&StartProtect{Volume: 3, Name: "root0", Mirror: true, Gen: 7},
		&StartProtect{Volume: 4, Name: "data"},
		&RemoteIOReq{ID: 5, Volume: 3, Sector: 100, Sectors: 2048},
		&RemoteIOReq{ID: 6, Volume: 3, Sector: 100, Sectors: 2, Write: true, Data: [][]byte{data}},
		&RemoteIORes{ID: 5, Volume: 3, Sectors: 2, Data: [][]byte{data}},
		&RemoteIORes{ID: 5, Volume: 3, Sectors: 2048, Zero: true},
		&RemoteIORes{ID: 6, Volume: 3, Sectors: 2, Status: StatusDenied, Written: true},
		&RemoteIORes{ID: 6, Volume: 3, Sectors: 2, Written: true},
		&AgentShutdown{},
		&AgentShutdown{Reply: true},
		&StopProtect{Volume: 3},
		&WriteAck{Seq: 1 << 40},
		&DirtyMap{Seq: 11, Volume: 3, Initial: true, RegionSectors: 128, Extents: []Extent{{0, 2}, {5, 1}, {1000, 7}}},
		&DirtyMap{Seq: 12, Volume: 3, RegionSectors: 8},
		&Heartbeat{},
		&Heartbeat{Backlog: []Backlog{{Volume: 1, IOs: 2, Bytes: 1024, AgeMillis: 30, Sync: true}, {Volume: 2}}},
		&Hello{MaxVersion: 1, Session: 7, Name: "vm", Group: true},
		&GroupState{Seq: 13, Consistent: true},
		&GroupState{Seq: 14},
		&Checkpoint{Seq: 15, Name: "before-upgrade.1"},
		&CsumReq{ID: 16, Volume: 3, Sector: 256, Sectors: 300, RegionSectors: 128, Alg: AlgSHA256},
		&CsumRes{ID: 16, Volume: 3, Alg: AlgSHA256, Point: 99, Sums: [][CsumSize]byte{{1}, {2}, {3}}, Dirty: []bool{false, true, false}},
		&CsumRes{ID: 17, Volume: 3, Alg: AlgSHA256, Status: StatusDenied, Sums: [][CsumSize]byte{}, Dirty: []bool{}},
		&Checkpoint{Seq: 16, Name: "nightly", Refused: true},
		&Refused{Reason: `vm "vm1" was promoted on this hub`},
	}
}

// flat joins data vectors so that encoded and decoded messages compare.
func flat(m Message) Message {
	join := func(d [][]byte) [][]byte {
		if d == nil {
			return nil
		}
		return [][]byte{bytes.Join(d, nil)}
	}
	switch m := m.(type) {
	case *ProtectedWrite:
		c := *m
		c.Data = join(m.Data)
		return &c
	case *RemoteIOReq:
		c := *m
		c.Data = join(m.Data)
		return &c
	case *RemoteIORes:
		c := *m
		c.Data = join(m.Data)
		return &c
	case *DirtyMap:
		c := *m
		if c.Extents == nil {
			c.Extents = []Extent{}
		}
		return &c
	}
	return m
}

func TestFrameRoundTrip(t *testing.T) {
	var stream bytes.Buffer
	w := NewWriter(&stream)
	msgs := sampleMessages()
	for _, m := range msgs {
		if err := w.WriteMessage(m); err != nil {
			t.Fatal(err)
		}
	}
	w.Flush()
	r := NewReader(&stream, 0)
	for i, want := range msgs {
		f, err := r.ReadFrame()
		if err != nil {
			t.Fatalf("message %d (%s): %v", i, want.Cmd(), err)
		}
		if !bytes.Equal(append([]byte(nil), AppendFrame(nil, want)[HeaderSize:]...), f.Payload) {
			t.Errorf("message %d: Writer and AppendFrame disagree", i)
		}
		got, err := Decode(f)
		if err != nil {
			t.Fatalf("message %d (%s): %v", i, want.Cmd(), err)
		}
		if !reflect.DeepEqual(flat(got), flat(want)) {
			t.Errorf("message %d:\n got %#v\nwant %#v", i, got, flat(want))
		}
	}
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Errorf("after the last frame: %v, want EOF", err)
	}
}

// TestDecodeProtectedWrite: decoding every PROTECTED_WRITE sample into
// one reused message gives what Decode gives, without an allocation, and
// other commands are refused.
func TestDecodeProtectedWrite(t *testing.T) {
	var m ProtectedWrite
	for _, want := range sampleMessages() {
		f := frameOf(t, want)
		if want.Cmd() != CmdProtectedWrite {
			if err := DecodeProtectedWrite(f, &m); err == nil || !errors.Is(err, ErrMalformed) {
				t.Errorf("%s: %v, want ErrMalformed", want.Cmd(), err)
			}
			continue
		}
		if err := DecodeProtectedWrite(f, &m); err != nil {
			t.Fatalf("%#v: %v", want, err)
		}
		got := m
		if len(got.Data) == 0 {
			got.Data = nil // the reused slice, empty
		}
		if !reflect.DeepEqual(flat(&got), flat(want)) {
			t.Errorf("got %#v\nwant %#v", got, flat(want))
		}
	}
	f := frameOf(t, sampleMessages()[2])
	if n := testing.AllocsPerRun(100, func() { DecodeProtectedWrite(f, &m) }); n != 0 {
		t.Errorf("%.1f allocations per frame, want 0", n)
	}
}

// frameOf encodes m and reads it back as a frame.
func frameOf(t *testing.T, m Message) Frame {
	t.Helper()
	f, err := NewReader(bytes.NewReader(AppendFrame(nil, m)), 0).ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestCmdString(t *testing.T) {
	if CmdRemoteIOReq.String() != "REMOTE_IO_REQ" || Cmd(99).String() != "CMD(99)" {
		t.Errorf("String: %s %s", CmdRemoteIOReq, Cmd(99))
	}
}

// frame builds a raw frame.
func frame(cmd Cmd, flags uint16, seq uint64, payload []byte) []byte {
	b := make([]byte, HeaderSize, HeaderSize+len(payload))
	Header{Version: Version, Cmd: cmd, Flags: flags, Seq: seq, Len: uint32(len(payload))}.put(b)
	return append(b, payload...)
}

// payload concatenates little-endian fields: uint64, uint32, uint16,
// byte, []byte and string values.
func payload(fields ...any) []byte {
	var b []byte
	for _, f := range fields {
		switch f := f.(type) {
		case uint64:
			b = le.AppendUint64(b, f)
		case uint32:
			b = le.AppendUint32(b, f)
		case uint16:
			b = le.AppendUint16(b, f)
		case byte:
			b = append(b, f)
		case []byte:
			b = append(b, f...)
		case string:
			b = append(b, f...)
		default:
			panic("payload: bad field")
		}
	}
	return b
}

func TestFrameValidation(t *testing.T) {
	hdr := func(mut func(b []byte)) []byte {
		b := frame(CmdHeartbeat, 0, 0, payload(uint32(0)))
		mut(b)
		return b
	}
	sec := make([]byte, SectorSize)
	uuid := make([]byte, 16)
	tests := []struct {
		name  string
		frame []byte
		want  string
	}{
		{"bad magic", hdr(func(b []byte) { b[0] = 'X' }), "bad magic"},
		{"version", hdr(func(b []byte) { b[4] = 2 }), "unsupported protocol version 2"},
		{"unknown command", hdr(func(b []byte) { b[5] = 99 }), "unknown command 99"},
		{"command zero", hdr(func(b []byte) { b[5] = 0 }), "unknown command 0"},
		{"reserved", hdr(func(b []byte) { b[21] = 1 }), "reserved header bytes"},
		{"too long", hdr(func(b []byte) { le.PutUint32(b[16:], DefaultMaxPayload+1) }), "exceeds the maximum"},
		{"unknown flag", frame(CmdHeartbeat, 4, 0, payload(uint32(0))), "unknown flags 0x4"},
		{"reply on write", frame(CmdProtectedWrite, FlagReply, 1, nil), "unknown flags"},
		{"seq on hello", frame(CmdHello, 0, 3, nil), "sequence number 3, want 0"},
		{"write without seq", frame(CmdProtectedWrite, 0, 0, nil), "sequence number 0"},
		{"hello short", frame(CmdHello, 0, 0, payload(uint64(1))), "payload ends in uuid"},
		{"hello empty name", frame(CmdHello, 0, 0, payload(uint64(1), uuid, uint16(1), uint16(0))), "must be 1 to 128"},
		{"hello bad name", frame(CmdHello, 0, 0, payload(uint64(1), uuid, uint16(1), uint16(3), "a/b")), "contains '/'"},
		{"hello dotdot", frame(CmdHello, 0, 0, payload(uint64(1), uuid, uint16(1), uint16(2), "..")), "not a valid name"},
		{"hello name overrun", frame(CmdHello, 0, 0, payload(uint64(1), uuid, uint16(1), uint16(9), "vm")), "payload ends in name"},
		{"hello group reply", frame(CmdHello, FlagReply|FlagGroup, 0, payload(uint64(1), uuid, uint16(1), uint16(2), "vm")), "group flag on a reply"},
		{"group state seq 0", frame(CmdGroupState, FlagConsistent, 0, nil), "sequence number 0"},
		{"group state flag", frame(CmdGroupState, 2, 1, nil), "unknown flags 0x2"},
		{"group state payload", frame(CmdGroupState, 0, 1, payload(uint32(0))), "4 trailing payload bytes"},
		{"hello version 0", frame(CmdHello, 0, 0, payload(uint64(1), uuid, uint16(0), uint16(2), "vm")), "version 0 below 1"},
		{"hello trailing", frame(CmdHello, 0, 0, payload(uint64(1), uuid, uint16(1), uint16(2), "vm", byte(0))), "1 trailing payload bytes"},
		{"write volume 0", frame(CmdProtectedWrite, 0, 1, payload(uint64(0), uint64(0), uint32(1), uint32(0), sec)), "volume id 0"},
		{"write zero sectors", frame(CmdProtectedWrite, 0, 1, payload(uint64(1), uint64(0), uint32(0), uint32(0))), "zero sectors"},
		{"write out of range", frame(CmdProtectedWrite, FlagZeroes, 1, payload(uint64(1), uint64(1)<<48, uint32(1), uint32(0))), "out of range"},
		{"write short data", frame(CmdProtectedWrite, 0, 1, payload(uint64(1), uint64(0), uint32(2), uint32(0), sec)), "payload ends in data"},
		{"write long data", frame(CmdProtectedWrite, 0, 1, payload(uint64(1), uint64(0), uint32(1), uint32(0), sec, byte(1))), "1 trailing payload bytes"},
		{"write data on zeroes", frame(CmdProtectedWrite, FlagZeroes, 1, payload(uint64(1), uint64(0), uint32(1), uint32(0), sec)), "512 trailing"},
		{"write data on failure", frame(CmdProtectedWrite, 0, 1, payload(uint64(1), uint64(0), uint32(1), uint32(1), sec)), "512 trailing"},
		{"write zeroes and discard", frame(CmdProtectedWrite, FlagZeroes|FlagDiscard, 1, payload(uint64(1), uint64(0), uint32(1), uint32(0))), "both zeroes and discard"},
		{"write too big", frame(CmdProtectedWrite, 0, 1, payload(uint64(1), uint64(0), uint32(MaxIOSectors+1), uint32(0))), "more than 16384"},
		{"report too many", frame(CmdReportVolumes, 0, 0, payload(uint32(MaxVolumes+1))), "257 volumes"},
		{"report short", frame(CmdReportVolumes, 0, 0, payload(uint32(1), uint64(8))), "payload ends in flags"},
		{"report flags", frame(CmdReportVolumes, 0, 0, payload(uint32(1), uint64(8), uint32(0x10), uint16(1), "a")), "unknown flags 0x10"},
		{"changed unprotected", frame(CmdReportVolumes, 0, 0, payload(uint32(1), uint64(8), uint32(8), uint16(1), "a")), "changed without protect"},
		{"report size 0", frame(CmdReportVolumes, 0, 0, payload(uint32(1), uint64(0), uint32(0), uint16(1), "a")), "size 0 sectors"},
		{"report duplicate", frame(CmdReportVolumes, 0, 0, payload(uint32(2), uint64(8), uint32(0), uint16(1), "a", uint64(8), uint32(0), uint16(1), "a")), "reported twice"},
		{"report control char", frame(CmdReportVolumes, 0, 0, payload(uint32(1), uint64(8), uint32(0), uint16(2), "a\n")), "contains"},
		{"start volume 0", frame(CmdStartProtect, 0, 0, payload(uint64(0), uint16(1), "a")), "volume id 0"},
		{"start short", frame(CmdStartProtect, 0, 0, payload(uint64(1))), "payload ends in volume name length"},
		{"remote op", frame(CmdRemoteIOReq, 0, 1, payload(uint64(1), uint64(0), uint32(1), []byte{2, 0, 0, 0})), "bad op bytes"},
		{"remote pad", frame(CmdRemoteIOReq, 0, 1, payload(uint64(1), uint64(0), uint32(1), []byte{0, 0, 1, 0})), "bad op bytes"},
		{"remote too big", frame(CmdRemoteIOReq, 0, 1, payload(uint64(1), uint64(0), uint32(MaxIOSectors+1), []byte{0, 0, 0, 0})), "more than"},
		{"remote read with data", frame(CmdRemoteIOReq, 0, 1, payload(uint64(1), uint64(0), uint32(1), []byte{0, 0, 0, 0}, sec)), "trailing"},
		{"remote write short", frame(CmdRemoteIOReq, 0, 1, payload(uint64(1), uint64(0), uint32(1), []byte{1, 0, 0, 0})), "payload ends in data"},
		{"remote id 0", frame(CmdRemoteIOReq, 0, 0, payload(uint64(1), uint64(0), uint32(1), []byte{0, 0, 0, 0})), "sequence number 0"},
		{"res volume 0", frame(CmdRemoteIORes, 0, 1, payload(uint64(0), uint32(0), uint32(1), sec)), "volume id 0"},
		{"res sectors 0", frame(CmdRemoteIORes, 0, 1, payload(uint64(1), uint32(0), uint32(0))), "0 sectors"},
		{"res zero failed", frame(CmdRemoteIORes, FlagZero, 1, payload(uint64(1), uint32(1), uint32(1))), "zero flag on a failed"},
		{"res zero write", frame(CmdRemoteIORes, FlagZero|FlagWritten, 1, payload(uint64(1), uint32(0), uint32(1))), "or a write"},
		{"res data on write", frame(CmdRemoteIORes, FlagWritten, 1, payload(uint64(1), uint32(0), uint32(1), sec)), "trailing"},
		{"res short data", frame(CmdRemoteIORes, 0, 1, payload(uint64(1), uint32(0), uint32(2), sec)), "payload ends in data"},
		{"res data on zero", frame(CmdRemoteIORes, FlagZero, 1, payload(uint64(1), uint32(0), uint32(1), sec)), "trailing"},
		{"shutdown payload", frame(CmdAgentShutdown, 0, 0, []byte{1}), "trailing"},
		{"checkpoint seq 0", frame(CmdCheckpoint, 0, 0, payload(uint16(1), "a")), "sequence number 0"},
		{"checkpoint empty", frame(CmdCheckpoint, 0, 1, payload(uint16(0))), "must be 1 to 64"},
		{"checkpoint long", frame(CmdCheckpoint, 0, 1, payload(uint16(65), strings.Repeat("a", 65))), "at most 64"},
		{"checkpoint slash", frame(CmdCheckpoint, 0, 1, payload(uint16(3), "a/b")), "only letters"},
		{"checkpoint short", frame(CmdCheckpoint, 0, 1, payload(uint16(5), "ab")), "payload ends in checkpoint name"},
		{"checkpoint flags", frame(CmdCheckpoint, 2, 1, payload(uint16(1), "a")), "unknown flags"},
		{"refused empty", frame(CmdRefused, 0, 0, payload(uint16(0))), "want 1 to 512"},
		{"refused long", frame(CmdRefused, 0, 0, payload(uint16(513), strings.Repeat("a", 513))), "want 1 to 512"},
		{"refused escape", frame(CmdRefused, 0, 0, payload(uint16(5), "a\x1b[2J")), "not printable"},
		{"refused seq", frame(CmdRefused, 0, 3, payload(uint16(1), "a")), "sequence number 3"},
		{"refused flags", frame(CmdRefused, 1, 0, payload(uint16(1), "a")), "unknown flags"},
		{"stop volume 0", frame(CmdStopProtect, 0, 0, payload(uint64(0))), "volume id 0"},
		{"ack payload", frame(CmdWriteAck, 0, 1, []byte{1}), "trailing"},
		{"dirty region size", frame(CmdDirtyMap, 0, 1, payload(uint64(1), uint32(100), uint32(0))), "power of two"},
		{"dirty count", frame(CmdDirtyMap, 0, 1, payload(uint64(1), uint32(128), uint32(2), uint64(0), uint64(1))), "2 extents in 16 bytes"},
		{"dirty empty extent", frame(CmdDirtyMap, 0, 1, payload(uint64(1), uint32(128), uint32(1), uint64(0), uint64(0))), "empty or out of range"},
		{"dirty overflow", frame(CmdDirtyMap, 0, 1, payload(uint64(1), uint32(128), uint32(1), ^uint64(0), uint64(2))), "empty or out of range"},
		{"dirty overlap", frame(CmdDirtyMap, 0, 1, payload(uint64(1), uint32(128), uint32(2), uint64(0), uint64(4), uint64(3), uint64(1))), "overlaps"},
		{"dirty volume 0", frame(CmdDirtyMap, 0, 1, payload(uint64(0), uint32(128), uint32(0))), "volume id 0"},
		{"dirty no seq", frame(CmdDirtyMap, 0, 0, payload(uint64(1), uint32(128), uint32(0))), "sequence number 0"},
		{"heartbeat count", frame(CmdHeartbeat, 0, 0, payload(uint32(1))), "1 entries in 0 bytes"},
		{"heartbeat flags", frame(CmdHeartbeat, 0, 0, payload(uint32(1), uint64(1), uint64(0), uint64(0), uint32(0), uint32(2))), "unknown flags"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := NewReader(bytes.NewReader(tc.frame), 0)
			f, err := r.ReadFrame()
			if err == nil && f.Cmd == CmdProtectedWrite {
				// The receiver's allocation-free decoder checks as much.
				var m ProtectedWrite
				if err := DecodeProtectedWrite(f, &m); err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, ErrMalformed) {
					t.Errorf("DecodeProtectedWrite: %v, want an ErrMalformed containing %q", err, tc.want)
				}
			}
			if err == nil {
				_, err = Decode(f)
			}
			if err == nil {
				t.Fatalf("accepted, want error %q", tc.want)
			}
			if !errors.Is(err, ErrMalformed) {
				t.Errorf("error %v does not wrap ErrMalformed", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestReaderTruncated(t *testing.T) {
	full := AppendFrame(nil, &StopProtect{Volume: 1})
	for n := 1; n < len(full); n++ {
		_, err := NewReader(bytes.NewReader(full[:n]), 0).ReadFrame()
		if err != io.ErrUnexpectedEOF {
			t.Fatalf("%d of %d bytes: %v, want unexpected EOF", n, len(full), err)
		}
	}
	// A small maximum refuses before allocating.
	big := frame(CmdHeartbeat, 0, 0, make([]byte, 100))
	if _, err := NewReader(bytes.NewReader(big), 64).ReadFrame(); err == nil || !strings.Contains(err.Error(), "exceeds the maximum of 64") {
		t.Errorf("max payload: %v", err)
	}
}

func TestCheckNameAndUUID(t *testing.T) {
	for _, ok := range []string{"vm1", "root-0", "ü", strings.Repeat("a", MaxNameLen)} {
		if err := CheckName(ok); err != nil {
			t.Errorf("CheckName(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "a/b", `a\b`, "a\x00", strings.Repeat("a", MaxNameLen+1), "\xff"} {
		if CheckName(bad) == nil {
			t.Errorf("CheckName(%q) accepted", bad)
		}
	}
	if _, err := ParseUUID("6c1d7d0e-3b1f-4d2a-9a51-0c5f2d1e7a10"); err != nil {
		t.Error(err)
	}
	for _, bad := range []string{"6c1d7d0e3b1f4d2a9a510c5f2d1e7a10", "6c1d7d0e-3b1f-4d2a-9a51-0c5f2d1e7a1g", "x"} {
		if _, err := ParseUUID(bad); err == nil {
			t.Errorf("ParseUUID(%q) accepted", bad)
		}
	}
}

// FuzzRepagentFrame: the reader and decoder never panic; a decoded frame
// encodes back to a frame that decodes to the same message.
func FuzzRepagentFrame(f *testing.F) {
	for _, m := range sampleMessages() {
		f.Add(AppendFrame(nil, m))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := &Reader{br: bufio.NewReaderSize(bytes.NewReader(b), 4096), max: 64 << 10}
		for i := 0; i < 4; i++ {
			fr, err := r.ReadFrame()
			if err != nil {
				return
			}
			m, err := Decode(fr)
			if err != nil {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("decode error %v does not wrap ErrMalformed", err)
				}
				continue
			}
			again := AppendFrame(nil, m)
			fr2, err := NewReader(bytes.NewReader(again), 64<<10).ReadFrame()
			if err != nil {
				t.Fatalf("re-encoded %s does not read: %v", m.Cmd(), err)
			}
			m2, err := Decode(fr2)
			if err != nil {
				t.Fatalf("re-encoded %s does not decode: %v", m.Cmd(), err)
			}
			if !reflect.DeepEqual(flat(m), flat(m2)) {
				t.Fatalf("round trip changed %s:\n%#v\n%#v", m.Cmd(), m, m2)
			}
		}
	})
}

func BenchmarkFrameEncode(b *testing.B) {
	data := pattern(1, 64<<10)
	m := &ProtectedWrite{Seq: 1, Volume: 1, Sector: 0, Sectors: 128, Data: [][]byte{data}}
	w := NewWriter(io.Discard)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		w.WriteMessage(m)
	}
}

func BenchmarkFrameDecode(b *testing.B) {
	data := pattern(1, 64<<10)
	one := AppendFrame(nil, &ProtectedWrite{Seq: 1, Volume: 1, Sector: 0, Sectors: 128, Data: [][]byte{data}})
	rd := bytes.NewReader(one)
	r := NewReader(rd, 0)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		rd.Reset(one)
		r.br.Reset(rd)
		f, err := r.ReadFrame()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := Decode(f); err != nil {
			b.Fatal(err)
		}
	}
}

// pattern returns n bytes that depend on seed.
func pattern(seed uint64, n int) []byte {
	b := make([]byte, n)
	x := seed*0x9e3779b97f4a7c15 + 1
	for i := 0; i+8 <= n; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		le.PutUint64(b[i:], x)
	}
	return b
}

// TestReason: a REFUSED reason is printable ASCII of bounded length
// whatever the hub's error text holds.
func TestReason(t *testing.T) {
	for in, want := range map[string]string{
		"":                       "refused",
		`vm "a" was promoted`:    `vm "a" was promoted`,
		"x\n\x1b[2J\x00é":        "x??[2J???",
		strings.Repeat("a", 600): strings.Repeat("a", MaxReasonLen),
	} {
		got := Reason(in)
		if got != want {
			t.Errorf("Reason(%q) = %q, want %q", in, got, want)
		}
		f, err := NewReader(bytes.NewReader(AppendFrame(nil, &Refused{Reason: got})), 0).ReadFrame()
		if err == nil {
			_, err = Decode(f)
		}
		if err != nil {
			t.Errorf("REFUSED %q does not decode: %v", got, err)
		}
	}
}
