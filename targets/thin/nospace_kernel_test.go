package thin_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	_ "github.com/vhostdm/vhostdm/targets" // linear
	"github.com/vhostdm/vhostdm/targets/thin"
	"github.com/vhostdm/vhostdm/test/oracle"
)

// step is one action of a scenario that runs the same on the kernel (as a
// dmsetup script in the oracle guest) and on vhostdm (on a Manager), each
// printing "<label> <value>" lines to compare.
type step struct {
	op    string // mk, reload, msg, write, bgwrite, wait, sleep, status, events, remove
	label string
	dev   string
	arg   string // table, message, block number or seconds
}

// diskNames maps the scenario's disk names ($S, $D, ...) to devices.
type diskNames map[string]string

func (n diskNames) expand(s string) string {
	for k, v := range n {
		s = strings.ReplaceAll(s, k, v)
	}
	return s
}

// script renders the steps as the guest's shell script.
func script(steps []step, disks diskNames) string {
	var b strings.Builder
	b.WriteString("echo 3 > /sys/module/dm_thin_pool/parameters/no_space_timeout\n")
	for _, s := range steps {
		arg := disks.expand(s.arg)
		switch s.op {
		case "mk":
			fmt.Fprintf(&b, "dmsetup create %s --table %q && dmsetup mknodes\n", s.dev, arg)
		case "reload":
			fmt.Fprintf(&b, "dmsetup reload %s --table %q && dmsetup suspend %[1]s && dmsetup resume %[1]s\n", s.dev, arg)
		case "remove":
			fmt.Fprintf(&b, "dmsetup remove %s\n", s.dev)
		case "msg":
			fmt.Fprintf(&b, "dmsetup message %s 0 %q 2>/dev/null; echo \"%s $?\"\n", s.dev, arg, s.label)
		case "write":
			fmt.Fprintf(&b, "dd if=/dev/zero of=/dev/mapper/%s bs=65536 seek=%s count=1 conv=fsync 2>/dev/null; echo \"%s $?\"\n", s.dev, arg, s.label)
		case "bgwrite":
			fmt.Fprintf(&b, "( dd if=/dev/zero of=/dev/mapper/%s bs=65536 seek=%s count=1 conv=fsync 2>/dev/null; echo $? > /tmp/bg ) &\nsleep 1\n", s.dev, arg)
		case "wait":
			fmt.Fprintf(&b, "wait; echo \"%s $(cat /tmp/bg)\"\n", s.label)
		case "sleep":
			fmt.Fprintf(&b, "sleep %s\n", arg)
		case "status":
			fmt.Fprintf(&b, "echo \"%s $(dmsetup status %s)\"\n", s.label, s.dev)
		case "events":
			fmt.Fprintf(&b, "echo \"%s $(dmsetup info -c --noheadings -o events %s)\"\n", s.label, s.dev)
		}
	}
	return b.String()
}

// run runs the steps on a vhostdm Manager, returning the same lines as
// the guest prints.
func run(t *testing.T, steps []step, disks diskNames) map[string]string {
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	out := map[string]string{}
	rc := func(err error) string {
		if err != nil {
			return "1"
		}
		return "0"
	}
	write := func(dev, block string) error {
		d, err := m.Get(dev)
		if err != nil {
			return err
		}
		var b uint64
		fmt.Sscan(block, &b)
		if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: b * 128, Sectors: 128, Data: [][]byte{make([]byte, 65536)}}); err != nil {
			return err
		}
		return d.Submit(&mapper.Request{Op: mapper.OpFlush})
	}
	var bg chan error
	for _, s := range steps {
		arg := disks.expand(s.arg)
		var d *mapper.Device
		if s.op != "mk" && s.op != "sleep" && s.op != "wait" {
			var err error
			if d, err = m.Get(s.dev); err != nil {
				t.Fatalf("%s %s: %v", s.op, s.dev, err)
			}
		}
		switch s.op {
		case "mk":
			if _, err := m.CreateTable(s.dev, "", false, arg); err != nil {
				t.Fatalf("create %s %q: %v", s.dev, arg, err)
			}
		case "reload":
			if err := d.Reload(arg); err != nil {
				t.Fatalf("reload %s %q: %v", s.dev, arg, err)
			}
		case "remove":
			if err := m.Remove(s.dev, false); err != nil {
				t.Fatalf("remove %s: %v", s.dev, err)
			}
		case "msg":
			_, err := d.Message(0, strings.Fields(arg))
			out[s.label] = rc(err)
		case "write":
			out[s.label] = rc(write(s.dev, arg))
		case "bgwrite":
			bg = make(chan error, 1)
			go func(dev, block string) { bg <- write(dev, block) }(s.dev, arg)
			time.Sleep(time.Second)
		case "wait":
			out[s.label] = rc(<-bg)
		case "sleep":
			var n int
			fmt.Sscan(arg, &n)
			time.Sleep(time.Duration(n) * time.Second)
		case "status":
			var l []string
			for _, st := range d.Status(mapper.StatusInfo, false) {
				l = append(l, st.String())
			}
			out[s.label] = strings.Join(l, "\n")
		case "events":
			out[s.label] = fmt.Sprint(d.Info().EventNr)
		}
	}
	return out
}

