// Package journaltest is the model of the journal's tests, for tests of
// other journal.Store implementations: a deterministic generator of op
// histories over several volumes (writes, zeroes, discards, resizes,
// resync sets, checkpoints), the expected volume contents after any
// prefix, and Verify, which checks an opened journal against them.
package journaltest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/vhostdm/vhostdm/repagent/hub/journal"
)

// Model is the expected content of a VM's volumes.
type Model map[string][]byte

// Clone returns a deep copy of m.
func (m Model) Clone() Model {
	c := Model{}
	for k, v := range m {
		c[k] = bytes.Clone(v)
	}
	return c
}

// Apply applies a record to the model.
func (m Model) Apply(r *journal.Record) {
	switch r.Kind {
	case journal.KindWrite:
		copy(m[r.Volume][r.Offset:], r.Data)
	case journal.KindZero, journal.KindDiscard:
		clear(m[r.Volume][r.Offset : r.Offset+r.Length])
	case journal.KindVolume:
		b := m[r.Volume]
		if int64(len(b)) >= r.Size {
			m[r.Volume] = b[:r.Size:r.Size]
		} else {
			m[r.Volume] = append(b, make([]byte, r.Size-int64(len(b)))...)
		}
	}
}

// Env says how Verify reaches what a journal.Store holds.
type Env struct {
	// Read returns the bytes of a recovered volume (its Path); nil:
	// os.ReadFile.
	Read func(path string) ([]byte, error)
	// Sums returns digests of everything the store holds (segments,
	// state, base images) to check that materializing changes none of
	// it. DirEnv's sums every file of the VM's directory.
	Sums func(t *testing.T) map[string]string
	// Done is called after each recovered point was checked (it may
	// remove what Materialize made); nil: nothing.
	Done func(t *testing.T, rv journal.Recovered)
}

// DirEnv is the Env of a journal.DirStore in dir.
func DirEnv(dir string) Env {
	return Env{Sums: func(t *testing.T) map[string]string { return treeSums(t, dir) }}
}

