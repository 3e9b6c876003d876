//go:build !race

package mapper

// Race detector annotations of the raw system calls (race_on.go); nothing
// without -race.
func raceReleaseIO()                     {}
func raceWroteBufs(bufs [][]byte, n int) {}
func raceReadBufs(bufs [][]byte, n int)  {}
