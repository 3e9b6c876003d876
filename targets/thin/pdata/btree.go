package pdata

import (
	"bytes"
	"sort"

	"github.com/vhostdm/vhostdm/mapper"
)

// B-tree node layout (part of the on-disk format):
//
//	0  u32 csum | 4 u32 flags | 8 u64 blocknr | 16 u32 nr_entries
//	20 u32 max_entries | 24 u32 value_size | 28 u32 padding
//	32 u64 keys[max_entries] | values[max_entries] of value_size bytes
//
// Internal nodes have 8-byte values: child block numbers.
const (
	nodeHeader   = 32
	flagInternal = 1
	flagLeaf     = 2
)

// MaxEntries returns the entries of a node with vsize-byte values: the
// most that fit, rounded down to a multiple of 3 (252 for 8 bytes).
func MaxEntries(vsize int) int {
	n := (BlockSize - nodeHeader) / (8 + vsize)
	return 3 * (n / 3)
}

type node []byte

func (n node) leaf() bool             { return le.Uint32(n[4:])&flagLeaf != 0 }
func (n node) nr() int                { return int(le.Uint32(n[16:])) }
func (n node) setNr(v int)            { le.PutUint32(n[16:], uint32(v)) }
func (n node) max() int               { return int(le.Uint32(n[20:])) }
func (n node) vsize() int             { return int(le.Uint32(n[24:])) }
func (n node) key(i int) uint64       { return le.Uint64(n[nodeHeader+8*i:]) }
func (n node) setKey(i int, k uint64) { le.PutUint64(n[nodeHeader+8*i:], k) }
func (n node) val(i int) []byte {
	off := nodeHeader + 8*n.max() + n.vsize()*i
	return n[off : off+n.vsize()]
}
func (n node) child(i int) uint64 { return le.Uint64(n.val(i)) }

func initNode(buf []byte, leaf bool, vsize int) node {
	n := node(buf)
	clear(n[4:])
	flags := uint32(flagInternal)
	if leaf {
		flags = flagLeaf
	}
	le.PutUint32(n[4:], flags)
	le.PutUint32(n[20:], uint32(MaxEntries(vsize)))
	le.PutUint32(n[24:], uint32(vsize))
	return n
}

// insertAt puts (k, v) at index i, moving later entries up.
func (n node) insertAt(i int, k uint64, v []byte) {
	nr, vs := n.nr(), n.vsize()
	kb := n[nodeHeader:]
	copy(kb[8*(i+1):8*(nr+1)], kb[8*i:8*nr])
	vb := n[nodeHeader+8*n.max():]
	copy(vb[vs*(i+1):vs*(nr+1)], vb[vs*i:vs*nr])
	n.setKey(i, k)
	copy(n.val(i), v)
	n.setNr(nr + 1)
}

// removeAt drops entry i.
func (n node) removeAt(i int) {
	nr, vs := n.nr(), n.vsize()
	kb := n[nodeHeader:]
	copy(kb[8*i:], kb[8*(i+1):8*nr])
	vb := n[nodeHeader+8*n.max():]
	copy(vb[vs*i:], vb[vs*(i+1):vs*nr])
	n.setNr(nr - 1)
}

// moveEntries appends src's entries [from, to) to dst.
func moveEntries(dst, src node, from, to int) {
	for i := from; i < to; i++ {
		dst.insertAt(dst.nr(), src.key(i), src.val(i))
	}
}

// lowerBound returns the first index whose key is >= k.
func (n node) lowerBound(k uint64) int {
	return sort.Search(n.nr(), func(i int) bool { return n.key(i) >= k })
}

// childIndex returns the index of the child of internal node n that
// covers k: the last key <= k, or 0.
func (n node) childIndex(k uint64) int {
	i := sort.Search(n.nr(), func(i int) bool { return n.key(i) > k })
	if i > 0 {
		i--
	}
	return i
}

