package journal

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"testing"
)

// model is the expected content of a VM's volumes.
type model map[string][]byte

func (m model) clone() model {
	c := model{}
	for k, v := range m {
		c[k] = bytes.Clone(v)
	}
	return c
}

// apply applies a record to the model.
func (m model) apply(r *Record) {
	switch r.Kind {
	case KindWrite:
		copy(m[r.Volume][r.Offset:], r.Data)
	case KindZero, KindDiscard:
		clear(m[r.Volume][r.Offset : r.Offset+r.Length])
	case KindVolume:
		b := m[r.Volume]
		if int64(len(b)) >= r.Size {
			m[r.Volume] = b[:r.Size:r.Size]
		} else {
			m[r.Volume] = append(b, make([]byte, r.Size-int64(len(b)))...)
		}
	}
}

// checkRecovered compares materialized images with the model.
func checkRecovered(t *testing.T, what string, rv Recovered, want model) {
	t.Helper()
	if len(rv.Volumes) != len(want) {
		t.Fatalf("%s: recovered %d volumes, want %d", what, len(rv.Volumes), len(want))
	}
	for _, v := range rv.Volumes {
		got, err := os.ReadFile(v.Path)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		w, ok := want[v.Name]
		if !ok {
			t.Fatalf("%s: unexpected volume %s", what, v.Name)
		}
		if int64(len(got)) != v.Size || len(got) != len(w) {
			t.Fatalf("%s: volume %s is %d bytes (reported %d), want %d", what, v.Name, len(got), v.Size, len(w))
		}
		if !bytes.Equal(got, w) {
			i := 0
			for got[i] == w[i] {
				i++
			}
			t.Fatalf("%s (point %+v): volume %s differs from the model first at byte %d", what, rv.Point, v.Name, i)
		}
	}
}

// treeSums returns the sha256 of every file under dir.
func treeSums(t *testing.T, dir string) map[string]string {
	t.Helper()
	sums := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		h := sha256.Sum256(b)
		sums[p] = hex.EncodeToString(h[:])
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return sums
}

func sameSums(t *testing.T, what string, a, b map[string]string) {
	t.Helper()
	if len(a) != len(b) {
		t.Fatalf("%s: %d files before, %d after", what, len(a), len(b))
	}
	for p, s := range a {
		if b[p] != s {
			t.Fatalf("%s: %s changed", what, p)
		}
	}
}

// gen produces the deterministic op history of the model tests: op i (from
// 1) is one record with sequence number i, a function of the seed, i and the
// state after ops 1..i-1.
type gen struct {
	seed     uint64
	vols     []string
	sizes    map[string]int64
	inResync bool
	next     uint64 // sequence number of the next op
}

func newGen(seed uint64, vols ...string) *gen {
	return &gen{seed: seed, vols: vols, sizes: map[string]int64{}, next: 1}
}

const genVolSize = 256 << 10

// op returns the next op and advances the generator's state.
func (g *gen) op() Record {
	i := g.next
	g.next++
	r := g.make(i)
	r.Seq, r.HasSeq = i, true
	switch r.Kind {
	case KindVolume:
		g.sizes[r.Volume] = r.Size
	case KindResyncBegin:
		g.inResync = true
	case KindResyncEnd:
		g.inResync = false
	}
	return r
}

func (g *gen) make(i uint64) Record {
	if i <= uint64(len(g.vols)) {
		return Record{Kind: KindVolume, Volume: g.vols[i-1], Size: genVolSize}
	}
	rng := rand.New(rand.NewPCG(g.seed, i))
	vol := g.vols[rng.IntN(len(g.vols))]
	size := g.sizes[vol]
	x := rng.IntN(100)
	switch {
	case x < 8:
		n := int64(1+rng.IntN(128)) * 512
		n = min(n, size)
		off := int64(rng.IntN(int((size-n)/512)+1)) * 512
		k := KindZero
		if x < 3 {
			k = KindDiscard
		}
		return Record{Kind: k, Volume: vol, Offset: off, Length: n}
	case x < 13:
		return Record{Kind: KindResyncBegin}
	case x < 18 && g.inResync:
		return Record{Kind: KindResyncEnd}
	case x < 22 && !g.inResync:
		return Record{Kind: KindCheckpoint, Checkpoint: fmt.Sprintf("cp-%d", i)}
	case x < 24:
		ns := size + int64(rng.IntN(5)-2)*(32<<10)
		ns = max(64<<10, min(ns, 1<<20))
		return Record{Kind: KindVolume, Volume: vol, Size: ns}
	}
	n := int64(1+rng.IntN(32)) * 512
	n = min(n, size)
	off := int64(rng.IntN(int((size-n)/512)+1)) * 512
	data := make([]byte, n)
	for j := 0; j < len(data); j += 8 {
		le.PutUint64(data[j:], rng.Uint64())
	}
	return Record{Kind: KindWrite, Volume: vol, Offset: off, Data: data}
}

// history regenerates ops 1..n and returns them.
func history(seed uint64, n uint64, vols ...string) []Record {
	g := newGen(seed, vols...)
	ops := make([]Record, 0, n)
	for g.next <= n {
		ops = append(ops, g.op())
	}
	return ops
}

// modelsAt returns the model after ops 1..s for every s in seqs.
func modelsAt(ops []Record, seqs []uint64) map[uint64]model {
	sort.Slice(seqs, func(a, b int) bool { return seqs[a] < seqs[b] })
	out := map[uint64]model{}
	m := model{}
	i := 0
	for _, s := range seqs {
		for ; uint64(i) < s; i++ {
			m.apply(&ops[i])
		}
		out[s] = m.clone()
	}
	return out
}