// noSpaceSteps are the kernel-compared scenarios:
//
//   - A: error_if_no_space over a data device of 8 blocks with a low
//     water mark of 2: the event, the failed write, a write to a mapped
//     block while out of data space, growth by a reload, read_only.
//   - B: queue_if_no_space: a write waits, and after no_space_timeout
//     (3 s here; the kernel's default is 60) the pool turns to
//     error_if_no_space and the write fails; growth ends it.
//   - C: metadata out of space: create_thin until the free metadata
//     blocks reach the reserve, then the pool is read-only; a larger
//     metadata device brings it back.
//   - D: metadata whose needs_check flag is set loads read-only.
//   - E: a metadata device grown from 1 MiB to 80 MiB under a pool
//     vhostdm wrote.
func noSpaceSteps() []step {
	var s []step
	add := func(op, label, dev, arg string) { s = append(s, step{op, label, dev, arg}) }
	// A
	add("mk", "", "mA", "0 8192 linear $S 0")
	add("mk", "", "dA", "0 1024 linear $S 8192")
	add("mk", "", "pa", "0 1024 thin-pool /dev/mapper/mA /dev/mapper/dA 128 2 1 error_if_no_space")
	add("msg", "A_create", "pa", "create_thin 1")
	add("mk", "", "ta", "0 4096 thin /dev/mapper/pa 1")
	for i := 0; i < 8; i++ {
		add("write", fmt.Sprintf("A_write%d", i), "ta", fmt.Sprint(i))
		add("status", fmt.Sprintf("A_status%d", i), "pa", "")
		add("events", fmt.Sprintf("A_events%d", i), "pa", "")
	}
	add("write", "A_write_full", "ta", "8")
	add("status", "A_status_full", "pa", "")
	add("events", "A_events_full", "pa", "")
	add("write", "A_write_mapped", "ta", "3")
	add("reload", "", "dA", "0 2048 linear $S 8192")
	add("reload", "", "pa", "0 2048 thin-pool /dev/mapper/mA /dev/mapper/dA 128 2 1 error_if_no_space")
	add("status", "A_status_grown", "pa", "")
	add("events", "A_events_grown", "pa", "")
	add("write", "A_write_grown", "ta", "8")
	add("status", "A_status_after", "pa", "")
	add("reload", "", "pa", "0 2048 thin-pool /dev/mapper/mA /dev/mapper/dA 128 2 1 read_only")
	add("status", "A_status_ro", "pa", "")
	add("write", "A_write_ro", "ta", "9")
	add("msg", "A_msg_ro", "pa", "create_thin 2")
	// B
	add("mk", "", "mB", "0 8192 linear $S 16384")
	add("mk", "", "dB", "0 512 linear $S 24576")
	add("mk", "", "pb", "0 512 thin-pool /dev/mapper/mB /dev/mapper/dB 128 0")
	add("msg", "B_create", "pb", "create_thin 1")
	add("mk", "", "tb", "0 4096 thin /dev/mapper/pb 1")
	for i := 0; i < 4; i++ {
		add("write", fmt.Sprintf("B_write%d", i), "tb", fmt.Sprint(i))
	}
	add("events", "B_events_full", "pb", "")
	add("bgwrite", "", "tb", "4")
	add("status", "B_status_queued", "pb", "")
	add("events", "B_events_queued", "pb", "")
	add("sleep", "", "", "4")
	add("wait", "B_write_queued", "", "")
	add("status", "B_status_timeout", "pb", "")
	add("events", "B_events_timeout", "pb", "")
	add("write", "B_write_after_timeout", "tb", "5")
	add("reload", "", "dB", "0 1024 linear $S 24576")
	add("reload", "", "pb", "0 1024 thin-pool /dev/mapper/mB /dev/mapper/dB 128 0")
	add("status", "B_status_grown", "pb", "")
	add("events", "B_events_grown", "pb", "")
	add("write", "B_write_grown", "tb", "5")
	// C
	add("mk", "", "mC", "0 512 linear $S 32768")
	add("mk", "", "dC", "0 2048 linear $S 36864")
	add("mk", "", "pc", "0 2048 thin-pool /dev/mapper/mC /dev/mapper/dC 128 0")
	add("status", "C_status0", "pc", "")
	for i := 1; i <= 60; i++ {
		add("msg", fmt.Sprintf("C_create%02d", i), "pc", fmt.Sprintf("create_thin %d", i))
		add("status", fmt.Sprintf("C_status%02d", i), "pc", "")
	}
	add("events", "C_events_full", "pc", "")
	add("reload", "", "mC", "0 2048 linear $S 32768")
	add("reload", "", "pc", "0 2048 thin-pool /dev/mapper/mC /dev/mapper/dC 128 0")
	add("status", "C_status_grown", "pc", "")
	add("events", "C_events_grown", "pc", "")
	add("msg", "C_create_grown", "pc", "create_thin 100")
	add("status", "C_status_after", "pc", "")
	// D
	add("mk", "", "pd", "0 8192 thin-pool $DM $DD 128 0")
	add("status", "D_status", "pd", "")
	add("msg", "D_create", "pd", "create_thin 7")
	// E
	add("mk", "", "mE", "0 2048 linear $EM 0")
	add("mk", "", "pe", "0 8192 thin-pool /dev/mapper/mE $ED 128 0")
	add("status", "E_status0", "pe", "")
	add("reload", "", "mE", "0 163840 linear $EM 0")
	add("reload", "", "pe", "0 8192 thin-pool /dev/mapper/mE $ED 128 0")
	add("status", "E_status_grown", "pe", "")
	add("msg", "E_create", "pe", "create_thin 9")
	add("mk", "", "te", "0 4096 thin /dev/mapper/pe 9")
	add("write", "E_write", "te", "5")
	add("status", "E_status_after", "pe", "")
	add("remove", "", "te", "")
	add("remove", "", "pe", "")
	return s
}

