package mappertest

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// TargetCase describes a target for RunTarget.
type TargetCase struct {
	// Backends is how many memory backends of BackendBytes the table uses;
	// they are named m0, m1, ...
	Backends     int
	BackendBytes int
	// Table returns a table of one or more lines over the backends.
	Table func(backends []string) string
	// Stores is true when data written reads back (false for zero).
	Stores bool
	// ZeroesOnDiscard is true when discarded ranges read back as zeros.
	ZeroesOnDiscard bool
	// Align is the alignment in sectors of the I/O the target accepts
	// (8 for a crypt sector_size of 4096); 0 means 1.
	Align uint64
	// InitialUnknown is true when a fresh device over zeroed backends
	// need not read as zeros (crypt reads them as decrypted garbage).
	InitialUnknown bool
	// RecoversOnRestart is true when the target keeps flushed data in a
	// journal that a restarted process replays (replicator): durability
	// is checked after a Kill and a new manager, not on the live device.
	RecoversOnRestart bool
	// Setup, when set, runs before the device is created, for what the
	// table stands on: lower mapper devices (/dev/mapper/NAME), a pool
	// and its messages.
	Setup func(t *testing.T, m *mapper.Manager, backends []string)
	// Storage, when set, provides real backends (RBD images) instead of
	// memory ones. Durability is then checked by a second manager with
	// its own connections, reading read-only what the first flushed: a
	// restarted process sees what the storage holds, not a cache.
	Storage Storage
}

// Storage is real storage for RunTarget.
type Storage interface {
	// Create makes n zeroed backends of size bytes and returns the names
	// tables use for them; they are removed when t ends.
	Create(t *testing.T, n, size int) []string
	// Schemes returns the opener of those names for one manager, with
	// connections of its own, closed when t ends.
	Schemes(t *testing.T) map[string]mapper.OpenFunc
}

