package snapshot_test

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

var (
	modelSeed = flag.Uint64("model.seed", 0, "run the snapshot model test with this seed only")
	modelOps  = flag.Int("model.ops", 400, "operations per snapshot model run")
	modelLog  = flag.Bool("model.log", false, "log every operation of the snapshot model test")
)

const (
	originSectors = 2048
	maxSnaps      = 3
)

// msnap is the model of one snapshot.
type msnap struct {
	name, cow  string
	kind       string // P, PO or N
	chunk      uint64
	data       []byte
	used       map[uint64]bool
	capacity   int
	invalid    bool
	overflowed bool
}

// capacity returns how many exceptions a COW device of cowSectors holds.
func capacity(kind string, chunk, cowSectors uint64) int {
	total := cowSectors / chunk
	if kind == "N" {
		return int(total)
	}
	stride := chunk*512/16 + 1
	n := 0
	for c := uint64(2); c < total; c++ {
		if c%stride != 1 {
			n++
		}
	}
	return n
}

type model struct {
	t       *testing.T
	rng     *rand.Rand
	mems    map[string]*mappertest.Mem
	cowSize map[string]int
	m       *mapper.Manager
	origin  []byte
	snaps   map[string]*msnap
	nextID  int
	merging *msnap // the snapshot being merged into the origin
	lastAl  uint64 // merge status: sectors allocated last seen
	freeCow []string
}

func (md *model) manager() {
	set := &memSet{mems: md.mems}
	md.m = mapper.NewManager(mapper.ManagerOptions{Open: set.open, Logger: slog.New(slog.DiscardHandler)})
}

type memSet struct{ mems map[string]*mappertest.Mem }

func (s *memSet) open(name string, readOnly bool) (mapper.Backend, error) {
	if m := s.mems[name]; m != nil {
		return m, nil
	}
	return nil, mapper.Errorf(mapper.ErrNotFound, "no backend %s", name)
}

func (md *model) baseTable() string {
	if md.merging != nil {
		return fmt.Sprintf("0 %d snapshot-merge orig %s %s %d", originSectors, md.merging.cow, md.merging.kind, md.merging.chunk)
	}
	return fmt.Sprintf("0 %d snapshot-origin orig", originSectors)
}

func (s *msnap) table() string {
	return fmt.Sprintf("0 %d snapshot orig %s %s %d", originSectors, s.cow, s.kind, s.chunk)
}

func (md *model) dev(name string) *mapper.Device {
	d, err := md.m.Get(name)
	if err != nil {
		md.t.Fatal(err)
	}
	return d
}

// write writes to a view and updates the model chunk by chunk, as the
// targets split requests.
func (md *model) write(name string) {
	s, n := md.rng.Uint64N(originSectors), 1+md.rng.Uint64N(64)
	n = min(n, originSectors-s)
	buf := make([]byte, n*512)
	for i := range buf {
		buf[i] = byte(md.rng.Uint32())
	}
	op := mapper.OpWrite
	var data [][]byte = [][]byte{buf}
	if md.rng.IntN(8) == 0 {
		op, data = mapper.OpWriteZeroes, nil
		clear(buf)
	}
	if md.merging != nil && md.wouldFill(name, s, n) {
		// The merge's own copy-outs, booked in the model when it
		// started, happen later in the target: skip writes whose
		// outcome would depend on that timing.
		return
	}
	err := md.dev(name).Submit(&mapper.Request{Op: op, Sector: s, Sectors: n, Data: data})
	if name == "base" {
		if err != nil {
			md.t.Fatalf("origin %s %d+%d: %v", op, s, n, err)
		}
		// Copy-outs first: each snapshot keeps the old data.
		for _, sn := range md.snaps {
			if sn.invalid {
				continue
			}
			for c := s / sn.chunk; c*sn.chunk < s+n; c++ {
				if sn.used[c] {
					continue
				}
				if len(sn.used) == sn.capacity {
					sn.invalid = true
					break
				}
				sn.used[c] = true
			}
		}
		copy(md.origin[s*512:], buf)
		return
	}
	sn := md.snaps[name]
	wantErr := false
	applied := uint64(0)
	for c := s / sn.chunk; c*sn.chunk < s+n; c++ {
		if sn.invalid || sn.overflowed {
			wantErr = true
			break
		}
		if !sn.used[c] {
			if len(sn.used) == sn.capacity {
				if sn.kind == "PO" {
					sn.overflowed = true
				} else {
					sn.invalid = true
				}
				wantErr = true
				break
			}
			sn.used[c] = true
		}
		end := min((c+1)*sn.chunk, s+n)
		applied = end - s
	}
	copy(sn.data[s*512:], buf[:applied*512])
	if wantErr != (err != nil) {
		md.t.Fatalf("snapshot %s (%s, %d/%d chunks) %s %d+%d: error %v, model expects error %v", name, sn.kind, len(sn.used), sn.capacity, op, s, n, err, wantErr)
	}
}

