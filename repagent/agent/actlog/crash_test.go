package actlog

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The kill -9 test re-executes the test binary as a writer process.
const childEnv = "ACTLOG_CRASH_CHILD"

func TestMain(m *testing.M) {
	if path := os.Getenv(childEnv); path != "" {
		os.Exit(crashChild(path))
	}
	os.Exit(m.Run())
}

func crashConfig() Config { return testConfig(16) }

// crashChild writes randomly to three volumes through the log at path until
// it is killed. On fd 3 it reports "R" when ready, "B seq vol first last"
// once Begin has admitted a write (the write may proceed), and "A seq"
// before acknowledging every write up to seq as the hub would.
func crashChild(path string) int {
	report := os.NewFile(3, "report")
	l, rec, err := Open(path, crashConfig())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	// The previous run's extents: resynced (pretend), then released.
	for i, v := range rec.Volumes {
		if v.Full {
			l.FullResyncDone(i)
		}
		l.Clean(i, 0, crashConfig().Volumes[i].Size)
	}
	var (
		mu       sync.Mutex
		next     uint64 = 1
		inflight [4]uint64
		out      sync.Mutex
	)
	say := func(s string) {
		out.Lock()
		defer out.Unlock()
		if _, err := report.WriteString(s); err != nil { // one write(2): atomic on a pipe
			os.Exit(3)
		}
	}
	say("R\n")
	cfg := crashConfig()
	for w := range inflight {
		go func() {
			r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(w)))
			for {
				mu.Lock()
				seq := next
				next++
				inflight[w] = seq
				mu.Unlock()
				vol := r.IntN(len(cfg.Volumes))
				size := cfg.Volumes[vol].Size
				n := uint64(512 * (1 + r.IntN(256)))
				off := r.Uint64N(size-n) &^ 511
				tok, err := l.Begin(vol, off, n)
				if err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(2)
				}
				say(fmt.Sprintf("B %d %d %d %d\n", seq, vol, tok.first, tok.last))
				// The local write would happen here.
				l.End(tok, seq)
				mu.Lock()
				inflight[w] = 0
				mu.Unlock()
			}
		}()
	}
	r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 99))
	acked := uint64(0)
	for {
		time.Sleep(time.Duration(50+r.IntN(500)) * time.Microsecond)
		mu.Lock()
		wm := next - 1
		for _, s := range inflight {
			if s != 0 && s-1 < wm {
				wm = s - 1
			}
		}
		mu.Unlock()
		// The hub lags behind by up to 40 writes.
		if lag := uint64(r.IntN(40)); wm > lag {
			wm -= lag
		} else {
			wm = 0
		}
		if wm <= acked {
			continue
		}
		acked = wm
		say(fmt.Sprintf("A %d\n", wm))
		l.Ack(wm)
	}
}

type begunWrite struct {
	seq         uint64
	vol         int
	first, last uint64
}

func TestKill9RecoveryCoversBegunWrites(t *testing.T) {
	cfg := crashConfig()
	path := filepath.Join(t.TempDir(), "vm.actlog")
	l, _ := openLog(t, path, cfg)
	for i := range cfg.Volumes {
		l.FullResyncDone(i)
	}
	l.Close()
	distinct := map[[2]uint64]bool{}
	for round := range 6 {
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childEnv+"="+path)
		cmd.ExtraFiles = []*os.File{pw}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		pw.Close()
		var (
			nbegun atomic.Int64
			begun  []begunWrite
			acked  uint64
			ready  = make(chan struct{})
			parsed = make(chan error, 1)
		)
		go func() {
			sc := bufio.NewScanner(pr)
			first := true
			for sc.Scan() {
				f := strings.Fields(sc.Text())
				switch {
				case len(f) == 1 && f[0] == "R" && first:
					first = false
					close(ready)
				case len(f) == 5 && f[0] == "B":
					var w begunWrite
					var err error
					w.seq, err = strconv.ParseUint(f[1], 10, 64)
					if err == nil {
						w.vol, err = strconv.Atoi(f[2])
					}
					if err == nil {
						w.first, err = strconv.ParseUint(f[3], 10, 64)
					}
					if err == nil {
						w.last, err = strconv.ParseUint(f[4], 10, 64)
					}
					if err != nil {
						parsed <- fmt.Errorf("bad line %q", sc.Text())
						return
					}
					begun = append(begun, w)
					nbegun.Add(1)
				case len(f) == 2 && f[0] == "A":
					a, err := strconv.ParseUint(f[1], 10, 64)
					if err != nil {
						parsed <- fmt.Errorf("bad line %q", sc.Text())
						return
					}
					acked = max(acked, a)
				default:
					parsed <- fmt.Errorf("bad line %q", sc.Text())
					return
				}
			}
			parsed <- sc.Err()
		}()
		select {
		case <-ready:
		case err := <-parsed:
			t.Fatalf("child ended before it was ready: %v", err)
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Fatal("child not ready after 30 s")
		}
		// Kill at a random point after a random number of writes (not
		// a fixed time: the machine may be loaded).
		target := int64(100 + rand.IntN(400))
		for deadline := time.Now().Add(60 * time.Second); nbegun.Load() < target && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(time.Duration(rand.IntN(5000)) * time.Microsecond)
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		err = cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("child did not die by SIGKILL: %v", err)
		}
		if err := <-parsed; err != nil {
			t.Fatal(err)
		}
		pr.Close()

		l, rec := openLog(t, path, cfg)
		if rec.Err != nil || rec.Clean {
			t.Fatalf("round %d: recovery after kill -9: %+v", round, rec)
		}
		got := extentsOf(t, rec, cfg.ExtentSize)
		hot := map[[2]uint64]bool{}
		total := 0
		for v, xs := range got {
			for _, x := range xs {
				hot[[2]uint64{uint64(v), x}] = true
				total++
			}
		}
		if total > cfg.Extents {
			t.Fatalf("round %d: recovered %d extents, al-extents is %d", round, total, cfg.Extents)
		}
		need := map[[2]uint64]bool{}
		for _, w := range begun {
			for x := w.first; x <= w.last; x++ {
				distinct[[2]uint64{uint64(w.vol), x}] = true
				if w.seq > acked {
					need[[2]uint64{uint64(w.vol), x}] = true
				}
			}
		}
		for k := range need {
			if !hot[k] {
				t.Errorf("round %d: volume %d extent %d had an unacknowledged write (acked up to %d) but is not in the recovered set %v", round, k[0], k[1], acked, got)
			}
		}
		t.Logf("round %d: %d writes begun, acked to %d, %d extents needed, %d recovered (%d bytes to resync of %d)",
			round, len(begun), acked, len(need), total, uint64(total)*cfg.ExtentSize, cfg.Volumes[0].Size+cfg.Volumes[1].Size+cfg.Volumes[2].Size)
		if len(begun) < 50 {
			t.Fatalf("round %d: the child began only %d writes", round, len(begun))
		}
		if _, err := l.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// The test means something only if extents were evicted.
	if len(distinct) <= 3*cfg.Extents {
		t.Fatalf("only %d distinct extents written with al-extents %d: eviction barely exercised", len(distinct), cfg.Extents)
	}
}