// ValueType says how a tree's leaf values hold references to other
// blocks (data blocks, subtrees): Inc is called when a shared leaf is
// copied (a new reference to each value) and Dec when a value is
// overwritten, removed or its tree deleted. Nil functions do nothing.
type ValueType struct {
	Size int
	Inc  func(v []byte) error
	Dec  func(v []byte) error
}

// Tree is a copy-on-write btree of uint64 keys and fixed-size values, one
// level; multi-level keys are trees whose values are roots of others. A
// Tree value holds no root: every operation takes a root and returns the
// new one.
type Tree struct {
	TM *TM
	VT ValueType
}

func (t *Tree) read(b uint64) (node, error) {
	buf, err := t.TM.BM.Read(b, KindNode)
	if err != nil {
		return nil, err
	}
	return t.check(b, node(buf))
}

func (t *Tree) check(b uint64, n node) (node, error) {
	vs := t.VT.Size
	if !n.leaf() {
		vs = 8
	}
	fl := le.Uint32(n[4:])
	if (fl != flagLeaf && fl != flagInternal) || n.vsize() != vs || n.max() != MaxEntries(vs) || n.nr() > n.max() {
		return nil, mapper.Errorf(mapper.ErrCorrupt, "btree node %d: flags %d, value size %d, %d of %d entries: want value size %d",
			b, fl, n.vsize(), n.nr(), n.max(), vs)
	}
	return n, nil
}

// Empty returns the root of a new empty tree.
func (t *Tree) Empty() (uint64, error) {
	b, buf, err := t.TM.NewBlock(KindNode)
	if err != nil {
		return 0, err
	}
	initNode(buf, true, t.VT.Size)
	return b, nil
}

// shadow makes block b writable in this transaction, counting new
// references to its children when it was shared.
func (t *Tree) shadow(b uint64) (uint64, node, error) {
	nb, buf, inc, err := t.TM.Shadow(b, KindNode)
	if err != nil {
		return 0, nil, err
	}
	n, err := t.check(nb, node(buf))
	if err != nil {
		return 0, nil, err
	}
	if inc {
		for i := 0; i < n.nr(); i++ {
			if !n.leaf() {
				err = t.TM.Inc(n.child(i))
			} else if t.VT.Inc != nil {
				err = t.VT.Inc(n.val(i))
			}
			if err != nil {
				return 0, nil, err
			}
		}
	}
	return nb, n, nil
}

// Lookup returns a copy of the value of k, and whether k is present.
func (t *Tree) Lookup(root, k uint64) ([]byte, bool, error) {
	for depth := 0; ; depth++ {
		n, err := t.read(root)
		if err != nil {
			return nil, false, err
		}
		if n.leaf() {
			i := n.lowerBound(k)
			if i < n.nr() && n.key(i) == k {
				return bytes.Clone(n.val(i)), true, nil
			}
			return nil, false, nil
		}
		if n.nr() == 0 || depth > 64 {
			return nil, false, mapper.Errorf(mapper.ErrCorrupt, "btree node %d: empty internal node or loop", root)
		}
		root = n.child(n.childIndex(k))
	}
}

// Last returns the highest key and its value.
func (t *Tree) Last(root uint64) (uint64, []byte, bool, error) {
	for depth := 0; ; depth++ {
		n, err := t.read(root)
		if err != nil {
			return 0, nil, false, err
		}
		if n.nr() == 0 {
			return 0, nil, false, nil
		}
		if n.leaf() {
			return n.key(n.nr() - 1), bytes.Clone(n.val(n.nr() - 1)), true, nil
		}
		if depth > 64 {
			return 0, nil, false, mapper.Errorf(mapper.ErrCorrupt, "btree node %d: loop", root)
		}
		root = n.child(n.nr() - 1)
	}
}

// Walk calls fn for every entry in key order. v is valid only during fn.
func (t *Tree) Walk(root uint64, fn func(k uint64, v []byte) error) error {
	return t.walk(root, fn, 0)
}

