//! The thread-per-core runtime: one glommio executor per shard, pinned to a
//! core, each with its own SO_REUSEPORT listener and its own table of
//! connections. Nothing on the data path is shared between shards.
//!
//! A connection's state lives in the shard's slab; its task is a tiny future
//! holding the slab key, so an idle connection costs its [`Driver`] state
//! plus a socket, and no buffer (reads go into one shard-owned buffer:
//! glommio's plain `TcpStream` waits for readiness and receives into
//! whatever buffer `poll_read` is handed at wake-up).
//!
//! Messages from other threads reach a connection through one bounded
//! channel per shard ([`ShardSender`]) and one receive task per shard, which
//! hands each message to its connection in the slab and wakes that
//! connection's task to send what the application queued: no channel and no
//! extra state per connection.
//!
//! Writes are batched per executor turn (as Redis writes its replies before
//! it sleeps): what a connection has to send is appended to one shard-owned
//! out buffer, and a flusher task, queued behind the connection tasks that
//! are ready in this turn, sends every connection's bytes in one pass (or a
//! connection task does when [`FLUSH_BATCH`] connections are waiting).
//! Sends that follow each other closely let the peer's kernel and threads
//! take them in one wake-up instead of one per response, and cost no
//! allocation per response; bytes a socket does not take are kept in the
//! connection's slot and sent by its own task when the socket is writable.
//!
//! The same shards run the client side ([`Runtime::start_client`]): no
//! listener; connections are opened on a chosen shard with
//! [`Runtime::connect`] and then live exactly as accepted ones do (slot,
//! task, timers, batched writes, messages). The bench's device fleet runs on
//! it.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use slab::Slab;

use crate::driver::{CloseReason, Connection, Driver, Endpoint, Service};
use crate::message::{ConnId, Envelope, ShardSender};
use crate::system;

/// The message type of a service's connections.
type MessageOf<S> = <<S as Service>::Conn as Connection>::Message;

/// Runtime settings (the transport part of the gateway's `[coap]` config).
#[derive(Clone)]
pub struct RuntimeConfig {
    pub address: SocketAddr,
    /// Number of shards; 0 = one per online CPU.
    pub shards: usize,
    /// 0 = unlimited.
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// None serves plain TCP.
    pub tls: Option<Arc<ServerConfig>>,
    /// How long a graceful shutdown waits for connections to drain.
    pub drain_timeout: Duration,
    /// Granularity of the per-shard timer wheel.
    pub tick: Duration,
    /// Capacity of each shard's inbound message channel
    /// ([`Runtime::sender`]); a send to a full channel fails with
    /// `SendError::Full`. At least 1.
    pub message_capacity: usize,
    /// Setting this starts a graceful shutdown. Give the runtime a flag that
    /// signal handlers already hold, so a signal during start-up is not lost.
    pub shutdown: Arc<AtomicBool>,
    /// Pin shard `i` to the `i`-th CPU the process may use (the default);
    /// false leaves placement to the kernel (a load generator sharing a
    /// small machine with the server it loads).
    pub pin: bool,
    /// Most bytes a connection may have waiting for its socket. At the
    /// bound the runtime stops reading from that peer (TCP backpressure),
    /// so a peer that sends without reading (Pings it never reads the Pongs
    /// of) cannot grow the gateway's memory. At least [`MIN_PENDING_TX`].
    pub max_pending_tx: usize,
    /// A connection at `max_pending_tx` whose peer takes none of it for
    /// this long is closed ([`CloseReason::WriteStalled`]).
    pub write_stall_timeout: Duration,
    /// Most TLS handshakes in progress on one shard; 0 = no limit. At the
    /// limit the shard stops accepting: new connections wait in the
    /// kernel's listen backlog (and, once it is full, in the clients' SYN
    /// retries), not in this process, until a handshake ends.
    pub max_handshakes: usize,
}

/// Floor of [`RuntimeConfig::max_pending_tx`]: a few TLS records.
pub const MIN_PENDING_TX: usize = 64 * 1024;

impl RuntimeConfig {
    pub fn new(address: SocketAddr, tls: Option<Arc<ServerConfig>>) -> Self {
        Self {
            address,
            shards: 0,
            max_connections: 0,
            handshake_timeout: Duration::from_secs(10),
            tls,
            drain_timeout: Duration::from_secs(5),
            tick: Duration::from_millis(50),
            message_capacity: 65_536,
            shutdown: Arc::new(AtomicBool::new(false)),
            pin: true,
            max_pending_tx: 256 * 1024,
            write_stall_timeout: Duration::from_secs(30),
            max_handshakes: 256,
        }
    }
}