func (md *model) check(name string, s, n uint64) {
	buf := make([]byte, n*512)
	err := md.dev(name).Submit(&mapper.Request{Op: mapper.OpRead, Sector: s, Sectors: n, Data: [][]byte{buf}})
	want := md.origin
	if name != "base" {
		sn := md.snaps[name]
		if sn.invalid {
			if !errors.Is(err, mapper.ErrIO) {
				md.t.Fatalf("read of invalid snapshot %s: %v", name, err)
			}
			if st := md.dev(name).Status(mapper.StatusInfo, false)[0].Params; st != "Invalid" {
				md.t.Fatalf("invalid snapshot %s status %q", name, st)
			}
			return
		}
		if sn.overflowed {
			if st := md.dev(name).Status(mapper.StatusInfo, false)[0].Params; st != "Overflow" {
				md.t.Fatalf("overflowed snapshot %s status %q", name, st)
			}
		}
		want = sn.data
	}
	if err != nil {
		md.t.Fatalf("read %s %d+%d: %v", name, s, n, err)
	}
	if !bytes.Equal(buf, want[s*512:(s+n)*512]) {
		for i := uint64(0); i < n; i++ {
			if !bytes.Equal(buf[i*512:(i+1)*512], want[(s+i)*512:(s+i+1)*512]) {
				md.t.Fatalf("%s: sector %d differs from the model", name, s+i)
			}
		}
	}
}

func (md *model) checkAll() {
	md.check("base", 0, originSectors)
	for name := range md.snaps {
		md.check(name, 0, originSectors)
	}
}

func (md *model) create() {
	if len(md.snaps) >= maxSnaps || md.merging != nil || len(md.freeCow) == 0 {
		return
	}
	cow := md.freeCow[0]
	md.freeCow = md.freeCow[1:]
	kind := []string{"P", "PO", "N"}[md.rng.IntN(3)]
	chunk := []uint64{8, 16, 32}[md.rng.IntN(3)]
	md.nextID++
	sn := &msnap{name: fmt.Sprintf("s%d", md.nextID), cow: cow, kind: kind, chunk: chunk,
		data: append([]byte(nil), md.origin...), used: map[uint64]bool{},
		capacity: capacity(kind, chunk, uint64(md.cowSize[cow])/512)}
	// Clear the COW device, as lvcreate does.
	md.mems[cow].WriteZeroes(0, int64(md.cowSize[cow]), false)
	md.mems[cow].Flush()
	// Suspend the origin, create the snapshot, resume: what a host
	// does to take a consistent snapshot of a running guest.
	base := md.dev("base")
	if err := base.Suspend(false); err != nil {
		md.t.Fatal(err)
	}
	if _, err := md.m.CreateTable(sn.name, "", false, sn.table()); err != nil {
		md.t.Fatalf("create %s: %v", sn.table(), err)
	}
	if err := base.Resume(); err != nil {
		md.t.Fatal(err)
	}
	md.snaps[sn.name] = sn
}

func (md *model) remove(name string) {
	if err := md.m.Remove(name, false); err != nil {
		md.t.Fatal(err)
	}
	md.freeCow = append(md.freeCow, md.snaps[name].cow)
	delete(md.snaps, name)
}

func (md *model) reload(name string) {
	d := md.dev(name)
	table := d.Status(mapper.StatusTable, false)[0].String()
	if err := d.Reload(table); err != nil {
		md.t.Fatalf("reload %s: %v", table, err)
	}
}

