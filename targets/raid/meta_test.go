package raid

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

// metaSet is n members of member bytes: metadata devices g<i> and data
// devices m<i>, and their "<meta> <data>" table pairs.
func metaSet(n, member int) (*mappertest.Set, []string) {
	var all, devs []string
	for i := 0; i < n; i++ {
		all = append(all, fmt.Sprintf("g%d", i), fmt.Sprintf("m%d", i))
		devs = append(devs, fmt.Sprintf("g%d m%d", i, i))
	}
	return mappertest.NewSet(member, all...), devs
}

// sbOf decodes the superblock and bitmap of metadata device name.
func sbOf(t *testing.T, set *mappertest.Set, name string) (superblock, bitmapSuper, byte) {
	t.Helper()
	b := set.Get(name).Bytes()
	sb, ok := decodeSuperblock(b)
	if !ok {
		t.Fatalf("%s: no dm-raid superblock (magic %#x)", name, binary.LittleEndian.Uint32(b))
	}
	bs, ok := decodeBitmapSuper(b[bitmapSBOffset:])
	if !ok {
		t.Fatalf("%s: no md bitmap", name)
	}
	return sb, bs, b[bitsOffset]
}

func span(b []byte, region int) []byte { return b[region*64*512 : (region+1)*64*512] }

// TestMetadataFailedLeg: a raid1 leg fails; the superblocks record it at
// once, bits of writes made while degraded stay set, and when the leg is
// back the reload recovers only those regions.
func TestMetadataFailedLeg(t *testing.T) {
	const member = 256 << 10 // 512 sectors: 8 regions of 64
	set, devs := metaSet(2, member)
	tbl := table("raid1", 2, member/512, 0, "daemon_sleep 3600000 region_size 64", devs)
	a := newArray(t, set, 2, tbl)
	waitIdle(t, a.d)
	a.io(mapper.OpWrite, 0, bytes.Repeat([]byte{1}, member))
	if err := a.d.Suspend(false); err != nil { // clears the bits
		t.Fatal(err)
	}
	if err := a.d.Resume(); err != nil {
		t.Fatal(err)
	}
	sb0, bs0, bits := sbOf(t, set, "g0")
	if bits != 0 || sb0.failed != [4]uint64{} || sb0.position != 0 || sb0.numDevices != 2 || sb0.level != 1 ||
		sb0.arraySectors != member/512 || sb0.sectors != member/512 || bs0.events != sb0.events || bs0.chunkBytes != 64*512 {
		t.Fatalf("healthy array: superblock %+v, bitmap %+v, bits %08b", sb0, bs0, bits)
	}
	if sb1, _, _ := sbOf(t, set, "g1"); sb1.position != 1 || sb1.events != sb0.events {
		t.Fatalf("member 1 superblock %+v", sb1)
	}

	set.Get("m1").FailNth(mapper.OpWrite, 1)
	a.io(mapper.OpWrite, 2*64+3, bytes.Repeat([]byte{2}, 8*512))
	sb, _, _ := sbOf(t, set, "g0")
	if !sb.isFailed(1) || sb.isFailed(0) || sb.events <= sb0.events {
		t.Fatalf("after leg 1 failed: superblock %+v (events before %d)", sb, sb0.events)
	}
	if sb1, _, _ := sbOf(t, set, "g1"); sb1.events != sb0.events {
		t.Errorf("the failed leg's superblock was written: events %d", sb1.events)
	}
	a.io(mapper.OpWrite, 5*64, bytes.Repeat([]byte{3}, 64*512))
	if err := a.d.Suspend(false); err != nil {
		t.Fatal(err)
	}
	if _, _, bits := sbOf(t, set, "g0"); bits != 1<<2|1<<5 {
		t.Fatalf("bits after a suspend while degraded: %08b, want regions 2 and 5 kept", bits)
	}
	a.m.Close()

	set.Get("m1").WriteAt([][]byte{bytes.Repeat([]byte{0xEE}, 64*512)}, 7*64*512)
	// Reloaded with a recovery rate of 128 kB/s, so that the 64 KiB to
	// recover take a moment and the status can be read while it runs
	// (unthrottled, memory devices recover before the first look).
	a = newArray(t, set, 2, table("raid1", 2, member/512, 0, "daemon_sleep 3600000 region_size 64 max_recovery_rate 128", devs))
	if f := strings.Fields(a.status()); f[2] != "Aa" {
		t.Errorf("reload with leg 1 back: %q, want it recovering", a.status())
	}
	st := waitSettled(t, a.d)
	if f := strings.Fields(st); f[2] != "AA" {
		t.Errorf("after recovery: %q", st)
	}
	m0, m1 := set.Get("m0").Bytes(), set.Get("m1").Bytes()
	for _, rg := range []int{2, 5} {
		if !bytes.Equal(span(m0, rg), span(m1, rg)) {
			t.Errorf("region %d not recovered", rg)
		}
	}
	if !bytes.Equal(span(m1, 7), bytes.Repeat([]byte{0xEE}, 64*512)) {
		t.Errorf("region 7 recovered too: not the bitmap's recovery")
	}
	for _, g := range []string{"g0", "g1"} {
		if sb, _, _ := sbOf(t, set, g); sb.failed != [4]uint64{} || sb.diskRecovery != maxSector {
			t.Errorf("%s after recovery: %+v", g, sb)
		}
	}
}