/// Errors that stop the runtime from starting.
#[derive(Debug)]
pub enum StartError {
    /// Another process already listens on the address.
    AddressInUse(SocketAddr),
    Bind(SocketAddr, io::Error),
    /// io_uring or locked memory is not available for the executors.
    Executor(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::AddressInUse(a) => write!(
                f,
                "address {a} is already in use by another process (is another gateway running?)"
            ),
            StartError::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
            StartError::Executor(m) => write!(f, "cannot start shard executors: {m}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Counters of one shard, readable from any thread.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Connections accepted (server) or connected (client runtime).
    pub accepted: AtomicU64,
    pub active: AtomicUsize,
    pub handshakes: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub rejected_max_connections: AtomicU64,
    pub closed: AtomicU64,
    /// Messages handed to a connection's `on_message`.
    pub messages_delivered: AtomicU64,
    /// Messages for a connection that has closed (or never existed, or was
    /// still in its TLS handshake): dropped by the shard.
    pub messages_dropped_closed: AtomicU64,
    /// Sends refused because this shard's channel was full (the message
    /// went back to the sender as `SendError::Full`).
    pub messages_rejected_full: AtomicU64,
    /// Times a connection's unsent bytes reached `max_pending_tx` and the
    /// runtime stopped reading from it.
    pub backpressure: AtomicU64,
    /// Connections closed because their peer took none of their unsent
    /// bytes within `write_stall_timeout`.
    pub write_stall_closes: AtomicU64,
    /// Times the shard stopped accepting because `max_handshakes` were in
    /// progress.
    pub accept_paused: AtomicU64,
    /// Bytes the shard's connections have waiting for their sockets, as
    /// of each connection's latest turn (each at most about
    /// `max_pending_tx`).
    pub pending_tx_bytes: AtomicUsize,
}

/// A connection for a client runtime to open ([`Runtime::connect`]).
pub struct Connect {
    pub addr: SocketAddr,
    /// TLS to the server `name` (the client's certificate, if any, is in
    /// the config).
    pub tls: Arc<ClientConfig>,
    pub name: ServerName<'static>,
    /// Handed to the application in [`crate::ConnInfo::tag`], and to
    /// [`Service::connect_failed`] when it never got one.
    pub tag: u64,
}

/// A running set of shards whose connections take messages of type `M`
/// (their [`Connection::Message`]).
pub struct Runtime<M> {
    local_addr: SocketAddr,
    stats: Vec<Arc<ShardStats>>,
    shutdown: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
    sender: ShardSender<M>,
    /// Per shard, its queue of connections to open (client runtimes only).
    connects: Vec<flume::Sender<Connect>>,
}

impl<M: Send + 'static> Runtime<M> {
    /// Binds the listeners and starts the shards. `make_service(shard)` runs
    /// on each shard's thread and builds that shard's [`Service`].
    pub fn start<S, F>(config: RuntimeConfig, make_service: F) -> Result<Runtime<M>, StartError>
    where
        S: Service,
        S::Conn: Connection<Message = M>,
        F: Fn(usize) -> S + Send + Sync + 'static,
    {
        let shards = shard_count(&config);
        let (sockets, local_addr) = bind_listeners(config.address, shards)?;
        Self::spawn(
            config,
            sockets.into_iter().map(Some).collect(),
            local_addr,
            false,
            make_service,
        )
    }

    /// Starts the shards of a client: no listener (`address` and `tls` of
    /// the config are not used); [`Runtime::connect`] opens connections.
    /// Shutdown, timers, messages and stats work as on a server.
    pub fn start_client<S, F>(
        config: RuntimeConfig,
        make_service: F,
    ) -> Result<Runtime<M>, StartError>
    where
        S: Service,
        S::Conn: Connection<Message = M>,
        F: Fn(usize) -> S + Send + Sync + 'static,
    {
        let shards = shard_count(&config);
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        Self::spawn(
            config,
            (0..shards).map(|_| None).collect(),
            unspecified,
            true,
            make_service,
        )
    }

    fn spawn<S, F>(
        mut config: RuntimeConfig,
        sockets: Vec<Option<socket2::Socket>>,
        local_addr: SocketAddr,
        client: bool,
        make_service: F,
    ) -> Result<Runtime<M>, StartError>
    where
        S: Service,
        S::Conn: Connection<Message = M>,
        F: Fn(usize) -> S + Send + Sync + 'static,
    {
        system::raise_memlock_limit();
        config.max_pending_tx = config.max_pending_tx.max(MIN_PENDING_TX);
        let shards = sockets.len();
        let stats: Vec<Arc<ShardStats>> = (0..shards)
            .map(|_| Arc::new(ShardStats::default()))
            .collect();
        let (inboxes, receivers): (Vec<_>, Vec<_>) = stats
            .iter()
            .map(|stats| {
                let (tx, rx) = flume::bounded::<Envelope<M>>(config.message_capacity.max(1));
                ((tx, stats.clone()), rx)
            })
            .unzip();
        let sender = ShardSender::new(inboxes);
        let (connects, connect_rxs): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| {
                let (tx, rx) = flume::unbounded::<Connect>();
                (tx, client.then_some(rx))
            })
            .unzip();
        let connects = if client { connects } else { Vec::new() };
        let shutdown = config.shutdown.clone();
        let total = Arc::new(AtomicUsize::new(0));
        let make_service = Arc::new(make_service);
        // Shard threads (and the helper threads glommio spawns for them)
        // inherit this mask; it is restored when `start` returns.
        let _mask = system::SignalMask::block_termination_signals();
        // Shard `i` on the `i`-th CPU the process may use (its affinity
        // mask: `taskset`, cgroup cpusets), never outside them.
        let cpus = system::allowed_cpus();

        let mut handles = Vec::with_capacity(shards);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        for (index, ((socket, inbox), connect_rx)) in sockets
            .into_iter()
            .zip(receivers)
            .zip(connect_rxs)
            .enumerate()
        {
            let shared = SharedState {
                config: config.clone(),
                stats: stats[index].clone(),
                shutdown: shutdown.clone(),
                total: total.clone(),
            };
            let make_service = make_service.clone();
            let ready = ready_tx.clone();
            let placement = if config.pin {
                Placement::Fixed(cpus[index % cpus.len()])
            } else {
                Placement::Unbound
            };
            let builder = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{index}"))
                // Socket reads go into our own buffers; this memory only
                // serves file IO, and pinning less keeps us under memlock
                // limits (FIELD-NOTES.md "glommio and memlock").
                .io_memory(64 << 10);
            let spawned = builder.spawn(move || async move {
                let _ = ready.send(Ok(()));
                let service = make_service(index);
                run_shard(index, socket, connect_rx, service, shared, inbox).await;
            });
            let failed = ready_tx.clone();
            match spawned {
                Ok(handle) => handles.push(std::thread::spawn(move || {
                    if let Err(e) = handle.join() {
                        // Reaches `start` when the executor could not even be
                        // built (memlock, io_uring), else it is only logged.
                        let _ = failed.send(Err(format!("shard {index}: {e}")));
                        tracing::error!(shard = index, error = %e, "shard executor failed");
                    }
                })),
                Err(e) => {
                    shutdown.store(true, Ordering::SeqCst);
                    return Err(StartError::Executor(format!(
                        "{e} (glommio needs io_uring and at least 512 KiB of locked memory per shard; \
                         check `ulimit -l` and that io_uring is not disabled)"
                    )));
                }
            }
        }
        drop(ready_tx);
        for _ in 0..shards {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    shutdown.store(true, Ordering::SeqCst);
                    return Err(StartError::Executor(format!(
                        "{e} (glommio needs io_uring and at least 512 KiB of locked memory per \
                         shard; check `ulimit -l` and that io_uring is not disabled)"
                    )));
                }
                Err(_) => {
                    shutdown.store(true, Ordering::SeqCst);
                    return Err(StartError::Executor(
                        "a shard executor did not start (io_uring or memlock unavailable?)".into(),
                    ));
                }
            }
        }
        Ok(Runtime {
            local_addr,
            stats,
            shutdown,
            handles,
            sender,
            connects,
        })
    }

    /// Opens a connection on `shard` (client runtimes, [`Runtime::start_client`]).
    /// The shard connects, handshakes, and creates the application with
    /// [`Service::accept`] once the handshake is done; a failure before
    /// that goes to [`Service::connect_failed`]. Gives the request back
    /// when this is not a client runtime or the shard has stopped.
    pub fn connect(&self, shard: usize, request: Connect) -> Result<(), Connect> {
        match self.connects.get(shard % self.connects.len().max(1)) {
            Some(tx) => tx.send(request).map_err(|e| e.into_inner()),
            None => Err(request),
        }
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.stats.len()
    }

    /// Sends messages to connections (by [`ConnId`]) from any thread.
    pub fn sender(&self) -> ShardSender<M> {
        self.sender.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> &[Arc<ShardStats>] {
        &self.stats
    }

    /// A flag that starts a graceful shutdown when set (e.g. by a signal
    /// handler).
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// Starts a graceful shutdown: stop accepting, let every connection say
    /// goodbye, drain, stop.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    /// Waits until every shard has stopped.
    pub fn join(self) {
        for handle in self.handles {
            let _ = handle.join();
        }
    }
}

