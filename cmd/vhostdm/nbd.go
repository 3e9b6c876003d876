package main

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/unixsock"
	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/nbd"
	"github.com/vhostdm/vhostdm/qmp"
)

// exportOptions turns a configured export into block-export-add's options.
func exportOptions(c *config.Config, e config.Export) qmp.ExportOptions {
	o := qmp.ExportOptions{Type: e.Type, ID: e.ID, NodeName: e.Device, Socket: c.Path(e.Socket), Writable: e.Writable,
		NumQueues: e.NumQueues, LogicalBlockSize: e.LogicalBlockSize, Serial: e.Serial}
	p := e.Perm()
	o.SocketOwner, o.SocketGroup, o.SocketMode = p.Owner, p.Group, p.Mode
	o.NegotiationTimeout = e.NegotiationWait
	o.Poll = time.Duration(e.PollUS) * time.Microsecond
	o.NoAdaptivePoll = e.AdaptivePoll != nil && !*e.AdaptivePoll
	if e.Type == config.TypeNBD {
		o.Listen, o.Name, o.Description, o.Bitmaps = e.Listen, e.Name, e.Description, e.Bitmaps
		o.TLSCreds, o.TLSNoVerifyPeer = c.Path(e.TLSCreds), !e.VerifyPeer()
		if e.Listen != "" {
			o.Socket = ""
		}
	}
	return o
}

// nbdServer is one NBD listening address and the exports served there.
type nbdServer struct {
	srv   *nbd.Server
	tls   string // TLSCreds + verify flag, which every export of the address shares
	refs  int
	done  chan struct{}
	close func()
}

// nbdExport is one NBD export on a shared server.
type nbdExport struct {
	s       *exportSet
	key     string
	srv     *nbdServer
	name    string
	bitmaps []*mapper.DirtyBitmap
}

func nbdAddrKey(o qmp.ExportOptions) string {
	if o.Listen != "" {
		return "tcp:" + o.Listen
	}
	return "unix:" + o.Socket
}

// exportBitmaps finds, checks and acquires the bitmaps an NBD export
// names, with QEMU's refusals (nbd/server.c and bdrv_dirty_bitmap_check).
func exportBitmaps(dev *mapper.Device, names []string, writable bool) ([]*mapper.DirtyBitmap, error) {
	var out []*mapper.DirtyBitmap
	release := func() {
		for _, b := range out {
			b.Release()
		}
	}
	for _, n := range names {
		b, err := dev.Bitmap(n)
		if err != nil {
			release()
			return nil, mapper.Errorf(mapper.ErrNotFound, "Bitmap '%s' is not found", n)
		}
		if err := b.CheckUsable(); err != nil {
			release()
			return nil, err
		}
		if !writable && b.Enabled() {
			release()
			return nil, mapper.Errorf(mapper.ErrInvalid, "Enabled bitmap '%s' incompatible with readonly export", n)
		}
		b.Acquire()
		out = append(out, b)
	}
	return out, nil
}

// addNBD adds an NBD export; s.mu is held.
func (s *exportSet) addNBD(o qmp.ExportOptions, dev *mapper.Device) error {
	if o.Writable {
		// Replication mirrors at the vhost export: a writable NBD export
		// of a protected device would bypass it.
		for id, e := range s.exports {
			if e.x != nil && e.opts.NodeName == o.NodeName && s.d.repOpts[id].Protect {
				return fmt.Errorf("device %s is replicated through export %q: a writable NBD export would bypass the mirror", o.NodeName, id)
			}
		}
	}
	bms, err := exportBitmaps(dev, o.Bitmaps, o.Writable)
	if err != nil {
		return err
	}
	key := nbdAddrKey(o)
	tlsKey := fmt.Sprintf("%s|%t", o.TLSCreds, o.TLSNoVerifyPeer)
	if o.Socket == "" && o.Listen == "" { // QSD's form: nbd-server-start's server
		if s.nbdDefault == "" {
			release(bms)
			return errors.New("NBD server not running")
		}
		key = s.nbdDefault
		tlsKey = s.nbdServers[key].tls
	}
	srv := s.nbdServers[key]
	if srv != nil && srv.tls != tlsKey {
		release(bms)
		return fmt.Errorf("NBD address %s is served with other TLS settings", key)
	}
	if srv == nil {
		if srv, err = s.startNBD(o, key, tlsKey); err != nil {
			release(bms)
			return err
		}
	}
	var bitmaps []nbd.Bitmap
	for _, b := range bms {
		bitmaps = append(bitmaps, b)
	}
	if err := srv.srv.Add(&nbd.Export{Name: o.Name, Description: o.Description, Device: dev, Writable: o.Writable, Bitmaps: bitmaps}); err != nil {
		release(bms)
		if srv.refs == 0 {
			srv.close()
		}
		return err
	}
	srv.refs++
	s.nbdServers[key] = srv
	dev.Open()
	done := make(chan struct{})
	close(done)
	s.exports[o.ID] = &export{opts: o, dev: dev, done: done, nbd: &nbdExport{s: s, key: key, srv: srv, name: o.Name, bitmaps: bms}}
	s.d.log.Info("nbd export added", "export", o.ID, "device", o.NodeName, "name", o.Name, "addr", key, "writable", o.Writable, "bitmaps", o.Bitmaps)
	return nil
}

