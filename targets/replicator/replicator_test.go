package replicator

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

const repTable = "0 8 replicator ringbuffer 4 log 0 create 2048 blockdev 1 0 blockdev 2 1 sync blockdev 4 2 async ios 100"

func devTable(nr int, dlog string) string {
	return "0 1024 replicator-dev /dev/mapper/rep " + itoa(nr) +
		" 0 1 l" + itoa(nr) + " nolog 0" +
		" 1 1 a" + itoa(nr) + " " + dlog +
		" 2 1 b" + itoa(nr) + " " + dlog
}

func itoa(n int) string { return strconv.Itoa(n) }

func randData(rng *rand.Rand, sectors int) []byte {
	b := make([]byte, sectors*mapper.SectorSize)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func TestReplicateBasic(t *testing.T) {
	w := newWorld(t)
	w.create("rep", repTable)
	d1 := w.create("d1", devTable(1, "core 1 64"))
	d2 := w.create("d2", devTable(2, "core 2 64 nosync"))
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 50; i++ {
		d := d1
		if i%2 == 1 {
			d = d2
		}
		write(t, d, uint64(rng.IntN(1000)), randData(rng, 1+rng.IntN(24)))
	}
	if err := d1.Submit(&mapper.Request{Op: mapper.OpWriteZeroes, Sector: 10, Sectors: 100}); err != nil {
		t.Fatal(err)
	}
	if err := d2.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: 500, Sectors: 100}); err != nil {
		t.Fatal(err)
	}
	if err := d1.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
		t.Fatal(err)
	}
	waitDrained(t, w.engine("rep"))
	w.sameAs(t, readAll(t, d1), "l1", "a1", "b1")
	w.sameAs(t, readAll(t, d2), "l2", "a2", "b2")
	rs, _ := w.m.Get("rep")
	info := status(rs, mapper.StatusInfo)
	if !strings.Contains(info, " 3 0 sync active 0 0 0 ") || !strings.Contains(info, " 1 sync active 0 0 0 32/32 2 async active 0 0 0 32/32") {
		t.Errorf("INFO after drain: %q", info)
	}
	if got := status(d1, mapper.StatusInfo); !strings.HasPrefix(got, "/dev/mapper/rep 1 3 0 l1 1/1 1 nolog 1 a1 16/16 1 core 2 b1 16/16 1 core") {
		t.Errorf("replicator-dev INFO: %q", got)
	}
}

func TestTableRoundTrip(t *testing.T) {
	w := newWorld(t)
	rep := w.create("rep", "0 8 replicator ringbuffer 4 log 0 create 2048 blockdev 1 0 blockdev 2 1 synchronous blockdev 4 2 async size 200k blockdev 4 3 asynchronous timeout 5m")
	d := w.create("d1", "0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 1 1 a1 core 1 64 2 1 b1 disk 3 dl1 64 nosync 3 1 c1 core 2 128 sync")
	for _, dev := range []*mapper.Device{rep, d} {
		first := status(dev, mapper.StatusTable)
		full := dev.Status(mapper.StatusTable, false)[0].String()
		if err := dev.Reload(full); err != nil {
			t.Fatalf("reload %s with its TABLE %q: %v", dev.Name(), full, err)
		}
		if again := status(dev, mapper.StatusTable); again != first {
			t.Errorf("%s TABLE changed on reload:\n%s\n%s", dev.Name(), first, again)
		}
	}
	if got, want := status(rep, mapper.StatusTable), "ringbuffer 4 log 0 auto 2048 blockdev 1 0 blockdev 2 1 synchronous blockdev 4 2 async size 200k blockdev 4 3 asynchronous timeout 5m"; got != want {
		t.Errorf("replicator TABLE\n got %q\nwant %q", got, want)
	}
	if got, want := status(d, mapper.StatusTable), "/dev/mapper/rep 1 0 1 l1 nolog 0 1 1 a1 core 1 64 2 1 b1 disk 3 dl1 64 nosync 3 1 c1 core 2 128 sync"; got != want {
		t.Errorf("replicator-dev TABLE\n got %q\nwant %q", got, want)
	}
	// The device works after both reloads.
	write(t, d, 7, bytes.Repeat([]byte{9}, 4096))
	waitDrained(t, w.engine("rep"))
	w.sameAs(t, readAll(t, d), "l1", "a1", "b1", "c1")
}

