package raid

import "fmt"

// algorithm is md's layout algorithm (include/linux/raid/pq.h ALGORITHM_*).
type algorithm int

// md's layouts used by dm-raid's types.
const (
	algLeftAsymmetric      algorithm = iota // ALGORITHM_LEFT_ASYMMETRIC
	algRightAsymmetric                      // ALGORITHM_RIGHT_ASYMMETRIC
	algLeftSymmetric                        // ALGORITHM_LEFT_SYMMETRIC
	algRightSymmetric                       // ALGORITHM_RIGHT_SYMMETRIC
	algParity0                              // ALGORITHM_PARITY_0
	algParityN                              // ALGORITHM_PARITY_N
	algRotatingZeroRestart                  // ALGORITHM_ROTATING_ZERO_RESTART (DDF)
	algRotatingNRestart                     // ALGORITHM_ROTATING_N_RESTART (DDF)
	algRotatingNContinue                    // ALGORITHM_ROTATING_N_CONTINUE (DDF)
	algLeftAsymmetric6                      // ALGORITHM_LEFT_ASYMMETRIC_6
	algRightAsymmetric6                     // ALGORITHM_RIGHT_ASYMMETRIC_6
	algLeftSymmetric6                       // ALGORITHM_LEFT_SYMMETRIC_6
	algRightSymmetric6                      // ALGORITHM_RIGHT_SYMMETRIC_6
)

// raidType is one of dm-raid's <raid_type> names.
type raidType struct {
	name    string
	level   int // 0, 1, 4, 5, 6 or 10
	alg     algorithm
	minDevs int
}

// parity returns the number of parity devices of the type.
func (t *raidType) parity() int {
	switch t.level {
	case 4, 5:
		return 1
	case 6:
		return 2
	}
	return 0
}

// raidTypes are the types vhostdm implements, with dm-raid 1.15's
// mapping to md levels and layouts (drivers/md/dm-raid.c raid_types).
// raid4 is md's PARITY_0: parity on the first device. The four raid10
// names are one type: as in dm-raid, raid10_format alone chooses the
// layout (near when not given), whatever the name.
var raidTypes = []raidType{
	{"raid0", 0, 0, 2},
	{"raid1", 1, 0, 2},
	{"raid10", 10, 0, 2},
	{"raid10_near", 10, 0, 2},
	{"raid10_far", 10, 0, 2},
	{"raid10_offset", 10, 0, 2},
	{"raid4", 4, algParity0, 2},
	{"raid5_n", 5, algParityN, 2},
	{"raid5_la", 5, algLeftAsymmetric, 2},
	{"raid5_ra", 5, algRightAsymmetric, 2},
	{"raid5_ls", 5, algLeftSymmetric, 2},
	{"raid5_rs", 5, algRightSymmetric, 2},
	{"raid6_zr", 6, algRotatingZeroRestart, 4},
	{"raid6_nr", 6, algRotatingNRestart, 4},
	{"raid6_nc", 6, algRotatingNContinue, 4},
	{"raid6_n_6", 6, algParityN, 4},
	{"raid6_la_6", 6, algLeftAsymmetric6, 4},
	{"raid6_ra_6", 6, algRightAsymmetric6, 4},
	{"raid6_ls_6", 6, algLeftSymmetric6, 4},
	{"raid6_rs_6", 6, algRightSymmetric6, 4},
}

func lookupType(name string) (*raidType, error) {
	for i := range raidTypes {
		if raidTypes[i].name == name {
			return &raidTypes[i], nil
		}
	}
	return nil, fmt.Errorf("raid type %q: unknown (raid0, raid1, raid10, raid10_{near,far,offset}, raid4, raid5_{n,la,ra,ls,rs}, raid6_{zr,nr,nc,n_6,la_6,ra_6,ls_6,rs_6})", name)
}

// stripeMap says where the chunks of one stripe (one chunk-row across the
// devices) live.
type stripeMap struct {
	pd, qd int    // devices holding P and Q; qd is -1 without Q
	data   []int  // data[k]: the device holding data chunk k of the stripe
	coef   []byte // coef[k]: the Q coefficient g^slot of data chunk k
}

// geometry is the layout of a raid4/5/6 array: n devices of which d hold
// data in each stripe.
type geometry struct {
	typ   *raidType
	n, d  int
	maps  []stripeMap // by stripe % len(maps): every layout repeats
	chunk uint64      // sectors
}

