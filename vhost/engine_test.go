package vhost

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vhostdm/vhostdm/internal/looptest"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/vhost/frontend"
)

// logBuffer is an io.Writer for a test's logger, safe for concurrent use.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestEngineDirectBlockDevice exports a cache = "none" device over a loop
// device, where every read and write goes to the queue's I/O engine
// (O_DIRECT is never tried on the ring goroutine), writes and reads back
// with many requests in flight on two queues, and checks the log names the
// engine that ran: io_uring, or the worker pool ("threads") when the test
// is built with the vhostdm_nouring tag (go test -tags vhostdm_nouring),
// which forces the fallback for this and every other test of the package.
func TestEngineDirectBlockDevice(t *testing.T) {
	img := filepath.Join(t.TempDir(), "loop.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 8<<20); err != nil {
		t.Fatal(err)
	}
	loop := looptest.Attach(t, img, 512)

	var logs logBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	m := mapper.NewManager(mapper.ManagerOptions{Logger: log})
	t.Cleanup(func() { m.Close() })
	dev, err := m.CreateTableWith("d", "", mapper.DeviceOptions{Cache: mapper.CacheNone}, fmt.Sprintf("0 16384 linear %s 0", loop))
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "s")
	exp, err := NewExport(ExportConfig{ID: "d", Socket: sock, NumQueues: 2, Writable: true, Logger: log}, dev)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- exp.Serve(context.Background()) }()
	t.Cleanup(func() {
		exp.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	c, err := frontend.Dial(testCtx(t), frontend.Config{Socket: sock, NumQueues: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	const blocks = 64 // 4 KiB each, at 64 KiB strides
	var wg sync.WaitGroup
	errs := make(chan error, 2*blocks)
	for i := range blocks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.WriteAt(testCtx(t), i%2, pattern(uint64(i), 4096), uint64(i*128)); err != nil {
				errs <- fmt.Errorf("write %d: %w", i, err)
			}
		}()
	}
	wg.Wait()
	for i := range blocks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got := make([]byte, 4096)
			if err := c.ReadAt(testCtx(t), 1-i%2, got, uint64(i*128)); err != nil {
				errs <- fmt.Errorf("read %d: %w", i, err)
				return
			}
			if !bytes.Equal(got, pattern(uint64(i), 4096)) {
				errs <- fmt.Errorf("block %d: read back is not what was written", i)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// What the engine acknowledged is on the loop device, past its cache.
	f, err := os.Open(loop)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, 4096)
	if _, err := f.ReadAt(got, 5*128*512); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pattern(5, 4096)) {
		t.Error("the loop device does not hold block 5")
	}
	if want := "engine=" + wantEngine; !strings.Contains(logs.String(), want) {
		t.Errorf("log does not say %s:\n%s", want, logs.String())
	}
}