// TestMetadataLegacy: an array with vhostdm's former VDMRAIDB bitmap is
// taken over: its dirty regions resync, and the kernel's format replaces
// it.
func TestMetadataLegacy(t *testing.T) {
	const member = 256 << 10
	n := 4
	set, devs := metaSet(n, member)
	hdr := make([]byte, 4097)
	copy(hdr, legacyMagic)
	le := binary.LittleEndian
	le.PutUint32(hdr[8:], 1)
	le.PutUint32(hdr[12:], uint32(n))
	le.PutUint64(hdr[16:], 64)
	le.PutUint64(hdr[24:], 8)
	le.PutUint64(hdr[32:], member/512)
	hdr[4096] = 1 << 1
	for i := 0; i < n; i++ {
		set.Get(fmt.Sprintf("g%d", i)).WriteAt([][]byte{hdr}, 0)
	}
	// Zero members are consistent; regions 1 and 5 of member 2 are not.
	set.Get("m2").WriteAt([][]byte{bytes.Repeat([]byte{7}, 64*512)}, 1*64*512)
	set.Get("m2").WriteAt([][]byte{bytes.Repeat([]byte{7}, 64*512)}, 5*64*512)
	a := newArray(t, set, n, table("raid5_ls", n, 3*member/512, 16, "region_size 64", devs))
	waitSettled(t, a.d)
	a.message("check")
	if st := waitSettled(t, a.d); strings.Fields(st)[5] != "64" {
		t.Errorf("check after the migration: %q, want 64 sectors (region 5 only: region 1 was dirty and resynced)", st)
	}
	for i := 0; i < n; i++ {
		sb, bs, _ := sbOf(t, set, fmt.Sprintf("g%d", i))
		if sb.position != uint32(i) || sb.level != 5 || sb.layout != 2 || sb.stripe != 16 || bs.version != bitmapVersion {
			t.Errorf("g%d after the migration: %+v %+v", i, sb, bs)
		}
	}
}

// TestMetadataRefused: superblocks that do not fit the table are refused
// with the kernel's reasons, and nothing is written.
func TestMetadataRefused(t *testing.T) {
	const member = 256 << 10
	n := 4
	set, devs := metaSet(n, member)
	length := uint64(3 * member / 512)
	a := newArray(t, set, n, table("raid5_ls", n, length, 16, "region_size 64", devs))
	waitIdle(t, a.d)
	a.m.Close()
	before := set.Get("g0").Bytes()
	swapped := append([]string{devs[1], devs[0]}, devs[2:]...)
	cases := []struct{ table, want string }{
		{table("raid5_la", n, length, 16, "region_size 64", devs), "takeover is not supported"},
		{table("raid5_ls", n, length, 32, "region_size 64", devs), "reshape is not supported"},
		{table("raid5_ls", n, length, 16, "region_size 128", devs), "regions of 64 sectors"},
		{table("raid5_ls", n, length, 16, "region_size 64", swapped), "cannot change device positions"},
		{table("raid5_ls", n, length-3*64, 16, "region_size 64", devs), "resize is not supported"},
	}
	for _, c := range cases {
		m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler)})
		_, err := m.CreateTable("r", "", false, c.table)
		m.Close()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want %q", c.table, err, c.want)
		}
	}
	// A blank metadata device in an existing array needs "rebuild".
	set.Get("g3").WriteAt([][]byte{make([]byte, 8192)}, 0)
	m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler)})
	_, err := m.CreateTable("r", "", false, table("raid5_ls", n, length, 16, "region_size 64", devs))
	m.Close()
	if err == nil || !strings.Contains(err.Error(), `"rebuild 3"`) {
		t.Errorf("blank metadata device 3: %v", err)
	}
	if !bytes.Equal(set.Get("g0").Bytes(), before) {
		t.Errorf("a refused table changed the metadata")
	}
	a = newArray(t, set, n, table("raid5_ls", n, length, 16, "rebuild 3 region_size 64", devs))
	if st := waitSettled(t, a.d); strings.Fields(st)[2] != "AAAA" {
		t.Errorf("rebuild of the blank device: %q", st)
	}
}

