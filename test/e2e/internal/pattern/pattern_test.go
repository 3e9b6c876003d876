package pattern

import (
	"strings"
	"testing"
)

func TestPlanProperties(t *testing.T) {
	for _, tc := range []struct {
		size                int64
		coverage, maxBlocks int
	}{
		{64 << 20, 25, 64}, {64 << 20, 100, 64}, {1 << 20, 50, 4}, {4096, 100, 1}, {12288, 10, 8},
	} {
		plan := Plan(7, tc.size, tc.coverage, tc.maxBlocks)
		nb := tc.size / BlockSize
		used := make([]bool, nb)
		var covered int64
		first, last := false, false
		for _, e := range plan {
			if e.Off%BlockSize != 0 || e.Len%BlockSize != 0 || e.Len <= 0 || e.End() > tc.size {
				t.Fatalf("size %d: bad extent %+v", tc.size, e)
			}
			if e.Len > int64(tc.maxBlocks)*BlockSize {
				t.Fatalf("size %d: extent %+v longer than %d blocks", tc.size, e, tc.maxBlocks)
			}
			for b := e.Off / BlockSize; b < e.End()/BlockSize; b++ {
				if used[b] {
					t.Fatalf("size %d: block %d in two extents", tc.size, b)
				}
				used[b] = true
				covered++
			}
			first = first || e.Off == 0
			last = last || e.End() == tc.size
		}
		if !first || !last {
			t.Errorf("size %d: plan misses the first or last block", tc.size)
		}
		if want := nb * int64(tc.coverage) / 100; covered < want {
			t.Errorf("size %d: covered %d blocks, want at least %d", tc.size, covered, want)
		}
		again := Plan(7, tc.size, tc.coverage, tc.maxBlocks)
		if len(again) != len(plan) || (len(plan) > 0 && again[0] != plan[0]) {
			t.Errorf("size %d: plan is not deterministic", tc.size)
		}
	}
}

func TestFillCheck(t *testing.T) {
	p := make([]byte, 8192)
	Fill(p, 3, 4096)
	if err := Check(p, 3, 4096); err != nil {
		t.Fatal(err)
	}
	if err := Check(p, 3, 8192); err == nil || !strings.Contains(err.Error(), "for byte 4096") {
		t.Errorf("misplaced data: got %v, want an error naming byte 4096", err)
	}
	p[600] ^= 1
	if err := Check(p, 3, 4096); err == nil || !strings.Contains(err.Error(), "sector at byte 4608") {
		t.Errorf("corrupt byte: got %v", err)
	}
	if err := Check(make([]byte, 512), 3, 0); err == nil || !strings.Contains(err.Error(), "all zeros") {
		t.Errorf("zeros: got %v", err)
	}
}

func TestWriterPermutationAndDurability(t *testing.T) {
	w := NewWriter(99, 96*BlockSize) // not a power of two
	seen := map[int64]bool{}
	for s := int64(0); s < w.Blocks; s++ {
		seen[w.Index(s)] = true
	}
	if int64(len(seen)) != w.Blocks {
		t.Fatalf("one run of writes hits %d of %d blocks", len(seen), w.Blocks)
	}
	// A disk after 250 writes, of which the first 200 were flushed.
	disk := make([][]byte, w.Blocks)
	for i := range disk {
		disk[i] = make([]byte, BlockSize)
	}
	for s := int64(0); s < 250; s++ {
		w.Fill(disk[w.Index(s)], s)
	}
	read := func(i int64) ([]byte, error) { return disk[i], nil }
	if errs := w.CheckDurable(read, 200, 250, 5); len(errs) != 0 {
		t.Fatalf("clean disk: %v", errs)
	}
	// Lose write 199 (acknowledged): its block goes back to write 199-96.
	b := w.Index(199)
	w.Fill(disk[b], 199-w.Blocks)
	errs := w.CheckDurable(read, 200, 250, 5)
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "lost write") {
		t.Fatalf("lost write: got %v", errs)
	}
	// Losing an unacknowledged write is fine.
	w.Fill(disk[b], 199)
	w.Fill(disk[w.Index(240)], 240-w.Blocks)
	if errs := w.CheckDurable(read, 200, 250, 5); len(errs) != 0 {
		t.Fatalf("unacknowledged write lost: %v", errs)
	}
	// A torn block is reported.
	disk[3][100] ^= 0xff
	if errs := w.CheckDurable(read, 200, 250, 5); len(errs) != 1 || !strings.Contains(errs[0].Error(), "torn") {
		t.Fatalf("torn block: got %v", errs)
	}
}
