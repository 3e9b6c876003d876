package oracle

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Plaintext returns n bytes of the fixed pattern the crypt vectors
// encrypt: SHA-256 of a little-endian counter, block after block.
func Plaintext(n int) []byte {
	out := make([]byte, 0, n+sha256.Size)
	var ctr [8]byte
	for i := uint64(0); len(out) < n; i++ {
		binary.LittleEndian.PutUint64(ctr[:], i)
		s := sha256.Sum256(ctr[:])
		out = append(out, s[:]...)
	}
	return out[:n]
}

// Vector is one crypt known-answer vector: the kernel's dm-crypt, loaded
// with "0 <Sectors> crypt <Args[0..2]> <dev> 0 <Args[3..]>", turned the
// first Sectors*512 bytes of [Plaintext] into ciphertext whose SHA-256 is
// Digest.
type Vector struct {
	Line    int
	Sectors uint64
	Args    []string // cipher, key, iv_offset, then the optional parameters
	Digest  string   // hex; empty until recorded
}

// Table returns the vector's table line with dev as the device.
func (v Vector) Table(dev string) string {
	parts := append([]string{fmt.Sprintf("0 %d crypt", v.Sectors)}, v.Args[:3]...)
	parts = append(parts, dev, "0")
	parts = append(parts, v.Args[3:]...)
	return strings.Join(parts, " ")
}

// VectorArea is the sectors each vector may use on the kernel's disk.
const VectorArea = 128

// ParseVectors reads a vectors file: '#' lines, then one vector a line,
// "<sectors> <cipher> <key> <iv_offset> [<#opts> <opts>...] [sha256=<hex>]".
func ParseVectors(path string) (header []string, vs []Vector, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	num := 0
	for sc.Scan() {
		num++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			if len(vs) == 0 && line != "" {
				header = append(header, line)
			}
			continue
		}
		f := strings.Fields(line)
		v := Vector{Line: num}
		if d, ok := strings.CutPrefix(f[len(f)-1], "sha256="); ok {
			v.Digest, f = d, f[:len(f)-1]
		}
		if len(f) < 4 {
			return nil, nil, fmt.Errorf("%s:%d: want <sectors> <cipher> <key> <iv_offset> and options", path, num)
		}
		if v.Sectors, err = strconv.ParseUint(f[0], 10, 64); err != nil || v.Sectors == 0 || v.Sectors > VectorArea {
			return nil, nil, fmt.Errorf("%s:%d: sectors %q: must be 1 to %d", path, num, f[0], VectorArea)
		}
		v.Args = f[1:]
		vs = append(vs, v)
	}
	return header, vs, sc.Err()
}

// FormatVectors returns the file text of a vectors file.
func FormatVectors(header []string, vs []Vector) string {
	var b strings.Builder
	for _, h := range header {
		b.WriteString(h + "\n")
	}
	for _, v := range vs {
		fmt.Fprintf(&b, "%d %s", v.Sectors, strings.Join(v.Args, " "))
		if v.Digest != "" {
			b.WriteString(" sha256=" + v.Digest)
		}
		b.WriteString("\n")
	}
	return b.String()
}
