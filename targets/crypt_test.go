package targets_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/test/oracle"
)

// TestCryptGolden replays the kernel's answers recorded in testdata/crypt.
func TestCryptGolden(t *testing.T) { oracle.CheckGolden(t, "testdata/crypt") }

// cryptDevice loads a one-line crypt table of sectors over a fresh memory
// disk "c" and returns the device and the disk.
func cryptDevice(t *testing.T, sectors uint64, args []string) (*mapper.Device, func() []byte) {
	t.Helper()
	m, set := memManager(t, int(sectors)*512, "c")
	table := fmt.Sprintf("0 %d crypt %s %s %s c 0 %s", sectors, args[0], args[1], args[2], strings.Join(args[3:], " "))
	d, err := m.CreateTable("cr", "", false, table)
	if err != nil {
		t.Fatalf("%s: %v", table, err)
	}
	return d, func() []byte { return set.Get("c").Bytes() }
}

// TestCryptVectors checks vhostdm's ciphertext against the kernel's: every
// vector of testdata/crypt_vectors was recorded from the real dm-crypt
// (every IV mode, both chain modes and ecb, sector sizes 512 and 4096 with
// and without iv_large_sectors, keycount 2 and 4, iv_offset ≠ 0, capi
// forms), and decrypting gives the plaintext back.
func TestCryptVectors(t *testing.T) {
	_, vs, err := oracle.ParseVectors("testdata/crypt_vectors")
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) < 50 {
		t.Fatalf("only %d vectors", len(vs))
	}
	for _, v := range vs {
		if v.Digest == "" {
			t.Fatalf("testdata/crypt_vectors:%d: not recorded (go test ./test/oracle -oracle.record)", v.Line)
		}
		d, disk := cryptDevice(t, v.Sectors, v.Args)
		plain := oracle.Plaintext(int(v.Sectors) * 512)
		mustSubmit(t, d, mapper.OpWrite, 0, v.Sectors, plain)
		sum := sha256.Sum256(disk())
		if got := hex.EncodeToString(sum[:]); got != v.Digest {
			t.Errorf("testdata/crypt_vectors:%d: %s: ciphertext sha256 %s, kernel's %s", v.Line, v.Args[0], got, v.Digest)
			continue
		}
		back := make([]byte, len(plain))
		mustSubmit(t, d, mapper.OpRead, 0, v.Sectors, back)
		if !bytes.Equal(back, plain) {
			t.Errorf("testdata/crypt_vectors:%d: decryption differs from the plaintext", v.Line)
		}
	}
}

// pyChecker is an independent dm-crypt model in python3-cryptography
// (OpenSSL): it decrypts what vhostdm encrypted and encrypts what vhostdm
// must decrypt. The IV definitions are dm-formats.md §2.2 / Appendix B.
const pyChecker = `
import sys, json, hashlib
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
def run(key, chain, iv, data, enc):
    m = {'xts': lambda: modes.XTS(iv), 'cbc': lambda: modes.CBC(iv), 'ecb': lambda: modes.ECB()}[chain]()
    c = Cipher(algorithms.AES(key), m)
    o = c.encryptor() if enc else c.decryptor()
    return o.update(data) + o.finalize()
def ivfor(mode, sub, key0, chain, s, ss):
    if mode == 'plain': return (s & 0xffffffff).to_bytes(4, 'little') + bytes(12)
    if mode == 'plain64': return (s & (2**64-1)).to_bytes(8, 'little') + bytes(8)
    if mode == 'plain64be': return bytes(8) + (s & (2**64-1)).to_bytes(8, 'big')
    if mode == 'null': return bytes(16)
    if mode == 'benbi': return bytes(8) + (((s << 5) + 1) & (2**64-1)).to_bytes(8, 'big')
    if mode == 'essiv:sha256': return run(hashlib.sha256(sub).digest(), 'ecb', None, s.to_bytes(8, 'little') + bytes(8), True)
    if mode == 'eboiv': return run(key0, chain, ((s * ss) & (2**64-1)).to_bytes(8, 'little') + bytes(8), bytes(16), True)
    raise Exception('mode ' + mode)
out = []
for c in json.load(sys.stdin):
    key = bytes.fromhex(c['key']); n = c['keycount']; sub = len(key) // n
    subs = [key[i*sub:(i+1)*sub] for i in range(n)]
    data = bytes.fromhex(c['data']); ss = c['sector_size']; res = b''
    for i in range(0, len(data), ss):
        cc = i // 512 + c['iv_offset']
        s = cc >> (ss.bit_length() - 10) if c['iv_large'] else cc
        k = subs[cc & (n - 1)]
        iv = None if c['chain'] == 'ecb' else ivfor(c['iv'], k, subs[0], c['chain'], s, ss)
        res += run(k, c['chain'], iv, data[i:i+ss], c['encrypt'])
    out.append(res.hex())
json.dump(out, sys.stdout)
`

