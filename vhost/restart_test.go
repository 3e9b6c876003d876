package vhost

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// The test binary doubles as a back-end process: with VHOST_TEST_CHILD=serve
// it exports a mapper device built from VHOST_CHILD_TABLE on
// VHOST_CHILD_SOCKET (VHOST_CHILD_QUEUES queues) and serves until killed.
// VHOST_CHILD_DELAY_MS delays writes to odd 16-sector blocks, so that a test can kill the
// process with requests in flight. It prints "ready" once listening.
func TestMain(m *testing.M) {
	if os.Getenv("VHOST_TEST_CHILD") == "serve" {
		os.Exit(childServe())
	}
	os.Exit(m.Run())
}

func childServe() int {
	log := testLogger()
	m := mapper.NewManager(mapper.ManagerOptions{Logger: log})
	dev, err := m.CreateTable("child", "", false, os.Getenv("VHOST_CHILD_TABLE"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	queues, _ := strconv.Atoi(os.Getenv("VHOST_CHILD_QUEUES"))
	var d Device = dev
	if ms, _ := strconv.Atoi(os.Getenv("VHOST_CHILD_DELAY_MS")); ms > 0 {
		d = slowDevice{Device: dev, delay: time.Duration(ms) * time.Millisecond}
	}
	e, err := NewExport(ExportConfig{ID: "child", Socket: os.Getenv("VHOST_CHILD_SOCKET"), NumQueues: queues,
		Writable: true, Logger: log}, d)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	fmt.Println("ready")
	if err := e.Serve(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	e.Close()
	m.Close()
	return 0
}

// slowDevice delays writes to odd 16-sector blocks, so that requests
// complete out of order and some stay in flight.
type slowDevice struct {
	Device
	delay time.Duration
}

func (s slowDevice) Submit(r *mapper.Request) error {
	if r.Op == mapper.OpWrite && r.Sector/16%2 == 1 {
		time.Sleep(s.delay)
	}
	return s.Device.Submit(r)
}

// startChild starts the test binary as a back end and waits until it
// listens.
func startChild(t testing.TB, socket, table string, queues int, delayMS int) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "VHOST_TEST_CHILD=serve", "VHOST_CHILD_SOCKET="+socket,
		"VHOST_CHILD_TABLE="+table, fmt.Sprintf("VHOST_CHILD_QUEUES=%d", queues),
		fmt.Sprintf("VHOST_CHILD_DELAY_MS=%d", delayMS))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	ready := make(chan bool, 1)
	go func() {
		s := bufio.NewScanner(out)
		ok := s.Scan() && s.Text() == "ready"
		ready <- ok
		for s.Scan() {
		}
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatal("back-end process did not start")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("back-end process did not start in time")
	}
	return cmd
}

// TestRestartNoLoss kills the back-end process with requests in flight,
// restarts it on the same socket, and checks that the client, handing its
// inflight region back, sees every request complete once with its data.
func TestRestartNoLoss(t *testing.T) { forEachLayout(t, testRestartNoLoss) }

func testRestartNoLoss(t *testing.T, packed bool) {
	dir := t.TempDir()
	img := dir + "/disk.img"
	sock := dir + "/vhost.sock"
	const size = 16 << 20
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	table := fmt.Sprintf("0 %d linear %s 0", size/512, img)
	child := startChild(t, sock, table, 2, 3000)
	ctx := testCtx(t)
	c, err := frontend.Dial(ctx, frontend.Config{Socket: sock, NumQueues: 2, QueueSize: 128, Inflight: true, Packed: packed})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.ProtocolFeatures()&wire.ProtocolInflightSHMFD == 0 {
		t.Fatal("INFLIGHT_SHMFD not negotiated")
	}
	if c.Packed() != packed {
		t.Fatalf("packed ring negotiated: %v, want %v", c.Packed(), packed)
	}
	const perQueue = 24
	var wg sync.WaitGroup
	var mu sync.Mutex
	completions := map[uint64]int{}
	var failures []string
	for q := range 2 {
		for k := range perQueue {
			sector := uint64((q*perQueue + k) * 16)
			buf, err := c.Buf(8192)
			if err != nil {
				t.Fatal(err)
			}
			copy(buf, pattern(sector, 8192))
			wg.Add(1)
			err = c.Submit(q, &frontend.BlkRequest{Type: virtio.BlkTypeOut, Sector: sector, Data: [][]byte{buf}}, func(r frontend.Result) {
				mu.Lock()
				completions[sector]++
				if r.Err != nil || r.Status != virtio.BlkStatusOK {
					failures = append(failures, fmt.Sprintf("sector %d: %+v", sector, r))
				}
				mu.Unlock()
				wg.Done()
			})
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	// The writes to even blocks complete, out of order with the odd ones
	// still in the back end's slow workers; then the back end is killed.
	waitFor(t, "fast writes", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(completions) >= perQueue
	})
	time.Sleep(100 * time.Millisecond)
	mu.Lock()
	early := len(completions)
	mu.Unlock()
	if early != perQueue {
		t.Fatalf("%d requests completed before the kill, want %d", early, perQueue)
	}
	child.Process.Kill()
	child.Wait()
	startChild(t, sock, table, 2, 0)
	if err := c.Reconnect(ctx); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		mu.Lock()
		t.Fatalf("only %d of %d requests completed after the restart", len(completions), 2*perQueue)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(failures) > 0 {
		t.Fatal(failures)
	}
	for s, n := range completions {
		if n != 1 {
			t.Fatalf("sector %d completed %d times", s, n)
		}
	}
	if c.Strays() != 0 {
		t.Fatalf("%d stray used elements", c.Strays())
	}
	file, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	for q := range 2 {
		for k := range perQueue {
			sector := uint64((q*perQueue + k) * 16)
			want := pattern(sector, 8192)
			got := make([]byte, 8192)
			if err := c.ReadAt(ctx, q, got, sector); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("sector %d: read back differs", sector)
			}
			if !bytes.Equal(file[sector*512:sector*512+8192], want) {
				t.Fatalf("sector %d: image differs", sector)
			}
		}
	}
}
