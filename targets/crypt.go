package targets

import (
	"encoding/hex"
	"fmt"
	"math/bits"
	"strings"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

// crypt encrypts the device's sectors onto a backend, bit for bit as the
// kernel's dm-crypt 1.24 does, so that an image moves between vhostdm,
// the kernel and cryptsetup unchanged.
//
//	crypt <cipher> <key> <iv_offset> <dev> <offset> [<#opt_params> <opt_params>...]
//
// <cipher> is `aes[:keycount]-chainmode-ivmode[:ivopts]` or
// `capi:chainmode(aes)-ivmode[:ivopts]` with chain mode xts, cbc or ecb
// (no IV) and IV mode plain, plain64, plain64be, essiv:sha256, benbi, null
// or eboiv; plain "aes" means aes-cbc-plain. keycount splits the key into
// that many equal subkeys (a power of 2); sector s uses subkey
// (s+iv_offset) & (keycount-1). <key> is hex: 32 or 64 bytes per subkey for
// xts, 16, 24 or 32 for cbc and ecb; a kernel keyring key
// (":<size>:logon:<desc>") is refused, as vhostdm has no keyring.
// <iv_offset> is added to the sector (in 512-byte units) before the IV is
// computed; it must be a multiple of sector_size/512. Optional parameters: allow_discards (pass discards down),
// sector_size:<512..4096> (the encryption unit, a power of 2; I/O must be
// aligned to it), iv_large_sectors (IVs count sector_size units, not 512-byte
// ones), and same_cpu_crypt, submit_from_crypt_cpus, no_read_workqueue and
// no_write_workqueue, which tune kernel threads and are accepted and echoed
// only. Write-zeroes writes encrypted zeros.
//
// INFO:  "" (empty).
// TABLE: "aes-xts-plain64 0000...0000 0 254:16 0 1 allow_discards" with the
// key masked as zeros, as `dmsetup table` prints it; the status kind 2
// (`dmsetup table --showkeys`) shows the key.
//
// Messages, only while suspended: `key set <hex key>` (same size as the
// loaded key) and `key wipe`; resuming with a wiped key fails.
func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "crypt", Version: [3]int{1, 24, 0}, New: newCrypt})
}

// statusShowKeys is the status kind that shows crypt keys: the value the
// mapper will give its StatusKind for `dmsetup table --showkeys`.
const statusShowKeys = mapper.StatusShowKeys

// cryptMaxKey is the longest key accepted, in bytes.
const cryptMaxKey = 1024

type cryptTarget struct {
	// Immutable after construction.
	specText    string
	spec        cryptSpec
	keySize     int    // bytes
	ivOffset    uint64 // 512-byte sectors
	dev         mapper.Backend
	offset      uint64 // sectors into dev
	length      uint64 // sectors
	sectorSize  int    // bytes: the encryption unit
	sectorShift uint   // log2(sectorSize/512)
	ivLarge     bool
	discards    bool
	tuning      []string // accepted no-op options, in TABLE order

	mu        sync.RWMutex // guards the key against key set/wipe
	key       []byte
	tfms      []*cryptTfm // nil while the key is wiped
	suspended bool
}

// cryptTuning are the options that only tune the kernel's threads, in the
// order TABLE prints them.
var cryptTuning = []string{"same_cpu_crypt", "submit_from_crypt_cpus", "no_read_workqueue", "no_write_workqueue"}

func newCrypt(c *mapper.Ctx, args []string) (mapper.Target, error) {
	if len(args) < 5 {
		return nil, fmt.Errorf("want at least 5 arguments <cipher> <key> <iv_offset> <dev> <offset>, got %d", len(args))
	}
	t := &cryptTarget{specText: args[0], length: c.Length, sectorSize: mapper.SectorSize}
	if err := t.parseOptions(c, args[5:]); err != nil {
		return nil, err
	}
	var err error
	if t.spec, err = parseCryptSpec(args[0]); err != nil {
		return nil, err
	}
	key, err := parseCryptKey(args[1])
	if err != nil {
		return nil, err
	}
	t.keySize = len(key)
	if err := t.setKey(key); err != nil {
		return nil, err
	}
	if t.ivOffset, err = mapper.ParseUint("iv_offset", args[2], 0, 1<<64-1); err != nil {
		return nil, err
	}
	if t.ivOffset&(1<<t.sectorShift-1) != 0 {
		return nil, fmt.Errorf("iv_offset %d: not a multiple of sector_size %d", t.ivOffset, t.sectorSize)
	}
	if t.offset, err = mapper.ParseUint("device offset", args[4], 0, mapper.MaxSector); err != nil {
		return nil, err
	}
	if t.offset+c.Length > mapper.MaxSector {
		return nil, fmt.Errorf("device offset %d + length %d: beyond the largest device", t.offset, c.Length)
	}
	if t.dev, err = c.Open(args[3]); err != nil {
		return nil, err
	}
	return t, nil
}

