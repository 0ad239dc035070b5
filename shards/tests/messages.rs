//! Messages from other threads to one connection, over a real runtime (plain
//! TCP, two shards) and real sockets.

// A test of the IO side: it reads the clock.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shards::{
    CloseReason, ConnId, ConnInfo, Connection, Runtime, RuntimeConfig, SendError, Service,
};

/// Greets with its `ConnId`, echoes lines, appends every message to its
/// output; the message "close" closes it. The line "block" holds the shard
/// thread until the test releases it.
struct Echo {
    out: Vec<u8>,
    closed: bool,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    blocked: AtomicBool,
    release: AtomicBool,
}

impl Connection for Echo {
    type Message = String;

    fn on_data(&mut self, _now: Instant, data: &[u8]) -> usize {
        let mut used = 0;
        while let Some(pos) = data[used..].iter().position(|b| *b == b'\n') {
            let line = &data[used..used + pos + 1];
            if line == b"block\n" {
                self.gate.blocked.store(true, Ordering::SeqCst);
                while !self.gate.release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            self.out.extend_from_slice(line);
            used += pos + 1;
        }
        used
    }
    fn on_timeout(&mut self, _now: Instant) {}
    fn on_message(&mut self, _now: Instant, msg: String) {
        if msg == "close" {
            self.closed = true;
        } else {
            self.out.extend_from_slice(msg.as_bytes());
        }
    }
    fn on_shutdown(&mut self, _now: Instant) {
        self.closed = true;
    }
    fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.out.is_empty() {
            return false;
        }
        out.append(&mut self.out);
        true
    }
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    fn is_closed(&self) -> bool {
        self.closed
    }
    fn on_closed(&mut self, _now: Instant, _reason: &CloseReason) {}
}

struct EchoService {
    gate: Arc<Gate>,
}

impl Service for EchoService {
    type Conn = Echo;
    fn accept(&self, info: &ConnInfo<'_>, _now: Instant) -> Echo {
        assert_eq!(info.shard, info.id.shard as usize);
        Echo {
            out: format!("id {}\n", info.id).into_bytes(),
            closed: false,
            gate: self.gate.clone(),
        }
    }
}

fn start(message_capacity: usize) -> (Runtime<String>, Arc<Gate>) {
    let mut config = RuntimeConfig::new("127.0.0.1:0".parse().unwrap(), None);
    config.shards = 2;
    config.tick = Duration::from_millis(10);
    config.message_capacity = message_capacity;
    let gate = Arc::new(Gate::default());
    let for_shards = gate.clone();
    let runtime = Runtime::start(config, move |_| EchoService {
        gate: for_shards.clone(),
    })
    .expect("runtime starts");
    (runtime, gate)
}

struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    id: ConnId,
}

