package actlog

import (
	"path/filepath"
	"sync/atomic"
	"testing"
)

func benchLog(b *testing.B, extents int) *Log {
	b.Helper()
	l, _, err := Open(filepath.Join(b.TempDir(), "vm.actlog"), Config{
		Volumes: []Volume{{"vda", 1 << 40}},
		Extents: extents,
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	return l
}

// BenchmarkHotWrite is the cost a write into a hot extent pays: Begin and
// End with no I/O and no allocation.
func BenchmarkHotWrite(b *testing.B) {
	l := benchLog(b, DefaultExtents)
	tok, err := l.Begin(0, 0, 4096)
	if err != nil {
		b.Fatal(err)
	}
	l.End(tok, 0)
	b.ReportAllocs()
	var seq uint64
	for i := 0; b.Loop(); i++ {
		seq++
		tok, err := l.Begin(0, uint64(i%1024)*4096, 4096)
		if err != nil {
			b.Fatal(err)
		}
		l.End(tok, seq)
	}
}

// BenchmarkHotWriteParallel is the same from every core at once.
func BenchmarkHotWriteParallel(b *testing.B) {
	l := benchLog(b, DefaultExtents)
	for x := range uint64(8) {
		tok, _ := l.Begin(0, x<<22, 4096)
		l.End(tok, 0)
	}
	b.ReportAllocs()
	var g atomic.Uint64
	b.RunParallel(func(pb *testing.PB) {
		x := g.Add(1) % 8
		for pb.Next() {
			tok, err := l.Begin(0, x<<22, 4096)
			if err != nil {
				b.Error(err)
				return
			}
			l.End(tok, 0)
		}
	})
}

// BenchmarkColdTransaction is one write into a cold extent at a time: one
// transaction (pwrite + fdatasync of a 4 KiB slot) each, evicting the
// least recently used extent once the set is full.
func BenchmarkColdTransaction(b *testing.B) {
	l := benchLog(b, 64)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		tok, err := l.Begin(0, uint64(i)<<22, 4096)
		if err != nil {
			b.Fatal(err)
		}
		l.End(tok, 0)
	}
	s := l.Stats()
	b.ReportMetric(float64(s.Extents)/float64(s.Transactions), "extents/txn")
}

// BenchmarkColdTransactionParallel is many writers into cold extents at
// once: they share transactions.
func BenchmarkColdTransactionParallel(b *testing.B) {
	l := benchLog(b, 1024)
	b.ReportAllocs()
	b.SetParallelism(16)
	var next atomic.Uint64
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			tok, err := l.Begin(0, next.Add(1)<<22, 4096)
			if err != nil {
				b.Error(err)
				return
			}
			l.End(tok, 0)
		}
	})
	s := l.Stats()
	b.ReportMetric(float64(s.Extents)/float64(s.Transactions), "extents/txn")
}