// startMerge switches the origin to snapshot-merge of a persistent
// snapshot and removes the snapshot's own device.
func (md *model) startMerge() {
	if md.merging != nil {
		return
	}
	for _, name := range md.snapNames() {
		sn := md.snaps[name]
		if sn.kind == "N" || sn.invalid || !md.mergeFits(sn) {
			continue
		}
		md.merging = sn
		if *modelLog {
			md.t.Logf("merge %s (%s %d, %d chunks)", sn.name, sn.kind, sn.chunk, len(sn.used))
			for _, o := range md.snapNames() {
				x := md.snaps[o]
				md.t.Logf("  %s %s %d used %d/%d invalid=%v", o, x.kind, x.chunk, len(x.used), x.capacity, x.invalid)
			}
		}
		base := md.dev("base")
		if err := base.Suspend(false); err != nil {
			md.t.Fatal(err)
		}
		if err := base.Load(md.baseTable()); err != nil {
			md.t.Fatalf("load %s: %v", md.baseTable(), err)
		}
		if err := base.Resume(); err != nil {
			md.t.Fatal(err)
		}
		if err := md.m.Remove(sn.name, false); err != nil {
			md.t.Fatal(err)
		}
		delete(md.snaps, sn.name)
		md.origin = sn.data
		md.lastAl = 1 << 62
		return
	}
}

// wouldFill reports whether a write of [s, s+n) to view name needs a
// chunk some snapshot has no room for.
func (md *model) wouldFill(name string, s, n uint64) bool {
	for sname, sn := range md.snaps {
		if sn.invalid || (name != "base" && name != sname) {
			continue
		}
		need := 0
		for c := s / sn.chunk; c*sn.chunk < s+n; c++ {
			if !sn.used[c] {
				need++
			}
		}
		if len(sn.used)+need > sn.capacity {
			return true
		}
	}
	return false
}

// mergeFits reports whether merging sn leaves the other snapshots valid:
// the merge writes every chunk of sn to the origin, which copies it out to
// them first. If so it books those copy-outs in the model.
func (md *model) mergeFits(sn *msnap) bool {
	need := map[*msnap]map[uint64]bool{}
	for _, o := range md.snaps {
		if o == sn || o.invalid {
			continue
		}
		need[o] = map[uint64]bool{}
		for c := range sn.used {
			for oc := c * sn.chunk / o.chunk; oc*o.chunk < (c+1)*sn.chunk; oc++ {
				if !o.used[oc] {
					need[o][oc] = true
				}
			}
		}
		if len(o.used)+len(need[o]) > o.capacity {
			return false
		}
	}
	for o, cs := range need {
		for c := range cs {
			o.used[c] = true
		}
	}
	return true
}

var usageRE = regexp.MustCompile(`^(\d+)/(\d+) (\d+)$`)

// mergeProgress checks that a merge's allocation only falls, and ends the
// merge (back to snapshot-origin) once it is done.
func (md *model) mergeProgress(finish bool) {
	if md.merging == nil {
		return
	}
	base := md.dev("base")
	for {
		st := base.Status(mapper.StatusInfo, false)[0].Params
		u := usageRE.FindStringSubmatch(st)
		if u == nil {
			md.t.Fatalf("merge status %q", st)
		}
		al, _ := strconv.ParseUint(u[1], 10, 64)
		meta, _ := strconv.ParseUint(u[3], 10, 64)
		if al > md.lastAl {
			md.t.Fatalf("merge status rose from %d to %d sectors", md.lastAl, al)
		}
		md.lastAl = al
		if al == meta {
			break
		}
		if !finish {
			return
		}
		time.Sleep(time.Millisecond)
	}
	cow := md.merging.cow
	md.merging = nil
	if err := base.Reload(md.baseTable()); err != nil {
		md.t.Fatal(err)
	}
	md.freeCow = append(md.freeCow, cow)
}

