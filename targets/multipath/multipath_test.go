package multipath_test

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	_ "github.com/vhostdm/vhostdm/targets" // flakey paths
	"github.com/vhostdm/vhostdm/targets/multipath"
	"github.com/vhostdm/vhostdm/test/oracle"
)

// TestMultipathGolden replays the kernel's answers recorded in
// testdata/multipath, the seed documents' examples included.
func TestMultipathGolden(t *testing.T) { oracle.CheckGolden(t, "testdata/multipath") }

type events struct {
	mu  sync.Mutex
	evs []mapper.Event
}

func (e *events) add(ev mapper.Event) { e.mu.Lock(); e.evs = append(e.evs, ev); e.mu.Unlock() }

func (e *events) take() []mapper.Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := e.evs
	e.evs = nil
	return out
}

func io(d *mapper.Device, op mapper.Op, sector, n uint64, data []byte) error {
	r := &mapper.Request{Op: op, Sector: sector, Sectors: n}
	if data != nil {
		r.Data = [][]byte{data}
	}
	return d.Submit(r)
}

func info(d *mapper.Device) string { return d.Status(mapper.StatusInfo, false)[0].Params }

// TestMultipathFailover builds a multipath device over two flakey devices
// on one disk: when a path goes down, I/O fails over and keeps working,
// the path is marked failed with PATH_FAILED raised; reinstating it brings
// it back; with no path left I/O fails or, with queue_if_no_path, waits.
func TestMultipathFailover(t *testing.T) {
	set := mappertest.NewSet(1<<20, "disk")
	var ev events
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler), Open: set.Open, Events: ev.add})
	defer m.Close()
	up, down := "0 2048 flakey disk 0 3600 0", "0 2048 flakey disk 0 0 3600"
	p1, err := m.CreateTable("p1", "", false, up)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := m.CreateTable("p2", "", false, up)
	if err != nil {
		t.Fatal(err)
	}
	d, err := m.CreateTable("mp", "", false, "0 2048 multipath 0 0 1 1 round-robin 0 2 1 /dev/mapper/p1 1 /dev/mapper/p2 1")
	if err != nil {
		t.Fatal(err)
	}
	data := oracle.Plaintext(64 * 512)
	for i := uint64(0); i < 8; i++ { // round-robin: both paths serve
		if err := io(d, mapper.OpWrite, i*8, 8, data[i*4096:(i+1)*4096]); err != nil {
			t.Fatal(err)
		}
	}
	if err := p1.Reload(down); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, 64*512)
	for i := 0; i < 4; i++ {
		if err := io(d, mapper.OpRead, 0, 64, back); err != nil {
			t.Fatalf("read with one path down: %v", err)
		}
		if !bytes.Equal(back, data) {
			t.Fatal("read with one path down returned other data")
		}
	}
	if got, want := info(d), "2 0 0 0 1 1 A 0 2 0 /dev/mapper/p1 F 1 /dev/mapper/p2 A 0"; got != want {
		t.Errorf("status after a path failure:\n got  %s\n want %s", got, want)
	}
	evs := ev.take()
	if len(evs) != 1 || evs[0].Kind != "PATH_FAILED" || evs[0].Data["DM_PATH"] != "/dev/mapper/p1" ||
		evs[0].Data["DM_NR_VALID_PATHS"] != 1 || evs[0].Data["DM_ACTION"] != "PATH_FAILED" {
		t.Errorf("events: %+v", evs)
	}
	// The path comes back.
	if err := p1.Reload(up); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Message(0, []string{"reinstate_path", "/dev/mapper/p1"}); err != nil {
		t.Fatal(err)
	}
	if evs := ev.take(); len(evs) != 1 || evs[0].Kind != "PATH_REINSTATED" || evs[0].Data["DM_NR_VALID_PATHS"] != 2 {
		t.Errorf("events: %+v", evs)
	}
	// Both down, fail_if_no_path: I/O fails.
	p1.Reload(down)
	p2.Reload(down)
	if err := io(d, mapper.OpRead, 0, 8, back[:4096]); err == nil {
		t.Fatal("read with every path down succeeded")
	}
	if got := info(d); !strings.Contains(got, "p1 F 2") || !strings.Contains(got, "p2 F 1") {
		t.Errorf("status with both paths failed: %s", got)
	}
	// queue_if_no_path: I/O waits until a path is reinstated.
	if _, err := d.Message(0, []string{"queue_if_no_path"}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- io(d, mapper.OpRead, 8, 8, back[:4096]) }()
	select {
	case err := <-done:
		t.Fatalf("queued read completed with no path: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	p2.Reload(up)
	if _, err := d.Message(0, []string{"reinstate_path", "/dev/mapper/p2"}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("queued read after reinstatement: %v", err)
	}
	if !bytes.Equal(back[:4096], data[4096:8192]) {
		t.Error("queued read returned other data")
	}
	// A queued I/O fails when the device suspends (presuspend stops
	// queueing) and queueing is restored on resume.
	d.Message(0, []string{"fail_path", "/dev/mapper/p2"})
	go func() { done <- io(d, mapper.OpRead, 8, 8, back[:4096]) }()
	time.Sleep(50 * time.Millisecond)
	if err := d.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err == nil {
		t.Error("queued read succeeded across suspend with no path")
	}
	if _, err := d.Message(0, []string{"fail_path", "/dev/mapper/p1"}); err == nil {
		t.Error("message accepted while suspended")
	}
	if err := d.Resume(); err != nil {
		t.Fatal(err)
	}
	if tab := d.Status(mapper.StatusTable, false)[0].Params; !strings.HasPrefix(tab, "1 queue_if_no_path ") {
		t.Errorf("queue_if_no_path not restored on resume: %s", tab)
	}
	// The core's remove flushes without a presuspend (the kernel's
	// __dm_destroy presuspends); stop queueing so that the flush fails.
	d.Message(0, []string{"fail_if_no_path"})
}

func TestMultipathMessages(t *testing.T) {
	set := mappertest.NewSet(1<<20, "a", "b", "c")
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler), Open: set.Open})
	defer m.Close()
	d, err := m.CreateTable("mp", "", false, "0 64 multipath 0 0 2 1 queue-length 0 1 0 a service-time 0 2 2 b 1 1 c 1 4")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		msg  string
		want string // error suffix, or "" for success
	}{
		{"switch_group 3", `switch_group: group "3": must be 1 to 2`},
		{"switch_group x", `switch_group: group "x": must be 1 to 2`},
		{"fail_path z", `fail_path: device "z": not a path of this table`},
		{"frob 1", `message "frob": unknown`},
		{"fail_path", `message "fail_path": want 2 words, got 1`},
		{"queue_if_no_path 1", `message "queue_if_no_path": unknown`},
		{"disable_group 2", ""},
		{"enable_group 2", ""},
		{"switch_group 2", ""},
	} {
		_, err := d.Message(0, strings.Fields(tc.msg))
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.HasSuffix(err.Error(), tc.want)) {
			t.Errorf("%s: got %v, want %q", tc.msg, err, tc.want)
		}
	}
	if err := io(d, mapper.OpWrite, 0, 8, make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	if got, want := info(d), "2 0 0 0 2 2 E 0 1 1 a A 0 0 A 0 2 2 b A 0 0 1 c A 0 0 4"; got != want {
		t.Errorf("after switch_group 2 and I/O:\n got  %s\n want %s", got, want)
	}
}

