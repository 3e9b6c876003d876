package config_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/config"
	_ "github.com/vhostdm/vhostdm/targets"
	_ "github.com/vhostdm/vhostdm/targets/thin"
)

func TestGoodConfig(t *testing.T) {
	c, err := config.Load("testdata/good.toml")
	if err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs("testdata")
	if c.Dir != abs || c.Path("vm1.qmp") != filepath.Join(abs, "vm1.qmp") || c.Path("/x") != "/x" {
		t.Errorf("paths: dir %q", c.Dir)
	}
	if len(c.Devices) != 2 || len(c.Exports) != 2 {
		t.Fatalf("decoded %+v", c)
	}
	e := c.Exports[1]
	if e.NumQueues != 1 || e.LogicalBlockSize != 512 || e.Writable || e.Serial != "ro" || e.PollUS != 0 {
		t.Errorf("defaults not applied: %+v", e)
	}
	if c.Exports[0].NumQueues != 2 || c.Exports[0].LogicalBlockSize != 4096 || !c.Exports[0].Writable || c.Exports[0].PollUS != 50 {
		t.Errorf("export[0] %+v", c.Exports[0])
	}
	order, err := c.DeviceOrder()
	if err != nil || order[0].Name != "root" || order[1].Name != "top" {
		t.Fatalf("order %v %v", order, err)
	}
}