func TestConstructorErrors(t *testing.T) {
	w := newWorld(t)
	w.create("rep", repTable)
	for _, c := range []struct{ table, want string }{
		{"0 8 replicator", "missing replog type"},
		{"0 8 replicator foo 2 log2 0 blockdev 1 0", `unknown replication log type "foo"`},
		{"0 8 replicator ringbuffer 9 log2 0 blockdev 1 0", `#replog_params "9": must be 0 to 5`},
		{"0 8 replicator ringbuffer 3 log2 0 auto blockdev 1 0", "ringbuffer: want <dev_path> <dev_start> [auto|create|open <size>], got 3 parameters"},
		{"0 8 replicator ringbuffer 4 log2 0 make 2048 blockdev 1 0", `log mode "make": not auto, create or open`},
		{"0 8 replicator ringbuffer 4 log2 0 auto 10 blockdev 1 0", `log size "10": must be 64 to`},
		{"0 8 replicator ringbuffer 4 log2 0 auto 4096 blockdev 1 0", "log device log2 too small: log start 0 + size 4096 > 2048 sectors"},
		{"0 8 replicator ringbuffer 4 log2 0 open 2048 blockdev 1 0", "open: log2: no log header"},
		{"0 8 replicator ringbuffer 4 log 0 create 2048 blockdev 1 0", "create: the replication log is active"},
		{"0 8 replicator ringbuffer 2 log2 0", "missing site links"},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 1", "slink 1: the first site link must be slink 0"},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 blockdev 1 0", "slink 0: given twice"},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 2 0 async", `slink policy "async": slink 0 (the local site) must be sync`},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 blockdev 3 1 async ios", "blockdev: want <slink_nr> [sync|async [ios|size|timeout <N>]], got 3 parameters"},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 blockdev 2 1 maybe", `slink policy "maybe": not sync or async`},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 blockdev 4 1 sync ios 5", `fall-behind "ios": only async site links fall behind`},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 blockdev 4 1 async ios 0", `fall-behind ios "0": must be 1 to`},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 blockdev 4 1 async size 10x", `fall-behind size "10x": unit "x" is not s, k, m, g, t, p or e`},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 blockdev 4 1 async timeout 5w", `fall-behind timeout "5w": unit "w" is not s, m, h or d`},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 blockdev 4 1 async age 5", `fall-behind "age": not ios, size or timeout`},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 0 nbd 1 1", `unknown site link type "nbd"`},
		{"0 8 replicator ringbuffer 2 log2 0 blockdev 1 2000", `slink number "2000": must be 0 to 1023`},
		{"0 1024 replicator-dev rep 1 0 1 x nolog 0", `replicator device "rep": not /dev/mapper/NAME`},
		{"0 1024 replicator-dev /dev/mapper/nope 1 0 1 x nolog 0", "replicator device /dev/mapper/nope: no replicator table loaded"},
		{"0 1024 replicator-dev /dev/mapper/rep x 0 1 x nolog 0", `dev_nr "x": not a number`},
		{"0 1024 replicator-dev /dev/mapper/rep 1", "missing site devices"},
		{"0 1024 replicator-dev /dev/mapper/rep 1 1 1 a1 nolog 0", "slink 0: missing, the local device is required"},
		{"0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 7 1 x nolog 0", "slink 7: not defined by replicator /dev/mapper/rep"},
		{"0 1024 replicator-dev /dev/mapper/rep 1 0 2 l1 x nolog 0", "slink 0: #dev_params 2, want 1"},
		{"0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 fancy 0", `unknown dirty log type "fancy"`},
		{"0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 1 x", "slink 0 dirty log: nolog: takes no parameters, got 1"},
		{"0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 core 1 7", "slink 0 dirty log: region size 7: not a power of 2"},
		{"0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 0 1 l2 nolog 0", "slink 0: given twice"},
		{"0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 1 5 a1 nolog 0", `#dev_params "5": must be 1 to 3`},
		{"0 2048 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0", "l1 too small for target"},
	} {
		_, err := w.m.CreateTable("x", "", false, c.table)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s:\n got %v\nwant ...%s", c.table, err, c.want)
		}
	}
	// dev_nr is unique per log.
	w.create("d1", devTable(1, "nolog 0"))
	_, err := w.m.CreateTable("x", "", false, "0 1024 replicator-dev /dev/mapper/rep 1 0 1 l9 nolog 0")
	if !errors.Is(err, mapper.ErrBusy) || !strings.Contains(err.Error(), "dev_nr 1: in use by device d1") {
		t.Errorf("duplicate dev_nr: %v", err)
	}
	// The replicator cannot go while its devices use it.
	if err := w.m.Remove("rep", false); !errors.Is(err, mapper.ErrBusy) {
		t.Errorf("remove replicator in use: %v", err)
	}
	// A replicator device takes no data I/O.
	rep, _ := w.m.Get("rep")
	if err := rep.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: 1, Data: [][]byte{make([]byte, 512)}}); !errors.Is(err, mapper.ErrUnsupported) {
		t.Errorf("read of the replicator device: %v", err)
	}
	// Messages.
	for _, c := range []struct{ msg, want string }{
		{"pause 0", "slink 0: the local site cannot be paused"},
		{"pause 9", "slink 9: no such site link"},
		{"pause", "message pause: want pause <slink_nr>|all"},
		{"resync all", `slink "all": not a number`},
		{"device add 3", "message device: want device del <dev_nr>"},
		{"device del 1", "dev_nr 1: device d1 is loaded"},
		{"flip 1", `message "flip": unknown`},
	} {
		_, err := rep.Message(0, strings.Fields(c.msg))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("message %q: got %v, want %s", c.msg, err, c.want)
		}
	}
}