// TestMetadataRaid0: raid0 with metadata devices keeps dm-raid's
// superblock only (level 0, the table's chunk, no bitmap), one more event
// per activation; a reload reads the data back and a table of another
// geometry is refused.
func TestMetadataRaid0(t *testing.T) {
	const member = 256 << 10
	set, devs := metaSet(3, member)
	tbl := table("raid0", 3, 3*member/512, 64, "", devs)
	a := newArray(t, set, 3, tbl)
	data := make([]byte, 3*member)
	for i := range data {
		data[i] = byte(i*7 + i/4096)
	}
	a.io(mapper.OpWrite, 0, data)
	if err := a.m.Remove("r", false); err != nil {
		t.Fatal(err)
	}
	var events uint64
	for i := range 3 {
		b := set.Get(fmt.Sprintf("g%d", i)).Bytes()
		sb, ok := decodeSuperblock(b)
		want := superblock{compat: sbFeatureV190, numDevices: 3, position: uint32(i), events: sb.events,
			diskRecovery: maxSector, arrayResync: maxSector, stripe: 64, newStripe: 64, reshapePos: maxSector,
			arraySectors: 3 * member / 512, sectors: member / 512}
		if !ok || sb != want {
			t.Fatalf("g%d: superblock %+v, want %+v", i, sb, want)
		}
		if _, ok := decodeBitmapSuper(b[bitmapSBOffset:]); ok || !bytes.Equal(b[sbSize:bitsOffset], make([]byte, bitsOffset-sbSize)) {
			t.Fatalf("g%d: raid0 wrote more than the superblock", i)
		}
		events = sb.events
	}

	a = newArray(t, set, 3, tbl)
	got := make([]byte, len(data))
	a.io(mapper.OpRead, 0, got)
	if !bytes.Equal(got, data) {
		t.Fatal("reload: data differs")
	}
	if st := a.status(); st != fmt.Sprintf("raid0 3 AAA %d/%d idle 0 0 -", member/512, member/512) {
		t.Errorf("status %q", st)
	}
	if sb, _ := decodeSuperblock(set.Get("g0").Bytes()); sb.events <= events {
		t.Errorf("reload: events %d, before %d", sb.events, events)
	}
	// A metadata device that fails a write takes nothing out of service:
	// raid0 has no redundancy and its superblock no state for the data.
	g1, _ := decodeSuperblock(set.Get("g1").Bytes())
	set.Get("g1").FailNth(mapper.OpWrite, 1)
	if err := a.d.Suspend(false); err != nil {
		t.Fatalf("suspend with a failing metadata device: %v", err)
	}
	if sb, _ := decodeSuperblock(set.Get("g1").Bytes()); sb.events != g1.events {
		t.Fatalf("g1: events %d after its write failed, want %d", sb.events, g1.events)
	}
	if err := a.d.Resume(); err != nil {
		t.Fatal(err)
	}
	sb0, _ := decodeSuperblock(set.Get("g0").Bytes())
	if sb, _ := decodeSuperblock(set.Get("g1").Bytes()); sb.events != g1.events+2 || sb0.events != sb.events {
		t.Errorf("g1: events %d after a failed then a good write (g0 %d), want %d", sb.events, sb0.events, g1.events+2)
	}
	a.io(mapper.OpRead, 0, got)
	if st := a.status(); st != fmt.Sprintf("raid0 3 AAA %d/%d idle 0 0 -", member/512, member/512) || !bytes.Equal(got, data) {
		t.Errorf("after a metadata write failed: status %q, data equal %v", st, bytes.Equal(got, data))
	}
	if err := a.m.Remove("r", false); err != nil {
		t.Fatal(err)
	}
	m := mapper.NewManager(mapper.ManagerOptions{Open: set.Open, Logger: slog.New(slog.DiscardHandler)})
	defer m.Close()
	if _, err := m.CreateTable("r", "", false, table("raid0", 3, 3*member/512, 128, "", devs)); err == nil || !strings.Contains(err.Error(), "chunks of 64 sectors") {
		t.Errorf("reload with another chunk size: %v, want refused", err)
	}
}
