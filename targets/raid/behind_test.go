package raid

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// slowWrites delays every write to a backend.
type slowWrites struct {
	mapper.Backend
	delay time.Duration
}

func (s slowWrites) WriteAt(bufs [][]byte, off int64) error {
	time.Sleep(s.delay)
	return s.Backend.WriteAt(bufs, off)
}

// TestWriteBehind: with a bitmap, max_write_behind lets writes complete
// before the write-mostly leg has them, up to the limit; the leg gets them
// in order and from a copy of the guest's buffer; with no other leg in
// service, writes are not behind.
func TestWriteBehind(t *testing.T) {
	const member = 256 << 10
	const delay = 50 * time.Millisecond
	set, devs := metaSet(2, member)
	open := func(name string, ro bool) (mapper.Backend, error) {
		b, err := set.Open(name, ro)
		if name == "m1" && err == nil {
			b = slowWrites{b, delay}
		}
		return b, err
	}
	m := mapper.NewManager(mapper.ManagerOptions{Open: open, Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	tbl := table("raid1", 2, member/512, 0, "nosync write_mostly 1 max_write_behind 8 daemon_sleep 3600000 region_size 64", devs)
	d, err := m.CreateTable("r", "", false, tbl)
	if err != nil {
		t.Fatal(err)
	}
	a := &array{t: t, set: set, m: m, d: d, n: 2}
	if _, bs, _ := sbOf(t, set, "g0"); bs.writeBehind != 4 {
		t.Errorf("bitmap write_behind %d, want 4 (max_write_behind 8 sectors, halved as dm-raid does)", bs.writeBehind)
	}

	// Four writes to one block: acknowledged before the slow leg has them.
	buf := make([]byte, 4096)
	t0 := time.Now()
	for i := 1; i <= 4; i++ {
		for j := range buf {
			buf[j] = byte(i)
		}
		a.io(mapper.OpWrite, 8, buf)
		for j := range buf { // the guest reuses its buffer at once
			buf[j] = 0xEE
		}
	}
	if el := time.Since(t0); el >= 4*delay*3/4 {
		t.Errorf("4 writes took %v: not written behind (each write to the slow leg takes %v)", el, delay)
	}
	back := make([]byte, 4096)
	a.io(mapper.OpRead, 8, back)
	if !bytes.Equal(back, bytes.Repeat([]byte{4}, 4096)) {
		t.Errorf("read after the writes: %x..., want 04", back[:4])
	}
	// Ten more: at most 4 queued and one in progress at a time.
	t0 = time.Now()
	for i := 0; i < 10; i++ {
		a.io(mapper.OpWrite, uint64(64+8*i), bytes.Repeat([]byte{byte(i + 10)}, 4096))
	}
	if el := time.Since(t0); el < 4*delay {
		t.Errorf("10 writes took %v: more than max_write_behind writes behind", el)
	}
	if err := a.d.Suspend(false); err != nil { // drains
		t.Fatal(err)
	}
	m0, m1 := set.Get("m0").Bytes(), set.Get("m1").Bytes()
	if !bytes.Equal(m0, m1) {
		t.Errorf("legs differ after the writes behind drained")
	}
	if !bytes.Equal(m1[8*512:8*512+4096], bytes.Repeat([]byte{4}, 4096)) {
		t.Errorf("write-mostly leg holds %x..., want the last write (04)", m1[8*512:8*512+4])
	}
	if err := a.d.Resume(); err != nil {
		t.Fatal(err)
	}

	// The other leg fails: writes are no longer behind.
	set.Get("m0").FailNth(mapper.OpWrite, 1)
	a.io(mapper.OpWrite, 200, bytes.Repeat([]byte{0x55}, 4096))
	if f := strings.Fields(a.status()); f[2] != "DA" {
		t.Fatalf("status %q, want leg 0 failed", a.status())
	}
	a.io(mapper.OpWrite, 300, bytes.Repeat([]byte{0x66}, 4096))
	if got := set.Get("m1").Bytes(); !bytes.Equal(got[200*512:200*512+4096], bytes.Repeat([]byte{0x55}, 4096)) ||
		!bytes.Equal(got[300*512:300*512+4096], bytes.Repeat([]byte{0x66}, 4096)) {
		t.Errorf("with the only other leg failed, acknowledged writes are not on the write-mostly leg")
	}
}

// TestWriteBehindCrash: the process dies while the write-mostly leg 0 is
// behind; the restarted array resyncs the dirty regions from the leg that
// has the acknowledged writes, not from leg 0.
func TestWriteBehindCrash(t *testing.T) {
	const member = 256 << 10
	set, devs := metaSet(2, member)
	open := func(name string, ro bool) (mapper.Backend, error) {
		b, err := set.Open(name, ro)
		if name == "m0" && err == nil {
			b = slowWrites{b, 200 * time.Millisecond}
		}
		return b, err
	}
	m := mapper.NewManager(mapper.ManagerOptions{Open: open, Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	tbl := table("raid1", 2, member/512, 0, "nosync write_mostly 0 max_write_behind 64 daemon_sleep 3600000 region_size 64", devs)
	d, err := m.CreateTable("r", "", false, tbl)
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0x77}, 8192)
	submit(t, d, mapper.OpWrite, 3*64, want)
	submit(t, d, mapper.OpFlush, 0, nil)
	set.Kill() // before leg 0 got the write
	if got := set.Get("m0").Bytes(); bytes.Equal(got[3*64*512:3*64*512+8192], want) {
		t.Fatal("leg 0 has the write already: the test did not catch it behind")
	}
	a := newArray(t, set, 2, tbl) // nosync: only the full resync is skipped
	waitSettled(t, a.d)
	for _, leg := range []string{"m0", "m1"} {
		if got := set.Get(leg).Bytes(); !bytes.Equal(got[3*64*512:3*64*512+8192], want) {
			t.Errorf("%s after the restart's resync: the acknowledged write is lost", leg)
		}
	}
}