// TestSelectors checks the selection rules of the registered selectors.
func TestSelectors(t *testing.T) {
	for _, n := range []string{"round-robin", "queue-length", "service-time"} {
		if _, err := multipath.Selectors.Lookup(n); err != nil {
			t.Fatal(err)
		}
	}
	mk := func(name string, args ...[]string) (multipath.Selector, []*multipath.Path) {
		st, _ := multipath.Selectors.Lookup(name)
		s, err := st.New(nil)
		if err != nil {
			t.Fatal(err)
		}
		var ps []*multipath.Path
		for i, a := range args {
			p := &multipath.Path{Name: string(rune('a' + i))}
			if err := s.AddPath(p, a); err != nil {
				t.Fatal(err)
			}
			ps = append(ps, p)
		}
		return s, ps
	}
	// round-robin: turns, skipping a failed path.
	s, ps := mk("round-robin", nil, nil, nil)
	var got []string
	for i := 0; i < 6; i++ {
		got = append(got, s.Select(4096).Name)
	}
	if strings.Join(got, "") != "abcabc" {
		t.Errorf("round-robin order %v", got)
	}
	s.FailPath(ps[1])
	got = nil
	for i := 0; i < 4; i++ {
		got = append(got, s.Select(4096).Name)
	}
	if strings.Join(got, "") != "acac" {
		t.Errorf("round-robin with b failed: %v", got)
	}
	// queue-length: the path with the fewest I/Os in flight.
	s, ps = mk("queue-length", nil, nil, nil)
	s.StartIO(ps[0], 1)
	s.StartIO(ps[0], 1)
	s.StartIO(ps[1], 1)
	s.StartIO(ps[2], 1)
	s.StartIO(ps[2], 1)
	if p := s.Select(4096); p != ps[1] {
		t.Errorf("queue-length chose %s, want b (1 in flight)", p.Name)
	}
	s.EndIO(ps[0], 1)
	s.EndIO(ps[0], 1)
	if p := s.Select(4096); p != ps[0] {
		t.Errorf("queue-length chose %s, want a (0 in flight)", p.Name)
	}
	if st := s.PathStatus(ps[2], mapper.StatusInfo); st != "2" {
		t.Errorf("queue-length status %q", st)
	}
	// service-time: (in flight + incoming) / relative throughput.
	s, ps = mk("service-time", []string{"1", "1"}, []string{"1", "4"}, []string{"1", "0"})
	if p := s.Select(4096); p != ps[1] {
		t.Errorf("idle paths: chose %s, want b (highest throughput)", p.Name)
	}
	// b has 3 x 4096 in flight: (12288+4096)/4 = (0+4096)/1, a tie
	// that goes to the higher throughput.
	s.StartIO(ps[1], 3*4096)
	if p := s.Select(4096); p != ps[1] {
		t.Errorf("chose %s, want b (equal service time, higher throughput)", p.Name)
	}
	// b has 4 x 4096: (16384+4096)/4 = 5120 > (0+4096)/1.
	s.StartIO(ps[1], 4096)
	if p := s.Select(4096); p != ps[0] {
		t.Errorf("chose %s, want a ((0+4096)/1 < (16384+4096)/4)", p.Name)
	}
	// b has 2 x 4096: (8192+4096)/4 = 3072 < 4096.
	s.EndIO(ps[1], 2*4096)
	if p := s.Select(4096); p != ps[1] {
		t.Errorf("chose %s, want b ((8192+4096)/4 < (0+4096)/1)", p.Name)
	}
	// Throughput 0 only when nothing else is valid.
	s.FailPath(ps[0])
	s.FailPath(ps[1])
	if p := s.Select(4096); p != ps[2] {
		t.Errorf("chose %v, want c (the only valid path)", p)
	}
	s.ReinstatePath(ps[0])
	s.StartIO(ps[0], 1<<30)
	if p := s.Select(4096); p != ps[0] {
		t.Errorf("chose %s, want a over the throughput-0 path", p.Name)
	}
	if st := s.PathStatus(ps[0], mapper.StatusInfo); st != "1073741824 1" {
		t.Errorf("service-time status %q", st)
	}
}