// crash flushes every device, drops what the backends did not make
// durable, and loads every table again from the durable state in a new
// manager, as a restart after kill -9 would.
func (md *model) crash() {
	for _, d := range md.m.Devices() {
		if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
			md.t.Fatal(err)
		}
	}
	// Stop everything at once, as kill -9 does: the merge must not run
	// on between the crash of one backend and that of the next.
	for _, d := range md.m.Devices() {
		if err := d.Suspend(true); err != nil {
			md.t.Fatal(err)
		}
	}
	old := md.m
	fresh := map[string]*mappertest.Mem{}
	for name, m := range md.mems {
		m.Crash()
		n := mappertest.NewMem(name, len(m.Bytes()))
		n.WriteAt([][]byte{m.Bytes()}, 0)
		n.Flush()
		fresh[name] = n
	}
	old.Close() // whatever it writes goes to the old memories
	md.mems = fresh
	md.manager()
	// Snapshots first, then the origin, as LVM activates them: a merge
	// that restarts must find every other snapshot to copy out to.
	for name, sn := range md.snaps {
		if sn.kind == "N" {
			delete(md.snaps, name)
			md.freeCow = append(md.freeCow, sn.cow)
			continue
		}
		sn.overflowed = false
		if _, err := md.m.CreateTable(name, "", false, sn.table()); err != nil {
			md.t.Fatalf("reload %s after crash: %v", sn.table(), err)
		}
	}
	if _, err := md.m.CreateTable("base", "", false, md.baseTable()); err != nil {
		md.t.Fatalf("reload origin after crash: %v", err)
	}
	md.checkAll()
	// The kernel does not keep a merge's allocation count on disk: after
	// a restart it is computed again from the remaining exceptions.
	md.lastAl = 1 << 62
}

func runModel(t *testing.T, seed uint64, ops int) {
	md := &model{t: t, rng: rand.New(rand.NewPCG(seed, 0x5a)), mems: map[string]*mappertest.Mem{},
		cowSize: map[string]int{}, snaps: map[string]*msnap{}, origin: make([]byte, originSectors*512)}
	md.mems["orig"] = mappertest.NewMem("orig", originSectors*512)
	for i := 0; i < maxSnaps+1; i++ {
		name := fmt.Sprintf("cow%d", i)
		size := []int{48 << 10, 160 << 10, 600 << 10, 1200 << 10}[md.rng.IntN(4)]
		md.mems[name] = mappertest.NewMem(name, size)
		md.cowSize[name] = size
		md.freeCow = append(md.freeCow, name)
	}
	md.manager()
	defer func() { md.m.Close() }()
	if _, err := md.m.CreateTable("base", "", false, md.baseTable()); err != nil {
		t.Fatal(err)
	}
	md.create()
	for i := 0; i < ops; i++ {
		names := append([]string{"base"}, md.snapNames()...)
		name := names[md.rng.IntN(len(names))]
		k := md.rng.IntN(100)
		if *modelLog {
			t.Logf("op %d: %s k=%d merging=%v", i, name, k, md.merging != nil)
		}
		switch {
		case k < 40:
			md.write(name)
		case k < 65:
			s := md.rng.Uint64N(originSectors)
			md.check(name, s, 1+md.rng.Uint64N(min(originSectors-s, 128)))
		case k < 72:
			if err := md.dev(name).Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil && name == "base" {
				t.Fatal(err)
			}
		case k < 80:
			md.create()
		case k < 84:
			md.reload(name)
		case k < 87:
			if name != "base" {
				md.remove(name)
			}
		case k < 91:
			md.crash()
		case k < 95:
			md.startMerge()
		default:
			md.mergeProgress(md.rng.IntN(3) == 0)
		}
		md.mergeProgress(false)
	}
	md.mergeProgress(true)
	md.checkAll()
}

// snapNames returns the snapshots' names in order, for reproducible runs.
func (md *model) snapNames() []string {
	var names []string
	for n := range md.snaps {
		names = append(names, n)
	}
	sortStrings(names)
	return names
}

func sortStrings(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// TestModel runs seeded random sequences of origin and snapshot writes and
// reads, flushes, snapshot creation under a suspended origin, reloads,
// removals, crashes with reloads from durable state, and merges under I/O,
// against a model of the origin and each snapshot (overflow predicted from
// the COW device's capacity). A failure names its seed: rerun it with
// -model.seed=N.
func TestModel(t *testing.T) {
	seeds := []uint64{1, 2, 3, 4, 5, 6, 7, 8}
	if *modelSeed != 0 {
		seeds = []uint64{*modelSeed}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			defer func() {
				if t.Failed() {
					t.Logf("reproduce with: go test ./targets/snapshot -run TestModel -model.seed=%d", seed)
				}
			}()
			runModel(t, seed, *modelOps)
		})
	}
}