// CheckRecovered compares materialized images, read with read (nil:
// os.ReadFile), with the model.
func CheckRecovered(t *testing.T, what string, rv journal.Recovered, want Model, read func(string) ([]byte, error)) {
	t.Helper()
	if read == nil {
		read = os.ReadFile
	}
	if len(rv.Volumes) != len(want) {
		t.Fatalf("%s: recovered %d volumes, want %d", what, len(rv.Volumes), len(want))
	}
	for _, v := range rv.Volumes {
		got, err := read(v.Path)
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

// Gen produces the deterministic op history of the model tests: op i (from
// 1) is one record with sequence number i, a function of the seed, i and the
// state after ops 1..i-1.
type Gen struct {
	seed     uint64
	vols     []string
	sizes    map[string]int64
	inResync bool
	next     uint64 // sequence number of the next op
}

// NewGen returns the generator of seed over the volumes vols.
func NewGen(seed uint64, vols ...string) *Gen {
	return &Gen{seed: seed, vols: vols, sizes: map[string]int64{}, next: 1}
}

// VolSize is the size volumes start with.
const VolSize = 256 << 10

// Next returns the sequence number of the op Op returns next.
func (g *Gen) Next() uint64 { return g.next }

// Op returns the next op and advances the generator's state.
func (g *Gen) Op() journal.Record {
	i := g.next
	g.next++
	r := g.make(i)
	r.Seq, r.HasSeq = i, true
	switch r.Kind {
	case journal.KindVolume:
		g.sizes[r.Volume] = r.Size
	case journal.KindResyncBegin:
		g.inResync = true
	case journal.KindResyncEnd:
		g.inResync = false
	}
	return r
}

func (g *Gen) make(i uint64) journal.Record {
	if i <= uint64(len(g.vols)) {
		return journal.Record{Kind: journal.KindVolume, Volume: g.vols[i-1], Size: VolSize}
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
		k := journal.KindZero
		if x < 3 {
			k = journal.KindDiscard
		}
		return journal.Record{Kind: k, Volume: vol, Offset: off, Length: n}
	case x < 13:
		return journal.Record{Kind: journal.KindResyncBegin}
	case x < 18 && g.inResync:
		return journal.Record{Kind: journal.KindResyncEnd}
	case x < 22 && !g.inResync:
		return journal.Record{Kind: journal.KindCheckpoint, Checkpoint: fmt.Sprintf("cp-%d", i)}
	case x < 24:
		ns := size + int64(rng.IntN(5)-2)*(32<<10)
		ns = max(64<<10, min(ns, 1<<20))
		return journal.Record{Kind: journal.KindVolume, Volume: vol, Size: ns}
	}
	n := int64(1+rng.IntN(32)) * 512
	n = min(n, size)
	off := int64(rng.IntN(int((size-n)/512)+1)) * 512
	data := make([]byte, n)
	for j := 0; j < len(data); j += 8 {
		binary.LittleEndian.PutUint64(data[j:], rng.Uint64())
	}
	return journal.Record{Kind: journal.KindWrite, Volume: vol, Offset: off, Data: data}
}

// History regenerates ops 1..n and returns them.
func History(seed uint64, n uint64, vols ...string) []journal.Record {
	g := NewGen(seed, vols...)
	ops := make([]journal.Record, 0, n)
	for g.next <= n {
		ops = append(ops, g.Op())
	}
	return ops
}

// ModelsAt returns the model after ops 1..s for every s in seqs.
func ModelsAt(ops []journal.Record, seqs []uint64) map[uint64]Model {
	sort.Slice(seqs, func(a, b int) bool { return seqs[a] < seqs[b] })
	out := map[uint64]Model{}
	m := Model{}
	i := 0
	for _, s := range seqs {
		for ; uint64(i) < s; i++ {
			m.Apply(&ops[i])
		}
		out[s] = m.Clone()
	}
	return out
}

// SameRecord compares a journaled record with the op that produced it.
func SameRecord(got, want *journal.Record) bool {
	return got.Kind == want.Kind && got.Volume == want.Volume && got.Checkpoint == want.Checkpoint &&
		got.Offset == want.Offset && got.Length == want.Length && got.Size == want.Size &&
		bytes.Equal(got.Data, want.Data) && got.HasSeq == want.HasSeq && got.Seq == want.Seq
}

// Verify checks an opened journal against the op history of seed: the
// journaled records from the applied position on are exactly the next ops;
// the newest consistent point is the newest one; materialized points (the
// newest, the oldest, sampled ones, by time, by seq, by checkpoint) equal the
// model; materializing changes nothing in the store (env.Sums).
func Verify(t *testing.T, j *journal.Journal, env Env, seed uint64, rng *rand.Rand, vols ...string) journal.Stats {
	t.Helper()
	ctx := context.Background()
	st := j.Stats()
	ops := History(seed, st.LastSeq, vols...)
	next := st.Oldest.Seq + 1
	err := j.Scan(ctx, func(rec journal.Record, _, _ int64) error {
		if !rec.HasSeq || rec.Seq != next {
			return fmt.Errorf("record %s has seq %d (has %v), want %d", rec.Kind, rec.Seq, rec.HasSeq, next)
		}
		if !SameRecord(&rec, &ops[next-1]) {
			return fmt.Errorf("record seq %d is %+v, want %+v", next, rec, ops[next-1])
		}
		next++
		return nil
	})
	if err != nil {
		t.Fatalf("scan: %v", err)
	}
	if next-1 != st.LastSeq {
		t.Fatalf("journal ends at seq %d, stats say %d", next-1, st.LastSeq)
	}
	// The newest point is the last op outside a resync set.
	open := false
	lastOut := uint64(0)
	for i := range ops {
		switch ops[i].Kind {
		case journal.KindResyncBegin:
			open = true
		case journal.KindResyncEnd:
			open = false
		}
		if !open {
			lastOut = uint64(i + 1)
		}
	}
	if st.Newest.Seq != lastOut {
		t.Fatalf("newest consistent point has seq %d, the model's newest is %d", st.Newest.Seq, lastOut)
	}
	if st.InResync != open {
		t.Fatalf("InResync %v, model %v", st.InResync, open)
	}

	var pts []journal.Point
	if err := j.Points(ctx, func(p journal.Point) bool { pts = append(pts, p); return true }); err != nil {
		t.Fatal(err)
	}
	if pts[0] != st.Oldest || pts[len(pts)-1] != st.Newest {
		t.Fatalf("points run %+v..%+v, want %+v..%+v", pts[0], pts[len(pts)-1], st.Oldest, st.Newest)
	}
	type sample struct {
		what string
		sel  journal.Selector
		want journal.Point
	}
	samples := []sample{{"newest", journal.Newest(), st.Newest}, {"oldest", journal.AtPos(st.Oldest.Pos), st.Oldest}}
	for range 3 {
		p := pts[rng.IntN(len(pts))]
		samples = append(samples, sample{"sampled point", journal.AtPos(p.Pos), p})
	}
	p := pts[rng.IntN(len(pts))]
	samples = append(samples, sample{"by seq", journal.AtSeq(p.Seq), p})
	p = pts[rng.IntN(len(pts))]
	// The newest point at that time: times may repeat.
	wantT := p
	for _, q := range pts {
		if !q.Time.After(p.Time) {
			wantT = q
		}
	}
	samples = append(samples, sample{"by time", journal.AtTime(p.Time), wantT})
	if cps := j.Checkpoints(); len(cps) > 0 {
		c := cps[rng.IntN(len(cps))]
		samples = append(samples, sample{"checkpoint " + c.Name, journal.AtCheckpoint(c.Name), c.Point})
	}
	var seqs []uint64
	for _, s := range samples {
		seqs = append(seqs, s.want.Seq)
	}
	models := ModelsAt(ops, seqs)
	var before map[string]string
	if env.Sums != nil {
		before = env.Sums(t)
	}
	for k, s := range samples {
		out := filepath.Join(t.TempDir(), fmt.Sprint(k))
		rv, err := j.Materialize(ctx, s.sel, out)
		if err != nil {
			t.Fatalf("materialize %s (%s): %v", s.what, s.sel, err)
		}
		if rv.Point.Pos != s.want.Pos || rv.Point.Seq != s.want.Seq {
			t.Fatalf("%s (%s) resolved to %+v, want %+v", s.what, s.sel, rv.Point, s.want)
		}
		CheckRecovered(t, s.what, rv, models[s.want.Seq], env.Read)
		if env.Done != nil {
			env.Done(t, rv)
		}
		os.RemoveAll(out)
	}
	if env.Sums != nil {
		sameSums(t, "materialize", before, env.Sums(t))
	}
	return st
}