// TestFallBehind checks that an async site over its threshold makes
// writes wait for it, and that it goes back to async once caught up.
func TestFallBehind(t *testing.T) {
	for _, c := range []struct {
		name, policy string
		async        int // writes of 4 KiB that stay asynchronous
	}{
		{"ios", "async ios 4", 4},
		{"size", "async size 16k", 4},
		{"size-sectors", "async size 24", 3},
		{"timeout", "async timeout 1s", -1},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := newWorld(t)
			n := len(strings.Fields(c.policy)) + 1
			w.create("rep", "0 8 replicator ringbuffer 4 log 0 create 2048 blockdev 1 0 blockdev "+itoa(n)+" 1 "+c.policy)
			d := w.create("d1", "0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 1 1 a1 nolog 0")
			rep, _ := w.m.Get("rep")
			waitDrained(t, w.engine("rep"))
			release := w.fake("a1").block()
			defer release()
			buf := bytes.Repeat([]byte{1}, 4096)
			writes := c.async
			if writes < 0 {
				writes = 3
			}
			for i := 0; i < writes; i++ {
				write(t, d, uint64(8*i), buf) // async: completes with the site blocked
			}
			if !strings.Contains(status(rep, mapper.StatusInfo), " 1 async active ") {
				t.Fatalf("site not active while within its threshold: %s", status(rep, mapper.StatusInfo))
			}
			if c.async < 0 {
				time.Sleep(1100 * time.Millisecond)
			}
			done := make(chan error, 1)
			go func() {
				done <- d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 100, Sectors: 8, Data: [][]byte{buf}})
			}()
			w.waitEvent("slink-fell-behind")
			select {
			case err := <-done:
				t.Fatalf("write over the threshold completed while the site was blocked: %v", err)
			case <-time.After(50 * time.Millisecond):
			}
			if got := status(rep, mapper.StatusInfo); !strings.Contains(got, " 1 async behind ") {
				t.Errorf("INFO while behind: %s", got)
			}
			release()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			w.waitEvent("slink-caught-up")
			waitDrained(t, w.engine("rep"))
			if got := status(rep, mapper.StatusInfo); !strings.Contains(got, " 1 async active 0 0 0 ") {
				t.Errorf("INFO after catching up: %s", got)
			}
			w.sameAs(t, readAll(t, d), "l1", "a1")
		})
	}
}

