package raid

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// rebuildUnderLoad rebuilds leg 1 of a raid1 over two files of legBytes
// while a guest writes and reads random 4 KiB blocks for load; it returns
// the guest's operations per second and the sectors recovered meanwhile,
// once the rebuild finished and check found 0 mismatches.
func rebuildUnderLoad(t *testing.T, legBytes int64, params string, load time.Duration) (float64, uint64) {
	t.Helper()
	dir := t.TempDir()
	var legs []string
	for i := range 2 {
		p := filepath.Join(dir, fmt.Sprintf("leg%d.img", i))
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, legBytes); err != nil {
			t.Fatal(err)
		}
		legs = append(legs, p)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	sectors := uint64(legBytes / 512)
	np := 3 + len(strings.Fields(params))
	d := create(t, m, "r", fmt.Sprintf("0 %d raid raid1 %d 0 rebuild 1 %s 2 - %s - %s", sectors, np, params, legs[0], legs[1]))
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 4096)
	ops := 0
	start := time.Now()
	for time.Since(start) < load {
		s := rng.Uint64N(sectors/8) * 8
		op := mapper.OpRead
		if ops%2 == 0 {
			op = mapper.OpWrite
			buf[0] = byte(ops)
		}
		submit(t, d, op, s, buf)
		ops++
	}
	el := time.Since(start)
	f := strings.Fields(d.Status(mapper.StatusInfo, false)[0].Params)
	done, _ := strconv.ParseUint(strings.Split(f[3], "/")[0], 10, 64)
	if f[4] == "idle" {
		done = sectors
	}
	t0 := time.Now()
	st := waitSettled(t, d)
	t.Logf("%q: rebuild settled in %v", params, time.Since(t0))
	if f := strings.Fields(st); f[2] != "AA" {
		t.Fatalf("%s: rebuild did not finish: %q", params, st)
	}
	if _, err := d.Message(0, []string{"check"}); err != nil {
		t.Fatal(err)
	}
	if st := waitSettled(t, d); strings.Fields(st)[5] != "0" {
		t.Errorf("%s: check after the rebuild: %q", params, st)
	}
	return float64(ops) / el.Seconds(), done
}

// TestRecoveryRate rebuilds a raid1 leg under a guest writer, without
// rate limits and with min_recovery_rate/max_recovery_rate: with them the
// rebuild gives way to the guest above the minimum (it recovers no more
// than the minimum rate allows while the guest is busy) and finishes at
// up to the maximum once the guest stops. The guest's IOPS of both runs
// are logged.
func TestRecoveryRate(t *testing.T) {
	const leg = 32 << 20
	const load = time.Second
	const minKB = 2048
	iops0, done0 := rebuildUnderLoad(t, leg, "", load)
	iops1, done1 := rebuildUnderLoad(t, leg, fmt.Sprintf("min_recovery_rate %d max_recovery_rate 1048576", minKB), load)
	t.Logf("guest IOPS during the rebuild: %.0f without limits (%d sectors recovered in %v), %.0f with min_recovery_rate %d (%d sectors)",
		iops0, done0, load, iops1, minKB, done1)
	// While busy, the rebuild runs at the minimum (2 sectors a kB): allow
	// half as much again, and two units.
	if limit := uint64(1.5*minKB*2*load.Seconds()) + 2*raid1Unit; done1 > limit {
		t.Errorf("with min_recovery_rate %d kB/s the rebuild recovered %d sectors in %v of guest I/O, want at most %d", minKB, done1, load, limit)
	}
}