fn shard_count(config: &RuntimeConfig) -> usize {
    if config.shards == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        config.shards
    }
}

/// Creates one listening socket per shard on the same address. A plain bind
/// (no SO_REUSEPORT) first tells whether another process holds the port:
/// with SO_REUSEPORT alone a second gateway would silently take half the
/// traffic (FIELD-NOTES.md, glommio).
fn bind_listeners(
    address: SocketAddr,
    shards: usize,
) -> Result<(Vec<socket2::Socket>, SocketAddr), StartError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if address.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let new_socket = |addr: SocketAddr, reuse_port: bool| -> io::Result<Socket> {
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        if addr.is_ipv6() {
            socket.set_only_v6(false).ok();
        }
        socket.bind(&addr.into())?;
        Ok(socket)
    };
    let map_err = |addr: SocketAddr, e: io::Error| {
        if e.kind() == io::ErrorKind::AddrInUse {
            StartError::AddressInUse(addr)
        } else {
            StartError::Bind(addr, e)
        }
    };
    let mut address = address;
    if address.port() != 0 {
        // Probe: fails with EADDRINUSE when anyone listens there already.
        let probe = new_socket(address, false).map_err(|e| map_err(address, e))?;
        probe.listen(1).map_err(|e| map_err(address, e))?;
        drop(probe);
    }
    let mut sockets = Vec::with_capacity(shards);
    for _ in 0..shards {
        let socket = new_socket(address, true).map_err(|e| map_err(address, e))?;
        socket.listen(4096).map_err(|e| map_err(address, e))?;
        if address.port() == 0 {
            // Port 0: the first socket picks the port, the others join it.
            if let Some(bound) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
                address = bound;
            }
        }
        sockets.push(socket);
    }
    Ok((sockets, address))
}

struct SharedState {
    config: RuntimeConfig,
    stats: Arc<ShardStats>,
    shutdown: Arc<AtomicBool>,
    /// Connections over all shards, for `max_connections`.
    total: Arc<AtomicUsize>,
}

/// One connection in the shard's table.
struct Slot<C> {
    stream: TcpStream,
    driver: Driver<C>,
    endpoint: Endpoint,
    /// TLS bytes the socket has not accepted yet (written by this
    /// connection's task when the socket is writable).
    pending_tx: Vec<u8>,
    /// Bytes of this connection wait in the shard's out buffer.
    queued: bool,
    /// The deadline registered in the shard's timer set.
    registered: Option<Instant>,
    handshake_deadline: Option<Instant>,
    /// Set when a closed connection still has bytes to send.
    linger_deadline: Option<Instant>,
    /// Set while the connection's unsent bytes are at `max_pending_tx`
    /// (reading paused): it is closed if that lasts until then.
    stall_deadline: Option<Instant>,
    /// `pending_tx.len()` as last added to the shard's `pending_tx_bytes`.
    accounted: usize,
    timer_fired: bool,
    shutdown_seen: bool,
    waker: Option<Waker>,
}