func (t *Tree) walk(b uint64, fn func(k uint64, v []byte) error, depth int) error {
	if depth > 64 {
		return mapper.Errorf(mapper.ErrCorrupt, "btree node %d: loop", b)
	}
	n, err := t.read(b)
	if err != nil {
		return err
	}
	for i := 0; i < n.nr(); i++ {
		if n.leaf() {
			err = fn(n.key(i), n.val(i))
		} else {
			err = t.walk(n.child(i), fn, depth+1)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// WalkNodes calls fn for every node block of the tree (for checks).
func (t *Tree) WalkNodes(root uint64, fn func(b uint64, leaf bool, nr int) error) error {
	n, err := t.read(root)
	if err != nil {
		return err
	}
	if err := fn(root, n.leaf(), n.nr()); err != nil {
		return err
	}
	if n.leaf() {
		return nil
	}
	for i := 0; i < n.nr(); i++ {
		if err := t.WalkNodes(n.child(i), fn); err != nil {
			return err
		}
	}
	return nil
}

// Insert sets k to v and returns the new root. A different value that k
// had is released through the value type's Dec.
func (t *Tree) Insert(root, k uint64, v []byte) (uint64, error) {
	return t.insertRoot(root, k, v, false)
}

// Set is Insert without releasing the old value: for values that are
// pointers the caller has already moved (a subtree's new root).
func (t *Tree) Set(root, k uint64, v []byte) (uint64, error) {
	return t.insertRoot(root, k, v, true)
}

func (t *Tree) insertRoot(root, k uint64, v []byte, set bool) (uint64, error) {
	nb, sp, err := t.insert(root, k, v, set, 0)
	if err != nil || sp == nil {
		return nb, err
	}
	left, err := t.read(nb)
	if err != nil {
		return 0, err
	}
	rb, buf, err := t.TM.NewBlock(KindNode)
	if err != nil {
		return 0, err
	}
	n := initNode(buf, false, 8)
	n.insertAt(0, left.key(0), u64(nb))
	n.insertAt(1, sp.key, u64(sp.b))
	return rb, nil
}

type split struct{ key, b uint64 }

func u64(v uint64) []byte {
	var b [8]byte
	le.PutUint64(b[:], v)
	return b[:]
}

func (t *Tree) insert(b, k uint64, v []byte, set bool, depth int) (uint64, *split, error) {
	if depth > 64 {
		return 0, nil, mapper.Errorf(mapper.ErrCorrupt, "btree node %d: loop", b)
	}
	nb, n, err := t.shadow(b)
	if err != nil {
		return 0, nil, err
	}
	if n.leaf() {
		i := n.lowerBound(k)
		if i < n.nr() && n.key(i) == k {
			old := n.val(i)
			if !bytes.Equal(old, v) {
				if !set && t.VT.Dec != nil {
					if err := t.VT.Dec(bytes.Clone(old)); err != nil {
						return 0, nil, err
					}
				}
				copy(old, v)
			}
			return nb, nil, nil
		}
		return t.insertEntry(nb, n, i, k, v)
	}
	if n.nr() == 0 {
		return 0, nil, mapper.Errorf(mapper.ErrCorrupt, "btree node %d: empty internal node", b)
	}
	i := n.childIndex(k)
	if k < n.key(0) {
		n.setKey(0, k)
	}
	nc, sp, err := t.insert(n.child(i), k, v, set, depth+1)
	if err != nil {
		return 0, nil, err
	}
	le.PutUint64(n.val(i), nc)
	if sp == nil {
		return nb, nil, nil
	}
	return t.insertEntry(nb, n, i+1, sp.key, u64(sp.b))
}

// insertEntry inserts at index i of n (block nb), splitting a full node
// in two halves; the second half is returned as a split.
func (t *Tree) insertEntry(nb uint64, n node, i int, k uint64, v []byte) (uint64, *split, error) {
	if n.nr() < n.max() {
		n.insertAt(i, k, v)
		return nb, nil, nil
	}
	rb, buf, err := t.TM.NewBlock(KindNode)
	if err != nil {
		return 0, nil, err
	}
	r := initNode(buf, n.leaf(), n.vsize())
	nr := n.nr()
	mid := nr / 2
	moveEntries(r, n, mid, nr)
	n.setNr(mid)
	if i <= mid {
		n.insertAt(i, k, v)
	} else {
		r.insertAt(i-mid, k, v)
	}
	return nb, &split{key: r.key(0), b: rb}, nil
}

// Remove deletes k, releasing its value, and returns the new root and
// whether k was there. Non-root nodes keep at least a third of their
// entries (thin_check's rule), by merging with or borrowing from a
// sibling.
func (t *Tree) Remove(root, k uint64) (uint64, bool, error) {
	if _, ok, err := t.Lookup(root, k); err != nil || !ok {
		return root, false, err
	}
	nb, err := t.remove(root, k)
	if err != nil {
		return 0, false, err
	}
	for {
		n, err := t.read(nb)
		if err != nil {
			return 0, false, err
		}
		if n.leaf() || n.nr() != 1 {
			return nb, true, nil
		}
		// A root with one child: the child becomes the root.
		child := n.child(0)
		if err := t.TM.Dec(nb); err != nil {
			return 0, false, err
		}
		nb = child
	}
}

func (t *Tree) remove(b, k uint64) (uint64, error) {
	nb, n, err := t.shadow(b)
	if err != nil {
		return 0, err
	}
	if n.leaf() {
		i := n.lowerBound(k)
		if i >= n.nr() || n.key(i) != k {
			return 0, mapper.Errorf(mapper.ErrCorrupt, "btree node %d: key %d vanished", nb, k)
		}
		v := bytes.Clone(n.val(i))
		n.removeAt(i)
		if t.VT.Dec != nil {
			if err := t.VT.Dec(v); err != nil {
				return 0, err
			}
		}
		return nb, nil
	}
	i := n.childIndex(k)
	nc, err := t.remove(n.child(i), k)
	if err != nil {
		return 0, err
	}
	le.PutUint64(n.val(i), nc)
	c, err := t.read(nc)
	if err != nil {
		return 0, err
	}
	if c.nr() < c.max()/3 && n.nr() > 1 {
		if err := t.rebalance(n, i); err != nil {
			return 0, err
		}
	}
	return nb, nil
}

// rebalance fixes the underfull child i of n with a neighbour: merged
// when both fit one node, else entries shared evenly.
func (t *Tree) rebalance(n node, i int) error {
	li := i
	if i+1 >= n.nr() {
		li = i - 1
	}
	lb, l, err := t.shadow(n.child(li))
	if err != nil {
		return err
	}
	le.PutUint64(n.val(li), lb)
	rb, r, err := t.shadow(n.child(li + 1))
	if err != nil {
		return err
	}
	le.PutUint64(n.val(li+1), rb)
	if l.nr()+r.nr() <= l.max() {
		moveEntries(l, r, 0, r.nr())
		n.removeAt(li + 1)
		return t.TM.Dec(rb)
	}
	want := (l.nr() + r.nr()) / 2
	if l.nr() < want {
		m := want - l.nr()
		moveEntries(l, r, 0, m)
		for j := 0; j < m; j++ {
			r.removeAt(0)
		}
	} else {
		m := l.nr() - want
		for j := 0; j < m; j++ {
			last := l.nr() - 1
			r.insertAt(0, l.key(last), l.val(last))
			l.setNr(last)
		}
	}
	n.setKey(li+1, r.key(0))
	return nil
}

// Del drops one reference to the tree at root: when it was the last,
// every value is released and every node freed.
func (t *Tree) Del(root uint64) error {
	c, err := t.TM.SM.Count(root)
	if err != nil {
		return err
	}
	if c > 1 {
		return t.TM.Dec(root)
	}
	n, err := t.read(root)
	if err != nil {
		return err
	}
	for i := 0; i < n.nr(); i++ {
		if !n.leaf() {
			err = t.Del(n.child(i))
		} else if t.VT.Dec != nil {
			err = t.VT.Dec(bytes.Clone(n.val(i)))
		}
		if err != nil {
			return err
		}
	}
	return t.TM.Dec(root)
}