func TestConfigErrors(t *testing.T) {
	pool := "[[device]]\nname = \"pool\"\ntable = \"0 2048 thin-pool m.img d.img 128 0\"\n"
	tests := []struct {
		name, text string
		want       []string
	}{
		{"syntax", "[qmp\nsocket = 1", []string{"vm.toml:2: expected '.' or ']' to end table name"}},
		{"unknown key", "[qmp]\nsocket = \"q\"\nsockett = \"x\"", []string{"vm.toml:3: qmp.sockett: unknown key"}},
		{"wrong type", "[[device]]\nname = 5\n", []string{"vm.toml: "}},
		{"newer version", "version = 2", []string{"vm.toml:1: version: version 2 is newer than this vhostdm understands (1)"}},
		{"table error on its line", "[[device]]\nname = \"a\"\ntable = \"\"\"\n0 8 zero\n16 8 zero\n\"\"\"\n",
			[]string{"vm.toml:5: device[0].table: line 2: gap in table: starts at 16, previous target ends at 8"}},
		{"one-line table", "[[device]]\nname = \"a\"\ntable = \"0 8 nosuch\"\n",
			[]string{`vm.toml:3: device[0].table: line 1: unknown target type "nosuch"`}},
		{"negotiation timeout", "[[device]]\nname = \"a\"\ntable = \"0 8 zero\"\n[[export]]\nid = \"e\"\ndevice = \"a\"\nsocket = \"s\"\nnegotiation-timeout = \"10\"\n",
			[]string{`vm.toml:8: export[0].negotiation-timeout: "10": want a duration such as "10s", or "0s" for none`}},
		{"missing table", "[[device]]\nname = \"a\"\n", []string{"vm.toml:1: device[0].table: missing table"}},
		{"bad cache mode", "[[device]]\nname = \"a\"\ncache = \"directsync\"\ntable = \"0 8 zero\"",
			[]string{`vm.toml:3: device[0].cache: "directsync": want "writeback" or "none"`}},
		{"bad locking", "[[device]]\nname = \"a\"\nlocking = \"yes\"\ntable = \"0 8 zero\"",
			[]string{`vm.toml:3: device[0].locking: "yes": want "auto", "on" or "off"`}},
		{"metadata cache zero", pool + "metadata-cache = \"0\"\n",
			[]string{`vm.toml:4: device[0].metadata-cache: "0": want a size from 64k to 16g in whole 4k blocks, such as "64m"`}},
		{"metadata cache negative", pool + "metadata-cache = \"-64m\"\n",
			[]string{`vm.toml:4: device[0].metadata-cache: "-64m": want a size from 64k to 16g`}},
		{"metadata cache absurd", pool + "metadata-cache = \"1t\"\n",
			[]string{`vm.toml:4: device[0].metadata-cache: "1t": want a size from 64k to 16g`}},
		{"metadata cache too small", pool + "metadata-cache = \"4k\"\n",
			[]string{`vm.toml:4: device[0].metadata-cache: "4k": want a size from 64k to 16g`}},
		{"metadata cache not a size", pool + "metadata-cache = \"lots\"\n",
			[]string{`vm.toml:4: device[0].metadata-cache: "lots": want a size from 64k to 16g`}},
		{"metadata cache not whole blocks", pool + "metadata-cache = \"1000000\"\n",
			[]string{`vm.toml:4: device[0].metadata-cache: "1000000": want a size from 64k to 16g in whole 4k blocks`}},
		{"metadata cache without a pool", "[[device]]\nname = \"a\"\nmetadata-cache = \"64m\"\ntable = \"0 8 zero\"\n",
			[]string{"vm.toml:3: device[0].metadata-cache: only a device whose table has a thin-pool line has a metadata cache"}},
		{"bad name", "[[device]]\nname = \"a/b\"\ntable = \"0 8 zero\"", []string{`vm.toml:2: device[0].name: device name "a/b": must not contain '/' or be . or ..`}},
		{"duplicate device", "[[device]]\nname = \"a\"\ntable = \"0 8 zero\"\n[[device]]\nname = \"a\"\ntable = \"0 8 zero\"",
			[]string{`vm.toml:5: device[1].name: device "a" already defined as device[0]`}},
		{"cycle", "[[device]]\nname = \"a\"\ntable = \"0 8 linear /dev/mapper/b 0\"\n[[device]]\nname = \"b\"\ntable = \"0 8 linear /dev/mapper/a 0\"",
			[]string{"device: dependency cycle: a -> b -> a"}},
		{"unknown dependency", "[[device]]\nname = \"a\"\ntable = \"0 8 linear /dev/mapper/zz 0\"",
			[]string{`device: device "a" uses /dev/mapper/zz, which is not a configured device`}},
		{"adaptive-poll with poll-us", "[[device]]\nname = \"a\"\ntable = \"0 8 zero\"\n[[export]]\nid = \"e\"\ndevice = \"a\"\nsocket = \"s\"\npoll-us = 20\nadaptive-poll = true\n",
			[]string{"vm.toml:9: export[0].adaptive-poll: true with poll-us = 20: choose one"}},
		{"adaptive-poll on nbd", "[[device]]\nname = \"a\"\ntable = \"0 8 zero\"\n[[export]]\ntype = \"nbd\"\nid = \"e\"\ndevice = \"a\"\nsocket = \"s\"\nadaptive-poll = true\n",
			[]string{"vm.toml:5: export[0].type: nbd exports take none of num-queues, logical-block-size, serial, poll-us, adaptive-poll, protect, fall-behind, allow-remote-write"}},
		{"adaptive-poll = false on nbd", "[[device]]\nname = \"a\"\ntable = \"0 8 zero\"\n[[export]]\ntype = \"nbd\"\nid = \"e\"\ndevice = \"a\"\nsocket = \"s\"\nadaptive-poll = false\n",
			[]string{"vm.toml:5: export[0].type: nbd exports take none of num-queues, logical-block-size, serial, poll-us, adaptive-poll, protect, fall-behind, allow-remote-write"}},
		{"export errors", `[[device]]
name = "a"
readonly = true
table = "0 8 zero"
[[export]]
id = "e"
device = "a"
socket = "s"
writable = true
num-queues = 65
logical-block-size = 1000
serial = "123456789012345678901"
poll-us = 1001
[[export]]
id = "e"
device = "nope"
socket = "s"
[[export]]
`, []string{
			`vm.toml:9: export[0].writable: device "a" is read-only`,
			"vm.toml:10: export[0].num-queues: 65: must be 1 to 64",
			"vm.toml:11: export[0].logical-block-size: 1000: must be a power of two from 512 to 2097152",
			`vm.toml:12: export[0].serial: "123456789012345678901": longer than 20 bytes`,
			"vm.toml:13: export[0].poll-us: 1001: must be 0 (off) to 1000 microseconds",
			`vm.toml:15: export[1].id: export id "e" already used by export[0]`,
			`vm.toml:16: export[1].device: no device named "nope"`,
			"vm.toml:17: export[1].socket: socket s already used by export[0]",
			"vm.toml:18: export[2].id: missing export id",
			"vm.toml:18: export[2].device: missing device",
			"vm.toml:18: export[2].socket: missing socket path",
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := config.Parse([]byte(tc.text), "vm.toml", "/etc/vhostdm")
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			got := strings.Split(err.Error(), "\n")
			if len(got) != len(tc.want) {
				t.Fatalf("got %d errors, want %d:\n%s", len(got), len(tc.want), err)
			}
			for i := range got {
				if !strings.HasPrefix(got[i], tc.want[i]) && !strings.HasSuffix(got[i], tc.want[i]) {
					t.Errorf("error %d:\n got: %s\nwant: %s", i, got[i], tc.want[i])
				}
			}
		})
	}
}

