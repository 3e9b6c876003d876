package snapshot_test

import (
	"math/rand/v2"
	"regexp"
)

// pattern returns n bytes of seeded pseudo-random data.
func pattern(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 99))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

func regexpMust(s string) *regexp.Regexp { return regexp.MustCompile(s) }
