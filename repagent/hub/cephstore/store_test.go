//go:build ceph

package cephstore_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/internal/cephtest"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub/cephstore"
	"github.com/vhostdm/vhostdm/repagent/hub/journal"
	"github.com/vhostdm/vhostdm/repagent/hub/journal/journaltest"
)

var cluster *cephtest.Cluster

// The crash test's child is this test binary re-executed with these
// variables set; it needs no cluster of its own.
const (
	childPoolEnv = "VHOSTDM_CEPHSTORE_CHILD_POOL"
	childConfEnv = "VHOSTDM_CEPHSTORE_CHILD_CONF"
	childSeedEnv = "VHOSTDM_CEPHSTORE_CHILD_SEED"
	// roundsEnv sets the kill rounds of TestJournalCrashModel (default 3).
	roundsEnv = "VHOSTDM_CEPHSTORE_CRASH_ROUNDS"
)

// testLease is the lease of the tests' stores: a reopen after a kill
// waits for it to end.
const testLease = 2 * time.Second

var crashVols = []string{"disk0", "disk1", "disk2"}

const crashVM = "vm.1/a" // a name that needs escaping

func TestMain(m *testing.M) {
	if pool := os.Getenv(childPoolEnv); pool != "" {
		crashChild(pool, os.Getenv(childConfEnv))
		os.Exit(0)
	}
	os.Exit(cephtest.Main(m, &cluster))
}

func openBackend(t testing.TB, pool string) *cephstore.Backend {
	t.Helper()
	b, err := cephstore.OpenBackend(cephstore.Config{Pool: pool, Conf: cluster.Conf, Lease: testLease, LockWait: testLease + 5*time.Second},
		slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// crashChild appends the deterministic op history to the journal of
// crashVM in pool from where it ends, applier running with a short
// retention, reporting each acknowledged sequence number on fd 3 (8
// bytes little endian; the first is the one it resumed after). It runs
// until killed.
func crashChild(pool, conf string) {
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "crash child:", err)
		os.Exit(2)
	}
	seed, err := strconv.ParseUint(os.Getenv(childSeedEnv), 10, 64)
	if err != nil {
		fail(err)
	}
	b, err := cephstore.OpenBackend(cephstore.Config{Pool: pool, Conf: conf, Lease: testLease, LockWait: testLease + 5*time.Second}, nil)
	if err != nil {
		fail(err)
	}
	st := b.Journal(crashVM)
	j, err := journal.Open(st.String(), journal.Options{Store: st, Retain: 20 * time.Millisecond, SegmentBytes: 64 << 10,
		ApplyInterval: 5 * time.Millisecond})
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

// TestJournalCrashModel is the journal's crash model test (package
// journal's TestCrashModel) over the Ceph store: a child process appends
// to the journal of a VM of 3 volumes (writes, zeroes, discards, resizes,
// resync sets, checkpoints; applier running with 20 ms retention, so the
// RBD replicas advance) and is killed with SIGKILL at random instants,
// several rounds over the same pool. After each kill the journal is
// reopened (after the dead child's lease) and checked: every
// acknowledged record is there, and the newest, oldest and sampled
// consistent points (by position, seq, time and checkpoint) recovered as
// RBD clones read back, through the rbd: backend, as the model's state of
// all 3 volumes; recovering changes no segment, state or replica byte.
// VHOSTDM_CEPHSTORE_CRASH_ROUNDS sets the number of kill rounds: 3 by
// default, 2 in scripts/test.sh (a fresh journal, then one resumed after
// a kill: every check still runs), more for a longer run by hand.
func TestJournalCrashModel(t *testing.T) {
	rounds := 3
	if s := os.Getenv(roundsEnv); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive number", roundsEnv, s)
		}
		rounds = n
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d (rounds %d)", seed, rounds)
	rng := rand.New(rand.NewPCG(seed, 0))
	pool := cluster.CreatePool(t, "rbd")
	env := cephEnv(t, pool)
	var maxOps uint64
	for round := range rounds {
		acked, resumed, stderr := runChild(t, pool, seed, time.Duration(300+rng.IntN(700))*time.Millisecond)
		start := time.Now()
		b := openBackend(t, pool)
		js := b.Journal(crashVM)
		j, err := journal.Open(js.String(), journal.Options{Store: js, Retain: time.Hour, NoApplier: true})
		if err != nil {
			t.Fatalf("round %d: reopen after kill: %v (child stderr: %s)", round, err, stderr)
		}
		reopen := time.Since(start)
		st := j.Stats()
		if st.LastSeq < acked {
			t.Fatalf("round %d: journal ends at seq %d, but the child had seq %d acknowledged", round, st.LastSeq, acked)
		}
		if st.LastSeq < resumed {
			t.Fatalf("round %d: journal ends at seq %d, the child resumed after %d", round, st.LastSeq, resumed)
		}
		env.Sums = func(t *testing.T) map[string]string { return storeSums(t, js, crashVols) }
		st = journaltest.Verify(t, j, env, seed, rng, crashVols...)
		t.Logf("round %d: reopened in %v (the dead child's lease), resumed after %d, acked %d, journal to seq %d, applied seq %d, newest seq %d, %d segments, %d bytes",
			round, reopen.Round(time.Millisecond), resumed, acked, st.LastSeq, st.Applied.Seq, st.Newest.Seq, st.Segments, st.Bytes)
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		b.Close()
		maxOps = st.LastSeq
	}
	if maxOps < uint64(rounds)*10 {
		t.Fatalf("only %d ops in %d rounds: the child did not run", maxOps, rounds)
	}
}

