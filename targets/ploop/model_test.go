package ploop_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// TestModel runs seeded random writes, write-zeroes, flushes, reloads,
// snapshots (up to three images), discards and background merges against
// a byte-slice model (and the top's allocated clusters against INFO),
// then has qemu-img check every image and read the merged top.
func TestModel(t *testing.T) {
	for seed := uint64(1); seed <= 3; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runModel(t, seed) })
	}
}

func runModel(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	dir := t.TempDir()
	const sectors = 2048 // 1 MiB of 32 KiB clusters
	imgs := []string{emptyFile(t, dir, "d0.hds")}
	table := func() string {
		w := []string{"0", fmt.Sprint(sectors), "ploop", "6", imgs[len(imgs)-1]}
		return strings.Join(append(w, imgs[:len(imgs)-1]...), " ")
	}
	m := newManager(t)
	d := create(t, m, "m", table())
	model := make([]byte, sectors*512)
	// levels[i] holds the clusters image i has (the last is the top), for
	// discards, which act on whole clusters the top has.
	const cs = 64
	levels := []map[uint64]bool{{}}
	clusters := func(s, l uint64) (uint64, uint64) { return s / cs, (s + l + cs - 1) / cs }
	anyHas := func(c uint64) bool {
		for _, lv := range levels {
			if lv[c] {
				return true
			}
		}
		return false
	}
	check := func(step int, what string) {
		if s := diff(readAll(t, d), model); s != "" {
			t.Fatalf("seed %d step %d (%s): %s", seed, step, what, s)
		}
		want := fmt.Sprintf("%d/%d", len(levels[len(levels)-1]), sectors/cs)
		if f := strings.Fields(status(d, mapper.StatusInfo)); f[4] != want {
			t.Fatalf("seed %d step %d (%s): INFO %v, want %s clusters in the top", seed, step, what, f, want)
		}
	}
	n := 0
	for step := range 300 {
		switch k := rng.IntN(100); {
		case k < 65:
			s := rng.Uint64N(sectors)
			l := 1 + rng.Uint64N(min(sectors-s, 200))
			data := pattern(rng.Uint64(), int(l*512))
			submit(t, d, mapper.OpWrite, s, data)
			copy(model[s*512:], data)
			for c, e := clusters(s, l); c < e; c++ {
				levels[len(levels)-1][c] = true
			}
		case k < 70:
			// Discard: whole clusters the top has read zeros after;
			// alone, the top frees them.
			s := rng.Uint64N(sectors)
			l := 1 + rng.Uint64N(min(sectors-s, 300))
			if err := d.Submit(&mapper.Request{Op: mapper.OpDiscard, Sector: s, Sectors: l}); err != nil {
				t.Fatal(err)
			}
			top := levels[len(levels)-1]
			for c := (s + cs - 1) / cs; c < (s+l)/cs; c++ {
				if top[c] {
					clear(model[c*cs*512 : (c+1)*cs*512])
					if len(levels) == 1 {
						delete(top, c)
					}
				}
			}
		case k < 75:
			s := rng.Uint64N(sectors)
			l := 1 + rng.Uint64N(min(sectors-s, 200))
			if err := d.Submit(&mapper.Request{Op: mapper.OpWriteZeroes, Sector: s, Sectors: l}); err != nil {
				t.Fatal(err)
			}
			clear(model[s*512 : (s+l)*512])
			for c, e := clusters(s, l); c < e; c++ {
				if anyHas(c) {
					levels[len(levels)-1][c] = true
				}
			}
		case k < 82:
			submit(t, d, mapper.OpFlush, 0, nil)
		case k < 88:
			if err := m.Remove("m", false); err != nil {
				t.Fatal(err)
			}
			d = create(t, m, "m", table())
			check(step, "reopen")
		case k < 94 && len(imgs) < 3:
			n++
			p := emptyFile(t, dir, fmt.Sprintf("s%d.hds", n))
			message(t, d, "snapshot", p)
			imgs = append(imgs, p)
			levels = append(levels, map[uint64]bool{})
			if got := status(d, mapper.StatusTable); got != strings.Join(strings.Fields(table())[3:], " ") {
				t.Fatalf("TABLE %q, want %q", got, table())
			}
		case k >= 94 && len(imgs) > 1:
			merge(t, d)
			imgs = append(imgs[:len(imgs)-2], imgs[len(imgs)-1])
			levels = mergeLevels(levels)
		}
		if step%25 == 0 {
			check(step, "periodic")
		}
	}
	check(300, "end")
	for len(imgs) > 1 {
		merge(t, d)
		imgs = append(imgs[:len(imgs)-2], imgs[len(imgs)-1])
		levels = mergeLevels(levels)
	}
	check(301, "merged")
	if err := m.Remove("m", false); err != nil {
		t.Fatal(err)
	}
	top := imgs[0]
	qemuCheck(t, top)
	ploopCheck(t, top)
	if s := diff(qemuRaw(t, top), model); s != "" {
		t.Fatalf("qemu-img reads the merged image %s: %s", filepath.Base(top), s)
	}
}

// mergeLevels is the model of merge: the top takes the clusters of the
// image under it, which leaves the stack.
func mergeLevels(levels []map[uint64]bool) []map[uint64]bool {
	n := len(levels)
	for c := range levels[n-2] {
		levels[n-1][c] = true
	}
	return append(levels[:n-2:n-2], levels[n-1])
}

