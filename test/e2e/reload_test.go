package e2e

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/test/e2e/harness"
	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// TestLiveReloadUnderWriter runs the guest's verified writer while the host
// runs `vhostdm ctl reload` 20 times, alternating between two tables that
// map the same image differently (one linear line, and the same data split
// into four lines). The guest must see no I/O error and every write must
// verify, in the guest and on the host.
func TestLiveReloadUnderWriter(t *testing.T) {
	e := needEnv(t)
	const size = 32 << 20
	cfg, img := linearConfig(t, size, true, "e2e-reload")
	startVhostdm(t, e, filepath.Join(cfg.Dir, "vm.toml"))
	bin, err := e.Vhostdm()
	if err != nil {
		t.Fatal(err)
	}
	sectors := size / 512
	one := fmt.Sprintf("0 %d linear %s 0", sectors, img)
	var split strings.Builder
	cuts := []int{0, 1000, 20000, 20008, sectors}
	for i := 0; i+1 < len(cuts); i++ {
		fmt.Fprintf(&split, "%d %d linear %s %d\n", cuts[i], cuts[i+1]-cuts[i], img, cuts[i])
	}
	vm := startVM(t, e, harness.VMConfig{
		Disks:  disksOf(cfg),
		Steps:  []string{proto.StepWriter},
		Params: writerParams(25),
	})
	waitFlushes(t, vm, 2, guestTimeout, "the writer's first flushes")
	start := time.Now()
	for i := 0; i < 20; i++ {
		table := one
		if i%2 == 0 {
			table = split.String()
		}
		out, err := exec.Command(bin, "ctl", "--qmp", cfg.QMP.Socket, "reload", "d0", "--table", table).CombinedOutput()
		if err != nil {
			t.Fatalf("reload %d: %v: %s", i, err, out)
		}
		time.Sleep(150 * time.Millisecond) // let the writer run on each table
	}
	t.Logf("20 reloads in %v", time.Since(start).Round(time.Millisecond))
	out, err := exec.Command(bin, "ctl", "--qmp", cfg.QMP.Socket, "table", "d0").CombinedOutput()
	if err != nil || strings.Count(string(out), "linear") != 1 {
		t.Fatalf("table after the last reload (one line expected): %v\n%s", err, out)
	}
	// An invalid table is refused and changes nothing, under I/O.
	out, err = exec.Command(bin, "ctl", "--qmp", cfg.QMP.Socket, "reload", "d0", "--table",
		fmt.Sprintf("0 100 linear %s 0\n200 %d linear %s 200", img, sectors-200, img)).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "line 2: gap in table: starts at 200, previous target ends at 100") {
		t.Fatalf("invalid reload: %v\n%s", err, out)
	}
	run, err := vm.Wait(guestTimeout)
	if err != nil {
		t.Fatal(err)
	}
	logRun(t, run)
	if f := run.Failed(); f != "" {
		t.Fatalf("the guest saw the reloads:\n%s", f)
	}
	res := run.Result(proto.StepWriter, "")
	if res == nil {
		t.Fatal("no final writer result")
	}
	t.Logf("writer: %v", res.Values)
	for _, err := range harness.CheckWriterExact(readFile(t, img)(), writerSeed, res.Values["writes"]) {
		t.Errorf("host check: %v", err)
	}
}