// cephEnv reads recovered volumes through the rbd: backend and removes
// the clones once checked.
func cephEnv(t *testing.T, pool string) journaltest.Env {
	o := ceph.NewOpener(ceph.Config{Conf: cluster.Conf}, slog.New(slog.DiscardHandler))
	t.Cleanup(func() { o.Close() })
	return journaltest.Env{
		Read: func(path string) ([]byte, error) { return readRBD(o, path) },
		Done: func(t *testing.T, rv journal.Recovered) {
			for _, v := range rv.Volumes {
				cluster.Must(t, "rbd", "rm", "--no-progress", strings.TrimPrefix(v.Path, "rbd:"))
			}
		},
	}
}

// readRBD reads a whole image through the rbd: backend.
func readRBD(o *ceph.Opener, name string) ([]byte, error) {
	b, err := o.Open(name, true)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	size, err := b.Size()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, size)
	if err := b.ReadAt([][]byte{buf}, 0); err != nil {
		return nil, err
	}
	return buf, nil
}

// storeSums digests every segment, the state and the base images of a
// journal.Store.
func storeSums(t *testing.T, st journal.Store, vols []string) map[string]string {
	t.Helper()
	sums := map[string]string{}
	sum := func(name string, b []byte) {
		h := sha256.Sum256(b)
		sums[name] = hex.EncodeToString(h[:])
	}
	state, err := st.GetState()
	if err != nil {
		t.Fatal(err)
	}
	sum("state", state)
	starts, err := st.Segments()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range starts {
		g, err := st.OpenSegment(s)
		if err != nil {
			t.Fatal(err)
		}
		n, _ := g.Size()
		b := make([]byte, n)
		if _, err := g.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		g.Close()
		sum(st.SegmentName(s), b)
	}
	for _, v := range vols {
		img, err := st.OpenImage(v, false)
		if err != nil {
			continue
		}
		n, _ := img.Size()
		b := make([]byte, n)
		if _, err := img.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		img.Close()
		sum(img.Name(), b)
	}
	return sums
}