// parseOptions reads the optional parameters; the kernel reads them
// before the cipher, so their errors come first.
func (t *cryptTarget) parseOptions(c *mapper.Ctx, args []string) error {
	if len(args) == 0 {
		return nil
	}
	a := mapper.NewArgs(args)
	n, err := a.Uint("optional parameter count", 0, 8)
	if err != nil {
		return err
	}
	if n != uint64(a.Len()) {
		return fmt.Errorf("optional parameter count %d: %d parameters follow", n, a.Len())
	}
	tuning := map[string]bool{}
	for a.Len() > 0 {
		opt, _ := a.Next("optional parameter")
		name, val, hasVal := strings.Cut(opt, ":")
		switch {
		case strings.EqualFold(opt, "allow_discards"):
			t.discards = true
		case strings.EqualFold(opt, "iv_large_sectors"):
			t.ivLarge = true
		case name == "sector_size" && hasVal:
			size, err := mapper.ParseUint("sector_size", val, 512, 4096)
			if err != nil {
				return err
			}
			if size&(size-1) != 0 {
				return fmt.Errorf("sector_size %d: not a power of 2", size)
			}
			if c.Length%(size/mapper.SectorSize) != 0 {
				return fmt.Errorf("target length %d not a multiple of sector_size %d", c.Length, size)
			}
			t.sectorSize = int(size)
			t.sectorShift = uint(bits.TrailingZeros64(size / mapper.SectorSize))
		case name == "integrity" && hasVal:
			return fmt.Errorf("optional parameter %q: integrity not supported", opt)
		default:
			known := false
			for _, o := range cryptTuning {
				if strings.EqualFold(opt, o) {
					tuning[o], known = true, true
				}
			}
			if !known {
				return fmt.Errorf("optional parameter %q: unknown", opt)
			}
		}
	}
	for _, o := range cryptTuning {
		if tuning[o] {
			t.tuning = append(t.tuning, o)
		}
	}
	return nil
}

// parseCryptKey decodes a hex key or "-" (no key).
func parseCryptKey(s string) ([]byte, error) {
	switch {
	case s == "-":
		return nil, nil
	case strings.HasPrefix(s, ":"):
		return nil, fmt.Errorf("key %q: kernel keyring keys are not supported, give the key in hex", s)
	case len(s)%2 != 0:
		return nil, fmt.Errorf("key: odd number of hex digits (%d)", len(s))
	case len(s)/2 > cryptMaxKey:
		return nil, fmt.Errorf("key: longer than %d bytes", cryptMaxKey)
	}
	key, err := hex.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("key: not hex")
	}
	return key, nil
}

// setKey splits key into subkeys and builds their ciphers; the caller
// holds mu or owns t.
func (t *cryptTarget) setKey(key []byte) error {
	n := t.spec.keyCount
	if len(key) == 0 {
		return fmt.Errorf("key \"-\": %s needs a key", t.specText)
	}
	if len(key)%n != 0 {
		return fmt.Errorf("key of %d bytes: cannot be split into %d subkeys for %s", len(key), n, t.specText)
	}
	sub := len(key) / n
	ok := false
	for _, s := range t.spec.keySizes() {
		ok = ok || s == sub
	}
	if !ok {
		return fmt.Errorf("key of %d bytes: %d-byte subkeys, want %v bytes each for %s", len(key), sub, t.spec.keySizes(), t.specText)
	}
	tfms := make([]*cryptTfm, n)
	for i := range tfms {
		tfm, err := newCryptTfm(t.spec, key[i*sub:(i+1)*sub])
		if err != nil {
			return fmt.Errorf("key: %v", err)
		}
		tfms[i] = tfm
	}
	t.key, t.tfms = key, tfms
	return nil
}

// Discards implements mapper.Discarder: only with allow_discards, as dm-crypt.
func (t *cryptTarget) Discards() bool { return t.discards }

// WritesZeroes implements mapper.Discarder.
func (t *cryptTarget) WritesZeroes() bool { return true }

func (t *cryptTarget) Map(r *mapper.Request) error {
	sector := t.offset + r.Sector
	switch r.Op {
	case mapper.OpFlush:
		return t.dev.Flush()
	case mapper.OpDiscard:
		if !t.discards {
			return mapper.Errorf(mapper.ErrUnsupported, "discard: allow_discards not set")
		}
		return t.dev.Discard(int64(sector<<mapper.SectorShift), int64(r.Bytes()))
	}
	unit := uint64(1) << t.sectorShift
	if r.Sector&(unit-1) != 0 || r.Sectors&(unit-1) != 0 {
		return mapper.Errorf(mapper.ErrIO, "%s of %d+%d sectors: not aligned to sector_size %d", r.Op, r.Sector, r.Sectors, t.sectorSize)
	}
	buf := make([]byte, r.Bytes())
	off := int64(sector << mapper.SectorShift)
	switch r.Op {
	case mapper.OpRead:
		if err := t.dev.ReadAt([][]byte{buf}, off); err != nil {
			return err
		}
		if err := t.convert(buf, r.Sector, false); err != nil {
			return err
		}
		n := 0
		for _, b := range r.Data {
			n += copy(b, buf[n:])
		}
		return nil
	case mapper.OpWrite, mapper.OpWriteZeroes:
		if r.Op == mapper.OpWrite {
			n := 0
			for _, b := range r.Data {
				n += copy(buf[n:], b)
			}
		}
		if err := t.convert(buf, r.Sector, true); err != nil {
			return err
		}
		if err := t.dev.WriteAt([][]byte{buf}, off); err != nil {
			return err
		}
		if r.FUA {
			return t.dev.Flush()
		}
		return nil
	}
	return mapper.ErrUnsupported
}

