package journal

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// BenchmarkAppend measures group commit: many goroutines append one write
// record each and wait until it is durable (fdatasync), as the hub does
// before WRITE_ACK; "pipelined" submits from one goroutine in order with
// up to 64 or 1024 submissions in flight, as a connection reader would. Reported:
// MB/s of record data, appends/s, appends per group commit.
func BenchmarkAppend(b *testing.B) {
	for _, size := range []int{4 << 10, 64 << 10} {
		b.Run(fmt.Sprintf("parallel/%dKiB", size>>10), func(b *testing.B) {
			j, vol := benchJournal(b)
			data := make([]byte, size)
			var off atomic.Int64
			b.SetBytes(int64(size))
			b.SetParallelism(16)
			b.ResetTimer()
			start, cpu0 := time.Now(), processCPU()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					o := off.Add(int64(size)) % (vol - int64(size))
					o -= o % 512
					if _, err := j.Append(context.Background(), Record{Kind: KindWrite, Volume: "a", Offset: o, Data: data}); err != nil {
						b.Error(err)
						return
					}
				}
			})
			reportAppends(b, j, start, cpu0)
		})
		for _, inflight := range []int{64, 1024} {
			b.Run(fmt.Sprintf("pipelined%d/%dKiB", inflight, size>>10), func(b *testing.B) {
				j, vol := benchJournal(b)
				data := make([]byte, size)
				b.SetBytes(int64(size))
				b.ResetTimer()
				start, cpu0 := time.Now(), processCPU()
				window := make(chan *Pending, inflight)
				done := make(chan struct{})
				go func() {
					defer close(done)
					for p := range window {
						if _, err := p.Wait(context.Background()); err != nil {
							b.Error(err)
						}
					}
				}()
				for i := range b.N {
					o := int64(i*size) % (vol - int64(size))
					o -= o % 512
					p, err := j.Submit(Record{Kind: KindWrite, Volume: "a", Offset: o, Data: data, Seq: uint64(i + 1), HasSeq: true})
					if err != nil {
						b.Fatal(err)
					}
					window <- p
				}
				close(window)
				<-done
				reportAppends(b, j, start, cpu0)
			})
		}
	}
}

func benchJournal(b *testing.B) (*Journal, int64) {
	const vol = 1 << 30
	j, err := Open(b.TempDir(), Options{NoApplier: true, Retain: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { j.Close() })
	if _, err := j.Append(context.Background(), Record{Kind: KindVolume, Volume: "a", Size: vol}); err != nil {
		b.Fatal(err)
	}
	return j, vol
}

func reportAppends(b *testing.B, j *Journal, start time.Time, cpu0 time.Duration) {
	el := time.Since(start).Seconds()
	st := j.Stats()
	b.ReportMetric(float64(b.N)/el, "appends/s")
	// The process's CPU (its io_uring workers' included) per append:
	// what the hub pays for its journal on the cores it shares.
	b.ReportMetric(float64(processCPU()-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-µs/append")
	if st.Batches > 0 {
		b.ReportMetric(float64(st.Appends)/float64(st.Batches), "appends/commit")
	}
}

// BenchmarkApply measures the applier: b.N 4 KiB write records journaled
// beforehand, then one apply pass (read, merge, write, fsync) into a 256 MiB
// preallocated base image. "sequential" writes are adjacent and merged;
// "random" ones are not.
func BenchmarkApply(b *testing.B) {
	for _, pattern := range []string{"sequential", "random"} {
		b.Run(pattern, func(b *testing.B) {
			const vol, size = 256 << 20, 4096
			j, err := Open(b.TempDir(), Options{NoApplier: true})
			if err != nil {
				b.Fatal(err)
			}
			defer j.Close()
			if _, err := j.Append(context.Background(), Record{Kind: KindVolume, Volume: "a", Size: vol}); err != nil {
				b.Fatal(err)
			}
			if err := j.ApplyNow(); err != nil { // creates the image
				b.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(1, 1))
			data := make([]byte, size)
			var last *Pending
			for i := range b.N {
				off := int64(i*size) % vol
				if pattern == "random" {
					off = int64(rng.IntN(vol/size)) * size
				}
				last, err = j.Submit(Record{Kind: KindWrite, Volume: "a", Offset: off, Data: data})
				if err != nil {
					b.Fatal(err)
				}
			}
			if _, err := last.Wait(context.Background()); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(size)
			b.ResetTimer()
			start, cpu0 := time.Now(), processCPU()
			if err := j.ApplyNow(); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "records/s")
			b.ReportMetric(float64((processCPU()-cpu0).Microseconds())/float64(b.N), "cpu-µs/record")
			if st := j.Stats(); st.Bytes != 0 {
				b.Fatalf("%d bytes left unapplied", st.Bytes)
			}
		})
	}
}

// processCPU returns the process's user plus system CPU time (the
// applier's work, its fsyncs included, on a machine whose wall clock is
// shared).
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