type pyCase struct {
	Key       string `json:"key"`
	KeyCount  int    `json:"keycount"`
	Chain     string `json:"chain"`
	IV        string `json:"iv"`
	SectorSz  int    `json:"sector_size"`
	IVLarge   bool   `json:"iv_large"`
	IVOffset  uint64 `json:"iv_offset"`
	Data      string `json:"data"`
	Encrypt   bool   `json:"encrypt"`
	cipher    string
	sectors   uint64
	plain     []byte
	ourCipher []byte
}

func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		for _, dir := range []string{"/usr/sbin/", "/sbin/"} {
			if _, e := os.Stat(dir + name); e == nil {
				return dir + name
			}
		}
		t.Fatalf("%s not found: install Debian package %s (apt-get install -y %s, or scripts/setup.sh)", name, pkg, pkg)
	}
	return p
}

// TestCryptPython round-trips every IV mode through python3-cryptography:
// it decrypts vhostdm's ciphertext and encrypts data vhostdm then
// decrypts, for both chain modes, both sector sizes, keycount > 1,
// iv_offset ≠ 0 and iv_large_sectors.
func TestCryptPython(t *testing.T) {
	py := needTool(t, "python3", "python3-cryptography")
	if out, err := exec.Command(py, "-c", "import cryptography").CombinedOutput(); err != nil {
		t.Fatalf("python3 cannot import cryptography: %v %s: install Debian package python3-cryptography", err, out)
	}
	var cases []*pyCase
	key := func(n int, seed byte) string {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i)*7 + seed
		}
		return hex.EncodeToString(b)
	}
	seed := byte(1)
	for _, iv := range []string{"plain", "plain64", "plain64be", "essiv:sha256", "benbi", "null", "eboiv"} {
		for _, chain := range []string{"xts", "cbc"} {
			for _, cfg := range []struct {
				keycount, ss int
				large        bool
				off          uint64
			}{{1, 512, false, 0}, {2, 512, false, 1001}, {1, 4096, false, 8}, {4, 4096, true, 24}} {
				klen := 64
				if chain == "cbc" {
					klen = 32
				}
				seed++
				cases = append(cases, &pyCase{Key: key(klen*cfg.keycount, seed), KeyCount: cfg.keycount, Chain: chain, IV: iv,
					SectorSz: cfg.ss, IVLarge: cfg.large, IVOffset: cfg.off, sectors: 32})
			}
		}
	}
	cases = append(cases, &pyCase{Key: key(32, 99), KeyCount: 1, Chain: "ecb", SectorSz: 4096, sectors: 32})
	for _, c := range cases {
		spec := "aes"
		if c.KeyCount > 1 {
			spec += fmt.Sprintf(":%d", c.KeyCount)
		}
		spec += "-" + c.Chain
		if c.IV != "" {
			spec += "-" + c.IV
		}
		c.cipher = spec
	}
	// Round 1: vhostdm encrypts, python decrypts.
	var batch []*pyCase
	for i, c := range cases {
		c.plain = oracle.Plaintext(int(c.sectors) * 512)[i:]
		c.plain = append(c.plain, oracle.Plaintext(i)...)
		d, disk := cryptDevice(t, c.sectors, c.args())
		mustSubmit(t, d, mapper.OpWrite, 0, c.sectors, c.plain)
		c.ourCipher = disk()
		cc := *c
		cc.Data, cc.Encrypt = hex.EncodeToString(c.ourCipher), false
		batch = append(batch, &cc)
	}
	// Round 2: python encrypts, vhostdm decrypts.
	for _, c := range cases {
		cc := *c
		cc.Data, cc.Encrypt = hex.EncodeToString(c.plain), true
		batch = append(batch, &cc)
	}
	in, _ := json.Marshal(batch)
	cmd := exec.Command(py, "-c", pyChecker)
	cmd.Stdin = bytes.NewReader(in)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("python checker: %v", err)
	}
	var res []string
	if err := json.Unmarshal(out, &res); err != nil || len(res) != len(batch) {
		t.Fatalf("python checker answered %d results (%v)", len(res), err)
	}
	for i, c := range cases {
		if res[i] != hex.EncodeToString(c.plain) {
			t.Errorf("%s: python3-cryptography does not decrypt vhostdm's ciphertext to the plaintext", c.describe())
		}
		theirs, _ := hex.DecodeString(res[len(cases)+i])
		if !bytes.Equal(theirs, c.ourCipher) {
			t.Errorf("%s: python3-cryptography's ciphertext differs from vhostdm's", c.describe())
			continue
		}
		m, set := memManager(t, int(c.sectors)*512, "c")
		set.Get("c").WriteAt([][]byte{theirs}, 0)
		d, err := m.CreateTable("cr", "", false, fmt.Sprintf("0 %d crypt %s", c.sectors, strings.Join(c.argsOn("c"), " ")))
		if err != nil {
			t.Fatal(err)
		}
		back := make([]byte, len(c.plain))
		mustSubmit(t, d, mapper.OpRead, 0, c.sectors, back)
		if !bytes.Equal(back, c.plain) {
			t.Errorf("%s: vhostdm does not decrypt python's ciphertext", c.describe())
		}
	}
}

