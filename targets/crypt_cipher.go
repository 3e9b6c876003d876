package targets

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/crypto/xts"
)

// cryptSpec is a parsed dm-crypt cipher specification.
type cryptSpec struct {
	cipher    string // block cipher: "aes"
	chain     string // chain mode: "cbc", "xts" or "ecb"
	ivMode    string // "" for ecb, else plain, plain64, plain64be, essiv, benbi, null, eboiv
	ivOpts    string // essiv's hash
	keyCount  int    // power of two
	apiFormat bool   // given in the capi: form
}

// parseCryptSpec parses `cipher[:keycount]-chainmode-ivmode[:ivopts]` or
// `capi:chainmode(cipher)-ivmode[:ivopts]` as crypt_ctr_cipher_old and
// crypt_ctr_cipher_new split them.
func parseCryptSpec(s string) (cryptSpec, error) {
	sp := cryptSpec{keyCount: 1}
	if api, ok := strings.CutPrefix(s, "capi:"); ok {
		sp.apiFormat = true
		// ivopts after the last ':', ivmode after the last '-'.
		if i := strings.LastIndexByte(api, ':'); i >= 0 {
			api, sp.ivOpts = api[:i], api[i+1:]
		}
		if i := strings.LastIndexByte(api, '-'); i >= 0 {
			api, sp.ivMode = api[:i], api[i+1:]
		}
		open := strings.IndexByte(api, '(')
		if open <= 0 || !strings.HasSuffix(api, ")") || strings.ContainsAny(api[open+1:len(api)-1], "(),") {
			return sp, fmt.Errorf("cipher %q: want capi:chainmode(cipher)-ivmode, e.g. capi:xts(aes)-plain64", s)
		}
		sp.chain, sp.cipher = api[:open], api[open+1:len(api)-1]
		if sp.ivMode == "" && sp.chain != "ecb" {
			sp.ivMode = "null" // no IV generator: the IV stays zero
		}
	} else {
		if strings.ContainsRune(s, '(') {
			return sp, fmt.Errorf("cipher %q: bad cipher specification (use the capi: form for crypto API names)", s)
		}
		head, rest, hasDash := strings.Cut(s, "-")
		cipherName, count, hasCount := strings.Cut(head, ":")
		sp.cipher = cipherName
		if hasCount {
			n, err := strconv.ParseUint(count, 10, 31)
			if err != nil || n == 0 || n&(n-1) != 0 || strings.HasPrefix(count, "+") {
				return sp, fmt.Errorf("cipher %q: key count %q: must be a power of 2", s, count)
			}
			sp.keyCount = int(n)
		}
		chain, rest, _ := strings.Cut(rest, "-")
		ivMode, ivOpts, _ := strings.Cut(rest, ":")
		if !hasDash || chain == "plain" && ivMode == "" {
			// The original dm-crypt format: "aes" means aes-cbc-plain.
			chain, ivMode = "cbc", "plain"
		}
		sp.chain, sp.ivMode, sp.ivOpts = chain, ivMode, ivOpts
		if sp.chain != "ecb" && sp.ivMode == "" {
			return sp, fmt.Errorf("cipher %q: IV mode required for chain mode %s", s, sp.chain)
		}
	}
	if sp.cipher != "aes" {
		return sp, fmt.Errorf("cipher %q: block cipher %q not supported (only aes)", s, sp.cipher)
	}
	switch sp.chain {
	case "cbc", "xts":
	case "ecb":
		sp.ivMode, sp.ivOpts = "", "" // no IV: the kernel drops the IV mode with a warning
	default:
		return sp, fmt.Errorf("cipher %q: chain mode %q not supported (cbc, xts or ecb)", s, sp.chain)
	}
	switch sp.ivMode {
	case "", "plain", "plain64", "plain64be", "benbi", "null", "eboiv":
		if sp.ivOpts != "" && !sp.apiFormat {
			// The kernel ignores options of IV modes that take none.
			sp.ivOpts = ""
		}
	case "essiv":
		if sp.ivOpts == "" {
			return sp, fmt.Errorf("cipher %q: digest algorithm missing for ESSIV mode", s)
		}
		if sp.ivOpts != "sha256" {
			return sp, fmt.Errorf("cipher %q: ESSIV digest %q not supported (only sha256)", s, sp.ivOpts)
		}
	case "lmk", "tcw", "random", "elephant":
		return sp, fmt.Errorf("cipher %q: IV mode %q not supported", s, sp.ivMode)
	default:
		return sp, fmt.Errorf("cipher %q: invalid IV mode %q", s, sp.ivMode)
	}
	return sp, nil
}

// keySizes returns the valid sizes in bytes of one subkey.
func (sp cryptSpec) keySizes() []int {
	if sp.chain == "xts" {
		return []int{32, 64}
	}
	return []int{16, 24, 32}
}

// cryptTfm is the cipher state of one subkey (the kernel's tfm).
type cryptTfm struct {
	block cipher.Block // the data cipher (for xts: the first half of the key)
	xts   *xts.Cipher  // xts only
	tweak cipher.Block // xts only: the second half of the key, for any IV
	essiv cipher.Block // essiv only: AES keyed with sha256(subkey)
}