// TestPushBackup backs up a device while the guest keeps writing: the
// backup equals the device at push_backup_start, and held writes land.
func TestPushBackup(t *testing.T) {
	dir := t.TempDir()
	img := emptyFile(t, dir, "pb.hds")
	const sectors = 512 // 64 clusters of 8 sectors
	m := newManager(t)
	d := create(t, m, "pb", fmt.Sprintf("0 %d ploop 3 %s", sectors, img))
	before := pattern(1, sectors*512)
	submit(t, d, mapper.OpWrite, 0, before)
	const uuid = "0123456789abcdef0123456789abcdef"
	message(t, d, "push_backup_start", uuid, "0")
	if got := message(t, d, "push_backup_get_uuid"); got != uuid {
		t.Fatalf("uuid %q", got)
	}
	if got := status(d, mapper.StatusInfo); !strings.Contains(got, " b ") {
		t.Errorf("INFO during backup %q", got)
	}
	// The guest writes every cluster, back to front, while the backup
	// copies front to back.
	after := pattern(2, sectors*512)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for c := 63; c >= 0; c-- {
			submit(t, d, mapper.OpWrite, uint64(c*8), after[c*4096:(c+1)*4096])
		}
	}()
	backup := make([]byte, sectors*512)
	done := make([]bool, 64)
	copyRun := func(c, n int) {
		buf := make([]byte, n*4096)
		submit(t, d, mapper.OpRead, uint64(c*8), buf)
		copy(backup[c*4096:], buf)
		message(t, d, "push_backup_write", uuid, fmt.Sprintf("%d:%d", c, n))
		for i := c; i < c+n; i++ {
			done[i] = true
		}
	}
	urgent := 0
	for c := 0; c < 64; c++ {
		time.Sleep(time.Millisecond)
		for { // the clusters writes wait for go first
			r := message(t, d, "push_backup_read", uuid)
			if r == "" {
				break
			}
			var uc, un int
			fmt.Sscanf(r, "%d:%d", &uc, &un)
			copyRun(uc, un)
			urgent++
		}
		if !done[c] {
			copyRun(c, 1)
		}
	}
	wg.Wait()
	if got := message(t, d, "push_backup_stop", uuid); got != "0" {
		t.Errorf("stop replied %q", got)
	}
	if s := diff(backup, before); s != "" {
		t.Fatalf("backup is not the device as it was at push_backup_start: %s", s)
	}
	if !bytes.Equal(readAll(t, d), after) {
		t.Fatal("writes held by the backup were lost")
	}
	if urgent == 0 {
		t.Error("no write waited for the backup")
	}
	if _, err := d.Message(0, []string{"push_backup_read", uuid}); err == nil {
		t.Error("push_backup_read after stop succeeded")
	}
}

// TestResize grows an image with data in the way of its larger BAT: the
// data moves, qemu-img sees the new size, and a reload serves it.
func TestResize(t *testing.T) {
	dir := t.TempDir()
	img := emptyFile(t, dir, "rs.hds")
	// 32 KiB clusters (ploop check wants at least that), 8000 of them: the
	// BAT fits one cluster; 8300 need two, and the first data cluster is
	// in the way. Only the written regions and a zero one are compared.
	const small, big = 8000 * 64, 8300 * 64
	m := newManager(t)
	d := create(t, m, "rs", fmt.Sprintf("0 %d ploop 6 %s", small, img))
	regions := []struct {
		sector uint64
		data   []byte
	}{{0, pattern(3, 1<<20)}, {300000, pattern(5, 100<<10)}, {100000, make([]byte, 64<<10)}}
	for _, r := range regions[:2] {
		submit(t, d, mapper.OpWrite, r.sector, r.data)
	}
	checkRegions := func(what string, read func(sector uint64, n int) []byte) {
		t.Helper()
		for _, r := range regions {
			if s := diff(read(r.sector, len(r.data)), r.data); s != "" {
				t.Fatalf("%s: sector %d: %s", what, r.sector, s)
			}
		}
	}
	devRead := func(sector uint64, n int) []byte {
		buf := make([]byte, n)
		submit(t, d, mapper.OpRead, sector, buf)
		return buf
	}
	message(t, d, "resize", fmt.Sprint(big))
	checkRegions("after resize", devRead)
	if err := d.Reload(fmt.Sprintf("0 %d ploop 6 %s", big, img)); err != nil {
		t.Fatal(err)
	}
	regions = append(regions, struct {
		sector uint64
		data   []byte
	}{big - 16, pattern(4, 8192)})
	submit(t, d, mapper.OpWrite, big-16, regions[3].data)
	checkRegions("after reload", devRead)
	if err := m.Remove("rs", false); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, img)
	ploopCheck(t, img)
	if out := mustRun(t, "qemu-img", "info", "-f", "parallels", img); !strings.Contains(out, fmt.Sprintf("(%d bytes)", big*512)) {
		t.Fatalf("qemu-img info after resize:\n%s", out)
	}
	raw := filepath.Join(t.TempDir(), "rs.raw")
	mustRun(t, "qemu-img", "convert", "-f", "parallels", "-O", "raw", img, raw)
	f, err := os.Open(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	checkRegions("qemu-img", func(sector uint64, n int) []byte {
		buf := make([]byte, n)
		f.ReadAt(buf, int64(sector*512))
		return buf
	})
}
