package raid

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
)

// This file is the test's own model of md's layouts, written from the
// reference (dm-formats.md §6.1, raid5.c raid5_compute_sector and
// raid6_idx_to_slot) separately from layout.go, with GF(2^8) by
// shift-and-add instead of tables.

// refMul multiplies in GF(2^8) mod 0x11d by shift-and-add.
func refMul(a, b byte) byte {
	var p byte
	for b != 0 {
		if b&1 != 0 {
			p ^= a
		}
		hi := a & 0x80
		a <<= 1
		if hi != 0 {
			a ^= 0x1d
		}
		b >>= 1
	}
	return p
}

// refPow2 returns g^n by repeated multiplication.
func refPow2(n int) byte {
	v := byte(1)
	for i := 0; i < n; i++ {
		v = refMul(v, 2)
	}
	return v
}

func refParity(name string) int {
	switch {
	case name == "raid1":
		return 0
	case strings.HasPrefix(name, "raid6"):
		return 2
	}
	return 1
}

// refLayout returns for data chunk k of stripe s the device holding it, and
// the devices of P and Q (-1 without Q).
func refLayout(name string, n int, s uint64, k int) (dd, p, q int) {
	d := n - refParity(name)
	ns := int(s % uint64(n))
	q = -1
	switch name {
	case "raid5_la":
		p, dd = d-ns, k
		if k >= p {
			dd++
		}
	case "raid5_ra":
		p, dd = ns, k
		if k >= p {
			dd++
		}
	case "raid5_ls":
		p = d - ns
		dd = (p + 1 + k) % n
	case "raid5_rs":
		p = ns
		dd = (p + 1 + k) % n
	case "raid5_n":
		p, dd = d, k
	case "raid4":
		p, dd = 0, k+1
	case "raid6_zr", "raid6_nr":
		p = ns
		if name == "raid6_nr" {
			p = n - 1 - int((s+1)%uint64(n))
		}
		q = p + 1
		if p == n-1 {
			q, dd = 0, k+1
		} else {
			dd = k
			if k >= p {
				dd += 2
			}
		}
	case "raid6_nc":
		p = n - 1 - ns
		q = (p + n - 1) % n
		dd = (p + 1 + k) % n
	case "raid6_n_6":
		p, q, dd = d, d+1, k
	case "raid6_la_6", "raid6_ra_6", "raid6_ls_6", "raid6_rs_6":
		// The raid5 layout over the first n-1 devices, Q on the last.
		dd, p, _ = refLayout("raid5_"+name[6:8], n-1, s, k)
		q = n - 1
	default:
		panic(name)
	}
	return dd, p, q
}

// refCoef returns the Q coefficient of the data chunk on device dev.
func refCoef(name string, n int, p, q, dev int) byte {
	if name == "raid6_zr" || name == "raid6_nr" || name == "raid6_nc" {
		return refPow2(dev)
	}
	slot := 0
	for i := (q + 1) % n; i != dev; i = (i + 1) % n {
		if i != p && i != q {
			slot++
		}
	}
	return refPow2(slot)
}

// checkParityModel checks that every stripe of members has the P and Q
// the model computes from its data (raid1: identical legs).
func checkParityModel(t *testing.T, label, name string, n int, members [][]byte) {
	t.Helper()
	if err := modelCheck(name, n, kchunk, members); err != nil {
		t.Errorf("%s: %v", label, err)
	}
}

func modelCheck(name string, n int, chunk uint64, members [][]byte) error {
	if name == "raid1" {
		for i := 1; i < n; i++ {
			if !bytes.Equal(members[0], members[i]) {
				return fmt.Errorf("leg %d differs from leg 0", i)
			}
		}
		return nil
	}
	d := n - refParity(name)
	cb := int(chunk * 512)
	stripes := len(members[0]) / cb
	for s := 0; s < stripes; s++ {
		var p, q int
		wantP := make([]byte, cb)
		wantQ := make([]byte, cb)
		for k := 0; k < d; k++ {
			var dd int
			dd, p, q = refLayout(name, n, uint64(s), k)
			data := members[dd][s*cb : (s+1)*cb]
			for i, v := range data {
				wantP[i] ^= v
			}
			if q >= 0 {
				c := refCoef(name, n, p, q, dd)
				for i, v := range data {
					wantQ[i] ^= refMul(c, v)
				}
			}
		}
		if !bytes.Equal(members[p][s*cb:(s+1)*cb], wantP) {
			return fmt.Errorf("stripe %d: P on device %d differs from the model", s, p)
		}
		if q >= 0 && !bytes.Equal(members[q][s*cb:(s+1)*cb], wantQ) {
			return fmt.Errorf("stripe %d: Q on device %d differs from the model", s, q)
		}
	}
	return nil
}
