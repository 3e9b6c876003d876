package harness

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/test/e2e/internal/proto"
)

// TestStripedModel checks the host model of a striped table against the
// kernel's rule written out sector by sector: chunk c of the device is
// chunk c/n of stripe c%n.
func TestStripedModel(t *testing.T) {
	dir := t.TempDir()
	const chunk, n, perStripe = 8, 3, 48 // sectors
	var imgs [n][]byte
	for i := range imgs {
		imgs[i] = make([]byte, (perStripe+16)*512)
		for s := 0; s < len(imgs[i])/512; s++ {
			copy(imgs[i][s*512:], strconv.Itoa(i)+":"+strconv.Itoa(s)+";")
		}
		os.WriteFile(filepath.Join(dir, "s"+strconv.Itoa(i)), imgs[i], 0o644)
	}
	cfg := &Config{Dir: dir, Devices: []DeviceConfig{
		{Name: "st", Table: "0 144 striped 3 8 s0 16 s1 0 s2 8"},
		{Name: "top", Table: "0 16 zero\n16 100 linear /dev/mapper/st 20"},
	}}
	offs := []int{16, 0, 8}
	got, err := cfg.ReadDevice("st", 0, n*perStripe)
	if err != nil {
		t.Fatal(err)
	}
	for x := 0; x < n*perStripe; x++ {
		c := x / chunk
		st, off := c%n, offs[c%n]+(c/n)*chunk+x%chunk
		if !bytes.Equal(got[x*512:(x+1)*512], imgs[st][off*512:(off+1)*512]) {
			t.Fatalf("sector %d: model reads %q, want stripe %d sector %d", x, got[x*512:x*512+8], st, off)
		}
	}
	top, err := cfg.ReadDevice("top", 10, 20)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(top[:6*512], make([]byte, 6*512)) || !bytes.Equal(top[6*512:], got[20*512:34*512]) {
		t.Error("stacked linear over striped reads the wrong sectors")
	}
	need, err := cfg.Images()
	if err != nil {
		t.Fatal(err)
	}
	if need[filepath.Join(dir, "s0")] != (16+48)*512 {
		t.Errorf("image s0 needs %d bytes, want %d", need[filepath.Join(dir, "s0")], (16+48)*512)
	}
}