func release(bms []*mapper.DirtyBitmap) {
	for _, b := range bms {
		b.Release()
	}
}

// startNBD listens on o's address and serves it until the last export
// there is removed or the daemon stops.
func (s *exportSet) startNBD(o qmp.ExportOptions, key, tlsKey string) (*nbdServer, error) {
	cfg := nbd.Config{Logger: s.d.log.With("nbd", key)}
	if o.TLSCreds != "" {
		tc, err := nbd.TLSFromDir(o.TLSCreds, !o.TLSNoVerifyPeer)
		if err != nil {
			return nil, err
		}
		cfg.TLS = tc
	}
	var ln net.Listener
	var err error
	if o.Listen != "" {
		ln, err = net.Listen("tcp", o.Listen)
	} else {
		ln, err = unixsock.Listen(o.Socket, unixsock.Perm{Owner: o.SocketOwner, Group: o.SocketGroup, Mode: o.SocketMode})
	}
	if err != nil {
		return nil, fmt.Errorf("nbd: %w", err)
	}
	ns := &nbdServer{srv: nbd.NewServer(cfg), tls: tlsKey, done: make(chan struct{})}
	ns.close = func() {
		ns.srv.Close()
		<-ns.done
		ln.Close() // a unix socket file goes with its listener
	}
	go func() {
		defer close(ns.done)
		if err := ns.srv.Serve(s.d.ctx, ln); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
			s.d.log.Error("nbd server stopped", "addr", key, "err", err)
		}
	}()
	s.d.log.Info("nbd listening", "addr", ln.Addr().String(), "tls", o.TLSCreds != "")
	if ta, ok := ln.Addr().(*net.TCPAddr); ok && o.TLSCreds == "" && !ta.IP.IsLoopback() {
		s.d.log.Warn("nbd export reachable from the network without TLS: anyone who can connect can read the disk; set tls-creds", "addr", ln.Addr().String())
	}
	return ns, nil
}

// connected reports whether clients use the export. A client that has
// just sent NBD_CMD_DISC (nbdcopy exits before the server has processed
// it) is given half a second to be gone, so that a script's
// block-export-del right after its backup tool is not refused.
func (e *nbdExport) connected() bool {
	for deadline := time.Now().Add(500 * time.Millisecond); ; {
		if e.srv.srv.Clients(e.name) == 0 {
			return false
		}
		if time.Now().After(deadline) {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// close removes the export from its server (disconnecting its clients)
// and stops the server with its last export.
func (e *nbdExport) close() error {
	err := e.srv.srv.Remove(e.name, true)
	release(e.bitmaps)
	e.s.mu.Lock()
	e.srv.refs--
	last := e.srv.refs == 0
	if last && e.s.nbdServers[e.key] == e.srv {
		delete(e.s.nbdServers, e.key)
	}
	e.s.mu.Unlock()
	if last {
		e.srv.close()
	}
	return err
}

// NBDServerStart implements qmp.NBDServer: QSD's nbd-server-start.
func (s *exportSet) NBDServerStart(o qmp.ExportOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.nbdDefault != "" {
		return errors.New("NBD server already running")
	}
	key := nbdAddrKey(o)
	tlsKey := fmt.Sprintf("%s|%t", o.TLSCreds, o.TLSNoVerifyPeer)
	srv := s.nbdServers[key]
	if srv != nil && srv.tls != tlsKey {
		return fmt.Errorf("NBD address %s is served with other TLS settings", key)
	}
	if srv == nil {
		var err error
		if srv, err = s.startNBD(o, key, tlsKey); err != nil {
			return err
		}
		s.nbdServers[key] = srv
	}
	srv.refs++ // held until nbd-server-stop
	s.nbdDefault = key
	return nil
}

// NBDServerStop implements qmp.NBDServer: QSD's nbd-server-stop removes
// the exports added without addr and stops listening.
func (s *exportSet) NBDServerStop() ([]string, error) {
	s.mu.Lock()
	key := s.nbdDefault
	if key == "" {
		s.mu.Unlock()
		return nil, errors.New("NBD server not running")
	}
	s.nbdDefault = ""
	var ids []string
	var gone []*export
	for id, e := range s.exports {
		if e.nbd != nil && e.nbd.key == key && e.opts.Socket == "" && e.opts.Listen == "" {
			ids = append(ids, id)
			gone = append(gone, e)
			delete(s.exports, id)
		}
	}
	srv := s.nbdServers[key]
	s.mu.Unlock()
	var errs []error
	for _, e := range gone {
		errs = append(errs, e.close())
	}
	s.mu.Lock()
	srv.refs--
	last := srv.refs == 0
	if last {
		delete(s.nbdServers, key)
	}
	s.mu.Unlock()
	if last {
		srv.close()
	}
	return ids, errors.Join(errs...)
}

// closeNBDServers stops the servers left once every export is closed
// (nbd-server-start's); the daemon is stopping.
func (s *exportSet) closeNBDServers() {
	s.mu.Lock()
	srvs := s.nbdServers
	s.nbdServers, s.nbdDefault = map[string]*nbdServer{}, ""
	s.mu.Unlock()
	for _, srv := range srvs {
		srv.close()
	}
}