func newCryptTfm(sp cryptSpec, key []byte) (*cryptTfm, error) {
	t := &cryptTfm{}
	var err error
	if sp.chain == "xts" {
		if t.xts, err = xts.NewCipher(aes.NewCipher, key); err != nil {
			return nil, err
		}
		half := len(key) / 2
		if t.block, err = aes.NewCipher(key[:half]); err != nil {
			return nil, err
		}
		if t.tweak, err = aes.NewCipher(key[half:]); err != nil {
			return nil, err
		}
	} else if t.block, err = aes.NewCipher(key); err != nil {
		return nil, err
	}
	if sp.ivMode == "essiv" {
		salt := sha256.Sum256(key)
		if t.essiv, err = aes.NewCipher(salt[:]); err != nil {
			return nil, err
		}
	}
	return t, nil
}

// iv computes the IV of one encryption unit, as dm-crypt's IV generators
// do; ivSector is in 512-byte units (or in sector_size units with
// iv_large_sectors). first is the tfm of key 0, which eboiv uses.
func (sp cryptSpec) iv(iv *[16]byte, tfm, first *cryptTfm, ivSector uint64, sectorSize int) {
	*iv = [16]byte{}
	switch sp.ivMode {
	case "plain":
		binary.LittleEndian.PutUint32(iv[:], uint32(ivSector))
	case "plain64":
		binary.LittleEndian.PutUint64(iv[:], ivSector)
	case "plain64be":
		binary.BigEndian.PutUint64(iv[8:], ivSector)
	case "benbi":
		// Counts cipher blocks from 1: shift = 9 - log2(16).
		binary.BigEndian.PutUint64(iv[8:], ivSector<<5+1)
	case "essiv":
		binary.LittleEndian.PutUint64(iv[:], ivSector)
		tfm.essiv.Encrypt(iv[:], iv[:])
	case "eboiv":
		// The data cipher of key 0 encrypts one zero block with the
		// byte offset as its IV.
		var off [16]byte
		binary.LittleEndian.PutUint64(off[:], ivSector*uint64(sectorSize))
		zero := make([]byte, 16)
		first.crypt(sp, iv[:], zero, &off, true)
	}
}

// crypt encrypts or decrypts one unit from src into dst (which may be the
// same slice) with the given IV.
func (t *cryptTfm) crypt(sp cryptSpec, dst, src []byte, iv *[16]byte, encrypt bool) {
	switch sp.chain {
	case "cbc":
		if encrypt {
			cipher.NewCBCEncrypter(t.block, iv[:]).CryptBlocks(dst, src)
		} else {
			cipher.NewCBCDecrypter(t.block, iv[:]).CryptBlocks(dst, src)
		}
	case "ecb":
		for i := 0; i < len(src); i += aes.BlockSize {
			if encrypt {
				t.block.Encrypt(dst[i:i+aes.BlockSize], src[i:i+aes.BlockSize])
			} else {
				t.block.Decrypt(dst[i:i+aes.BlockSize], src[i:i+aes.BlockSize])
			}
		}
	case "xts":
		if lo := binary.LittleEndian.Uint64(iv[:]); binary.LittleEndian.Uint64(iv[8:]) == 0 {
			// The IV is a 64-bit sector number (plain, plain64, null):
			// x/crypto/xts does the whole unit.
			if encrypt {
				t.xts.Encrypt(dst, src, lo)
			} else {
				t.xts.Decrypt(dst, src, lo)
			}
			return
		}
		t.xtsAnyIV(dst, src, iv, encrypt)
	}
}

// xtsAnyIV is XTS (IEEE 1619) with a full 16-byte IV as the tweak, which
// x/crypto/xts cannot take (it only takes a 64-bit sector number): the
// tweak is the IV encrypted with the second key, and it is multiplied by x
// in GF(2^128) after every block. The block cipher is crypto/aes.
func (t *cryptTfm) xtsAnyIV(dst, src []byte, iv *[16]byte, encrypt bool) {
	var tweak, x [16]byte
	t.tweak.Encrypt(tweak[:], iv[:])
	for i := 0; i < len(src); i += 16 {
		for j := range x {
			x[j] = src[i+j] ^ tweak[j]
		}
		if encrypt {
			t.block.Encrypt(x[:], x[:])
		} else {
			t.block.Decrypt(x[:], x[:])
		}
		for j := range x {
			dst[i+j] = x[j] ^ tweak[j]
		}
		mulX(&tweak)
	}
}

// mulX multiplies the tweak by x in GF(2^128), little-endian as XTS has it.
func mulX(t *[16]byte) {
	lo := binary.LittleEndian.Uint64(t[:8])
	hi := binary.LittleEndian.Uint64(t[8:])
	carry := hi >> 63
	hi = hi<<1 | lo>>63
	lo = lo<<1 ^ carry*0x87
	binary.LittleEndian.PutUint64(t[:8], lo)
	binary.LittleEndian.PutUint64(t[8:], hi)
}
