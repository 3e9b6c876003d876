package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/reptest"
	"github.com/vhostdm/vhostdm/repagent/hub"
)

// waitVolume polls a hub child's status until fn accepts the volume.
func waitVolume(t *testing.T, p *hubProc, vol string, d time.Duration, fn func(hub.VolumeStatus) bool) hub.VolumeStatus {
	t.Helper()
	deadline := time.Now().Add(d)
	var last hub.VolumeStatus
	for time.Now().Before(deadline) {
		st, err := p.status()
		if err == nil {
			for _, vm := range st {
				for _, v := range vm.Volumes {
					if v.Volume == vol {
						last = v
						if fn(v) {
							return v
						}
					}
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("volume %s: condition not met after %v: %+v", vol, d, last)
	return last
}

// waitApplied polls a hub child's status until the replica images of vm
// hold the VM's newest consistent point: the journal is applied.
func waitApplied(t *testing.T, p *hubProc, vm string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st, err := p.status()
		if err == nil {
			for _, s := range st {
				if j := s.Journal; s.VM == vm && j != nil && j.AppliedSeq >= j.ConsistentSeq && j.Bytes == 0 {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			js, _ := json.Marshal(st)
			t.Fatalf("vm %s: journal not applied after %v: %s %v", vm, d, js, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cli runs a repagent-hub command in-process and returns its exit status
// and output.
func cli(args ...string) (int, string) {
	var out bytes.Buffer
	code := run(args, &out, &out)
	return code, out.String()
}

// TestFailbackCommands walks the failover and failback of
// docs/OPERATIONS.md with repagent-hub child processes and its commands:
// site A's volume replicates to hub B (`verify` finds it identical); A is
// lost, `promote --protect-to` at B writes a configuration that protects
// the recovery volume to A, and the recovery side writes; `seed` makes
// A's old disk the replica of a hub at A; the recovery volume connects
// to it and the checksum resync reads exactly the regions that differ;
// `verify` against hub A then exits 0, and the replica at A equals the
// recovery volume byte for byte.
func TestFailbackCommands(t *testing.T) {
	const size, rb = 8 << 20, 64 << 10
	dirB, dirA := t.TempDir(), t.TempDir()
	addrB, addrA := freeAddr(t), freeAddr(t)
	hubB := startHubProc(t, dirB, addrB, 0)
	defer func() { hubB.kill() }()
	r := reptest.New(t)
	r.Addr = addrB
	v := r.AddVolume("root", size)
	os.WriteFile(v.Backing, reptest.Pattern(1, size), 0o600)
	r.StartAgent(reptest.ProtectAll(v))
	waitVolume(t, hubB, "root", 60*time.Second, func(s hub.VolumeStatus) bool {
		return s.State == hub.StateProtecting && s.ResyncBytes == 0
	})
	if code, out := cli("verify", "--qmp", hubB.qmp, "--vm", "vm1", "--rate", "64m"); code != 0 || !strings.Contains(out, "0 mismatching regions") {
		t.Fatalf("verify at B: exit %d: %s", code, out)
	}
	// A bit flipped in B's replica behind the hub's back: verify names
	// the region and exits 3. (Once the journal is applied: the applier
	// would otherwise write the initial sync's data over the flip.)
	waitApplied(t, hubB, "vm1", 30*time.Second)
	f, _ := os.OpenFile(filepath.Join(hubB.store, "vm1", "root.img"), os.O_RDWR, 0)
	f.WriteAt([]byte{0xff}, 3*rb+77)
	f.Close()
	if code, out := cli("verify", "--qmp", hubB.qmp, "--vm", "vm1"); code != 3 || !strings.Contains(out, "1 mismatching regions") || !strings.Contains(out, "differs: bytes 196608-262143 (64.0KiB)") {
		t.Fatalf("verify at B after corruption: exit %d: %s", code, out)
	}

	// Site A is lost with a write B never got.
	r.Agent.Abort()
	f, _ = os.OpenFile(v.Backing, os.O_RDWR, 0)
	f.WriteAt(reptest.Pattern(2, 4096), 5*rb)
	f.Close()
	out := filepath.Join(dirB, "vm1")
	if code, o := cli("promote", "--qmp", hubB.qmp, "--vm", "vm1", "--out", out, "--protect-to", addrA); code != 0 {
		t.Fatalf("promote: exit %d: %s", code, o)
	}
	cfgPath := filepath.Join(out, "vm.toml")
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse(b, cfgPath, out)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RepAgent.Hub != addrA || cfg.RepAgent.VM != "vm1" || cfg.RepAgent.UUID != r.AgentCfg.UUID || len(cfg.Exports) != 1 || cfg.Exports[0].ID != "root" || !cfg.Exports[0].Protect {
		t.Fatalf("promoted configuration: [repagent] %+v, exports %+v", cfg.RepAgent, cfg.Exports)
	}
	// The recovery side writes (unprotected while A is away).
	img := filepath.Join(out, "root.img")
	f, _ = os.OpenFile(img, os.O_RDWR, 0)
	f.WriteAt(reptest.Pattern(3, 2*rb), 20*rb)
	f.WriteAt(reptest.Pattern(4, 512), size-512)
	f.Close()

	// Failback: A's old disk seeds a hub at A.
	if code, o := cli("seed", "--store", filepath.Join(dirA, "store"), "--vm", "vm1", "--uuid", cfg.RepAgent.UUID, "--volume", "root="+v.Backing); code != 0 {
		t.Fatalf("seed: exit %d: %s", code, o)
	}
	hubA := startHubProc(t, dirA, addrA, 0)
	defer func() { hubA.kill() }()
	r2 := reptest.New(t)
	r2.Addr = addrA
	w := r2.AddVolume("root", size)
	cur, _ := os.ReadFile(img)
	os.WriteFile(w.Backing, cur, 0o600)
	r2.StartAgent(reptest.ProtectAll(w))
	st := waitVolume(t, hubA, "root", 60*time.Second, func(s hub.VolumeStatus) bool {
		return s.State == hub.StateProtecting && s.ResyncBytes == 0
	})
	// Regions 3 (corrupt at B), 5, 20, 21 and 127 differ.
	if st.RemoteReadBytes != 5*rb || st.CsumMatchedBytes != size-5*rb {
		t.Errorf("failback read %d bytes (%d compared equal), want the 5 differing regions: %d", st.RemoteReadBytes, st.CsumMatchedBytes, 5*rb)
	}
	t.Logf("failback of a %d-byte volume read %d bytes", size, st.RemoteReadBytes)
	if code, o := cli("verify", "--qmp", hubA.qmp, "--vm", "vm1", "--json"); code != 0 || !strings.Contains(o, `"mismatches": 0`) {
		t.Errorf("verify at A: exit %d: %s", code, o)
	}
	replica := filepath.Join(dirA, "store", "vm1", "root.img")
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := reptest.SameFiles(w.Backing, replica, size)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica at A: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