func (c *pyCase) describe() string {
	return fmt.Sprintf("%s sector_size %d iv_offset %d iv_large %v", c.cipher, c.SectorSz, c.IVOffset, c.IVLarge)
}

// args returns cipher, key, iv_offset and options as cryptDevice takes them.
func (c *pyCase) args() []string {
	a := []string{c.cipher, c.Key, fmt.Sprint(c.IVOffset)}
	var opts []string
	if c.SectorSz != 512 {
		opts = append(opts, fmt.Sprintf("sector_size:%d", c.SectorSz))
	}
	if c.IVLarge {
		opts = append(opts, "iv_large_sectors")
	}
	if len(opts) > 0 {
		a = append(a, fmt.Sprint(len(opts)))
		a = append(a, opts...)
	}
	return a
}

func (c *pyCase) argsOn(dev string) []string {
	a := c.args()
	return append(append(a[:3:3], dev, "0"), a[3:]...)
}

// TestCryptCryptsetup checks vhostdm against cryptsetup's own dm-crypt IV
// code (OpenSSL ciphers): `cryptsetup reencrypt --encrypt` with a detached
// LUKS2 header and a known volume key turns a plain file into dm-crypt
// ciphertext, which must equal vhostdm's; and `reencrypt --decrypt` of
// vhostdm's ciphertext must give the plaintext back (for two configs: it
// takes seconds; TestCryptPython decrypts every mode). Every IV mode, both
// chain modes and both sector sizes appear (each run costs about half a
// second, so not every combination: the kernel vectors and the python
// checker cover those); LUKS2 counts IVs in 512-byte units at sector size
// 4096.
func TestCryptCryptsetup(t *testing.T) {
	cs := needTool(t, "cryptsetup", "cryptsetup-bin")
	configs := []struct {
		cipher string
		ss     int
	}{
		{"aes-xts-plain64", 512}, {"aes-xts-plain64be", 4096}, {"aes-xts-essiv:sha256", 4096}, {"aes-xts-benbi", 512},
		{"aes-cbc-plain", 4096}, {"aes-cbc-null", 512}, {"aes-cbc-eboiv", 4096}, {"aes-ecb", 512},
	}
	const sectors = 256
	dir := t.TempDir()
	pw := filepath.Join(dir, "pw")
	os.WriteFile(pw, []byte("vhostdm"), 0o600)
	type job struct {
		name, vk, hdr, img, img2, cipher string
		keyBits, ss                      int
		plain, plain2, ours              []byte
		reverse                          bool
		err                              error
	}
	jobs := make([]*job, len(configs))
	for i, cfg := range configs {
		// Decryption by cryptsetup is slow (seconds): two configs.
		j := &job{name: fmt.Sprintf("%s/%d", cfg.cipher, cfg.ss), cipher: cfg.cipher, ss: cfg.ss, keyBits: 512, reverse: i == 0 || i == 6}
		if !strings.Contains(cfg.cipher, "xts") {
			j.keyBits = 256
		}
		vk := make([]byte, j.keyBits/8)
		for k := range vk {
			vk[k] = byte(k*13 + i)
		}
		base := filepath.Join(dir, fmt.Sprint(i))
		j.vk, j.hdr, j.img, j.img2 = base+".vk", base+".hdr", base+".img", base+".img2"
		os.WriteFile(j.vk, vk, 0o600)
		os.WriteFile(j.hdr, nil, 0o600)
		os.Truncate(j.hdr, 4<<20)
		j.plain = oracle.Plaintext(sectors*512 + i)[i:]
		os.WriteFile(j.img, j.plain, 0o600)
		// vhostdm's ciphertext of the plaintext, and of other data
		// for cryptsetup to decrypt.
		args := []string{cfg.cipher, hex.EncodeToString(vk), "0"}
		if cfg.ss != 512 {
			args = append(args, "1", fmt.Sprintf("sector_size:%d", cfg.ss))
		}
		d, disk := cryptDevice(t, sectors, args)
		mustSubmit(t, d, mapper.OpWrite, 0, sectors, j.plain)
		j.ours = disk()
		j.plain2 = oracle.Plaintext(sectors*512 + 7)[7:]
		mustSubmit(t, d, mapper.OpWrite, 0, sectors, j.plain2)
		os.WriteFile(j.img2, disk(), 0o600)
		jobs[i] = j
	}
	// cryptsetup runs two at a time: encrypt the plaintext (making the
	// header), then decrypt vhostdm's ciphertext with that header.
	sem := make(chan struct{}, 2)
	var wg sync.WaitGroup
	for _, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			j.err = runCryptsetup(cs, "reencrypt", "-q", "--encrypt", "--type", "luks2", "--header", j.hdr, "--cipher", j.cipher,
				"--key-size", fmt.Sprint(j.keyBits), "--sector-size", fmt.Sprint(j.ss), "--volume-key-file", j.vk,
				"--force-offline-reencrypt", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pw,
				"--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1m", j.img)
			if j.err == nil && j.reverse {
				j.err = runCryptsetup(cs, "reencrypt", "-q", "--decrypt", "--header", j.hdr, "--force-offline-reencrypt", "--key-file", pw, j.img2)
			}
		}()
	}
	wg.Wait()
	for _, j := range jobs {
		if j.err != nil {
			t.Errorf("%s: %v", j.name, j.err)
			continue
		}
		if theirs, _ := os.ReadFile(j.img); !bytes.Equal(j.ours, theirs) {
			t.Errorf("%s: vhostdm's ciphertext differs from cryptsetup's", j.name)
		}
		if got, _ := os.ReadFile(j.img2); j.reverse && !bytes.Equal(got, j.plain2) {
			t.Errorf("%s: cryptsetup does not decrypt vhostdm's ciphertext", j.name)
		}
	}
}

