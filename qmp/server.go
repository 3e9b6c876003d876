package qmp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhostdm/vhostdm/internal/unixsock"
	"github.com/vhostdm/vhostdm/mapper"
)

// Event names, as sent in the "event" member.
const (
	// EventDM carries a target's own event: {name, target, event, data}.
	EventDM = "DM_EVENT"
	// EventDeviceResized is sent when a resume changes a device's size:
	// {name, old-size, new-size}, sizes in sectors.
	EventDeviceResized = "DM_DEVICE_RESIZED"
	// EventBlockExportDeleted is sent when an export is gone: {id}.
	EventBlockExportDeleted = "BLOCK_EXPORT_DELETED"
	// EventVhostUserConnected is sent when a front end connects to an
	// export: {id}. The daemon emits it with Server.Emit.
	EventVhostUserConnected = "VHOST_USER_CONNECTED"
	// EventVhostUserDisconnected is sent when an export's front end goes
	// away: {id}. The daemon emits it with Server.Emit.
	EventVhostUserDisconnected = "VHOST_USER_DISCONNECTED"
)

// DefaultMaxMessageBytes bounds one incoming message when
// Config.MaxMessageBytes is zero.
const DefaultMaxMessageBytes = 1 << 20

// eventQueueLen is how many messages may wait for a client; a client that
// lets more events pile up is disconnected (see Server.Emit).
const eventQueueLen = 1024

// flushTimeout bounds writing the replies still queued when a client has
// closed its side of the connection.
const flushTimeout = 10 * time.Second

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("qmp: server closed")

// Config configures a Server.
type Config struct {
	// Manager holds the devices the dm-* commands act on. Required.
	Manager *mapper.Manager
	// Exports adds and removes vhost-user-blk exports. When nil, the
	// block-export-add and block-export-del commands fail with a
	// GenericError and query-block-exports returns no exports.
	Exports Exports
	// Logger receives the server's logs; every line about a client
	// carries "client". Defaults to slog.Default().
	Logger *slog.Logger
	// OnQuit is called, in its own goroutine, after the reply to "quit"
	// has been sent; it should stop the daemon. When nil, quit closes the
	// server.
	OnQuit func()
	// Version is the daemon's version ("0.1.0"): the greeting and
	// query-version report it as the "qemu" triple, and "vhostdm VERSION"
	// as "package".
	Version string
	// MaxMessageBytes bounds one incoming message; a longer one is
	// discarded with a GenericError and the connection is kept. Defaults
	// to DefaultMaxMessageBytes.
	MaxMessageBytes int
	// Extra adds commands to the built-in set (see ExtraCommand).
	Extra []ExtraCommand
}

// Server is a QMP server. Its methods may be called concurrently. Each
// client is served by its own goroutines; commands of one client run one
// after the other, in order, and commands of different clients run
// concurrently.
type Server struct {
	cfg     Config
	log     *slog.Logger
	version versionInfo
	cmds    map[string]*command

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	clients   map[*client]struct{}
	nextID    uint64
	wg        sync.WaitGroup
}

// NewServer returns a server for cfg. It serves nothing until Serve.
func NewServer(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxMessageBytes <= 0 {
		cfg.MaxMessageBytes = DefaultMaxMessageBytes
	}
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		version:   parseVersion(cfg.Version),
		listeners: map[net.Listener]struct{}{},
		clients:   map[*client]struct{}{},
	}
	s.cmds = s.commands()
	return s
}

// Serve accepts clients on l until ctx is done, Close is called or
// accepting fails. It closes l, and before returning it disconnects the
// clients it accepted and waits for their goroutines. It returns nil when
// stopped by ctx, ErrServerClosed after Close, else the accept error.
// Serve may run on several listeners at once.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()

	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel() // disconnects this listener's clients
		wg.Wait()
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()

	for {
		conn, err := l.Accept()
		if err != nil {
			l.Close()
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			switch {
			case closed:
				return ErrServerClosed
			case ctx.Err() != nil:
				return nil
			}
			return fmt.Errorf("qmp: accept: %w", err)
		}
		c := s.newClient(conn)
		if c == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer s.wg.Done()
			c.serve(ctx)
		}()
	}
}