struct Shard<S: Service> {
    index: usize,
    service: S,
    shared: SharedState,
    slots: RefCell<Slab<Box<Slot<S::Conn>>>>,
    timers: RefCell<BTreeSet<(Instant, usize)>>,
    draining: Cell<bool>,
    /// Generation of the next accepted connection (see [`ConnId`]).
    next_generation: Cell<u32>,
    /// One read buffer for every connection of the shard.
    rx: RefCell<Vec<u8>>,
    /// Scratch for TLS output before it is written to a socket.
    tx: RefCell<Vec<u8>>,
    /// Scratch for the output of a delivered message.
    msg_tx: RefCell<Vec<u8>>,
    /// Connections of this shard whose TLS handshake is in progress.
    handshaking: Cell<usize>,
    /// Bytes waiting for the flusher, and whose they are.
    out: RefCell<OutQueue>,
    /// The flusher task's waker, and whether it has been woken for the
    /// bytes now in `out`.
    flusher: RefCell<Option<Waker>>,
    flush_scheduled: Cell<bool>,
}

/// The shard's batched output: every queued connection's bytes, back to
/// back, and one entry per queued write in the order they were made.
#[derive(Default)]
struct OutQueue {
    bytes: Vec<u8>,
    /// (slab key, generation, start, end) into `bytes`.
    entries: Vec<(usize, u32, usize, usize)>,
}

/// Connections waiting in the out buffer before a connection task sends
/// them itself instead of waiting for the flusher: bounds what batching
/// adds to a response's latency under load.
const FLUSH_BATCH: usize = 32;
/// The out buffer's capacity kept between turns (a burst may grow it
/// further; it shrinks back to this).
const OUT_KEEP: usize = 256 * 1024;

const RX_BUFFER: usize = 64 * 1024;
/// The read size for a connection with nothing unsent (see the read
/// loop): one TLS record and its header.
const READ_SIZE: usize = 16 * 1024 + 5;
/// The read size for a connection with unsent bytes.
const SLOW_READ: usize = 2 * 1024;
/// How often a shard that stopped accepting looks at its handshakes again.
const ACCEPT_PAUSE_POLL: Duration = Duration::from_millis(5);

/// The connection's handshake is over (done, failed, timed out, or the
/// connection is gone): it no longer counts against `max_handshakes`.
fn end_handshake<S: Service>(shard: &Shard<S>, slot: &mut Slot<S::Conn>) {
    if slot.handshake_deadline.take().is_some() {
        shard
            .handshaking
            .set(shard.handshaking.get().saturating_sub(1));
    }
}
/// How long a closing connection may take to accept its last bytes.
const LINGER: Duration = Duration::from_secs(2);
/// Reads per wake-up before the task yields to others (fairness).
const READ_BUDGET: usize = 16;
/// Messages handled per wake-up of the receive task before it yields.
const MESSAGE_BUDGET: usize = 256;

async fn run_shard<S: Service>(
    index: usize,
    socket: Option<socket2::Socket>,
    connects: Option<flume::Receiver<Connect>>,
    service: S,
    shared: SharedState,
    inbox: flume::Receiver<Envelope<MessageOf<S>>>,
) {
    // SAFETY: the fd comes from a socket we own and just bound/listened;
    // ownership moves into the glommio listener.
    let listener = socket.map(|socket| unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) });
    let tick = shared.config.tick;
    let shard = Rc::new(Shard {
        index,
        service,
        shared,
        slots: RefCell::new(Slab::new()),
        timers: RefCell::new(BTreeSet::new()),
        draining: Cell::new(false),
        next_generation: Cell::new(1),
        rx: RefCell::new(vec![0; RX_BUFFER]),
        tx: RefCell::new(Vec::new()),
        msg_tx: RefCell::new(Vec::new()),
        handshaking: Cell::new(0),
        out: RefCell::new(OutQueue::default()),
        flusher: RefCell::new(None),
        flush_scheduled: Cell::new(false),
    });
    glommio::spawn_local(Flusher {
        shard: shard.clone(),
    })
    .detach();

    let acceptor = listener.map(|l| glommio::spawn_local(accept_loop(shard.clone(), l)).detach());
    let connector =
        connects.map(|rx| glommio::spawn_local(connect_loop(shard.clone(), rx)).detach());
    // The receive task ends when the shard stops (the stop channel's sender
    // is dropped), so the inbox is dropped and senders see `Stopped`.
    let (stop_messages, stopped) = flume::bounded::<()>(1);
    let messages = glommio::spawn_local(futures_lite::future::or(
        message_loop(shard.clone(), inbox),
        async move {
            let _ = stopped.recv_async().await;
        },
    ));

    // The timer wheel: one tick task per shard fires expired deadlines and
    // watches for the shutdown flag.
    let mut drain_started: Option<Instant> = None;
    loop {
        glommio::timer::sleep(tick).await;
        let now = Instant::now();
        fire_timers(&shard, now);
        if drain_started.is_none() && shard.shared.shutdown.load(Ordering::SeqCst) {
            drain_started = Some(now);
            if let Some(a) = acceptor.as_ref() {
                a.cancel();
            }
            if let Some(c) = connector.as_ref() {
                c.cancel();
            }
            shard.draining.set(true);
            let slots = shard.slots.borrow();
            for (_, slot) in slots.iter() {
                if let Some(w) = slot.waker.as_ref() {
                    w.wake_by_ref();
                }
            }
        }
        if let Some(started) = drain_started {
            let empty = shard.slots.borrow().is_empty();
            if empty || now.duration_since(started) >= shard.shared.config.drain_timeout {
                break;
            }
        }
    }
    drop(stop_messages);
    messages.await;
    tracing::debug!(shard = index, "shard stopped");
}