// RunTarget runs the behaviour every target must have: read-after-write,
// I/O across target and chunk boundaries, flush making writes durable,
// discard and write-zeroes, TABLE output loading back to itself, suspend
// with I/O in flight, and the table's backends released on Close.
func RunTarget(t *testing.T, name string, c TargetCase) {
	t.Helper()
	names := make([]string, c.Backends)
	for i := range names {
		names[i] = fmt.Sprintf("m%d", i)
	}
	align := max(c.Align, 1)
	startMode := func(t *testing.T, set *Set, names []string, readOnly bool) (*mapper.Manager, *mapper.Device) {
		o := mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)}
		if c.Storage != nil {
			o.Schemes = c.Storage.Schemes(t)
		} else {
			o.Open = set.Open
		}
		m := mapper.NewManager(o)
		t.Cleanup(func() { m.Close() })
		if c.Setup != nil {
			c.Setup(t, m, names)
		}
		d, err := m.CreateTable(name, "", readOnly, c.Table(names))
		if err != nil {
			t.Fatalf("%s: create: %v", name, err)
		}
		return m, d
	}
	start := func(t *testing.T, set *Set) (*mapper.Manager, *mapper.Device) {
		return startMode(t, set, names, false)
	}
	var storageNames []string // of the running subtest, with Storage
	setup := func(t *testing.T) (*mapper.Manager, *Set, *mapper.Device) {
		if c.Storage != nil {
			storageNames = c.Storage.Create(t, c.Backends, c.BackendBytes)
			m, d := startMode(t, nil, storageNames, false)
			return m, nil, d
		}
		set := NewSet(c.BackendBytes, names...)
		m, d := start(t, set)
		return m, set, d
	}
	t.Run(name+"/read-after-write", func(t *testing.T) {
		_, _, d := setup(t)
		rng := rand.New(rand.NewPCG(1, 1))
		size := d.Size()
		model := make([]byte, size*mapper.SectorSize)
		if c.InitialUnknown {
			if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: size, Data: [][]byte{model}}); err != nil {
				t.Fatalf("read whole device: %v", err)
			}
		}
		for i := 0; i < 64; i++ {
			s := rng.Uint64N(size/align) * align
			n := (1 + rng.Uint64N(min(size-s, 256)/align)) * align
			buf := randBytes(rng, int(n*mapper.SectorSize))
			if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: n, Data: splitRandom(rng, buf)}); err != nil {
				t.Fatalf("write %d+%d: %v", s, n, err)
			}
			if c.Stores {
				copy(model[s*mapper.SectorSize:], buf)
			}
		}
		back := make([]byte, len(model))
		if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: size, Data: [][]byte{back}}); err != nil {
			t.Fatalf("read whole device: %v", err)
		}
		if !bytes.Equal(back, model) {
			t.Fatal("device content differs from the model")
		}
	})
	t.Run(name+"/flush-durable", func(t *testing.T) {
		_, set, d := setup(t)
		if !c.Stores {
			return
		}
		data := bytes.Repeat([]byte("flushed!"), int(d.Size())*mapper.SectorSize/8)
		if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: d.Size(), Data: [][]byte{data}}); err != nil {
			t.Fatal(err)
		}
		if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
			t.Fatalf("flush: %v", err)
		}
		switch {
		case c.Storage != nil:
			_, d = startMode(t, nil, storageNames, true)
		case c.RecoversOnRestart:
			set.Kill()
			_, d = start(t, set)
		default:
			for _, n := range names {
				set.Get(n).Crash()
			}
		}
		back := make([]byte, len(data))
		if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: d.Size(), Data: [][]byte{back}}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(back, data) {
			t.Fatal("data acknowledged by a flush did not survive a crash")
		}
	})
	t.Run(name+"/discard-write-zeroes", func(t *testing.T) {
		_, _, d := setup(t)
		size := d.Size()
		data := bytes.Repeat([]byte{0xa5}, int(size)*mapper.SectorSize)
		if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: 0, Sectors: size, Data: [][]byte{data}}); err != nil {
			t.Fatal(err)
		}
		if err := d.Submit(&mapper.Request{Op: mapper.OpWriteZeroes, Sector: size / 4, Sectors: size / 4}); err != nil {
			t.Fatalf("write-zeroes: %v", err)
		}
		err := d.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: size / 2, Sectors: size / 4})
		if err != nil && !errors.Is(err, mapper.ErrUnsupported) {
			t.Fatalf("discard: %v", err)
		}
		back := make([]byte, len(data))
		if err := d.Submit(&mapper.Request{Op: mapper.OpRead, Sector: 0, Sectors: size, Data: [][]byte{back}}); err != nil {
			t.Fatal(err)
		}
		q := int(size/4) * mapper.SectorSize
		if !bytes.Equal(back[q:2*q], make([]byte, q)) {
			t.Fatal("write-zeroes range does not read back zeros")
		}
		if c.ZeroesOnDiscard && !bytes.Equal(back[2*q:3*q], make([]byte, q)) {
			t.Fatal("discarded range does not read back zeros")
		}
		if c.Stores && !bytes.Equal(back[:q], data[:q]) {
			t.Fatal("data before the zeroed range changed")
		}
	})
	t.Run(name+"/table-round-trip", func(t *testing.T) {
		_, _, d := setup(t)
		first := tableText(d)
		if err := d.Reload(first); err != nil {
			t.Fatalf("TABLE output does not load back: %v\n%s", err, first)
		}
		if again := tableText(d); again != first {
			t.Fatalf("TABLE changed on reload:\n%s\nthen\n%s", first, again)
		}
	})
	t.Run(name+"/suspend-with-io", func(t *testing.T) {
		_, _, d := setup(t)
		var wg sync.WaitGroup
		errc := make(chan error, 8)
		stop := make(chan struct{})
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				buf := make([]byte, 4096)
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					s := uint64(w*8+i*32) % (d.Size() - 8)
					if err := d.Submit(&mapper.Request{Op: mapper.OpWrite, Sector: s, Sectors: 8, Data: [][]byte{buf}}); err != nil {
						errc <- err
						return
					}
				}
			}(w)
		}
		table := tableText(d)
		for i := 0; i < 5; i++ {
			if err := d.Load(table); err != nil {
				t.Fatal(err)
			}
			if err := d.Suspend(false); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Millisecond)
			if err := d.Resume(); err != nil {
				t.Fatal(err)
			}
		}
		close(stop)
		wg.Wait()
		close(errc)
		for err := range errc {
			t.Errorf("I/O failed across suspend/resume: %v", err)
		}
	})
	t.Run(name+"/close-releases", func(t *testing.T) {
		m, _, d := setup(t)
		d.Open()
		if err := m.Remove(d.Name(), false); !errors.Is(err, mapper.ErrBusy) {
			t.Fatalf("remove while open: %v", err)
		}
		d.Close()
		if err := m.Remove(d.Name(), false); err != nil {
			t.Fatalf("remove: %v", err)
		}
		if _, err := m.Get(d.Name()); !errors.Is(err, mapper.ErrNotFound) {
			t.Fatalf("device still there after remove: %v", err)
		}
	})
}

func tableText(d *mapper.Device) string {
	var lines []string
	for _, l := range d.Status(mapper.StatusTable, false) {
		lines = append(lines, l.String())
	}
	return strings.Join(lines, "\n")
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

func splitRandom(rng *rand.Rand, buf []byte) [][]byte {
	var out [][]byte
	for len(buf) > 0 {
		n := min(len(buf), 1+rng.IntN(5000))
		out = append(out, buf[:n])
		buf = buf[n:]
	}
	return out
}