// CommandNames returns the names of every command the server answers,
// extra ones included, sorted (what query-commands lists).
func (s *Server) CommandNames() []string {
	names := make([]string, 0, len(s.cmds))
	for n := range s.cmds {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Close stops every Serve, disconnects every client and waits for their
// goroutines. Commands already running finish first.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.clients {
		c.shut("server closed")
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// Emit sends an event to every client that has completed capabilities
// negotiation. data is marshalled as the event's "data" member and should
// be an object (a struct or map); nil leaves "data" out. Emit never blocks:
// a client that has stopped reading and has a full queue is disconnected,
// with a logged reason. A nil *Server drops the event.
func (s *Server) Emit(event string, data any) {
	if s == nil {
		return
	}
	b, err := encode(eventMsg{Event: event, Data: data, Timestamp: stamp(time.Now())})
	if err != nil {
		s.log.Error("event not sent: cannot encode", "event", event, "err", err)
		return
	}
	s.mu.Lock()
	clients := make([]*client, 0, len(s.clients))
	for c := range s.clients {
		clients = append(clients, c)
	}
	s.mu.Unlock()
	for _, c := range clients {
		if c.events.Load() {
			c.event(b)
		}
	}
}

// MapperEvent turns a device event into a QMP event; it is meant for
// mapper.ManagerOptions.Events. mapper.EventResized becomes
// DM_DEVICE_RESIZED {name, old-size, new-size}; every other kind becomes
// DM_EVENT {name, target, event, data}, where target is the Data member
// "target" when the raising target set it. It never blocks. A nil *Server
// drops the event, so that the Manager may be made before the Server:
//
//	var srv *qmp.Server
//	m := mapper.NewManager(mapper.ManagerOptions{Events: func(e mapper.Event) { srv.MapperEvent(e) }})
//	srv = qmp.NewServer(qmp.Config{Manager: m})
func (s *Server) MapperEvent(e mapper.Event) {
	if s == nil {
		return
	}
	if e.Kind == mapper.EventResized {
		s.Emit(EventDeviceResized, map[string]any{
			"name": e.Device, "old-size": e.Data["old-size"], "new-size": e.Data["new-size"],
		})
		return
	}
	data := e.Data
	if data == nil {
		data = map[string]any{}
	}
	target := e.Target
	if target == "" {
		target, _ = data["target"].(string)
	}
	s.Emit(EventDM, map[string]any{"name": e.Device, "target": target, "event": e.Kind, "data": data})
}

// ListenUnix listens on the unix socket path for Serve, mode 0600 from
// the first instant. A stale socket file is replaced; a socket a server
// answers on is not (the error wraps syscall.EADDRINUSE), nor is any other
// kind of file. Closing the listener removes the socket file while it is
// still this listener's. See internal/unixsock for owner, group and mode.
func ListenUnix(path string) (net.Listener, error) {
	return unixsock.Listen(path, unixsock.Perm{})
}

// outMsg is one encoded message for a client; after, if set, runs once
// the message is written (quit uses it).
type outMsg struct {
	b     []byte
	after func()
	last  bool // write nothing; the writer stops
	// negotiate marks the reply that completes capabilities negotiation:
	// the writer turns events on just before writing it, so that the
	// client gets every event raised after it can have seen the reply,
	// and none before the reply.
	negotiate bool
}

// client is one QMP connection. The reader goroutine (serve) parses and
// runs commands one at a time; the writer goroutine writes replies and
// events in the order they were queued, so an event raised by a command
// reaches its client before the command's reply.
type client struct {
	s    *Server
	conn net.Conn
	log  *slog.Logger

	out        chan outMsg
	done       chan struct{} // closed by shut
	shutOnce   sync.Once
	shutReason string      // set by the first shut, before done is closed
	events     atomic.Bool // events are delivered once set (by the writer)

	// Owned by the reader goroutine.
	commandMode bool // capabilities negotiation is complete
}

func (s *Server) newClient(conn net.Conn) *client {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		conn.Close()
		return nil
	}
	s.nextID++
	c := &client{
		s: s, conn: conn, log: s.log.With("client", s.nextID),
		out: make(chan outMsg, eventQueueLen), done: make(chan struct{}),
	}
	s.clients[c] = struct{}{}
	s.wg.Add(1)
	return c
}

// shut closes the connection once, giving the reason in the log.
func (c *client) shut(reason string) {
	c.shutOnce.Do(func() {
		c.shutReason = reason
		close(c.done)
		c.conn.Close()
	})
}

// send queues a reply, waiting while the queue is full.
func (c *client) send(m outMsg) {
	select {
	case c.out <- m:
	case <-c.done:
	}
}

// event queues an event without waiting; a client whose queue is full has
// stopped reading and is disconnected.
func (c *client) event(b []byte) {
	select {
	case c.out <- outMsg{b: b}:
	case <-c.done:
	default:
		c.log.Warn("client does not read its events; disconnecting")
		c.shut("event queue full")
	}
}

func (c *client) respond(r response) outMsg {
	b, err := encode(r)
	if err != nil { // a command returned something unencodable: our bug
		c.log.Error("cannot encode reply", "err", err)
		b, _ = encode(response{Error: genericf("internal error: cannot encode reply"), ID: r.ID})
	}
	return outMsg{b: b}
}

func (c *client) serve(ctx context.Context) {
	c.log.Info("client connected")
	stop := context.AfterFunc(ctx, func() { c.shut("server stopping") })
	defer stop()
	wrote := make(chan struct{})
	go c.writer(wrote)

	var g greeting
	g.QMP.Version = c.s.version
	g.QMP.Capabilities = []string{}
	gb, _ := encode(g)
	c.send(outMsg{b: gb})

	rd := newMsgReader(c.conn, c.s.cfg.MaxMessageBytes)
	reason := "client closed the connection"
	for {
		raw, err := rd.next()
		var qe *Error
		if errors.As(err, &qe) {
			c.log.Debug("bad message", "err", qe.Desc)
			c.send(c.respond(response{Error: qe}))
			continue
		}
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				reason = err.Error()
			}
			break
		}
		r, negotiate, after := c.handle(raw)
		if negotiate {
			c.commandMode = true
		}
		m := c.respond(r)
		m.after, m.negotiate = after, negotiate
		c.send(m)
	}
	// Let the writer flush what is queued, then close; a client that
	// stopped sending but does not read either gets 10 seconds.
	c.conn.SetWriteDeadline(time.Now().Add(flushTimeout))
	c.send(outMsg{last: true})
	<-wrote
	c.shut(reason)
	c.s.mu.Lock()
	delete(c.s.clients, c)
	c.s.mu.Unlock()
	c.log.Info("client disconnected", "reason", c.shutReason)
}

func (c *client) writer(wrote chan<- struct{}) {
	defer close(wrote)
	for {
		select {
		case m := <-c.out:
			if m.last {
				return
			}
			if m.negotiate {
				c.events.Store(true)
			}
			if _, err := c.conn.Write(m.b); err != nil {
				c.shut("write: " + err.Error())
				return
			}
			if m.after != nil {
				m.after()
			}
		case <-c.done:
			return
		}
	}
}