// TestSyncSiteWaits checks that a sync site holds writes until it has them.
func TestSyncSiteWaits(t *testing.T) {
	w := newWorld(t)
	w.create("rep", "0 8 replicator ringbuffer 4 log 0 create 2048 blockdev 1 0 blockdev 2 1 sync")
	d := w.create("d1", "0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 1 1 a1 nolog 0")
	release := w.fake("a1").block()
	done := make(chan error, 1)
	go func() {
		done <- d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: 1, Data: [][]byte{make([]byte, 512)}})
	}()
	select {
	case err := <-done:
		t.Fatalf("write completed before the sync site had it: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestSiteFailureAndRecovery cuts a site off: writes go on, the site's
// dirty log records what it missed, and once the link is back the site is
// resynchronised region by region.
func TestSiteFailureAndRecovery(t *testing.T) {
	for _, dlog := range []string{"core 1 16", "disk 2 dl1 16", "nolog 0"} {
		t.Run(strings.Fields(dlog)[0], func(t *testing.T) {
			w := newWorld(t)
			w.create("rep", "0 8 replicator ringbuffer 4 log 0 create 2048 blockdev 1 0 blockdev 2 1 sync")
			d := w.create("d1", "0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 1 1 a1 "+dlog)
			rep, _ := w.m.Get("rep")
			rng := rand.New(rand.NewPCG(3, 4))
			write(t, d, 0, randData(rng, 64))
			waitDrained(t, w.engine("rep"))
			w.fake("a1").setCut(true)
			for i := 0; i < 20; i++ {
				write(t, d, uint64(rng.IntN(1000)), randData(rng, 8)) // a sync site that failed no longer holds writes
			}
			w.waitEvent("slink-failed")
			info := status(rep, mapper.StatusInfo)
			if !strings.Contains(info, " 1 sync failed ") {
				t.Errorf("INFO with the site cut: %s", info)
			}
			if dlog != "nolog 0" && strings.Contains(status(d, mapper.StatusInfo), " a1 64/64 ") {
				t.Errorf("no region out of sync while the site was cut: %s", status(d, mapper.StatusInfo))
			}
			if bytes.Equal(w.mems["a1"].Bytes(), w.mems["l1"].Bytes()) {
				t.Fatal("cut site received the writes")
			}
			w.fake("a1").setCut(false)
			w.waitEvent("slink-in-sync")
			waitDrained(t, w.engine("rep"))
			w.sameAs(t, readAll(t, d), "l1", "a1")
			if got := status(rep, mapper.StatusInfo); !strings.Contains(got, " 1 sync active 0 0 0 ") {
				t.Errorf("INFO after recovery: %s", got)
			}
		})
	}
}

// TestPauseResumeResync drives a site with messages.
func TestPauseResumeResync(t *testing.T) {
	w := newWorld(t)
	w.create("rep", "0 8 replicator ringbuffer 4 log 0 create 2048 blockdev 1 0 blockdev 2 1 async")
	d := w.create("d1", "0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 1 1 a1 core 1 32")
	rep, _ := w.m.Get("rep")
	waitDrained(t, w.engine("rep"))
	if _, err := rep.Message(0, []string{"pause", "1"}); err != nil {
		t.Fatal(err)
	}
	write(t, d, 40, bytes.Repeat([]byte{7}, 1024))
	time.Sleep(20 * time.Millisecond)
	if got := status(rep, mapper.StatusInfo); !strings.Contains(got, " 1 async paused ") {
		t.Errorf("INFO paused: %s", got)
	}
	if !strings.Contains(status(d, mapper.StatusInfo), " a1 31/32 ") {
		t.Errorf("replicator-dev INFO paused: %s", status(d, mapper.StatusInfo))
	}
	if _, err := rep.Message(0, []string{"resume", "all"}); err != nil {
		t.Fatal(err)
	}
	waitDrained(t, w.engine("rep"))
	w.sameAs(t, readAll(t, d), "l1", "a1")
	// A resync rewrites the whole site, even data changed behind our back.
	w.mems["a1"].WriteAt([][]byte{bytes.Repeat([]byte{0xee}, 4096)}, 8192)
	if _, err := rep.Message(0, []string{"resync", "1"}); err != nil {
		t.Fatal(err)
	}
	waitDrained(t, w.engine("rep"))
	w.sameAs(t, readAll(t, d), "l1", "a1")
}

// TestBigWriteSmallLog checks that a write larger than the ring's entries
// is split and still replicated.
func TestBigWriteSmallLog(t *testing.T) {
	w := newWorld(t)
	w.create("rep", "0 8 replicator ringbuffer 4 log 0 create 64 blockdev 1 0 blockdev 2 1 sync blockdev 2 2 async")
	d := w.create("d1", "0 1024 replicator-dev /dev/mapper/rep 1 0 1 l1 nolog 0 1 1 a1 nolog 0 2 1 b1 nolog 0")
	rng := rand.New(rand.NewPCG(5, 6))
	write(t, d, 3, randData(rng, 1000))
	waitDrained(t, w.engine("rep"))
	w.sameAs(t, readAll(t, d), "l1", "a1", "b1")
}
