//! One device's session fed what a device, the clock and the hub can throw
//! at it (issue 15, item 3): raw frames, time steps, a real sign-up and
//! sign-in (so the fuzzer reaches the signed-in states without forging a
//! JWT), answers to the gateway's own requests with arbitrary codes and
//! payloads, and hub commands for arbitrary hrefs. The input is a script:
//! one op byte, then that op's bytes.
//!
//! Invariants, checked after every op:
//! - no panic;
//! - every `poll_transmit` hands over exactly one whole CoAP frame (the
//!   transport seals each in a TLS record of its own, spec Appendix A.6);
//! - what one op makes the session send is bounded (1 MiB);
//! - a closed session asks for no more time.
#![no_main]

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coap_gateway::auth::authority::{Authority, AuthoritySettings, SigningKey};
use coap_gateway::auth::jwt::{AuthorizationMode, TokenValidator};
use coap_gateway::auth::provider::{EmbeddedProvider, TokenProvider};
use coap_gateway::auth::validator::SharedValidator;
use coap_gateway::coap::{frame_len, next_message, Code, MessageWriter};
use coap_gateway::hub::{Command, CommandKind, ConnectionRef, Content, HubMessage, MemoryHub};
use coap_gateway::session::{PeerIdentity, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;

const D: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";
const MAX_MESSAGE: usize = 16 * 1024;

struct Run {
    session: Session,
    authority: Arc<Authority>,
    provider: Arc<EmbeddedProvider>,
    now: Instant,
    wall: SystemTime,
    /// Tokens of the gateway's requests to the device, newest last.
    requests: Vec<Vec<u8>>,
    /// `accesstoken` and `uid` of the latest sign-up answer.
    access_token: Option<String>,
    uid: Option<String>,
    next_token: u8,
}

fn run() -> Run {
    let authority = Arc::new(
        Authority::new(
            SigningKey::generate().expect("key"),
            AuthoritySettings::new("https://auth.test"),
        )
        .expect("authority"),
    );
    let validator = TokenValidator::new(
        authority.key_set(),
        authority.validation_settings(AuthorizationMode::DeviceIdClaim),
    )
    .expect("validator");
    let provider = Arc::new(EmbeddedProvider::new("plgd", authority.clone()));
    let config = SessionConfig {
        max_message_size: MAX_MESSAGE,
        hub: Arc::new(MemoryHub::new()),
        validator: Arc::new(SharedValidator::new(validator)),
        providers: vec![provider.clone()],
        ..SessionConfig::default()
    };
    let identity = PeerIdentity {
        device_id: Some(D.into()),
        connection: ConnectionRef(1),
        remote: "127.0.0.1:40000".into(),
    };
    let now = Instant::now();
    Run {
        session: Session::new(Rc::new(config), identity, now, 7),
        authority,
        provider,
        now,
        wall: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        requests: Vec::new(),
        access_token: None,
        uid: None,
        next_token: 0,
    }
}

/// Takes `n` bytes (fewer at the end of the input).
fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = data.split_at(n.min(data.len()));
    *data = tail;
    head
}

fn byte(data: &mut &[u8]) -> u8 {
    take(data, 1).first().copied().unwrap_or(0)
}

/// The value of `"key":"..."` in a JSON answer.
fn json_text(payload: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(payload).ok()?;
    let at = text.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = text[at..].find('"')?;
    Some(text[at..at + end].to_owned())
}

impl Run {
    /// Bytes from the device, as the transport glue hands them over.
    fn feed(&mut self, bytes: &[u8]) {
        let mut used = 0;
        while self.session.is_closed().is_none() {
            match next_message(&bytes[used..], MAX_MESSAGE) {
                Ok(Some((msg, len))) => {
                    self.session.handle_frame(self.now, self.wall, msg);
                    used += len;
                    self.exchanges();
                }
                Ok(None) => break,
                Err(e) => {
                    self.session.handle_frame_error(e);
                    break;
                }
            }
        }
    }

    /// The embedded provider answers at once, as in the transport glue.
    fn exchanges(&mut self) {
        while let Some(exchange) = self.session.poll_exchange() {
            if let Some(result) = self.provider.exchange(exchange.request, Box::new(|_| {})) {
                self.session
                    .handle_exchange(self.now, self.wall, exchange.id, result);
            }
        }
    }

    fn token(&mut self) -> [u8; 2] {
        self.next_token = self.next_token.wrapping_add(1);
        [0xA5, self.next_token]
    }

    fn post_json(&mut self, path: &[&str], body: &str) {
        let token = self.token();
        let mut frame = Vec::new();
        {
            let mut w = MessageWriter::new(&mut frame, Code::POST, &token);
            for segment in path {
                w.option_str(11, segment);
            }
            w.option_uint(12, 50)
                .option_uint(17, 50)
                .payload(body.as_bytes());
            w.finish();
        }
        self.feed(&frame);
    }