/// The shard's receive task: waits for a message, then drains the channel
/// without waiting (batches: a cross-thread wake-up costs far more than a
/// message, FIELD-NOTES.md "flume"). Ends when every sender is gone.
async fn message_loop<S: Service>(
    shard: Rc<Shard<S>>,
    inbox: flume::Receiver<Envelope<MessageOf<S>>>,
) {
    while let Ok(first) = inbox.recv_async().await {
        let now = Instant::now();
        let mut delivered = 0;
        let mut dropped = 0;
        let mut handled = 0;
        {
            let mut slots = shard.slots.borrow_mut();
            let mut next = Some(first);
            while let Some((to, msg)) = next {
                if deliver_message(&shard, &mut slots, now, to, msg) {
                    delivered += 1;
                } else {
                    dropped += 1;
                }
                handled += 1;
                next = if handled < MESSAGE_BUDGET {
                    inbox.try_recv().ok()
                } else {
                    None
                };
            }
        }
        let stats = &shard.shared.stats;
        if delivered > 0 {
            stats
                .messages_delivered
                .fetch_add(delivered, Ordering::Relaxed);
        }
        if dropped > 0 {
            stats
                .messages_dropped_closed
                .fetch_add(dropped, Ordering::Relaxed);
        }
        if handled >= MESSAGE_BUDGET {
            // More may be waiting: let the connections run first.
            futures_lite::future::yield_now().await;
        }
    }
}

/// Hands one message to its connection if it is still the one addressed
/// (same slot *and* generation); its output joins the bytes the connection's
/// task sends next, and that task is woken to send them, re-arm the
/// deadline and close the connection if the application closed it.
fn deliver_message<S: Service>(
    shard: &Shard<S>,
    slots: &mut Slab<Box<Slot<S::Conn>>>,
    now: Instant,
    to: ConnId,
    msg: MessageOf<S>,
) -> bool {
    let Some(slot) = usize::try_from(to.slot)
        .ok()
        .and_then(|key| slots.get_mut(key))
    else {
        return false;
    };
    if slot.endpoint.id != to {
        return false;
    }
    let key = to.slot as usize;
    let slot = &mut **slot;
    let mut out = shard.msg_tx.borrow_mut();
    out.clear();
    let delivered = slot
        .driver
        .on_message(&shard.service, slot.endpoint, now, msg, &mut out);
    let full = !out.is_empty() && queue_tx(shard, key, slot, &out);
    drop(out);
    if delivered {
        if let Some(w) = slot.waker.as_ref() {
            w.wake_by_ref();
        }
    }
    if full {
        flush_out(shard, slots, now);
    }
    delivered
}

/// Queues a connection's output behind what it already has queued: into
/// its slot when the socket is blocked (its task writes on writability),
/// else into the shard's out buffer for the flusher. True when enough
/// connections wait that the caller should flush now.
fn queue_tx<C: Connection>(
    shard: &Shard<impl Service<Conn = C>>,
    key: usize,
    slot: &mut Slot<C>,
    bytes: &[u8],
) -> bool {
    if !slot.pending_tx.is_empty() && !slot.queued {
        slot.pending_tx.extend_from_slice(bytes);
        return false;
    }
    let mut out = shard.out.borrow_mut();
    let start = out.bytes.len();
    out.bytes.extend_from_slice(bytes);
    let end = out.bytes.len();
    out.entries
        .push((key, slot.endpoint.id.generation, start, end));
    slot.queued = true;
    let full = out.entries.len() >= FLUSH_BATCH;
    drop(out);
    if !full && !shard.flush_scheduled.get() {
        shard.flush_scheduled.set(true);
        match shard.flusher.borrow().as_ref() {
            Some(w) => w.wake_by_ref(),
            // The flusher has not run yet: the caller flushes.
            None => return true,
        }
    }
    full
}

/// Sends every connection's queued bytes, in queue order. A socket that
/// takes only part keeps the rest in its slot, and glommio wakes the
/// connection's task when it is writable; a connection that failed or is
/// closing is woken to finish.
fn flush_out<S: Service>(shard: &Shard<S>, slots: &mut Slab<Box<Slot<S::Conn>>>, now: Instant) {
    shard.flush_scheduled.set(false);
    let mut out = shard.out.borrow_mut();
    let OutQueue { bytes, entries } = &mut *out;
    for &(key, generation, start, end) in entries.iter() {
        let Some(slot) = slots.get_mut(key) else {
            continue;
        };
        if slot.endpoint.id.generation != generation {
            continue;
        }
        slot.queued = false;
        let chunk = &bytes[start..end];
        if !slot.pending_tx.is_empty() {
            // An earlier chunk of this connection was only partly taken:
            // keep the order.
            slot.pending_tx.extend_from_slice(chunk);
            continue;
        }
        let Some(waker) = slot.waker.clone() else {
            slot.pending_tx.extend_from_slice(chunk);
            continue;
        };
        let mut cx = Context::from_waker(&waker);
        match write_some(&mut slot.stream, &mut cx, chunk) {
            Ok(n) if n < chunk.len() => slot.pending_tx.extend_from_slice(&chunk[n..]),
            Ok(_) => {}
            Err(e) => slot.driver.abort(now, CloseReason::Io(e.to_string())),
        }
        // Its task finishes a closed connection, and starts the write-stall
        // clock (and the gauge) of one this left at the bound.
        if slot.driver.closed().is_some()
            || slot.pending_tx.len() >= shard.shared.config.max_pending_tx
        {
            waker.wake_by_ref();
        }
    }
    entries.clear();
    bytes.clear();
    if bytes.capacity() > OUT_KEEP {
        bytes.shrink_to(OUT_KEEP);
    }
}

/// The shard's flusher task: woken by [`queue_tx`], it runs after the
/// connection tasks already ready in this executor turn.
struct Flusher<S: Service> {
    shard: Rc<Shard<S>>,
}

