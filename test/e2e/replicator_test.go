package e2e

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// replSetup is a VM's two disks replicated through one ringbuffer log:
// site 0 (local, sync) on the primary images, site 1 (async) on the site
// images, all of them files on the host.
type replSetup struct {
	cfg       *harness.Config
	size      int64
	primaries []string // site 0 images, one per disk
	sites     []string // site 1 images, one per disk
}

// Names of the replicated setup's devices.
const (
	replDev    = "rep"
	replSite   = 1
	replRegion = 1024 // sectors: 512 KiB regions in the site's dirty logs
)

// replicatorConfig builds the setup: a replicator over a 16 MiB log with
// blockdev sites 0 (sync) and 1 (async), and two replicator-dev devices of
// size bytes each, exported writable. Site 1 has disk dirty logs (nosync:
// every image starts zero), so what it misses survives a restart.
func replicatorConfig(t *testing.T, size int64, serial string) *replSetup {
	t.Helper()
	dir, sd := t.TempDir(), sockDir(t)
	logImg := sparse(t, filepath.Join(dir, "rlog.img"), 16<<20)
	s := &replSetup{size: size}
	s.cfg = &harness.Config{
		QMP: harness.QMPConfig{Socket: filepath.Join(sd, "qmp.sock")},
		Devices: []harness.DeviceConfig{{Name: replDev,
			Table: fmt.Sprintf("0 8 replicator ringbuffer 2 %s 0 blockdev 1 0 blockdev 2 %d async", logImg, replSite)}},
	}
	for i := range 2 {
		p := sparse(t, filepath.Join(dir, fmt.Sprintf("primary%d.img", i)), size)
		r := sparse(t, filepath.Join(dir, fmt.Sprintf("site%d.img", i)), size)
		dl := sparse(t, filepath.Join(dir, fmt.Sprintf("site%d.dlog", i)), 1<<20)
		s.primaries, s.sites = append(s.primaries, p), append(s.sites, r)
		name := fmt.Sprintf("d%d", i)
		s.cfg.Devices = append(s.cfg.Devices, harness.DeviceConfig{Name: name,
			Table: fmt.Sprintf("0 %d replicator-dev /dev/mapper/%s %d 0 1 %s nolog 0 %d 1 %s disk 3 %s %d nosync",
				size/512, replDev, i+1, p, replSite, r, dl, replRegion)})
		s.cfg.Exports = append(s.cfg.Exports, harness.ExportConfig{ID: fmt.Sprintf("x%d", i), Device: name,
			Socket: filepath.Join(sd, fmt.Sprintf("x%d.sock", i)), NumQueues: 2, Writable: true,
			LogicalBlockSize: 512, Serial: fmt.Sprintf("%s-%d", serial, i)})
	}
	writeConfig(t, dir, s.cfg)
	return s
}

// replSiteStatus is one site link's part of the replicator's INFO status.
type replSiteStatus struct {
	nr                        uint32
	policy, state             string
	ios, bytes, ageMS         int64
	inSync, regions           int64
	line                      string // the whole INFO line
	tailSeq, headSeq, logUsed int64
}

// replicatorSite parses the replicator's INFO status ("ringbuffer <dev>
// A <tail> <head> <used>/<size> <#slinks> {<nr> <policy> <state> <ios>
// <bytes> <age_ms> <in_sync>/<regions>}...") and returns site nr's part.
func replicatorSite(t *testing.T, q *harness.QMP, nr uint32) replSiteStatus {
	t.Helper()
	line := dmStatus(t, q, replDev)
	w := strings.Fields(line)
	bad := func(why string) {
		t.Fatalf("replicator status %q: %s", line, why)
	}
	if len(w) < 7 || w[0] != "ringbuffer" {
		bad("not ringbuffer <dev> <A|D> <tail> <head> <used>/<size> <#slinks> ...")
	}
	num := func(s string) int64 {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			bad(fmt.Sprintf("%q is not a number", s))
		}
		return n
	}
	frac := func(s string) (int64, int64) {
		a, b, ok := strings.Cut(s, "/")
		if !ok {
			bad(fmt.Sprintf("%q is not <n>/<m>", s))
		}
		return num(a), num(b)
	}
	st := replSiteStatus{line: line, tailSeq: num(w[3]), headSeq: num(w[4])}
	st.logUsed, _ = frac(w[5])
	n := int(num(w[6]))
	if len(w) != 7+7*n {
		bad(fmt.Sprintf("%d words for %d site links", len(w), n))
	}
	for i := range n {
		g := w[7+7*i : 14+7*i]
		if uint32(num(g[0])) != nr {
			continue
		}
		st.nr, st.policy, st.state = nr, g[1], g[2]
		st.ios, st.bytes, st.ageMS = num(g[3]), num(g[4]), num(g[5])
		st.inSync, st.regions = frac(g[6])
		return st
	}
	bad(fmt.Sprintf("no site link %d", nr))
	return st
}

