package config_test

import (
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/config"
)

const repagentBase = `
[[device]]
name = "root"
table = "0 8 zero"
`

func TestRepAgentConfig(t *testing.T) {
	text := repagentBase + `
[repagent]
hub = "127.0.0.1:7070"
vm = "vm1"
queue-size = "8m"

[[export]]
id = "root0"
device = "root"
socket = "root.sock"
protect = true
fall-behind = "size 4m"
on-hub-loss = "suspend"

[[export]]
id = "rec0"
device = "root"
socket = "rec.sock"
allow-remote-write = true
`
	c, err := config.Parse([]byte(text), "vm.toml", "/tmp")
	if err != nil {
		t.Fatal(err)
	}
	if c.RepAgent.Hub != "127.0.0.1:7070" || c.RepAgent.VM != "vm1" || c.RepAgent.QueueBytes != 8<<20 {
		t.Errorf("repagent %+v", c.RepAgent)
	}
	e := c.Exports[0]
	if !e.Protect || e.AllowRemoteWrite || e.FallBehind != "size 4m" || e.OnHubLoss != "suspend" || !c.Exports[1].AllowRemoteWrite || c.Exports[1].Protect {
		t.Errorf("export %+v", e)
	}
	c, err = config.Parse([]byte(repagentBase+"[repagent]\nhub = \"[::1]:7\"\nvm = \"v\"\n"), "vm.toml", "/tmp")
	if err != nil || c.RepAgent.QueueBytes != config.DefaultQueueSize {
		t.Errorf("default queue size: %v %+v", err, c.RepAgent)
	}
	if c.RepAgent.ALPath != "/tmp/v.actlog" || c.RepAgent.ALExtents != 0 || c.RepAgent.ALExtentBytes != 0 {
		t.Errorf("default activity log: %+v", c.RepAgent)
	}
	c, err = config.Parse([]byte(repagentBase+"[repagent]\nhub = \"[::1]:7\"\nvm = \"v\"\nactivity-log = \"state/al\"\nal-extents = 64\nal-extent-size = \"1m\"\n"), "vm.toml", "/tmp")
	if err != nil || c.RepAgent.ALPath != "/tmp/state/al" || c.RepAgent.ALExtents != 64 || c.RepAgent.ALExtentBytes != 1<<20 {
		t.Errorf("activity log: %v %+v", err, c.RepAgent)
	}
	c, err = config.Parse([]byte(repagentBase+"[repagent]\nhub = \"[::1]:7\"\nvm = \"v\"\nactivity-log = \"none\"\n"), "vm.toml", "/tmp")
	if err != nil || c.RepAgent.ALPath != "" {
		t.Errorf("activity log off: %v %+v", err, c.RepAgent)
	}
}

// TestRepAgentHubList: `hub` is one address or a list of them, in order;
// Hub is the first.
func TestRepAgentHubList(t *testing.T) {
	c, err := config.Parse([]byte(repagentBase+"[repagent]\nhub = [\"10.0.0.1:7070\", \"10.0.0.2:7070\"]\nvm = \"v\"\ninsecure = true\n"), "vm.toml", "/tmp")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.RepAgent.HubAddrs(); len(got) != 2 || got[0] != "10.0.0.1:7070" || got[1] != "10.0.0.2:7070" || c.RepAgent.Hub != "10.0.0.1:7070" {
		t.Errorf("hubs %q, hub %q", got, c.RepAgent.Hub)
	}
	c, err = config.Parse([]byte(repagentBase+"[repagent]\nhub = \"127.0.0.1:7\"\nvm = \"v\"\n"), "vm.toml", "/tmp")
	if err != nil || len(c.RepAgent.HubAddrs()) != 1 || c.RepAgent.Hub != "127.0.0.1:7" {
		t.Errorf("one hub: %v %+v", err, c.RepAgent)
	}
}