// TestCpio writes an archive and reads it back with a minimal newc reader.
func TestCpio(t *testing.T) {
	var buf bytes.Buffer
	c := newCpio(&buf)
	c.File("lib/modules/x/a.ko", 0o644, []byte("hello"))
	c.Symlink("bin/sh", "busybox")
	c.CharDev("dev/console", 0o600, 5, 1)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	var names []string
	for len(b) > 0 {
		if len(b) < 110 || string(b[:6]) != "070701" {
			t.Fatalf("bad header at %d", buf.Len()-len(b))
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(b[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return int(v)
		}
		size, nameLen := field(6), field(11)
		name := string(b[110 : 110+nameLen-1])
		names = append(names, name)
		off := (110 + nameLen + 3) &^ 3
		data := b[off : off+size]
		if name == "lib/modules/x/a.ko" && string(data) != "hello" {
			t.Errorf("file data %q", data)
		}
		b = b[(off+size+3)&^3:]
		if name == "TRAILER!!!" {
			break
		}
	}
	want := "lib,lib/modules,lib/modules/x,lib/modules/x/a.ko,bin,bin/sh,dev,dev/console,TRAILER!!!"
	if got := strings.Join(names, ","); got != want {
		t.Errorf("entries %s, want %s", got, want)
	}
}

func TestParseLine(t *testing.T) {
	ev, ok := parseLine(`[    3.1] noise VHOSTDM-RESULT {"step":"verify","disk":"vda","ok":true,"ms":5}`)
	if !ok || ev.Kind != EventResult || ev.Err != nil || ev.Result.Step != proto.StepVerify || !ev.Result.OK {
		t.Errorf("result line: %+v", ev)
	}
	ev, ok = parseLine(`VHOSTDM-RESULT-END {"ok":false,"failed":2}`)
	if !ok || ev.Kind != EventEnd || ev.End.Failed != 2 {
		t.Errorf("end line: %+v", ev)
	}
	ev, ok = parseLine(`VHOSTDM-RESULT {"step":"ver[  4.0] kernel says hi`)
	if !ok || ev.Err == nil {
		t.Errorf("torn line: want an error, got %+v", ev)
	}
	if _, ok := parseLine("Linux version 6.1"); ok {
		t.Error("plain console line parsed as a result")
	}
}

func TestConfigRoundTrip(t *testing.T) {
	c := &Config{QMP: QMPConfig{Socket: "/tmp/q.sock"},
		Devices: []DeviceConfig{{Name: "d", Table: "0 8 linear img 0\n8 8 zero"}},
		Exports: []ExportConfig{{ID: "x", Device: "d", Socket: "/tmp/x.sock", NumQueues: 2, LogicalBlockSize: 512, Serial: "s"}}}
	p := filepath.Join(t.TempDir(), "vm.toml")
	if err := c.Write(p); err != nil {
		t.Fatal(err)
	}
	got, err := LoadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if got.Exports[0] != c.Exports[0] || strings.TrimSpace(got.Devices[0].Table) != c.Devices[0].Table || got.QMP != c.QMP {
		t.Errorf("round trip: %+v, want %+v", got, c)
	}
}

// TestExampleConfigs loads examples/*.toml through the harness's reading
// of the schema and checks what the e2e tests and run-vm.sh rely on.
func TestExampleConfigs(t *testing.T) {
	root, err := findRepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"vm-basic.toml", "vm-striped.toml"} {
		c, err := LoadConfig(filepath.Join(root, "examples", name))
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Exports) == 0 {
			t.Errorf("%s: no exports", name)
		}
		for _, x := range c.Exports {
			if !strings.HasPrefix(x.Socket, "/tmp/vhostdm-examples/") {
				t.Errorf("%s: export %s socket %s is not under /tmp/vhostdm-examples/", name, x.ID, x.Socket)
			}
			if _, err := c.DeviceSectors(x.Device); err != nil {
				t.Errorf("%s: export %s: %v", name, x.ID, err)
			}
		}
		need, err := c.Images()
		if err != nil || len(need) == 0 {
			t.Errorf("%s: images %v, %v", name, need, err)
		}
		for p := range need {
			if !strings.HasPrefix(p, filepath.Join(root, "examples", "images")+"/") {
				t.Errorf("%s: image %s is not under examples/images", name, p)
			}
		}
	}
}

func TestQEMUArgsReconnect(t *testing.T) {
	for _, tc := range []struct {
		v    [3]int
		want string
	}{{[3]int{7, 2, 0}, "reconnect=1"}, {[3]int{9, 1, 0}, "reconnect=1"}, {[3]int{9, 2, 0}, "reconnect-ms=500"}, {[3]int{10, 0, 2}, "reconnect-ms=500"}} {
		e := &Env{QEMUVersion: tc.v, Kernel: "/boot/vmlinuz"}
		args := strings.Join(e.QEMUArgs(VMConfig{Disks: []Disk{{Socket: "/s", NumQueues: 2}}, Steps: []string{"info"}}, "/i"), " ")
		if !strings.Contains(args, "socket,id=c0,path=/s,"+tc.want) || !strings.Contains(args, "vhost-user-blk-pci,chardev=c0,num-queues=2") {
			t.Errorf("QEMU %v: args %s, want %s", tc.v, args, tc.want)
		}
		if !strings.Contains(args, "vhostdm.test=info") || !strings.Contains(args, "share=on") {
			t.Errorf("QEMU %v: args %s lack the step or shared memory", tc.v, args)
		}
	}
}

func TestLoadAvg(t *testing.T) {
	if _, err := LoadAvg(); err != nil {
		t.Error(err)
	}
}
