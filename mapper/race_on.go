//go:build race

package mapper

import (
	"runtime"
	"unsafe"
)

// ioSync is what the race detector sees raw reads acquire and raw writes
// release, as golang.org/x/sys/unix does for its own calls: data written
// to a file by one goroutine and read back by another is ordered.
var ioSync int64

func raceReleaseIO() { runtime.RaceReleaseMerge(unsafe.Pointer(&ioSync)) }

// raceWroteBufs tells the race detector that a raw read wrote the first n
// bytes of bufs.
func raceWroteBufs(bufs [][]byte, n int) {
	for _, b := range bufs {
		if n == 0 {
			break
		}
		if m := min(len(b), n); m > 0 {
			runtime.RaceWriteRange(unsafe.Pointer(&b[0]), m)
			n -= m
		}
	}
	runtime.RaceAcquire(unsafe.Pointer(&ioSync))
}

// raceReadBufs tells the race detector that a raw write read the first n
// bytes of bufs.
func raceReadBufs(bufs [][]byte, n int) {
	for _, b := range bufs {
		if n == 0 {
			break
		}
		if m := min(len(b), n); m > 0 {
			runtime.RaceReadRange(unsafe.Pointer(&b[0]), m)
			n -= m
		}
	}
}