impl Client {
    fn connect(runtime: &Runtime<String>) -> Client {
        let stream = TcpStream::connect(runtime.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut client = Client {
            reader: BufReader::new(stream),
            writer,
            id: ConnId {
                shard: 0,
                slot: 0,
                generation: 0,
            },
        };
        let greeting = client.line();
        client.id = greeting
            .strip_prefix("id ")
            .and_then(|s| s.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("greeting {greeting:?}"));
        client
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a line in time");
        line
    }

    fn send(&mut self, line: &str) {
        self.writer.write_all(line.as_bytes()).unwrap();
    }

    /// True once the server has closed the connection.
    fn at_eof(&mut self) -> bool {
        let mut rest = String::new();
        matches!(self.reader.read_line(&mut rest), Ok(0))
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn stop(runtime: Runtime<String>) {
    runtime.shutdown();
    runtime.join();
}

#[test]
fn messages_reach_their_connection_in_order_among_its_own_bytes() {
    let (runtime, _) = start(65_536);
    let sender = runtime.sender();
    let mut a = Client::connect(&runtime);
    let mut b = Client::connect(&runtime);
    assert_ne!(a.id, b.id);

    // From another thread, as the control plane would.
    let (to_a, to_b) = (a.id, b.id);
    let from_elsewhere = sender.clone();
    std::thread::spawn(move || {
        for i in 0..1000 {
            from_elsewhere.send(to_a, format!("a{i}\n")).unwrap();
            from_elsewhere.send(to_b, format!("b{i}\n")).unwrap();
        }
    })
    .join()
    .unwrap();
    for i in 0..1000 {
        assert_eq!(a.line(), format!("a{i}\n"));
        assert_eq!(b.line(), format!("b{i}\n"));
    }

    // Interleaved with the connection's own traffic.
    a.send("echo 1\n");
    assert_eq!(a.line(), "echo 1\n");
    sender.send(a.id, "hub\n".into()).unwrap();
    assert_eq!(a.line(), "hub\n");
    a.send("echo 2\n");
    assert_eq!(a.line(), "echo 2\n");

    // send_async from a plain thread's executor.
    futures_lite::future::block_on(sender.send_async(b.id, "async\n".into())).unwrap();
    assert_eq!(b.line(), "async\n");

    let delivered: u64 = runtime
        .stats()
        .iter()
        .map(|s| s.messages_delivered.load(Ordering::Relaxed))
        .sum();
    assert_eq!(delivered, 2002);
    stop(runtime);
}

#[test]
fn a_message_can_close_its_connection() {
    let (runtime, _) = start(16);
    let mut a = Client::connect(&runtime);
    let shard = &runtime.stats()[a.id.shard as usize];
    runtime.sender().send(a.id, "last words\n".into()).unwrap();
    runtime.sender().send(a.id, "close".into()).unwrap();
    assert_eq!(a.line(), "last words\n");
    assert!(a.at_eof(), "closed after its last bytes");
    wait_for("the slot to be freed", || {
        shard.active.load(Ordering::Relaxed) == 0
    });
    stop(runtime);
}

#[test]
fn a_message_for_a_closed_connection_is_dropped_not_given_to_the_slots_next_occupant() {
    let (runtime, _) = start(16);
    let sender = runtime.sender();
    let old = Client::connect(&runtime);
    let old_id = old.id;
    let shard = runtime.stats()[old_id.shard as usize].clone();
    drop(old);
    wait_for("the old connection to close", || {
        shard.closed.load(Ordering::Relaxed) == 1
    });

    // SO_REUSEPORT spreads connections over the shards: connect until one
    // lands on the old connection's shard, where it takes the freed slot.
    let mut new = loop {
        let c = Client::connect(&runtime);
        if c.id.shard == old_id.shard {
            break c;
        }
    };
    assert_eq!(new.id.slot, old_id.slot, "the slot is reused");
    assert_ne!(new.id.generation, old_id.generation);

    sender.send(old_id, "for the old one\n".into()).unwrap();
    sender.send(new.id, "for the new one\n".into()).unwrap();
    // One channel per shard, in order: the old message was handled first.
    assert_eq!(new.line(), "for the new one\n");
    assert_eq!(shard.messages_dropped_closed.load(Ordering::Relaxed), 1);
    assert_eq!(shard.messages_delivered.load(Ordering::Relaxed), 1);

    // An id that never existed on this shard.
    let never = ConnId {
        slot: 999,
        ..new.id
    };
    sender.send(never, "nobody\n".into()).unwrap();
    sender.send(new.id, "still here\n".into()).unwrap();
    assert_eq!(new.line(), "still here\n");
    assert_eq!(shard.messages_dropped_closed.load(Ordering::Relaxed), 2);
    stop(runtime);
}

#[test]
fn a_full_channel_gives_the_message_back() {
    let (runtime, gate) = start(1);
    let sender = runtime.sender();
    let mut a = Client::connect(&runtime);
    let shard = runtime.stats()[a.id.shard as usize].clone();

    // Hold the shard's thread so that nothing drains its channel.
    a.send("block\n");
    wait_for("the shard to block", || gate.blocked.load(Ordering::SeqCst));
    assert_eq!(sender.send(a.id, "queued\n".into()), Ok(()));
    assert_eq!(sender.queued(a.id.shard as usize), 1);
    assert_eq!(
        sender.send(a.id, "refused\n".into()),
        Err(SendError::Full("refused\n".to_string()))
    );
    assert_eq!(shard.messages_rejected_full.load(Ordering::Relaxed), 1);

    gate.release.store(true, Ordering::SeqCst);
    assert_eq!(a.line(), "block\n");
    assert_eq!(a.line(), "queued\n");
    assert_eq!(sender.send(a.id, "after\n".into()), Ok(()));
    assert_eq!(a.line(), "after\n");
    stop(runtime);
}

#[test]
fn after_the_runtime_stops_sends_fail_with_stopped() {
    let (runtime, _) = start(16);
    let sender = runtime.sender();
    let a = Client::connect(&runtime);
    let id = a.id;
    stop(runtime);
    assert_eq!(
        sender.send(id, "too late".into()),
        Err(SendError::Stopped("too late".to_string()))
    );
    let beyond = ConnId { shard: 7, ..id };
    assert!(matches!(
        sender.send(beyond, "no such shard".into()),
        Err(SendError::Stopped(_))
    ));
}
