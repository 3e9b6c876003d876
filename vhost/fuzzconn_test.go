package vhost

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhostdm/vhostdm/mapper"
	"golang.org/x/sys/unix"

	"github.com/vhostdm/vhostdm/vhost/frontend"
	"github.com/vhostdm/vhostdm/vhost/internal/virtio"
	"github.com/vhostdm/vhostdm/vhost/internal/wire"
)

// fuzzExport is the export FuzzConnSequence attacks, one per process (the
// fuzzing engine runs many inputs in each worker process).
var fuzzExport struct {
	once   sync.Once
	socket string
	err    error
}

func fuzzTarget(f *testing.F) string {
	fuzzExport.once.Do(func() {
		dir, err := os.MkdirTemp("", "vfz")
		if err != nil {
			fuzzExport.err = err
			return
		}
		img := filepath.Join(dir, "d.img")
		if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
			fuzzExport.err = err
			return
		}
		m := mapper.NewManager(mapper.ManagerOptions{Logger: testLogger()})
		dev, err := m.CreateTable("fz", "", false, fmt.Sprintf("0 2048 linear %s 0", img))
		if err != nil {
			fuzzExport.err = err
			return
		}
		fuzzExport.socket = filepath.Join(dir, "s")
		e, err := NewExport(ExportConfig{ID: "fz", Socket: fuzzExport.socket, Writable: true, NumQueues: 2,
			Logger: testLogger(), Table: dev, NegotiationTimeout: 2 * time.Second}, dev)
		if err != nil {
			fuzzExport.err = err
			return
		}
		go e.Serve(context.Background())
	})
	if fuzzExport.err != nil {
		f.Fatal(fuzzExport.err)
	}
	return fuzzExport.socket
}

// fuzzOps is what one op byte of FuzzConnSequence selects.
var fuzzOps = []wire.ReqCode{
	wire.ReqGetFeatures, wire.ReqSetFeatures, wire.ReqSetProtocolFeatures, wire.ReqSetOwner, wire.ReqSetMemTable, wire.ReqAddMemReg,
	wire.ReqRemMemReg, wire.ReqSetVringNum, wire.ReqSetVringAddr, wire.ReqSetVringBase, wire.ReqGetVringBase, wire.ReqSetVringKick,
	wire.ReqSetVringCall, wire.ReqSetVringErr, wire.ReqSetVringEnable, wire.ReqSetLogBase, wire.ReqGetInflightFD, wire.ReqSetInflightFD,
	wire.ReqResetDevice, wire.ReqSetStatus, wire.ReqGetConfig, wire.ReqSetConfig, wire.ReqResetOwner, wire.ReqSetBackendReqFD,
	// Pseudo-ops: write guest memory and kick, shrink guest memory,
	// send raw bytes.
	0xfd, 0xfe, 0xff,
}

// fuzzReader hands out the fuzz input; reads past its end give zeros.
type fuzzReader struct{ b []byte }