func TestLoadMissing(t *testing.T) {
	_, err := config.Load(filepath.Join(t.TempDir(), "none.toml"))
	if err == nil || !os.IsNotExist(err) && !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("missing file: %v", err)
	}
}

// TestNBDExportConfig: NBD exports take socket or listen, share an address
// only with the same TLS settings and distinct names, and refuse the
// vhost-only keys (and vhost exports the NBD-only ones).
func TestNBDExportConfig(t *testing.T) {
	dev := "[[device]]\nname = \"a\"\ntable = \"0 8 zero\"\n"
	good := dev + `
[[export]]
id = "n0"
type = "nbd"
device = "a"
socket = "n.sock"
bitmaps = ["b0"]

[[export]]
id = "n1"
type = "nbd"
device = "a"
socket = "n.sock"
name = "second"
`
	c, err := config.Parse([]byte(good), "vm.toml", "/etc/vm")
	if err != nil {
		t.Fatal(err)
	}
	if c.Exports[0].Name != "a" || c.Exports[1].Name != "second" || c.Exports[0].NumQueues != 0 || !c.Exports[0].VerifyPeer() {
		t.Errorf("nbd defaults: %+v", c.Exports)
	}
	if c.StatePath() != "/etc/vm" {
		t.Errorf("state path %q", c.StatePath())
	}
	for _, tc := range []struct{ name, text, want string }{
		{"both addresses", `[[export]]
id = "n"
type = "nbd"
device = "a"
socket = "s"
listen = "127.0.0.1:10809"`, "export[0].socket: an nbd export needs exactly one of socket"},
		{"bad listen", `[[export]]
id = "n"
type = "nbd"
device = "a"
listen = "nope"`, `export[0].listen: "nope": want host:port`},
		{"vhost key on nbd", `[[export]]
id = "n"
type = "nbd"
device = "a"
socket = "s"
num-queues = 2`, "export[0].type: nbd exports take none of"},
		{"nbd key on vhost", `[[export]]
id = "v"
device = "a"
socket = "s"
bitmaps = ["x"]`, "export[0].bitmaps: only nbd exports take bitmaps"},
		{"unknown type", `[[export]]
id = "v"
type = "iscsi"
device = "a"
socket = "s"`, `export[0].type: "iscsi": want vhost-user-blk or nbd`},
		{"same name twice", `[[export]]
id = "n"
type = "nbd"
device = "a"
socket = "s"
[[export]]
id = "m"
type = "nbd"
device = "a"
socket = "s"`, `export[1].name: nbd export name "a" already used`},
		{"shared with vhost", `[[export]]
id = "v"
device = "a"
socket = "s"
[[export]]
id = "m"
type = "nbd"
device = "a"
socket = "s"`, "export[1].socket: socket s already used"},
		{"TLS differs", `[[export]]
id = "n"
type = "nbd"
device = "a"
listen = "127.0.0.1:1"
tls-creds = "x"
[[export]]
id = "m"
type = "nbd"
device = "a"
name = "m"
listen = "127.0.0.1:1"`, "export[1].tls-creds: exports sharing an address need the same TLS settings"},
	} {
		_, err := config.Parse([]byte(dev+tc.text), "vm.toml", "/etc/vm")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}

// TestMetadataCacheConfig: device.metadata-cache is a size that reaches
// the device's options; absent, the options leave the default.
func TestMetadataCacheConfig(t *testing.T) {
	text := "[[device]]\nname = \"pool\"\nmetadata-cache = \"64m\"\ntable = \"0 2048 thin-pool m.img d.img 128 0\"\n" +
		"[[device]]\nname = \"p2\"\ntable = \"0 2048 thin-pool m2.img d2.img 128 0\"\n"
	c, err := config.Parse([]byte(text), "vm.toml", "/etc/vm")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Devices[0].Options().MetadataCache; got != 64<<20 {
		t.Errorf("metadata-cache 64m: options carry %d bytes", got)
	}
	if got := c.Devices[1].Options().MetadataCache; got != 0 {
		t.Errorf("no metadata-cache: options carry %d bytes, want 0 (the default)", got)
	}
	_, err = config.Parse([]byte(strings.Replace(text, `"64m"`, "65536", 1)), "vm.toml", "/etc/vm")
	if err == nil || !strings.Contains(err.Error(), "metadata-cache") {
		t.Errorf("an integer metadata-cache: %v, want an error naming the key", err)
	}
}