    /// Everything the session queued: one whole frame per call.
    fn drain(&mut self) {
        let mut total = 0usize;
        let mut out = Vec::new();
        while self.session.poll_transmit(&mut out) {
            let len = frame_len(&out, usize::MAX).expect("a well-formed frame");
            assert_eq!(len, Some(out.len()), "poll_transmit handed over one whole frame");
            let (msg, _) = next_message(&out, usize::MAX)
                .expect("parses")
                .expect("whole");
            if msg.code.is_request() {
                self.requests.push(msg.token.to_vec());
                if self.requests.len() > 64 {
                    self.requests.remove(0);
                }
            } else if msg.code == Code::CHANGED {
                if let Some(t) = json_text(msg.payload, "accesstoken") {
                    self.access_token = Some(t);
                }
                if let Some(u) = json_text(msg.payload, "uid") {
                    self.uid = Some(u);
                }
            }
            total += out.len();
            assert!(total <= 1 << 20, "one op made the session send over 1 MiB");
            out.clear();
        }
        if self.session.is_closed().is_some() {
            assert_eq!(self.session.poll_timeout(), None);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = run();
    r.drain();
    let mut data = data;
    let mut ops = 0;
    while !data.is_empty() && ops < 64 {
        ops += 1;
        match byte(&mut data) % 7 {
            // Raw bytes from the device.
            0 => {
                let n = usize::from(byte(&mut data)) * 4;
                let bytes = take(&mut data, n).to_vec();
                r.feed(&bytes);
            }
            // Time passes.
            1 => {
                let step = Duration::from_millis(u64::from(byte(&mut data)) * 250);
                r.now += step;
                r.wall += step;
                if r.session.poll_timeout().is_some_and(|t| t <= r.now) {
                    r.session.handle_timeout(r.now);
                }
                r.exchanges();
            }
            // A real sign-up with a fresh code.
            2 => {
                let unix = r.wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let code = r.authority.issue_code("alice", None, unix).expect("code");
                let body = format!(
                    r#"{{"di":"{D}","authprovider":"plgd","accesstoken":"{code}"}}"#
                );
                r.post_json(&["oic", "sec", "account"], &body);
            }
            // Sign-in (or out) with what the last sign-up gave.
            3 => {
                let login = byte(&mut data) % 4 != 0;
                let body = format!(
                    r#"{{"di":"{D}","uid":"{}","accesstoken":"{}","login":{login}}}"#,
                    r.uid.clone().unwrap_or_default(),
                    r.access_token.clone().unwrap_or_default()
                );
                r.post_json(&["oic", "sec", "session"], &body);
            }
            // An answer to one of the gateway's requests: code, options
            // (Observe, Content-Format), payload all chosen by the input.
            4 => {
                let pick = usize::from(byte(&mut data));
                let code = Code::from(byte(&mut data));
                let observe = byte(&mut data);
                let format = byte(&mut data);
                let n = usize::from(byte(&mut data)) * 2;
                let payload = take(&mut data, n).to_vec();
                let token = match r.requests.len() {
                    0 => vec![0u8; 8],
                    len => r.requests[len - 1 - pick % len].clone(),
                };
                let mut frame = Vec::new();
                {
                    let mut w = MessageWriter::new(&mut frame, code, &token);
                    if observe % 2 == 1 {
                        w.option_uint(6, u32::from(observe));
                    }
                    if format % 3 != 0 {
                        w.option_uint(12, [0, 50, 60, 10000][usize::from(format % 4)]);
                    }
                    w.payload(&payload);
                    w.finish();
                }
                r.feed(&frame);
            }
            // A hub command for an href the input names.
            5 => {
                let kind = byte(&mut data);
                let n = usize::from(byte(&mut data) % 32);
                let href: String = take(&mut data, n)
                    .iter()
                    .map(|b| char::from(b'!' + b % 94))
                    .collect();
                let content = Content {
                    data: vec![0xA0],
                    content_format: 10000,
                };
                let kind = match kind % 4 {
                    0 => CommandKind::Retrieve { etags: Vec::new() },
                    1 => CommandKind::Update { content },
                    2 => CommandKind::Create { content },
                    _ => CommandKind::Delete,
                };
                let command = Command {
                    correlation_id: format!("c{ops}"),
                    device_id: D.into(),
                    href: format!("/{href}"),
                    kind,
                    interface: None,
                    valid_until_ns: 0,
                    issued_at_ns: 0,
                };
                r.session
                    .handle_hub_message(r.now, r.wall, HubMessage::Command(Box::new(command)));
            }
            // Twin switched off, on, or resynchronised.
            _ => {
                let b = byte(&mut data);
                r.session.handle_hub_message(
                    r.now,
                    r.wall,
                    HubMessage::Twin {
                        enabled: b % 2 == 0,
                        force: b % 4 < 2,
                    },
                );
            }
        }
        r.drain();
    }
});