// TestNoSpaceKernel runs noSpaceSteps on Linux 6.1 in one boot of the
// oracle guest and on vhostdm, and compares every status line, event
// count and result; then thin_check and thin_dump judge the metadata each
// grew in scenario E.
func TestNoSpaceKernel(t *testing.T) {
	oracle.Modules = append(oracle.Modules, "crc32c_generic", "dm-thin-pool")
	defer thin.SetNoSpaceTimeout(3 * time.Second)()
	dir := t.TempDir()
	// Per side: a scratch disk for A-C, D's metadata and data, E's.
	type side struct{ s, dm, dd, em, ed string }
	mkSide := func(name string) side {
		x := side{}
		for _, f := range []struct {
			p    *string
			n    string
			size int64
		}{{&x.s, "scratch", 64 << 20}, {&x.dm, "dmeta", 4 << 20}, {&x.dd, "ddata", 4 << 20}, {&x.em, "emeta", 80 << 20}, {&x.ed, "edata", 4 << 20}} {
			*f.p = filepath.Join(dir, name+"-"+f.n+".img")
			mkfile(t, *f.p, f.size)
		}
		return x
	}
	ours, kern := mkSide("ours"), mkSide("kernel")
	// D: a pool vhostdm wrote, marked needs_check.
	{
		e := &env{t: t, meta: ours.dm, data: ours.dd, bs: 128, nrBlocks: 64, virt: 4096,
			model: &model{devs: map[uint64]map[uint64][]byte{}}}
		e.start()
		e.mustMsg("create_thin", "1")
		e.model.devs[1] = map[uint64][]byte{}
		e.activate(1)
		e.write(1, 0, make([]byte, 4096))
		e.stop()
		if err := thin.SetNeedsCheck(ours.dm); err != nil {
			t.Fatal(err)
		}
	}
	// E: a pool vhostdm wrote on 1 MiB of metadata, inside an 80 MiB file.
	{
		if err := os.Truncate(ours.em, 1<<20); err != nil {
			t.Fatal(err)
		}
		e := &env{t: t, meta: ours.em, data: ours.ed, bs: 128, nrBlocks: 64, virt: 4096,
			model: &model{devs: map[uint64]map[uint64][]byte{}}}
		e.start()
		for id := uint64(1); id <= 3; id++ {
			e.mustMsg("create_thin", fmt.Sprint(id))
			e.model.devs[id] = map[uint64][]byte{}
			e.activate(id)
			e.write(id, id*128, make([]byte, 65536))
		}
		e.stop()
		if err := os.Truncate(ours.em, 80<<20); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range [][2]string{{ours.dm, kern.dm}, {ours.dd, kern.dd}, {ours.em, kern.em}, {ours.ed, kern.ed}} {
		b, err := os.ReadFile(p[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p[1], b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	steps := noSpaceSteps()
	sc := script(steps, diskNames{"$S": "/dev/vdb", "$DM": "/dev/vdc", "$DD": "/dev/vdd", "$EM": "/dev/vde", "$ED": "/dev/vdf"})

	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	t0 := time.Now()
	g, err := oracle.NewGuest(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	text, err := g.Run(ctx, sc, []string{kern.s, kern.dm, kern.dd, kern.em, kern.ed})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s ran in %v", g.Release, time.Since(t0))
	kernel := map[string]string{}
	for _, l := range strings.Split(text, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(l), " "); ok && strings.Contains(k, "_") {
			kernel[k] = strings.TrimSpace(v)
		}
	}
	got := run(t, steps, diskNames{"$S": ours.s, "$DM": ours.dm, "$DD": ours.dd, "$EM": ours.em, "$ED": ours.ed})
	var labels []string
	for _, s := range steps {
		if s.label != "" {
			labels = append(labels, s.label)
		}
	}
	for _, l := range labels {
		k, ok := kernel[l]
		if !ok {
			t.Errorf("%s: the kernel printed nothing\n%s", l, text)
			continue
		}
		g := strings.TrimSpace(got[l])
		if l == "C_events_full" || l == "C_events_grown" {
			// The one known difference: the kernel raises the metadata
			// low water event each time the free count, sampled at every
			// metadata block allocation, crosses the mark; it jitters
			// around the mark with the kernel's order of shadowing and
			// freeing (4 crossings here), vhostdm's order crosses it
			// once. Both raise at least one, then the mode changes.
			var kn, gn int
			fmt.Sscan(k, &kn)
			fmt.Sscan(g, &gn)
			if base := map[string]int{"C_events_full": 2, "C_events_grown": 3}[l]; gn != base || kn < base {
				t.Errorf("%s: vhostdm %d events, kernel %d: want %d (one metadata low water event, then out of metadata space, then write) and the kernel at least as many", l, gn, kn, base)
			}
			continue
		}
		if g != k {
			t.Errorf("%s: vhostdm %q, kernel %q", l, g, k)
		}
	}
	if t.Failed() {
		t.Logf("kernel output:\n%s", text)
	}
	// Both grew E's metadata: each passes thin_check, and thin_dump shows
	// the same devices and the new device 9.
	for _, m := range []string{ours.em, kern.em} {
		thinCheck(t, m)
		var ids []uint64
		for _, d := range thinDump(t, m).Devices {
			ids = append(ids, d.ID)
		}
		if slices.Sort(ids); !slices.Equal(ids, []uint64{1, 2, 3, 9}) {
			t.Errorf("%s: thin_dump devices %v, want [1 2 3 9]", m, ids)
		}
	}
}
