package journal_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/repagent/hub/journal/journaltest"
)

// The crash test's child process is this test binary, re-executed with
// these variables set (as Go's os/exec tests do).
const (
	crashChildEnv = "VHOSTDM_JOURNAL_CRASH_CHILD" // the VM directory
	crashSeedEnv  = "VHOSTDM_JOURNAL_CRASH_SEED"
	// crashRoundsEnv sets the number of kill rounds of TestCrashModel
	// (default 8, about 10-20 s with -race on 2 cores); for a long run:
	//
	//	VHOSTDM_JOURNAL_CRASH_ROUNDS=200 go test -run TestCrashModel -timeout 1h ./repagent/hub/journal/
	crashRoundsEnv = "VHOSTDM_JOURNAL_CRASH_ROUNDS"
)

var crashVols = []string{"disk0", "disk1", "disk2"}

func TestMain(m *testing.M) {
	if dir := os.Getenv(crashChildEnv); dir != "" {
		crashChild(dir)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// crashChild opens the journal in dir with a short retention and the
// applier running, and appends the deterministic op history from where the
// journal ends, reporting each acknowledged sequence number on fd 3 (8
// bytes, little endian; the first number is the sequence number it resumed
// after). It runs until killed.
func crashChild(dir string) {
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "crash child:", err)
		os.Exit(2)
	}
	seed, err := strconv.ParseUint(os.Getenv(crashSeedEnv), 10, 64)
	if err != nil {
		fail(err)
	}
	j, err := journal.Open(dir, journal.Options{Retain: 20 * time.Millisecond, SegmentBytes: 64 << 10, ApplyInterval: 5 * time.Millisecond})
	if err != nil {
		fail(err)
	}
	pipe := os.NewFile(3, "acks")
	var pmu sync.Mutex
	report := func(seq uint64) {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], seq)
		pmu.Lock()
		defer pmu.Unlock()
		if _, err := pipe.Write(b[:]); err != nil {
			fail(err)
		}
	}
	last := j.Stats().LastSeq
	g := journaltest.NewGen(seed, crashVols...)
	for g.Next() <= last {
		g.Op()
	}
	report(last)
	sem := make(chan struct{}, 48)
	rng := rand.New(rand.NewPCG(seed, last))
	for {
		// Submit a burst of ops, each waited for by its own goroutine so
		// that group commits batch them.
		for range 1 + rng.IntN(24) {
			rec := g.Op()
			p, err := j.Submit(rec)
			if err != nil {
				fail(fmt.Errorf("submit seq %d: %w", rec.Seq, err))
			}
			sem <- struct{}{}
			go func() {
				defer func() { <-sem }()
				if _, err := p.Wait(context.Background()); err != nil {
					fail(err)
				}
				report(rec.Seq)
			}()
		}
		if rng.IntN(4) == 0 {
			time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
		}
	}
}

// TestCrashModel kills a child process appending to a journal of 3 volumes
// (writes, zeroes, discards, resizes, resync sets, some left open across
// kills, checkpoints; applier running with 20ms retention) with SIGKILL at
// random instants, several rounds over the same directory. After each kill
// it reopens the journal and checks that every acknowledged record is there,
// that the newest, oldest and sampled consistent points (by position, seq,
// time and checkpoint) materialize to the model's state of all 3 volumes,
// and that materializing changes no file of the journal or base images.
// The seed is logged (VHOSTDM_JOURNAL_CRASH_SEED=N reuses one; the kill
// instants still vary). 8 rounds by default (about 10 s); for a long run:
//
//	VHOSTDM_JOURNAL_CRASH_ROUNDS=200 go test -run TestCrashModel -timeout 1h ./repagent/hub/journal/
func TestCrashModel(t *testing.T) {
	rounds := 8
	if s := os.Getenv(crashRoundsEnv); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive number", crashRoundsEnv, s)
		}
		rounds = n
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(crashSeedEnv); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", crashSeedEnv, s, err)
		}
		seed = n
	}
	t.Logf("seed %d (rounds %d)", seed, rounds)
	rng := rand.New(rand.NewPCG(seed, 0))
	dir := t.TempDir()
	var maxOps uint64
	for round := range rounds {
		acked, resumed, stderr := runCrashChild(t, dir, seed, time.Duration(30+rng.IntN(200))*time.Millisecond)
		j, err := journal.Open(dir, journal.Options{Retain: time.Hour, NoApplier: true})
		if err != nil {
			t.Fatalf("round %d: reopen after kill: %v (child stderr: %s)", round, err, stderr)
		}
		st := j.Stats()
		if st.LastSeq < acked {
			t.Fatalf("round %d: journal ends at seq %d, but the child had seq %d acknowledged", round, st.LastSeq, acked)
		}
		if st.LastSeq < resumed {
			t.Fatalf("round %d: journal ends at seq %d, the child resumed after %d", round, st.LastSeq, resumed)
		}
		st = journaltest.Verify(t, j, journaltest.DirEnv(dir), seed, rng, crashVols...)
		t.Logf("round %d: resumed after %d, acked %d, journal to seq %d, applied seq %d, newest seq %d, %d segments, %d bytes",
			round, resumed, acked, st.LastSeq, st.Applied.Seq, st.Newest.Seq, st.Segments, st.Bytes)
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		maxOps = st.LastSeq
	}
	if maxOps < uint64(rounds)*10 {
		t.Fatalf("only %d ops in %d rounds: the child did not run", maxOps, rounds)
	}
}

// runCrashChild runs the child on dir, kills it with SIGKILL after d (from
// its first report), and returns the highest sequence number it reported
// acknowledged, the sequence number it resumed after, and its stderr.
func runCrashChild(t *testing.T, dir string, seed uint64, d time.Duration) (acked, resumed uint64, stderr string) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+dir, crashSeedEnv+"="+strconv.FormatUint(seed, 10))
	cmd.ExtraFiles = []*os.File{pw}
	var errBuf bytes.Buffer
	cmd.Stderr = &errBuf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	first := make(chan uint64, 1)
	done := make(chan uint64)
	go func() {
		defer pr.Close()
		var b [8]byte
		var hi uint64
		n := 0
		for {
			if _, err := io.ReadFull(pr, b[:]); err != nil {
				done <- hi
				return
			}
			v := binary.LittleEndian.Uint64(b[:])
			if n == 0 {
				first <- v
			}
			n++
			hi = max(hi, v)
		}
	}()
	select {
	case resumed = <-first:
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("child did not start: %s", errBuf.String())
	}
	time.Sleep(d)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child ended before the kill: %v: %s", err, errBuf.String())
	}
	acked = <-done
	return acked, resumed, errBuf.String()
}