impl<S: Service> Future for Flusher<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shard = &*self.shard;
        {
            let mut w = shard.flusher.borrow_mut();
            match &*w {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        if !shard.out.borrow().entries.is_empty() {
            let mut slots = shard.slots.borrow_mut();
            flush_out(shard, &mut slots, Instant::now());
        } else {
            shard.flush_scheduled.set(false);
        }
        Poll::Pending
    }
}

fn fire_timers<S: Service>(shard: &Shard<S>, now: Instant) {
    let mut expired = Vec::new();
    {
        let mut timers = shard.timers.borrow_mut();
        while let Some(&(at, key)) = timers.first() {
            if at > now {
                break;
            }
            timers.pop_first();
            expired.push(key);
        }
    }
    let mut slots = shard.slots.borrow_mut();
    for key in expired {
        if let Some(slot) = slots.get_mut(key) {
            slot.registered = None;
            slot.timer_fired = true;
            if let Some(w) = slot.waker.as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

async fn accept_loop<S: Service>(shard: Rc<Shard<S>>, listener: TcpListener) {
    let limit = shard.shared.config.max_handshakes;
    loop {
        // Admission: past `max_handshakes` in progress, leave new
        // connections in the kernel's backlog until one ends (a storm then
        // spreads over the clients' SYN retries instead of piling up here).
        if limit != 0 && shard.handshaking.get() >= limit {
            shard
                .shared
                .stats
                .accept_paused
                .fetch_add(1, Ordering::Relaxed);
            while shard.handshaking.get() >= limit {
                glommio::timer::sleep(ACCEPT_PAUSE_POLL).await;
            }
        }
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(shard = shard.index, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = &shard.shared;
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let max = shared.config.max_connections;
        if !admit(shared) {
            tracing::debug!(
                shard = shard.index,
                max,
                "max_connections reached, refusing"
            );
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (peer_addr, local_addr) = match (stream.peer_addr(), stream.local_addr()) {
            (Ok(p), Ok(l)) => (p, l),
            _ => {
                shared.total.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
        };
        let driver = match &shared.config.tls {
            Some(config) => match Driver::tls(config.clone()) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "cannot create TLS connection");
                    shared.total.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
            },
            None => Driver::plain(),
        };
        let handshake_deadline = shared
            .config
            .tls
            .as_ref()
            .map(|_| Instant::now() + shared.config.handshake_timeout);
        adopt(
            &shard,
            stream,
            peer_addr,
            local_addr,
            driver,
            handshake_deadline,
        );
    }
}

/// Counts a new connection against `max_connections` (over all shards);
/// false, counted as rejected, when there is no room.
fn admit(shared: &SharedState) -> bool {
    let max = shared.config.max_connections;
    let total = shared.total.fetch_add(1, Ordering::SeqCst) + 1;
    if max != 0 && total > max {
        shared.total.fetch_sub(1, Ordering::SeqCst);
        shared
            .stats
            .rejected_max_connections
            .fetch_add(1, Ordering::Relaxed);
        return false;
    }
    true
}

/// Gives a connected socket its slot and its task (accepted or opened).
fn adopt<S: Service>(
    shard: &Rc<Shard<S>>,
    stream: TcpStream,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
    driver: Driver<S::Conn>,
    handshake_deadline: Option<Instant>,
) {
    let generation = shard.next_generation.get();
    shard.next_generation.set(generation.wrapping_add(1));
    if handshake_deadline.is_some() {
        shard.handshaking.set(shard.handshaking.get() + 1);
    }
    let mut slots = shard.slots.borrow_mut();
    let entry = slots.vacant_entry();
    let key = entry.key();
    let endpoint = Endpoint {
        peer_addr,
        local_addr,
        id: ConnId {
            shard: shard.index as u32,
            slot: key as u32,
            generation,
        },
    };
    entry.insert(Box::new(Slot {
        stream,
        driver,
        endpoint,
        pending_tx: Vec::new(),
        queued: false,
        registered: None,
        handshake_deadline,
        linger_deadline: None,
        stall_deadline: None,
        accounted: 0,
        timer_fired: false,
        shutdown_seen: false,
        waker: None,
    }));
    drop(slots);
    shard.shared.stats.active.fetch_add(1, Ordering::Relaxed);
    glommio::spawn_local(ConnTask {
        shard: shard.clone(),
        key,
        started: false,
    })
    .detach();
}

/// A client shard's connector: opens each requested connection in a task
/// of its own (connects wait on the network, not on each other).
async fn connect_loop<S: Service>(shard: Rc<Shard<S>>, requests: flume::Receiver<Connect>) {
    while let Ok(request) = requests.recv_async().await {
        glommio::spawn_local(open(shard.clone(), request)).detach();
    }
}

async fn open<S: Service>(shard: Rc<Shard<S>>, request: Connect) {
    let Connect {
        addr,
        tls,
        name,
        tag,
    } = request;
    let shared = &shard.shared;
    let failed = |reason: CloseReason| {
        shard.service.connect_failed(tag, Instant::now(), &reason);
    };
    if !admit(shared) {
        let max = shared.config.max_connections;
        failed(CloseReason::Io(format!("max_connections ({max}) reached")));
        return;
    }
    let connected = TcpStream::connect(addr).await.and_then(|stream| {
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr()?;
        Ok((stream, local))
    });
    let (stream, local_addr) = match connected {
        Ok(c) => c,
        Err(e) => {
            shared.total.fetch_sub(1, Ordering::SeqCst);
            failed(CloseReason::Io(e.to_string()));
            return;
        }
    };
    let driver = match Driver::tls_client(tls, name, tag) {
        Ok(d) => d,
        Err(e) => {
            shared.total.fetch_sub(1, Ordering::SeqCst);
            failed(CloseReason::Tls(e.to_string()));
            return;
        }
    };
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let deadline = Instant::now() + shared.config.handshake_timeout;
    adopt(&shard, stream, addr, local_addr, driver, Some(deadline));
}

/// The task of one connection: just the slab key; all state is in the slot.
struct ConnTask<S: Service> {
    shard: Rc<Shard<S>>,
    key: usize,
    started: bool,
}

impl<S: Service> Future for ConnTask<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let shard = &*this.shard;
        let now = Instant::now();
        let mut slots = shard.slots.borrow_mut();
        let Some(slot) = slots.get_mut(this.key) else {
            return Poll::Ready(());
        };
        match &slot.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => slot.waker = Some(cx.waker().clone()),
        }
        let mut tx = shard.tx.borrow_mut();
        tx.clear();

        if !this.started {
            this.started = true;
            slot.driver
                .start(&shard.service, slot.endpoint, now, &mut tx);
        }

        // Reads, into the shard's buffer; none while the peer leaves
        // `max_pending_tx` of our bytes unread (what it sends waits in the
        // kernel, then in its own socket: memory here stays bounded).
        let max_pending = shard.shared.config.max_pending_tx;
        let mut rx = shard.rx.borrow_mut();
        let mut eof = false;
        let mut paused = false;
        // Reads that returned data this turn.
        let mut reads = 0;
        for _ in 0..READ_BUDGET {
            if slot.driver.closed().is_some() {
                break;
            }
            let unsent = slot.pending_tx.len() + tx.len();
            if unsent >= max_pending {
                paused = true;
                break;
            }
            // Reads are sized by what they may produce: a few bytes in can
            // be many out (a 2-byte Ping is answered by a 24-byte TLS
            // record), and what one read produces is only checked after
            // it. A peer that is behind reading gets small reads.
            let len = if unsent == 0 { READ_SIZE } else { SLOW_READ };
            match Pin::new(&mut slot.stream).poll_read(cx, &mut rx[..len]) {
                Poll::Ready(Ok(0)) => {
                    eof = true;
                    break;
                }
                Poll::Ready(Ok(n)) => {
                    reads += 1;
                    let was_handshaking = slot.driver.is_handshaking();
                    slot.driver
                        .receive(&shard.service, slot.endpoint, now, &mut rx[..n], &mut tx);
                    if was_handshaking && !slot.driver.is_handshaking() {
                        end_handshake(shard, slot);
                        shard
                            .shared
                            .stats
                            .handshakes
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    // No break on a short read: glommio arms a readiness
                    // poll after one but registers our waker only on the
                    // next poll_read, which then answers Pending cheaply.
                }
                Poll::Ready(Err(e)) => {
                    slot.driver.abort(now, CloseReason::Io(e.to_string()));
                    break;
                }
                Poll::Pending => break,
            }
        }
        drop(rx);
        if reads == READ_BUDGET {
            // Every read of this turn returned data and no read armed a
            // readiness poll (glommio arms one only when a read would
            // block): more is waiting, so come back after the others had
            // their turn instead of waiting for a timer.
            cx.waker().wake_by_ref();
        }
        if eof {
            slot.driver.abort(now, CloseReason::PeerClosed);
        }

        // Timers.
        if slot.timer_fired {
            slot.timer_fired = false;
            if let Some(hd) = slot.handshake_deadline {
                if now >= hd && slot.driver.is_handshaking() {
                    shard
                        .shared
                        .stats
                        .handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    slot.driver.abort(now, CloseReason::HandshakeTimeout);
                }
            }
            if slot.driver.deadline().is_some_and(|d| now >= d) {
                slot.driver
                    .on_timeout(&shard.service, slot.endpoint, now, &mut tx);
            }
        }

        // Graceful shutdown.
        if shard.draining.get() && !slot.shutdown_seen {
            slot.shutdown_seen = true;
            slot.driver
                .shutdown(&shard.service, slot.endpoint, now, &mut tx);
        }

        // A refused handshake is counted before its alert goes out, so a
        // peer that has seen the alert also sees the counter (/metrics,
        // tests). Clearing the deadline counts it once.
        if slot.handshake_deadline.is_some()
            && matches!(slot.driver.closed(), Some(CloseReason::Tls(_)))
        {
            end_handshake(shard, slot);
            shard
                .shared
                .stats
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
        }

        // Writes: queued for the flusher, or behind bytes the socket has
        // not taken yet.
        let flush_now = !tx.is_empty() && queue_tx(shard, this.key, slot, &tx);
        if !slot.pending_tx.is_empty() && !slot.queued {
            match write_some(&mut slot.stream, cx, &slot.pending_tx) {
                Ok(n) => {
                    slot.pending_tx.drain(..n);
                    if slot.pending_tx.is_empty() {
                        slot.pending_tx = Vec::new();
                    }
                }
                Err(e) => {
                    slot.pending_tx = Vec::new();
                    slot.driver.abort(now, CloseReason::Io(e.to_string()));
                }
            }
        }
        drop(tx);

        // Backpressure: a peer that keeps `max_pending_tx` of our bytes
        // unread for `write_stall_timeout` is closed; one that reads again
        // is read from again.
        if slot.pending_tx.len() >= max_pending && slot.driver.closed().is_none() {
            match slot.stall_deadline {
                None => {
                    slot.stall_deadline = Some(now + shard.shared.config.write_stall_timeout);
                    shard
                        .shared
                        .stats
                        .backpressure
                        .fetch_add(1, Ordering::Relaxed);
                }
                Some(at) if now >= at => {
                    shard
                        .shared
                        .stats
                        .write_stall_closes
                        .fetch_add(1, Ordering::Relaxed);
                    slot.driver.abort(now, CloseReason::WriteStalled);
                }
                Some(_) => {}
            }
        } else {
            slot.stall_deadline = None;
            if paused {
                // Reading stopped above and no read interest is armed:
                // come back now that there is room.
                cx.waker().wake_by_ref();
            }
        }

        let pending = slot.pending_tx.len();
        let gauge = &shard.shared.stats.pending_tx_bytes;
        if pending > slot.accounted {
            gauge.fetch_add(pending - slot.accounted, Ordering::Relaxed);
        } else {
            gauge.fetch_sub(slot.accounted - pending, Ordering::Relaxed);
        }
        slot.accounted = pending;

        // Done? Close once the last bytes are out, the socket failed, the
        // peer stalled our writes, or it would not take our last bytes
        // within the linger time.
        let finished = match slot.driver.closed() {
            Some(CloseReason::Io(_))
            | Some(CloseReason::PeerClosed)
            | Some(CloseReason::WriteStalled) => true,
            Some(_) if slot.pending_tx.is_empty() && !slot.queued => true,
            Some(_) => {
                let linger = *slot.linger_deadline.get_or_insert(now + LINGER);
                now >= linger
            }
            None => false,
        };
        if finished {
            if let Some(at) = slot.registered.take() {
                shard.timers.borrow_mut().remove(&(at, this.key));
            }
            let mut removed = slots.remove(this.key);
            drop(slots);
            gauge.fetch_sub(removed.accounted, Ordering::Relaxed);
            end_handshake(shard, &mut removed);
            if let (None, Some(tag), Some(reason)) = (
                removed.driver.app(),
                removed.driver.client_tag(),
                removed.driver.closed(),
            ) {
                shard.service.connect_failed(tag, now, reason);
            }
            // Orderly close: shutdown(Write) sends FIN after the queued bytes.
            let fd_stream = removed.stream;
            let _ = fd_stream_shutdown(&fd_stream);
            drop(fd_stream);
            shard.shared.total.fetch_sub(1, Ordering::SeqCst);
            shard.shared.stats.active.fetch_sub(1, Ordering::Relaxed);
            shard.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(());
        }

        // Next deadline into the shard's timer set.
        let deadline = [
            slot.handshake_deadline,
            slot.driver.deadline(),
            slot.linger_deadline,
            slot.stall_deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        if deadline != slot.registered {
            let mut timers = shard.timers.borrow_mut();
            if let Some(old) = slot.registered.take() {
                timers.remove(&(old, this.key));
            }
            if let Some(at) = deadline {
                if at <= now {
                    // Already due: run again right away.
                    slot.timer_fired = true;
                    cx.waker().wake_by_ref();
                } else {
                    timers.insert((at, this.key));
                    slot.registered = Some(at);
                }
            }
        }
        drop(slots);
        if flush_now {
            let mut slots = shard.slots.borrow_mut();
            flush_out(shard, &mut slots, now);
        }
        Poll::Pending
    }
}

fn write_some(stream: &mut TcpStream, cx: &mut Context<'_>, mut buf: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while !buf.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                written += n;
                buf = &buf[n..];
            }
            Poll::Ready(Err(e)) => return Err(e),
            // glommio armed a writability poll with our waker.
            Poll::Pending => break,
        }
    }
    Ok(written)
}