func TestRepAgentConfigErrors(t *testing.T) {
	exp := func(extra string) string {
		return "\n[[export]]\nid = \"e\"\ndevice = \"root\"\nsocket = \"e.sock\"\n" + extra
	}
	hub := "\n[repagent]\nhub = \"127.0.0.1:7070\"\nvm = \"vm1\"\n"
	tests := []struct{ name, text, want string }{
		{"protect without hub", exp("protect = true\n"), "export[0].protect: replication settings need a [repagent] hub"},
		{"no hub", "\n[repagent]\nvm = \"vm1\"\n", "repagent.hub: missing hub address"},
		{"bad hub", "\n[repagent]\nhub = \"nohost\"\nvm = \"vm1\"\n", `"nohost": want host:port`},
		{"no vm", "\n[repagent]\nhub = \"127.0.0.1:1\"\n", "repagent.vm: missing vm name"},
		{"partial tls", hub + "tls-cert = \"a.crt\"\n", "must all be set, or none"},
		{"queue size", hub + "queue-size = \"lots\"\n", `queue-size: "lots"`},
		{"fall-behind kind", hub + exp("protect = true\nfall-behind = \"bytes 5\"\n"), `unknown threshold "bytes"`},
		{"fall-behind form", hub + exp("fall-behind = \"ios\"\n"), `want "ios N"`},
		{"fall-behind ios", hub + exp("fall-behind = \"ios 0\"\n"), "ios must be a positive integer"},
		{"fall-behind size", hub + exp("fall-behind = \"size 5q\"\n"), `size "5q"`},
		{"fall-behind timeout", hub + exp("fall-behind = \"timeout 5y\"\n"), "timeout must be a positive integer"},
		{"unknown key", hub + "queue = 1\n", "repagent.queue: unknown key"},
		{"impossible fall-behind", hub + exp("protect = true\nfall-behind = \"size 64m\"\n"), `vm.toml:15: export[0].fall-behind: "size 64m" (67108864 bytes) can never trigger: the volume's backlog is bounded by its share of the mirror queue, 67108864 bytes (queue-size 67108864 bytes / 1 protected exports)`},
		{"impossible fall-behind share", hub + "queue-size = \"8m\"\n" + exp("protect = true\nfall-behind = \"size 5m\"\n") + "\n[[export]]\nid = \"f\"\ndevice = \"root\"\nsocket = \"f.sock\"\nprotect = true\n", `5242880 bytes) can never trigger: the volume's backlog is bounded by its share of the mirror queue, 4194304 bytes (queue-size 8388608 bytes / 2 protected exports)`},
		{"on-hub-loss value", hub + exp("protect = true\non-hub-loss = \"pause\"\n"), `export[0].on-hub-loss: "pause": want "continue" or "suspend"`},
		{"suspend without threshold", hub + exp("protect = true\non-hub-loss = \"suspend\"\n"), `"suspend" needs a fall-behind threshold`},
		{"al-extents", hub + "al-extents = 70000\n", "vm.toml:9: repagent.al-extents: 70000: want 1 to 65534"},
		{"al-extent-size", hub + "al-extent-size = \"3m\"\n", `repagent.al-extent-size: "3m": want a power of two from 4k to 1g`},
		{"activity log without hub", "\n[repagent]\nactivity-log = \"x\"\n", "repagent.hub: missing hub address"},
		{"hub list bad address", "\n[repagent]\nhub = [\"127.0.0.1:1\", \"nohost\"]\nvm = \"vm1\"\n", `vm.toml:7: repagent.hub: "nohost": want host:port`},
		{"hub list twice", "\n[repagent]\nhub = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\nvm = \"vm1\"\n", `vm.toml:7: repagent.hub: "127.0.0.1:1": listed twice`},
		{"hub list empty", "\n[repagent]\nhub = []\nvm = \"vm1\"\n", `vm.toml:7: repagent.hub: an empty list: want "host:port" or a list of them`},
		{"hub list not strings", "\n[repagent]\nhub = [\"127.0.0.1:1\", 7]\nvm = \"vm1\"\n", `vm.toml:7: repagent.hub: 7 is not a string`},
		{"hub a number", "\n[repagent]\nhub = 7070\nvm = \"vm1\"\n", `vm.toml:7: repagent.hub: 7070 is not a string or a list of strings`},
		{"protect and remote write", hub + exp("protect = true\nallow-remote-write = true\n"), "vm.toml:15: export[0].allow-remote-write: not with protect = true"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := config.Parse([]byte(repagentBase+tc.text), "vm.toml", "/tmp")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want %q", err, tc.want)
			}
		})
	}
}

func TestParseFallBehind(t *testing.T) {
	tests := []struct {
		in   string
		want config.FallBehind
	}{
		{"", config.FallBehind{}},
		{"ios 10000", config.FallBehind{IOs: 10000}},
		{"size 256m", config.FallBehind{Bytes: 256 << 20}},
		{"size 200", config.FallBehind{Bytes: 200}},
		{"size 8s", config.FallBehind{Bytes: 4096}},
		{"size 1g", config.FallBehind{Bytes: 1 << 30}},
		{"timeout 5s", config.FallBehind{Timeout: 5 * time.Second}},
		{"timeout 2m", config.FallBehind{Timeout: 2 * time.Minute}},
		{"timeout 1d", config.FallBehind{Timeout: 24 * time.Hour}},
	}
	for _, tc := range tests {
		got, err := config.ParseFallBehind(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseFallBehind(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
	if _, err := config.ParseSize("99999999999e"); err == nil {
		t.Errorf("overflowing size accepted")
	}
}