func (r *fuzzReader) u8() uint8 {
	if len(r.b) == 0 {
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *fuzzReader) u16() uint16 { return uint16(r.u8()) | uint16(r.u8())<<8 }
func (r *fuzzReader) u32() uint32 { return uint32(r.u16()) | uint32(r.u16())<<16 }
func (r *fuzzReader) u64() uint64 { return uint64(r.u32()) | uint64(r.u32())<<32 }

// fuzzMemSize is the front end's guest memory; user address = fuzzUser+gpa.
const (
	fuzzMemSize = 256 << 10
	fuzzUser    = 0x7f0000000000
)

// FuzzConnSequence drives one connection with a sequence of messages, each
// with fds of every kind (memfds of honest and lying sizes, eventfds,
// pipes, sockets, the inflight fd the back end handed out), interleaved
// with writes of garbage into the rings, kicks, and truncation of guest
// memory. Whatever the sequence, the daemon must not crash, and once the
// connection closes the export must serve the next front end within 10 s:
// nothing wedges.
func FuzzConnSequence(f *testing.F) {
	socket := fuzzTarget(f)
	op := func(c wire.ReqCode) byte {
		for i, o := range fuzzOps {
			if o == c {
				return byte(i)
			}
		}
		panic(c)
	}
	le64 := func(v uint64) []byte { return le.AppendUint64(nil, v) }
	// A valid setup of queue 0, then a request written into the ring.
	var setup []byte
	setup = append(setup, op(wire.ReqGetFeatures), op(wire.ReqSetProtocolFeatures))
	setup = append(setup, le64(wire.ProtocolReplyAck|wire.ProtocolConfig|wire.ProtocolLogSHMFD|wire.ProtocolInflightSHMFD)...)
	setup = append(setup, op(wire.ReqSetOwner), op(wire.ReqSetFeatures))
	setup = append(setup, le64(virtio.FeatureVersion1|virtio.FeatureProtocolFeatures|virtio.FeatureIndirectDesc|virtio.FeatureLogAll)...)
	setup = append(setup, op(wire.ReqSetMemTable), 0)
	setup = append(setup, op(wire.ReqSetVringCall), 0, 1, op(wire.ReqSetVringNum), 0, 4) // 16 entries
	setup = append(setup, op(wire.ReqSetVringBase), 0, 0)
	setup = append(setup, op(wire.ReqSetVringAddr), 0, 0, 0, 0, 1, 0, 2, 0) // pages 0, 1, 2
	setup = append(setup, op(wire.ReqSetVringKick), 0, 1, op(wire.ReqSetVringEnable), 0, 1)
	garbage, shrink, raw := byte(len(fuzzOps)-3), byte(len(fuzzOps)-2), byte(len(fuzzOps)-1)
	with := func(b ...byte) []byte { return append(append([]byte{}, setup...), b...) }
	// Garbage in the available ring (page 1): index 0x00ff, heads 0xffff.
	f.Add(with(garbage, 0x10, 0, 8, 0, 0, 0xff, 0, 0xff, 0xff, 0xff, 0xff))
	// A 3-descriptor chain (header at 0x3000, data 0x4000, status
	// 0x3010) in page 0, made available: a read; then guest memory
	// shrinks under the running ring and the front end kicks again.
	chain := []byte{garbage, 0, 0, 48,
		0, 0x30, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 1, 0, 1, 0,
		0, 0x40, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 3, 0, 2, 0,
		0x10, 0x30, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0,
		garbage, 0x10, 0, 6, 0, 0, 1, 0, 0, 0}
	f.Add(with(append(append([]byte{}, chain...), shrink, 0x80, 0, garbage, 0, 0, 0)...))
	f.Add(with(append(append([]byte{}, chain...), op(wire.ReqGetVringBase), 0, 0)...))
	f.Add(with(op(wire.ReqGetInflightFD), 0, 4, op(wire.ReqSetInflightFD), 3, 0, 1, 0, 4, op(wire.ReqGetVringBase), 0, 0))
	f.Add(with(op(wire.ReqSetLogBase), 1<<2|1, op(wire.ReqSetVringAddr), 0, 1, 0, 0, 1, 0, 2, 0, op(wire.ReqResetDevice)))
	f.Add([]byte{op(wire.ReqSetVringCall), 0, 2, op(wire.ReqSetVringKick), 0, 3, raw, 12, 1, 0, 0, 0})
	f.Add(with(op(wire.ReqAddMemReg), 1, op(wire.ReqRemMemReg), 0, op(wire.ReqSetVringCall), 0, 4, op(wire.ReqSetMemTable), 2<<1))
	// Call and error fds blocked and full, then a request completes and
	// the queue is stopped.
	f.Add(with(append(append([]byte{op(wire.ReqSetVringCall), 0, 6, op(wire.ReqSetVringErr), 0, 6}, chain...), op(wire.ReqGetVringBase), 0, 0)...))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzConn(t, socket, data)
	})
}