fn fd_stream_shutdown(stream: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    // SAFETY: `fd` is a valid open socket owned by `stream`, which outlives
    // this call; shutdown(2) does not take ownership.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::system::allowed_cpus;

    /// Shards follow the affinity mask they start under (`taskset`).
    #[test]
    fn shards_are_placed_on_the_cpus_the_process_may_use() {
        let all = allowed_cpus();
        assert!(!all.is_empty());
        let last = *all.last().unwrap();
        let seen = std::thread::spawn(move || {
            // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            unsafe { libc::CPU_SET(last, &mut set) };
            let rc =
                unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
            assert_eq!(rc, 0);
            allowed_cpus()
        })
        .join()
        .unwrap();
        assert_eq!(seen, vec![last]);
    }

    /// An idle connection's task stays three words: messages reach it
    /// through the shard's one channel, not a channel of its own
    /// (ARCHITECTURE.md "Memory per connection").
    #[test]
    fn the_connection_task_stays_tiny() {
        struct Idle;
        impl Connection for Idle {
            type Message = String;
            fn on_data(&mut self, _: Instant, _: &[u8]) -> usize {
                0
            }
            fn on_timeout(&mut self, _: Instant) {}
            fn on_message(&mut self, _: Instant, _: String) {}
            fn on_shutdown(&mut self, _: Instant) {}
            fn poll_transmit(&mut self, _: &mut Vec<u8>) -> bool {
                false
            }
            fn poll_timeout(&self) -> Option<Instant> {
                None
            }
            fn is_closed(&self) -> bool {
                false
            }
            fn on_closed(&mut self, _: Instant, _: &CloseReason) {}
        }
        struct Idles;
        impl Service for Idles {
            type Conn = Idle;
            fn accept(&self, _: &crate::ConnInfo<'_>, _: Instant) -> Idle {
                Idle
            }
        }
        assert!(std::mem::size_of::<ConnTask<Idles>>() <= 3 * std::mem::size_of::<usize>());
        // The ConnId lives in the endpoint: two socket addresses and 12
        // bytes, where the shard index used to be.
        assert!(
            std::mem::size_of::<Endpoint>() <= 2 * std::mem::size_of::<SocketAddr>() + 12,
            "{}",
            std::mem::size_of::<Endpoint>()
        );
    }
}