func runCryptsetup(cs string, args ...string) error {
	out, err := exec.Command(cs, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

func TestCryptConformance(t *testing.T) {
	m, set := memManager(t, 1<<20, "a")
	key := strings.Repeat("0123456789abcdef", 8)
	d, err := m.CreateTable("cr", "", false, "0 256 crypt aes-xts-plain64 "+key+" 0 a 0 1 sector_size:4096\n"+
		"256 512 crypt aes:2-cbc-essiv:sha256 "+key+" 16 a 256 1 allow_discards")
	if err != nil {
		t.Fatal(err)
	}
	conform(t, m, d, 8, oracle.StatusShowKeys)
	// Unaligned I/O to the 4096-byte sector part fails; discard passes
	// down only with allow_discards; write-zeroes reads back zeros.
	if err := submit(t, d, mapper.OpRead, 1, 8, make([]byte, 4096)); err == nil {
		t.Error("unaligned read of a sector_size:4096 target succeeded")
	}
	if err := submit(t, d, mapper.OpDiscard, 0, 8, nil); err == nil {
		t.Error("discard without allow_discards succeeded")
	}
	mustSubmit(t, d, mapper.OpDiscard, 256, 8, nil)
	if !bytes.Equal(set.Get("a").Bytes()[256*512:264*512], make([]byte, 4096)) {
		t.Error("allowed discard did not reach the device")
	}
	mustSubmit(t, d, mapper.OpWriteZeroes, 8, 16, nil)
	back := make([]byte, 16*512)
	mustSubmit(t, d, mapper.OpRead, 8, 16, back)
	if !bytes.Equal(back, make([]byte, len(back))) {
		t.Error("write-zeroes does not read back as zeros")
	}
	if bytes.Equal(set.Get("a").Bytes()[8*512:24*512], back) {
		t.Error("write-zeroes left plaintext zeros on the device")
	}
	if got := d.Status(mapper.StatusTable, false)[0].Params; !strings.Contains(got, strings.Repeat("0", 128)) || strings.Contains(got, key) {
		t.Errorf("TABLE shows the key: %s", got)
	}
}

// TestCryptKeyMessages checks key wipe and key set: refused while live,
// accepted while suspended, and resume refused until a key is set.
func TestCryptKeyMessages(t *testing.T) {
	m, _ := memManager(t, 1<<20, "a")
	key := strings.Repeat("00112233445566778899aabbccddeeff", 2)
	d, err := m.CreateTable("cr", "", false, "0 64 crypt aes-cbc-plain64 "+key+" 0 a 0")
	if err != nil {
		t.Fatal(err)
	}
	data := oracle.Plaintext(4096)
	mustSubmit(t, d, mapper.OpWrite, 0, 8, data)
	if _, err := d.Message(0, []string{"key", "wipe"}); err == nil || !strings.Contains(err.Error(), "not suspended") {
		t.Fatalf("key wipe while live: %v", err)
	}
	if err := d.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Message(0, []string{"key", "wipe"}); err != nil {
		t.Fatal(err)
	}
	if err := d.Resume(); err == nil {
		t.Fatal("resume without a key succeeded")
	}
	for _, bad := range [][]string{{"key", "set", key[:32]}, {"key", "set", "xyz"}, {"key", "frob"}, {"nokey", "set"}} {
		if _, err := d.Message(0, bad); err == nil {
			t.Errorf("message %v accepted", bad)
		}
	}
	if _, err := d.Message(0, []string{"key", "set", key}); err != nil {
		t.Fatal(err)
	}
	if err := d.Resume(); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, 4096)
	mustSubmit(t, d, mapper.OpRead, 0, 8, back)
	if !bytes.Equal(back, data) {
		t.Error("data differs after key wipe and set")
	}
}

func TestCryptErrors(t *testing.T) {
	m, _ := memManager(t, 1<<20, "a")
	key := strings.Repeat("00", 64)
	for _, tc := range []struct{ args, want string }{
		{"aes-xts-plain64 " + key + " 0 a 0 1 integrity:28:aead", `optional parameter "integrity:28:aead": integrity not supported`},
		{"aes-xts-plain64 " + key + " 0 a 0 2 allow_discards", "optional parameter count 2: 1 parameters follow"},
		{"aes-xts-plain64 " + key + " 0 a 0 1 frob", `optional parameter "frob": unknown`},
		{"capi:xts(aes-plain64 " + key + " 0 a 0", `cipher "capi:xts(aes-plain64": want capi:chainmode(cipher)-ivmode, e.g. capi:xts(aes)-plain64`},
		{"aes-cbc-essiv:sha1 " + key[:64] + " 0 a 0", `cipher "aes-cbc-essiv:sha1": ESSIV digest "sha1" not supported (only sha256)`},
		{"aes-xts-plain64 " + key + "0 0 a 0", "key: odd number of hex digits (129)"},
		{"aes:2-xts-plain64 " + key[:126] + " 0 a 0", "key of 63 bytes: cannot be split into 2 subkeys for aes:2-xts-plain64"},
		{"aes-xts-plain64 " + key + " 0 nosuch 0", "open nosuch: no such memory backend"},
	} {
		_, err := m.CreateTable("e", "", false, "0 8 crypt "+tc.args)
		if err == nil || !strings.HasSuffix(err.Error(), "crypt: "+tc.want) {
			t.Errorf("%s: got %v, want ...crypt: %s", tc.args, err, tc.want)
		}
	}
}
