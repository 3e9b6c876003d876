package ploop_test

import (
	"bufio"
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
)

// The crash workload: write i puts pattern(i) in 4 KiB block crashBlock(i)
// of a 4 MiB disk of 64 KiB clusters; every eighth write is followed by a
// flush, reported on stdout once acknowledged. After write crashAt (not
// flushed, and allocating clusters) the child reports "W" and waits to be
// killed.
const (
	crashSectors = 8192
	crashWrites  = 3000
	crashAt      = 8*9 + 5
)

func crashBlock(i int) int { return (i*7919 + i/3) % (crashSectors / 8) }

// TestCrashChild is the child process of TestCrashKill; it does nothing
// unless PLOOP_CRASH_IMAGE names the image to write.
func TestCrashChild(t *testing.T) {
	img := os.Getenv("PLOOP_CRASH_IMAGE")
	if img == "" {
		return
	}
	m := mapper.NewManager(mapper.ManagerOptions{Logger: slog.New(slog.DiscardHandler)})
	d, err := m.CreateTable("crash", "", false, fmt.Sprintf("0 %d ploop 7 %s", crashSectors, img))
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	for i := range crashWrites {
		r := &mapper.Request{Op: mapper.OpWrite, Sector: uint64(crashBlock(i) * 8), Sectors: 8, Data: [][]byte{pattern(uint64(i), 4096)}}
		if err := d.Submit(r); err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
		if i == crashAt {
			fmt.Println("W")
			time.Sleep(time.Hour)
		}
		if i%8 == 7 {
			if err := d.Submit(&mapper.Request{Op: mapper.OpFlush}); err != nil {
				fmt.Println("ERR", err)
				os.Exit(1)
			}
			fmt.Printf("F %d\n", i)
		}
	}
}

// TestCrashKill kills a process writing a ploop image with SIGKILL and
// reloads the image: every flushed write is there, the rest is either old
// or new data, and the image, once closed by us, passes qemu-img check and
// ploop check and reads the same through qemu-img.
func TestCrashKill(t *testing.T) {
	dir := t.TempDir()
	img := emptyFile(t, dir, "crash.hds")
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), "PLOOP_CRASH_IMAGE="+img)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	flushed := -1
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "ERR") {
			t.Fatalf("child: %s", line)
		}
		if v, ok := strings.CutPrefix(line, "F "); ok {
			flushed, _ = strconv.Atoi(v)
		}
		if line == "W" {
			break
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	if flushed < 0 {
		t.Fatal("child reported no flush")
	}
	// The image was left in use; our load repairs it.
	hdr := make([]byte, 64)
	f, _ := os.Open(img)
	f.ReadAt(hdr, 0)
	f.Close()
	if !bytes.Equal(hdr[44:48], []byte{0x59, 0x6e, 0x6f, 0x74}) {
		t.Fatalf("in-use flag after kill: % x", hdr[44:48])
	}
	before, _ := os.Stat(img)
	m := newManager(t)
	d := create(t, m, "r", fmt.Sprintf("0 %d ploop 7 %s", crashSectors, img))
	got := readAll(t, d)
	for b := range crashSectors / 8 {
		var ok []int // write numbers whose data the block may hold; -1: zeros
		last := -1
		for i := 0; i < crashWrites; i++ {
			if crashBlock(i) != b {
				continue
			}
			if i <= flushed {
				last = i
			} else {
				ok = append(ok, i)
			}
		}
		ok = append(ok, last)
		blk := got[b*4096 : (b+1)*4096]
		match := false
		for _, i := range ok {
			want := make([]byte, 4096)
			if i >= 0 {
				want = pattern(uint64(i), 4096)
			}
			if bytes.Equal(blk, want) {
				match = true
				break
			}
		}
		if !match {
			t.Fatalf("block %d after crash: not the flushed write %d nor a later one", b, last)
		}
	}
	if err := m.Remove("r", false); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, img)
	ploopCheck(t, img)
	if s := diff(qemuRaw(t, img), got); s != "" {
		t.Fatalf("qemu-img reads the repaired image differently: %s", s)
	}
	after, _ := os.Stat(img)
	if after.Size()%(64<<10) != 0 || after.Size() >= before.Size() {
		t.Errorf("image of %d bytes after the crash, %d after repair: want fewer, whole clusters", before.Size(), after.Size())
	}
}