func fuzzConn(t *testing.T, socket string, data []byte) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rc, err := frontend.DialRaw(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	// Replies are read and dropped, their fds closed.
	drained := make(chan struct{})
	synced := make(chan struct{}, 1) // a GET_FEATURES reply came
	var gfSent, gfGot atomic.Int64
	var inflightFD int = -1
	var ifMu sync.Mutex
	go func() {
		defer close(drained)
		for {
			h, _, fds, err := rc.Recv(24 * time.Hour) // until the connection closes
			if err != nil {
				return
			}
			if h.Code == wire.ReqGetFeatures {
				gfGot.Add(1)
				select {
				case synced <- struct{}{}:
				default:
				}
			}
			ifMu.Lock()
			for _, fd := range fds {
				if inflightFD < 0 {
					inflightFD = fd
				} else {
					unix.Close(fd)
				}
			}
			ifMu.Unlock()
		}
	}()
	var cleanup []int
	defer func() {
		rc.Close()
		<-drained
		for _, fd := range cleanup {
			unix.Close(fd)
		}
		if inflightFD >= 0 {
			unix.Close(inflightFD)
		}
	}()
	newFD := func(fd int, err error) int {
		if err != nil {
			t.Fatal(err)
		}
		cleanup = append(cleanup, fd)
		return fd
	}
	memfd := newFD(unix.MemfdCreate("fz", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING))
	if err := unix.Ftruncate(memfd, fuzzMemSize); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(memfd, 0, fuzzMemSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	truncated := false
	small := newFD(unix.MemfdCreate("fz-small", unix.MFD_CLOEXEC))
	unix.Ftruncate(small, 4096)
	efd := newFD(unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK))
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	cleanup = append(cleanup, p[0], p[1])
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	cleanup = append(cleanup, sp[0], sp[1])
	// blocked is an eventfd made blocking after it was filled: every
	// write the back end makes to it would block (O_NONBLOCK belongs to
	// the file description both sides share).
	blocked := newFD(unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK))
	unix.Write(blocked, le.AppendUint64(nil, 0xfffffffffffffffe))
	unix.SetNonblock(blocked, false)
	// fd picks one of the fds by a fuzz byte.
	fd := func(k uint8) []int {
		switch k % 8 {
		case 0:
			return []int{memfd}
		case 1:
			return []int{efd}
		case 2:
			return []int{p[1]}
		case 3:
			ifMu.Lock()
			defer ifMu.Unlock()
			if inflightFD >= 0 {
				return []int{inflightFD}
			}
			return []int{memfd}
		case 4:
			return []int{small}
		case 5:
			return []int{sp[1]}
		case 6:
			return []int{blocked}
		}
		return nil
	}
	r := &fuzzReader{b: data}
	send := func(code wire.ReqCode, pl wire.Payload, fds []int) {
		b := pl.AppendTo(nil)
		msg := append(wire.Header{Code: code, Flags: wire.FlagVersion | wire.FlagNeedReply, Size: uint32(len(b))}.AppendTo(nil), b...)
		rc.Send(msg, fds)
	}
	// sync waits until the back end has handled every message sent so
	// far: it answers GET_FEATURES in order.
	sync := func() bool {
		want := gfSent.Add(1)
		rc.Send(wire.Header{Code: wire.ReqGetFeatures, Flags: wire.FlagVersion}.AppendTo(nil), nil)
		deadline := time.After(2 * time.Second)
		for gfGot.Load() < want {
			select {
			case <-synced:
			case <-drained:
				return false
			case <-deadline:
				return false
			}
		}
		return true
	}
	for n := 0; n < 64 && len(r.b) > 0; n++ {
		code := fuzzOps[int(r.u8())%len(fuzzOps)]
		if code == wire.ReqGetFeatures {
			gfSent.Add(1)
		}
		if os.Getenv("VHOST_FUZZ_TRACE") != "" {
			t.Logf("op %v, %d bytes left", code, len(r.b))
		}
		switch code {
		case wire.ReqGetFeatures, wire.ReqSetOwner, wire.ReqResetDevice, wire.ReqResetOwner:
			send(code, wire.NoPayload{}, nil)
		case wire.ReqSetFeatures, wire.ReqSetProtocolFeatures, wire.ReqSetStatus:
			send(code, wire.U64(r.u64()), nil)
		case wire.ReqSetMemTable, wire.ReqAddMemReg, wire.ReqRemMemReg:
			k := r.u8()
			reg := wire.MemRegion{GPA: 0, Size: fuzzMemSize, UserAddr: fuzzUser}
			if k&1 != 0 {
				reg = wire.MemRegion{GPA: uint64(r.u32()), Size: uint64(r.u32()), UserAddr: fuzzUser + uint64(r.u32()), Offset: uint64(r.u16())}
			}
			fds := fd(k >> 1)
			if code == wire.ReqSetMemTable {
				send(code, wire.MemTable{Regions: []wire.MemRegion{reg}}, fds)
			} else {
				send(code, wire.SingleMemRegion{Region: reg}, fds)
			}
		case wire.ReqSetVringNum, wire.ReqSetVringBase, wire.ReqGetVringBase, wire.ReqSetVringEnable:
			q := uint32(r.u8() % 3)
			v := uint32(r.u8())
			if code == wire.ReqSetVringNum {
				v = 1 << (v % 16)
			}
			send(code, wire.VringState{Index: q, Num: v}, nil)
		case wire.ReqSetVringAddr:
			q := uint32(r.u8() % 3)
			// Offsets in pages of the guest memory.
			a := wire.VringAddr{Index: q, Flags: uint32(r.u8() & 1), Desc: fuzzUser + uint64(r.u16())<<12,
				Avail: fuzzUser + uint64(r.u16())<<12, Used: fuzzUser + uint64(r.u16())<<12}
			a.Log = a.Used - fuzzUser
			send(code, a, nil)
		case wire.ReqSetVringKick, wire.ReqSetVringCall, wire.ReqSetVringErr:
			q := r.u8() % 3
			fds := fd(r.u8())
			send(code, wire.VringFD{Index: q, NoFD: fds == nil}, fds)
		case wire.ReqSetLogBase:
			k := r.u8()
			send(code, wire.LogDesc{Size: 4096 << (k % 4), Offset: 0}, fd(k>>2))
		case wire.ReqGetInflightFD:
			send(code, wire.InflightDesc{NumQueues: uint16(r.u8()%3 + 1), QueueSize: 1 << (r.u8() % 9)}, nil)
		case wire.ReqSetInflightFD:
			k := r.u8()
			send(code, wire.InflightDesc{MmapSize: uint64(r.u16()) << 6, NumQueues: uint16(r.u8()%3 + 1), QueueSize: 1 << (r.u8() % 9)}, fd(k))
		case wire.ReqGetConfig, wire.ReqSetConfig:
			off, size := uint32(r.u8()%100), uint32(r.u8()%100)
			send(code, wire.ConfigMsg{Offset: off, Size: size, Flags: uint32(r.u8() & 1), Data: make([]byte, size)}, nil)
		case wire.ReqSetBackendReqFD:
			send(code, wire.NoPayload{}, fd(r.u8()))
		case 0xfd: // garbage into guest memory (rings, descriptors), then kick
			if !sync() {
				return
			}
			off := int(r.u16()) << 4 % fuzzMemSize
			n := int(r.u8())
			if !truncated {
				for i := 0; i < n && off+i < fuzzMemSize; i++ {
					mem[off+i] = r.u8()
				}
			}
			unix.Write(efd, le.AppendUint64(nil, 1))
		case 0xfe: // shrink guest memory under the back end
			if !sync() {
				return
			}
			unix.Ftruncate(memfd, int64(r.u16())<<4)
			truncated = true
			unix.Write(efd, le.AppendUint64(nil, 1))
		case 0xff: // raw bytes
			n := int(r.u8() % 32)
			b := make([]byte, 0, n)
			for range n {
				b = append(b, r.u8())
			}
			rc.Send(b, fd(r.u8()))
		}
	}
	sync()
	rc.Close()
	<-drained
	// The export serves the next front end: it answers GET_FEATURES.
	next, err := frontend.DialRaw(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	if err := next.Send(wire.Header{Code: wire.ReqGetFeatures, Flags: wire.FlagVersion}.AppendTo(nil), nil); err != nil {
		t.Fatal(err)
	}
	h, _, fds, err := next.Recv(10 * time.Second)
	wire.CloseFDs(fds)
	if err != nil || h.Code != wire.ReqGetFeatures {
		t.Fatalf("the export does not serve the next front end: %v", err)
	}
}