// runChild runs the crash child on pool, kills it with SIGKILL after d
// (from its first report), and returns the highest sequence number it
// reported acknowledged, the one it resumed after, and its stderr.
func runChild(t *testing.T, pool string, seed uint64, d time.Duration) (acked, resumed uint64, stderr string) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childPoolEnv+"="+pool, childConfEnv+"="+cluster.Conf, childSeedEnv+"="+strconv.FormatUint(seed, 10))
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
	case <-time.After(90 * time.Second):
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

// TestLeaseExcludes: while one store holds a VM's journal, another
// cannot open it (ErrInUse, naming the holder), and can once the first
// closes.
func TestLeaseExcludes(t *testing.T) {
	pool := cluster.CreatePool(t, "rbd")
	a := openBackend(t, pool)
	defer a.Close()
	ja, err := journal.Open("a", journal.Options{Store: a.Journal("vm1")})
	if err != nil {
		t.Fatal(err)
	}
	b, err := cephstore.OpenBackend(cephstore.Config{Pool: pool, Conf: cluster.Conf, Lease: testLease}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := journal.Open("b", journal.Options{Store: b.Journal("vm1")}); !errors.Is(err, journal.ErrInUse) {
		t.Fatalf("second open while held: %v, want ErrInUse", err)
	} else {
		t.Logf("second open: %v", err)
	}
	if err := ja.Close(); err != nil {
		t.Fatal(err)
	}
	jb, err := journal.Open("b", journal.Options{Store: b.Journal("vm1")})
	if err != nil {
		t.Fatalf("open after the holder closed: %v", err)
	}
	jb.Close()
}

// TestBadStore: a missing pool and a key without caps on the pool fail
// Open with errors that say so; a key with the caps OPERATIONS.md gives
// (mon 'profile rbd', osd 'profile rbd pool=POOL') runs a journal,
// replica and recovery.
func TestBadStore(t *testing.T) {
	_, err := cephstore.Open(cephstore.Config{Pool: "no-such-pool", Conf: cluster.Conf}, nil)
	if err == nil || !strings.Contains(err.Error(), `pool "no-such-pool" not found`) {
		t.Errorf("missing pool: %v", err)
	}
	pool := cluster.CreatePool(t, "rbd")
	kr := cluster.AddClient(t, "nocaps", "mon", "allow r")
	_, err = cephstore.Open(cephstore.Config{Pool: pool, Conf: cluster.Conf, ID: "nocaps", Keyring: kr}, nil)
	if err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("key without osd caps: %v", err)
	}
	kr = cluster.AddClient(t, "hub", "mon", "profile rbd", "osd", "profile rbd pool="+pool)
	b, err := cephstore.OpenBackend(cephstore.Config{Pool: pool, Conf: cluster.Conf, ID: "hub", Keyring: kr}, nil)
	if err != nil {
		t.Fatalf("least-caps key: %v", err)
	}
	defer b.Close()
	js := b.Journal("vm1")
	j, err := journal.Open("vm1", journal.Options{Store: js, NoApplier: true})
	if err != nil {
		t.Fatalf("least-caps key: %v", err)
	}
	defer j.Close()
	data := bytes.Repeat([]byte{7}, 4096)
	if _, err := j.Append(context.Background(), journal.Record{Kind: journal.KindVolume, Volume: "d", Size: 1 << 20},
		journal.Record{Kind: journal.KindWrite, Volume: "d", Offset: 8192, Data: data}); err != nil {
		t.Fatalf("least-caps key: append: %v", err)
	}
	if err := j.ApplyNow(); err != nil {
		t.Fatalf("least-caps key: apply: %v", err)
	}
	rv, err := j.Materialize(context.Background(), journal.Newest(), "least-caps")
	if err != nil {
		t.Fatalf("least-caps key: recover: %v", err)
	}
	o := ceph.NewOpener(ceph.Config{Conf: cluster.Conf, ID: "hub", Keyring: kr}, nil)
	defer o.Close()
	got, err := readRBD(o, rv.Volumes[0].Path)
	if err != nil || !bytes.Equal(got[8192:8192+4096], data) {
		t.Fatalf("least-caps key: recovered volume: %v", err)
	}
}