func newGeometry(t *raidType, n int, chunk uint64) *geometry {
	g := &geometry{typ: t, n: n, d: n - t.parity(), chunk: chunk}
	period := n * (n - 1) // a multiple of every layout's period
	if t.alg == algParity0 || t.alg == algParityN {
		period = 1
	}
	g.maps = make([]stripeMap, period)
	for s := range g.maps {
		m := stripeMap{qd: -1, data: make([]int, g.d)}
		for k := 0; k < g.d; k++ {
			m.data[k], m.pd, m.qd = g.compute(uint64(s), k)
		}
		if t.level == 6 {
			m.coef = g.qCoefficients(&m)
		}
		g.maps[s] = m
	}
	return g
}

// stripe returns the map of stripe s.
func (g *geometry) stripe(s uint64) *stripeMap { return &g.maps[s%uint64(len(g.maps))] }

// ddf reports whether the layout is one of the DDF rotating layouts, whose
// Q slots are physical device indexes.
func (g *geometry) ddf() bool {
	switch g.typ.alg {
	case algRotatingZeroRestart, algRotatingNRestart, algRotatingNContinue:
		return g.typ.level == 6
	}
	return false
}

// compute returns for data chunk k of stripe s its device and the devices
// of P and Q (-1 without Q), as md's raid5_compute_sector does.
func (g *geometry) compute(s uint64, k int) (dd, pd, qd int) {
	n, d := g.n, g.d
	dd, qd = k, -1
	if g.typ.level != 6 {
		switch g.typ.alg {
		case algLeftAsymmetric:
			pd = d - int(s%uint64(n))
			if dd >= pd {
				dd++
			}
		case algRightAsymmetric:
			pd = int(s % uint64(n))
			if dd >= pd {
				dd++
			}
		case algLeftSymmetric:
			pd = d - int(s%uint64(n))
			dd = (pd + 1 + k) % n
		case algRightSymmetric:
			pd = int(s % uint64(n))
			dd = (pd + 1 + k) % n
		case algParity0:
			pd, dd = 0, k+1
		case algParityN:
			pd = d
		}
		return dd, pd, qd
	}
	switch g.typ.alg {
	case algParityN:
		pd, qd = d, d+1
	case algRotatingZeroRestart, algRotatingNRestart:
		if g.typ.alg == algRotatingZeroRestart {
			pd = int(s % uint64(n))
		} else {
			pd = n - 1 - int((s+1)%uint64(n))
		}
		qd = pd + 1
		if pd == n-1 {
			dd, qd = k+1, 0
		} else if dd >= pd {
			dd += 2
		}
	case algRotatingNContinue:
		pd = n - 1 - int(s%uint64(n))
		qd = (pd + n - 1) % n
		dd = (pd + 1 + k) % n
	case algLeftAsymmetric6, algRightAsymmetric6:
		if g.typ.alg == algLeftAsymmetric6 {
			pd = d - int(s%uint64(n-1))
		} else {
			pd = int(s % uint64(n-1))
		}
		if dd >= pd {
			dd++
		}
		qd = n - 1
	case algLeftSymmetric6, algRightSymmetric6:
		if g.typ.alg == algLeftSymmetric6 {
			pd = d - int(s%uint64(n-1))
		} else {
			pd = int(s % uint64(n-1))
		}
		dd = (pd + 1 + k) % (n - 1)
		qd = n - 1
	}
	return dd, pd, qd
}

// qCoefficients returns g^slot for each data chunk of m, with md's slot
// numbering (raid6_idx_to_slot): DDF layouts number every device from 0,
// P and Q included; the others number the data devices only, starting
// with the device after Q.
func (g *geometry) qCoefficients(m *stripeMap) []byte {
	slot := make([]int, g.n)
	if g.ddf() {
		for i := range slot {
			slot[i] = i
		}
	} else {
		c := 0
		for j := 0; j < g.n; j++ {
			i := (m.qd + 1 + j) % g.n
			if i != m.pd && i != m.qd {
				slot[i] = c
				c++
			}
		}
	}
	coef := make([]byte, g.d)
	for k, dev := range m.data {
		coef[k] = gfPow2(slot[dev])
	}
	return coef
}