// waitDrained polls the replicator's status until site nr is active, in
// sync and has no backlog, and returns that status.
func waitDrained(t *testing.T, q *harness.QMP, nr uint32, timeout time.Duration) replSiteStatus {
	t.Helper()
	start := time.Now()
	for {
		st := replicatorSite(t, q, nr)
		if st.state == "active" && st.ios == 0 && st.bytes == 0 && st.inSync == st.regions {
			t.Logf("site %d drained %v after the guest: %s", nr, time.Since(start).Round(time.Millisecond), st.line)
			return st
		}
		if time.Since(start) > timeout {
			t.Fatalf("site %d did not drain within %v: %s", nr, timeout, st.line)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkSitesIdentical requires every site image to equal its primary.
func (s *replSetup) checkSitesIdentical(t *testing.T) {
	t.Helper()
	for i := range s.primaries {
		p := mustRead(t, s.primaries[i])
		if d := firstDiff(mustRead(t, s.sites[i]), p); d != "" {
			t.Errorf("disk %d: the async site's image is not identical to the primary: %s", i, d)
		}
	}
}

// TestReplicatorTwoDisks boots a guest on two replicator-dev disks sharing
// one log: the verify plan on vda, the verified writer on vdb. After the
// guest ends, the async site drains (its backlog in the replicator's
// status reaches 0) and both site images are byte-identical to the
// primaries, which hold the guest's data.
func TestReplicatorTwoDisks(t *testing.T) {
	e := needEnv(t)
	const (
		size                      = 16 << 20
		seed, coverage, maxBlocks = 11011, 50, 64
		writerSecs                = 6
	)
	s := replicatorConfig(t, size, "e2e-repl")
	startVhostdm(t, e, filepath.Join(s.cfg.Dir, "vm.toml"))
	q := dialQMP(t, s.cfg.QMP.Socket, "vhostdm")
	if st := replicatorSite(t, q, replSite); st.policy != "async" || st.state != "active" {
		t.Fatalf("site %d before the guest: want async active, got %s", replSite, st.line)
	}

	params := seedParams(seed, coverage, maxBlocks)
	params[proto.ParamDisks] = "2"
	params[proto.ParamDuration] = strconv.Itoa(writerSecs)
	params[proto.ParamQD] = strconv.Itoa(writerQD)
	params[proto.ParamFlushEvery] = strconv.Itoa(writerFlushEvery)
	run := runGuest(t, e, harness.VMConfig{
		Disks:  disksOf(s.cfg),
		CPUs:   2,
		Steps:  []string{proto.StepInfo, proto.StepVerify + "@vda", proto.StepWriter + "@vdb"},
		Params: params,
	})
	for _, d := range []string{"vda", "vdb"} {
		if di := info(t, run, d); di.Sectors != size/512 {
			t.Errorf("%s: guest capacity %d sectors, want %d", d, di.Sectors, size/512)
		}
	}
	wr := run.Result(proto.StepWriter, "vdb")
	if wr == nil || wr.Values["writes"] == 0 {
		t.Fatalf("no writer result with writes on vdb: %+v", wr)
	}
	writes := wr.Values["writes"]

	st := waitDrained(t, q, replSite, 30*time.Second)
	if st.tailSeq == 0 && st.headSeq == 0 {
		t.Errorf("the log's sequence numbers never moved: %s", st.line)
	}
	// The primaries hold the guest's data...
	for _, err := range harness.CheckPlan(mustRead(t, s.primaries[0]), harness.PlanCheck{Seed: seed, Coverage: coverage, MaxBlocks: maxBlocks}) {
		t.Errorf("primary of vda: %v", err)
	}
	for _, err := range harness.CheckWriterExact(mustRead(t, s.primaries[1]), seed, writes) {
		t.Errorf("primary of vdb after %d writes: %v", writes, err)
	}
	// ...and so do the site's images, byte for byte.
	s.checkSitesIdentical(t)
	t.Logf("%d writer writes on vdb and the verify plan on vda replicated to site %d", writes, replSite)
}

// TestReplicatorBackendCrash kills vhostdm (SIGKILL) under the guest's
// verified writer on a replicator-dev disk and restarts it on the same
// config: QEMU reconnects and resubmits what was in flight, so the guest
// sees no I/O error; the log replays, every write the guest saw completed
// is on the primary (exactly the last write in every block), and after
// the guest ends the async site converges to the primaries.
func TestReplicatorBackendCrash(t *testing.T) {
	e := needEnv(t)
	const (
		size                      = 16 << 20
		seed, coverage, maxBlocks = 12012, 25, 32
		writerSecs                = 12
	)
	s := replicatorConfig(t, size, "e2e-replcrash")
	be := startVhostdm(t, e, filepath.Join(s.cfg.Dir, "vm.toml"))

	params := seedParams(seed, coverage, maxBlocks)
	params[proto.ParamDisks] = "2"
	params[proto.ParamDuration] = strconv.Itoa(writerSecs)
	params[proto.ParamQD] = strconv.Itoa(writerQD)
	params[proto.ParamFlushEvery] = strconv.Itoa(writerFlushEvery)
	vm := startVM(t, e, harness.VMConfig{
		Disks:  disksOf(s.cfg),
		CPUs:   2, // writes from both CPUs go to both queues
		Steps:  []string{proto.StepVerify + "@vda", proto.StepWriter + "@vdb"},
		Params: params,
	})
	acked := waitFlushes(t, vm, 3, guestTimeout, "the writer's first flushes")
	t.Logf("writer at %d acknowledged writes: kill -9 %s", acked, be.Name)
	killed := time.Now()
	be.Kill()
	time.Sleep(300 * time.Millisecond)
	if err := be.Start(15 * time.Second); err != nil {
		t.Fatalf("restart %s on the same config: %v", be.Name, err)
	}
	t.Logf("%s restarted after %v", be.Name, time.Since(killed).Round(time.Millisecond))
	acked = waitFlushes(t, vm, 3, 90*time.Second, "flushes after the back end restarted (QEMU reconnect + in-flight resubmission)")
	t.Logf("writer progressed to %d acknowledged writes %v after the kill", acked, time.Since(killed).Round(time.Millisecond))

	writes := waitWriterDone(t, vm)
	// A failed step (the verify on vda ran before the writer) or an I/O
	// error fails the waits above; the host checks vda's plan below.
	waitGuestEnd(t, vm)
	t.Logf("writer: %d writes, no I/O error across the restart", writes)

	q := dialQMP(t, s.cfg.QMP.Socket, "vhostdm (restarted)")
	waitDrained(t, q, replSite, 30*time.Second)
	for _, err := range harness.CheckWriterExact(mustRead(t, s.primaries[1]), seed, writes) {
		t.Errorf("primary of vdb after the crash and %d writes: %v", writes, err)
	}
	for _, err := range harness.CheckPlan(mustRead(t, s.primaries[0]), harness.PlanCheck{Seed: seed, Coverage: coverage, MaxBlocks: maxBlocks}) {
		t.Errorf("primary of vda: %v", err)
	}
	s.checkSitesIdentical(t)
}