// convert encrypts or decrypts buf in place, which holds the units from
// target sector on: crypt_convert's per-unit IV sector and key index.
func (t *cryptTarget) convert(buf []byte, sector uint64, encrypt bool) error {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if t.tfms == nil {
		return mapper.Errorf(mapper.ErrIO, "crypt key is not set")
	}
	mask := uint64(len(t.tfms) - 1)
	var iv [16]byte
	for i := 0; i < len(buf); i += t.sectorSize {
		cc := sector + t.ivOffset
		ivSector := cc
		if t.ivLarge {
			ivSector >>= t.sectorShift
		}
		tfm := t.tfms[cc&mask]
		t.spec.iv(&iv, tfm, t.tfms[0], ivSector, t.sectorSize)
		u := buf[i : i+t.sectorSize]
		tfm.crypt(t.spec, u, u, &iv, encrypt)
		sector += 1 << t.sectorShift
	}
	return nil
}

func (t *cryptTarget) Status(kind mapper.StatusKind) string {
	if kind == mapper.StatusInfo {
		return ""
	}
	t.mu.RLock()
	key := "-"
	if t.keySize > 0 {
		if kind == statusShowKeys && t.tfms != nil {
			key = hex.EncodeToString(t.key)
		} else {
			// A wiped key prints as zeros, as the kernel's wiped buffer does.
			key = strings.Repeat("0", 2*t.keySize)
		}
	}
	t.mu.RUnlock()
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %d %s %d", t.specText, key, t.ivOffset, t.dev.Name(), t.offset)
	var opts []string
	if t.discards {
		opts = append(opts, "allow_discards")
	}
	opts = append(opts, t.tuning...)
	if t.sectorSize != mapper.SectorSize {
		opts = append(opts, fmt.Sprintf("sector_size:%d", t.sectorSize))
	}
	if t.ivLarge {
		opts = append(opts, "iv_large_sectors")
	}
	if len(opts) > 0 {
		fmt.Fprintf(&b, " %d %s", len(opts), strings.Join(opts, " "))
	}
	return b.String()
}

// Message handles `key set <key>` and `key wipe`, allowed only while the
// device is suspended.
func (t *cryptTarget) Message(args []string) (string, error) {
	if len(args) < 2 || !strings.EqualFold(args[0], "key") {
		return "", fmt.Errorf("unknown message %q: want key set <key> or key wipe", strings.Join(args, " "))
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.suspended {
		return "", fmt.Errorf("key %s: device not suspended", args[1])
	}
	switch {
	case strings.EqualFold(args[1], "set") && len(args) == 3:
		key, err := parseCryptKey(args[2])
		if err != nil {
			return "", err
		}
		if len(key) != t.keySize {
			return "", fmt.Errorf("key set: key of %d bytes, want %d", len(key), t.keySize)
		}
		return "", t.setKey(key)
	case strings.EqualFold(args[1], "wipe") && len(args) == 2:
		clear(t.key)
		t.key, t.tfms = nil, nil
		return "", nil
	}
	return "", fmt.Errorf("unknown message %q: want key set <key> or key wipe", strings.Join(args, " "))
}

// Presuspend marks the target suspended, which key messages require.
func (t *cryptTarget) Presuspend(noflush bool) error {
	t.mu.Lock()
	t.suspended = true
	t.mu.Unlock()
	return nil
}

// Resume refuses to go live without a key, as crypt_preresume does.
func (t *cryptTarget) Resume() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.tfms == nil {
		return fmt.Errorf("crypt key is not set: send key set first")
	}
	t.suspended = false
	return nil
}

// Close wipes the key.
// HidesKeys implements mapper.KeyHider: TABLE zeros the key, as dmsetup
// does without --showkeys.
func (t *cryptTarget) HidesKeys() {}

func (t *cryptTarget) Close() error {
	t.mu.Lock()
	clear(t.key)
	t.key, t.tfms = nil, nil
	t.mu.Unlock()
	return nil
}

// Areas lists the one area of the device the target uses.
func (t *cryptTarget) Areas(fn func(b mapper.Backend, start, length uint64) error) error {
	return fn(t.dev, t.offset, t.length)
}