// TestReplicatedWriteThroughput measures, in one run, the hub's
// replicated write path over a directory store and over the Ceph store:
// 32 writers submit mirrored writes (4 KiB, then 64 KiB, random offsets
// of a 64 MiB volume) to a VM's journal and wait for each to be durable
// (what WRITE_ACK waits for), with the applier advancing the replica
// image (retain 0). It reports acknowledged MiB/s and writes/s, group
// commits, and the RADOS operations the Ceph store issued per group
// commit; it fails if any write fails or the applier does.
func TestReplicatedWriteThroughput(t *testing.T) {
	pool := cluster.CreatePool(t, "rbd")
	b := openBackend(t, pool)
	defer b.Close()
	const volSize = 64 << 20
	d := 4 * time.Second
	for _, size := range []int{4 << 10, 64 << 10} {
		for _, kind := range []string{"dir", "ceph"} {
			var st journal.Store = journal.DirStore(t.TempDir())
			vm := fmt.Sprintf("bench-%d", size)
			if kind == "ceph" {
				st = b.Journal(vm)
			}
			j, err := journal.Open(st.String(), journal.Options{Store: st, ApplyInterval: 50 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := j.Append(context.Background(), journal.Record{Kind: journal.KindVolume, Volume: "disk", Size: volSize}); err != nil {
				t.Fatal(err)
			}
			ops0, seg0 := b.Ops()
			st0 := j.Stats()
			var mu sync.Mutex
			var acked, seq uint64
			deadline := time.Now().Add(d)
			var wg sync.WaitGroup
			start := time.Now()
			for w := range 32 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(w), uint64(size)))
					data := make([]byte, size)
					for i := 0; i < size; i += 8 {
						binary.LittleEndian.PutUint64(data[i:], rng.Uint64())
					}
					for time.Now().Before(deadline) {
						binary.LittleEndian.PutUint64(data, rng.Uint64())
						off := int64(rng.IntN(volSize/size)) * int64(size)
						mu.Lock()
						seq++
						p, err := j.Submit(journal.Record{Kind: journal.KindWrite, Volume: "disk", Offset: off, Data: data, Seq: seq, HasSeq: true})
						mu.Unlock()
						if err != nil {
							t.Error(err)
							return
						}
						if _, err := p.Wait(context.Background()); err != nil {
							t.Error(err)
							return
						}
						mu.Lock()
						acked++
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
			el := time.Since(start)
			st1 := j.Stats()
			ops1, seg1 := b.Ops()
			if err := j.ApplyNow(); err != nil {
				t.Fatalf("%s: apply: %v", kind, err)
			}
			batches := st1.Batches - st0.Batches
			line := fmt.Sprintf("%-4s %2d KiB writes, QD32: %7.1f MiB/s, %6.0f writes/s acknowledged durable, %d group commits (%.1f writes each)",
				kind, size>>10, float64(acked)*float64(size)/el.Seconds()/(1<<20), float64(acked)/el.Seconds(), batches, float64(acked)/float64(max(batches, 1)))
			if kind == "ceph" {
				line += fmt.Sprintf("; RADOS ops by the store: %.2f per group commit (%.2f of them segment writes), applier's librbd writes: %d calls (%.2f per group commit)",
					float64(ops1-ops0)/float64(max(batches, 1)), float64(seg1-seg0)/float64(max(batches, 1)),
					st1.ApplyWrites-st0.ApplyWrites, float64(st1.ApplyWrites-st0.ApplyWrites)/float64(max(batches, 1)))
			}
			t.Log(line)
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestRecoverWhileApplierRuns: with the applier running (retain 0) and
// its replica handles open, a recovery at the newest point is an RBD
// clone that reads back (through the rbd: backend) what was written,
// before and after more writes are applied.
func TestRecoverWhileApplierRuns(t *testing.T) {
	pool := cluster.CreatePool(t, "rbd")
	b := openBackend(t, pool)
	defer b.Close()
	js := b.Journal("vm1")
	j, err := journal.Open("vm1", journal.Options{Store: js, ApplyInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	o := ceph.NewOpener(ceph.Config{Conf: cluster.Conf}, nil)
	defer o.Close()
	const size = 8 << 20
	want := make([]byte, size)
	ctx := context.Background()
	if _, err := j.Append(ctx, journal.Record{Kind: journal.KindVolume, Volume: "d", Size: size}); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for round := range 3 {
		for range 200 {
			off := int64(rng.IntN(size/4096)) * 4096
			data := bytes.Repeat([]byte{byte(1 + rng.IntN(255))}, 4096)
			copy(want[off:], data)
			if _, err := j.Append(ctx, journal.Record{Kind: journal.KindWrite, Volume: "d", Offset: off, Data: data}); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.Now().Add(30 * time.Second)
		for j.Stats().Applied.Pos < j.Stats().Durable {
			if time.Now().After(deadline) {
				t.Fatal("not applied")
			}
			time.Sleep(20 * time.Millisecond)
		}
		rv, err := j.Materialize(ctx, journal.Newest(), fmt.Sprint(round))
		if err != nil {
			t.Fatal(err)
		}
		got, err := readRBD(o, rv.Volumes[0].Path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			n := 0
			for i := range got {
				if got[i] != want[i] {
					n++
				}
			}
			t.Fatalf("round %d: recovered clone %s differs from what was written in %d bytes (applied %+v)", round, rv.Volumes[0].Path, n, j.Stats().Applied)
		}
	}
}

// TestReplicationThroughput measures, in one run, replication end to
// end — guest writes through vhost-user to protected volumes, the agent,
// the hub on loopback journaling and applying — with the hub's store a
// directory and then the Ceph pool: writers run unpaced for 5 s, then the
// hub catches up (protecting, nothing outstanding). It reports the
// mirrored bytes per second of the whole run (writes and catch-up) and
// the resync bytes (queue overflows), and fails if the hub does not
// catch up.
func TestReplicationThroughput(t *testing.T) {
	pool := cluster.CreatePool(t, "rbd")
	for _, kind := range []string{"dir", "ceph"} {
		r := reptest.New(t)
		if kind == "ceph" {
			r.HubCfg.Backend = openBackend(t, pool) // the hub closes it
		}
		r.HubCfg.Retain = 0
		r.StartHub()
		vols := []*reptest.Vol{r.AddVolume("root", 32<<20), r.AddVolume("data", 32<<20)}
		r.StartAgent(reptest.ProtectAll(vols...))
		r.WaitProtected(120*time.Second, vols...)
		applied := func() (mirrored, remote uint64) {
			for _, v := range r.HubVolumes() {
				mirrored += v.AppliedBytes
				remote += v.RemoteReadBytes
			}
			return
		}
		m0, r0 := applied()
		stop := make(chan struct{})
		start := time.Now()
		wait := r.RunWriters(stop, vols...)
		time.Sleep(5 * time.Second)
		close(stop)
		writes := wait()
		r.WaitProtected(300*time.Second, vols...)
		el := time.Since(start)
		m1, r1 := applied()
		t.Logf("%-4s store: %d guest writes (4-64 KiB) in 5 s; hub caught up after %v: %.1f MiB/s mirrored (%d MiB), %.1f MiB resynced after overflows",
			kind, writes, el.Round(time.Millisecond), float64(m1-m0)/el.Seconds()/(1<<20), (m1-m0)>>20, float64(r1-r0)/(1<<20))
		r.Agent.Abort()
		r.Agent = nil
		r.Hub.Close()
		r.Hub = nil
	}
}

// TestRedoShrunkPass: an apply pass that writes near a volume's end and
// then shrinks it, cut short after the replica was written and synced
// (its final state write fails), is redone at the next open from the
// pass's start. The redo writes past the end of the already shrunk RBD
// image (librbd refuses or clips such a write, so the store grows the
// image first, as a file grows) and zeroes past it; the replica then
// holds exactly what the journal says. This was TestJournalCrashModel's
// intermittent "rbd: ret=-1, Operation not permitted" after a kill -9.
func TestRedoShrunkPass(t *testing.T) {
	pool := cluster.CreatePool(t, "rbd")
	b := openBackend(t, pool)
	defer b.Close()
	injected := errors.New("injected: the pass's final state write fails")
	var armed, synced atomic.Bool
	hook := func(op, path string) error {
		switch {
		case op == "image-sync" && armed.Load():
			synced.Store(true)
		case op == "state-write" && synced.Load():
			return injected
		}
		return nil
	}
	j, err := journal.Open("vm1", journal.Options{Store: b.Journal("vm1"), NoApplier: true, FaultHook: hook})
	if err != nil {
		t.Fatal(err)
	}
	const k = 1 << 10
	w1, w2, w3 := bytes.Repeat([]byte{0xa5}, 8*k), bytes.Repeat([]byte{0x5a}, 4*k), bytes.Repeat([]byte{0x3c}, 4*k)
	// The volume in a pass of its own: the redone pass starts with the
	// image as the cut pass left it.
	if _, err := j.Append(context.Background(), journal.Record{Kind: journal.KindVolume, Volume: "d", Size: 256 * k}); err != nil {
		t.Fatal(err)
	}
	if err := j.ApplyNow(); err != nil {
		t.Fatal(err)
	}
	armed.Store(true)
	recs := []journal.Record{
		{Kind: journal.KindWrite, Volume: "d", Offset: 192 * k, Data: w1},
		{Kind: journal.KindZero, Volume: "d", Offset: 224 * k, Length: 16 * k},
		{Kind: journal.KindWrite, Volume: "d", Offset: 4 * k, Data: w2},
		{Kind: journal.KindVolume, Volume: "d", Size: 128 * k},
		{Kind: journal.KindVolume, Volume: "d", Size: 192 * k},
		{Kind: journal.KindWrite, Volume: "d", Offset: 160 * k, Data: w3},
	}
	if _, err := j.Append(context.Background(), recs...); err != nil {
		t.Fatal(err)
	}
	if err := j.ApplyNow(); !errors.Is(err, injected) {
		t.Fatalf("apply: %v, want the injected state write error", err)
	}
	j.Close()
	want := make([]byte, 192*k)
	copy(want[4*k:], w2)
	copy(want[160*k:], w3)
	if got := cluster.Export(t, strings.TrimPrefix(b.Replica("vm1", "d"), "rbd:")); !bytes.Equal(got, want) {
		t.Fatalf("the cut pass did not write the replica: %d bytes", len(got))
	}
	// The replica holds the whole pass, shrunk and grown again; the state
	// says the pass is under way: Open redoes it.
	j, err = journal.Open("vm1", journal.Options{Store: b.Journal("vm1"), NoApplier: true})
	if err != nil {
		t.Fatalf("reopen, redoing the pass: %v", err)
	}
	defer j.Close()
	if st := j.Stats(); st.Applied.Pos != st.Durable {
		t.Fatalf("after the redo the applied position is %d, want %d", st.Applied.Pos, st.Durable)
	}
	if got := cluster.Export(t, strings.TrimPrefix(b.Replica("vm1", "d"), "rbd:")); !bytes.Equal(got, want) {
		n := len(got)
		for i := range min(len(got), len(want)) {
			if got[i] != want[i] {
				n = i
				break
			}
		}
		t.Fatalf("after the redo the replica is %d bytes, want %d; first difference at %d", len(got), len(want), n)
	}
}

// TestHalfCreatedReplica: librbd creates an image in steps (directory
// entry, id object, header); a hub killed between them leaves the
// replica's name taken by an image that neither opens nor can be created
// again. The next apply pass removes those remains and creates the
// replica.
func TestHalfCreatedReplica(t *testing.T) {
	pool := cluster.CreatePool(t, "rbd")
	b := openBackend(t, pool)
	defer b.Close()
	spec := strings.TrimPrefix(b.Replica("vm1", "d"), "rbd:")
	name := strings.TrimPrefix(spec, pool+"/")
	const id = "0123456789ab"
	put := func(val []byte, args ...string) {
		cmd := cluster.Command("rados", append([]string{"-p", pool}, args...)...)
		cmd.Stdin = bytes.NewReader(val)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("rados %v: %v: %s", args, err, out)
		}
	}
	put(cephString(id), "setomapval", "rbd_directory", "name_"+name)
	put(cephString(name), "setomapval", "rbd_directory", "id_"+id)
	put(cephString(id), "put", "rbd_id."+name, "-")
	if out, err := cluster.Run("rbd", "create", "--size", "1M", spec); err == nil || !strings.Contains(err.Error(), "File exists") {
		t.Fatalf("the remains of a cut creation: rbd create %s: %v %s, want File exists", spec, err, out)
	}
	j, err := journal.Open("vm1", journal.Options{Store: b.Journal("vm1"), NoApplier: true})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	data := bytes.Repeat([]byte{0x77}, 4096)
	if _, err := j.Append(context.Background(), journal.Record{Kind: journal.KindVolume, Volume: "d", Size: 1 << 20},
		journal.Record{Kind: journal.KindWrite, Volume: "d", Offset: 8192, Data: data}); err != nil {
		t.Fatal(err)
	}
	if err := j.ApplyNow(); err != nil {
		t.Fatalf("apply over the remains of a cut creation: %v", err)
	}
	want := make([]byte, 1<<20)
	copy(want[8192:], data)
	if got := cluster.Export(t, spec); !bytes.Equal(got, want) {
		t.Fatalf("the replica (%d bytes) does not hold the journal's write", len(got))
	}
}

// cephString is a string as Ceph encodes it: a little-endian 32-bit
// length, then the bytes.
func cephString(s string) []byte {
	return append(binary.LittleEndian.AppendUint32(nil, uint32(len(s))), s...)
}

// TestStateFenced: two hubs on one pool. Hub A holds vm1 with a long
// lease; its lock is broken (as an operator fences a hub that hangs) and
// hub B takes vm1 and writes its state. A, which has not noticed yet (its
// next renewal is far off), can no longer write vm1's state: a volume
// state (PutVolume), the journal's applied state (PutState) and the
// segment index (CreateSegment) fail with ErrNotHeld and change nothing,
// because each is one RADOS operation that asserts A's lock. A hub that
// holds no lease on vm1 cannot write its state while B holds it either,
// and can once B lets go. A's renewal then reports the lease lost.
func TestStateFenced(t *testing.T) {
	pool := cluster.CreatePool(t, "rbd")
	a, err := cephstore.OpenBackend(cephstore.Config{Pool: pool, Conf: cluster.Conf, Lease: 30 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	jsA := a.Journal("vm1")
	ja, err := journal.Open("a", journal.Options{Store: jsA, NoApplier: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ja.Close()
	ctx := context.Background()
	if _, err := ja.Append(ctx, journal.Record{Kind: journal.KindVolume, Volume: "d", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := ja.ApplyNow(); err != nil {
		t.Fatal(err)
	}
	if err := a.PutVolume("vm1", "d", []byte(`{"by":"a"}`)); err != nil {
		t.Fatalf("the holder's state write: %v", err)
	}

	// Break A's lock.
	obj := "vhostdm-hub.vm.vm1"
	var info struct {
		Lockers []struct{ Name, Cookie string }
	}
	if err := json.Unmarshal([]byte(cluster.Must(t, "rados", "-p", pool, "lock", "info", obj, "vhostdm-hub", "--format=json")), &info); err != nil || len(info.Lockers) != 1 {
		t.Fatalf("lock info of %s: %v %+v", obj, err, info)
	}
	cluster.Must(t, "rados", "-p", pool, "lock", "break", obj, "vhostdm-hub", info.Lockers[0].Name, "--lock-cookie", info.Lockers[0].Cookie)
	brk := time.Now()

	b := openBackend(t, pool)
	defer b.Close()
	jsB := b.Journal("vm1")
	jb, err := journal.Open("b", journal.Options{Store: jsB, NoApplier: true})
	if err != nil {
		t.Fatalf("hub B takes vm1 after A's lock was broken: %v", err)
	}
	if err := b.PutVolume("vm1", "d", []byte(`{"by":"b"}`)); err != nil {
		t.Fatalf("the new holder's state write: %v", err)
	}
	stateB, err := jsB.GetState()
	if err != nil {
		t.Fatal(err)
	}
	segsB, err := jsB.Segments()
	if err != nil {
		t.Fatal(err)
	}

	// A still believes it holds vm1.
	if err := jsA.(interface{ LeaseErr() error }).LeaseErr(); err != nil {
		t.Fatalf("A noticed too early for this test (%v after the break): %v", time.Since(brk), err)
	}
	if err := a.PutVolume("vm1", "d", []byte(`{"by":"a, stale"}`)); !errors.Is(err, cephstore.ErrNotHeld) {
		t.Errorf("stale hub's volume state write: %v, want ErrNotHeld", err)
	} else {
		t.Logf("stale hub's volume state write: %v", err)
	}
	if err := jsA.PutState([]byte(`{"stale":true}`)); !errors.Is(err, cephstore.ErrNotHeld) {
		t.Errorf("stale hub's journal state write: %v, want ErrNotHeld", err)
	}
	if seg, err := jsA.CreateSegment(1 << 40); !errors.Is(err, cephstore.ErrNotHeld) {
		if seg != nil {
			seg.Close()
		}
		t.Errorf("stale hub's segment creation: %v, want ErrNotHeld", err)
	}
	// A hub holding nothing on vm1.
	c := openBackend(t, pool)
	defer c.Close()
	if err := c.PutVolume("vm1", "d", []byte(`{"by":"c"}`)); !errors.Is(err, cephstore.ErrNotHeld) {
		t.Errorf("a state write of a hub not holding vm1, while B holds it: %v, want ErrNotHeld", err)
	}
	if got, err := b.GetVolume("vm1", "d"); err != nil || string(got) != `{"by":"b"}` {
		t.Errorf("volume state after the refused writes: %q %v, want B's", got, err)
	}
	if got, err := jsB.GetState(); err != nil || !bytes.Equal(got, stateB) {
		t.Errorf("journal state after the refused write: %q %v, want B's", got, err)
	}
	if got, err := jsB.Segments(); err != nil || len(got) != len(segsB) {
		t.Errorf("segment index after the refused creation: %v %v, want %v", got, err, segsB)
	}
	if err := jb.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.PutVolume("vm1", "d", []byte(`{"by":"c"}`)); err != nil {
		t.Errorf("a state write of a hub not holding vm1, nobody holding it: %v", err)
	}
	// A's renewal (every 10 s) finds its lease gone and does not take vm1
	// again although nobody holds it.
	deadline := brk.Add(25 * time.Second)
	for jsA.(interface{ LeaseErr() error }).LeaseErr() == nil {
		if time.Now().After(deadline) {
			t.Fatal("A's renewal did not report the broken lease")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := a.PutVolume("vm1", "d", []byte(`{"by":"a, stale"}`)); !errors.Is(err, cephstore.ErrNotHeld) {
		t.Errorf("stale hub's volume state write after its renewal failed: %v, want ErrNotHeld", err)
	}
	if got, err := c.GetVolume("vm1", "d"); err != nil || string(got) != `{"by":"c"}` {
		t.Errorf("volume state: %q %v, want C's", got, err)
	}
}
