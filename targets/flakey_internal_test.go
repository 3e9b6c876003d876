package targets

import (
	"log/slog"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

// TestFlakeyCycle checks the up/down cycle against a fake clock: counted
// in whole seconds from the table load, up first.
func TestFlakeyCycle(t *testing.T) {
	base := time.Unix(1000, 0)
	now := base
	flakeyNow = func() time.Time { return now }
	defer func() { flakeyNow = time.Now }()
	set := mappertest.NewSet(1<<20, "a")
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler), Open: set.Open})
	defer m.Close()
	d, err := m.CreateTable("cy", "", false, "0 64 flakey a 0 2 3")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	for s, wantUp := range []bool{true, true, false, false, false, true, true, false, false, false, true} {
		for _, frac := range []time.Duration{0, 999 * time.Millisecond} {
			now = base.Add(time.Duration(s)*time.Second + frac)
			err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: 1, Data: [][]byte{buf}})
			if (err == nil) != wantUp {
				t.Errorf("at %v: read err %v, want up %v", now.Sub(base), err, wantUp)
			}
		}
	}
}
