package raid

import "crypto/subtle"

// GF(2^8) arithmetic of md's RAID-6 (lib/raid6): the field is
// GF(2)[x]/(x^8+x^4+x^3+x^2+1), polynomial 0x11d, generator g = {02}.
// P is the XOR of the data blocks and Q = ⊕ g^slot · D[slot].

// gfPoly is the field's reducing polynomial.
const gfPoly = 0x11d

var (
	gfExp [512]byte // gfExp[i] = g^i, doubled so that log sums need no modulo
	gfLog [256]byte // gfLog[g^i] = i; gfLog[0] is unused
	// gfMulTab[c] multiplies by c: gfMulTab[c][x] = c·x.
	gfMulTab [256][256]byte
)

func init() {
	x := 1
	for i := 0; i < 255; i++ {
		gfExp[i] = byte(x)
		gfLog[x] = byte(i)
		x <<= 1
		if x&0x100 != 0 {
			x ^= gfPoly
		}
	}
	for i := 255; i < len(gfExp); i++ {
		gfExp[i] = gfExp[i-255]
	}
	for c := 1; c < 256; c++ {
		for v := 1; v < 256; v++ {
			gfMulTab[c][v] = gfExp[int(gfLog[c])+int(gfLog[v])]
		}
	}
}

// gfMul returns a·b in the field.
func gfMul(a, b byte) byte { return gfMulTab[a][b] }

// gfInv returns 1/a; a must not be zero.
func gfInv(a byte) byte { return gfExp[255-int(gfLog[a])] }

// gfPow2 returns g^n.
func gfPow2(n int) byte { return gfExp[n%255] }

// xorInto sets dst ^= src.
func xorInto(dst, src []byte) { subtle.XORBytes(dst, dst, src[:len(dst)]) }

// mulXorInto sets dst ^= c·src.
func mulXorInto(dst, src []byte, c byte) {
	switch c {
	case 0:
		return
	case 1:
		xorInto(dst, src)
		return
	}
	t := &gfMulTab[c]
	src = src[:len(dst)]
	for i, v := range src {
		dst[i] ^= t[v]
	}
}

// mulInPlace sets b = c·b.
func mulInPlace(b []byte, c byte) {
	if c == 1 {
		return
	}
	t := &gfMulTab[c]
	for i, v := range b {
		b[i] = t[v]
	}
}
