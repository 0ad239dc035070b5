//! The device side of the in-memory transport (`idle --transport memory`):
//! a simulated device that connects to a gateway [`shards::Driver`] through
//! byte buffers instead of a socket.
//!
//! Set-up ([`SetupDevice`]): a real buffered `rustls::ClientConnection`
//! with the device's own OCF identity certificate (full TLS 1.3 mutual
//! handshake, resumption off, as in `connect`), our CSM, the sign-up
//! (`POST /oic/sec/account` with a code the gateway's authority minted,
//! spec §5.2), the sign-in (`POST /oic/sec/session`, spec §5.4) and the
//! answers to the gateway's `GET /oic/res` requests that follow it (local
//! endpoints and the twin's link list, spec §6.3/§8.1:
//! [`ocf::local_links_body`], so that the twin is IN_SYNC with nothing to
//! observe).
//!
//! Idle ([`IdleDevice`]): the device keeps only its TLS 1.3 traffic keys
//! and sequence numbers, taken from rustls once the set-up is done
//! (`dangerous_extract_secrets`), and protects and unprotects records
//! itself (RFC 8446 §5.2–§5.3) to answer keepalive Pings (spec §2.4) and
//! anything else the gateway sends. The bytes on the wire are what rustls
//! would send with the same keys; what changes is that an idle device
//! costs ~100 bytes of this process's memory instead of a rustls
//! connection's few KiB, so that the process's memory growth is the
//! gateway's (the figure measured) plus a small, exactly known term.

use std::io::{Read, Write};
use std::sync::Arc;

use coap_gateway::auth::pki::{Ca, LeafSpec};
use coap_gateway::coap::{deframer, option, signal, Code, MessageRef, MessageWriter};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ConnectionTrafficSecrets, RootCertStore};

use crate::ocf::{self, Registration};

/// Largest CoAP message accepted from the gateway.
const MAX_MESSAGE: usize = 1 << 20;
/// TLS record header: type, legacy version, length (RFC 8446 §5.1).
const HEADER: usize = 5;
/// `application_data`, `alert`, `handshake` record types.
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
/// The largest TLSCiphertext length (RFC 8446 §5.2: 2^14 + 256).
const MAX_CIPHERTEXT: usize = (1 << 14) + 256;
/// The AEAD tag of every TLS 1.3 suite.
const TAG: usize = 16;

/// A device's client configuration: its own OCF identity certificate
/// (CN `uuid:<id>`, issued in memory by the gateway's CA), no resumption
/// (every handshake is full, as in `connect`), secret extraction on (for
/// [`SetupDevice::into_idle`]).
pub fn client_config(
    ca: &Ca,
    roots: &Arc<RootCertStore>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    id: uuid::Uuid,
) -> Result<Arc<ClientConfig>, String> {
    let leaf = ca
        .issue(&LeafSpec::device(id))
        .map_err(|e| format!("cannot issue a device certificate: {e}"))?;
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(vec![leaf.cert_der.clone()], leaf.private_key())
        .map_err(|e| format!("device certificate: {e}"))?;
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// Where the set-up of a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Handshake, CSM and sign-up sent (rustls sends the plaintext with
    /// its Finished); waiting for the sign-up's 2.04.
    SigningUp,
    /// Sign-in sent; waiting for its 2.04.
    SigningIn,
    /// Signed in: answering the gateway's requests.
    SignedIn,
}

/// A device during its set-up, with a rustls client.
pub struct SetupDevice {
    tls: ClientConnection,
    id: String,
    step: Step,
    /// Decrypted bytes not yet a whole CoAP message.
    plain: Vec<u8>,
    next_token: u64,
    sign_up_token: [u8; 8],
    sign_in_token: [u8; 8],
    /// Requests of the gateway answered (its `GET /oic/res`).
    pub requests_answered: u32,
    pub pings_answered: u32,
}

impl SetupDevice {
    /// A new device that will sign up with `code` (spec §5.2); its CSM and
    /// sign-up are queued at once and leave with its TLS Finished.
    pub fn new(config: Arc<ClientConfig>, id: String, code: &str) -> Result<SetupDevice, String> {
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let tls = ClientConnection::new(config, name).map_err(|e| format!("TLS client: {e}"))?;
        let mut device = SetupDevice {
            tls,
            id,
            step: Step::SigningUp,
            plain: Vec::new(),
            next_token: 0,
            sign_up_token: [0; 8],
            sign_in_token: [0; 8],
            requests_answered: 0,
            pings_answered: 0,
        };
        let mut out = Vec::with_capacity(512);
        let csm = device.token();
        signal::write_csm(&mut out, &csm, None, false);
        device.sign_up_token = device.token();
        ocf::write_post(
            &mut out,
            &device.sign_up_token,
            &["oic", "sec", "account"],
            &ocf::sign_up_body(&device.id, code),
        );
        device.write(&out)?;
        Ok(device)
    }

    pub fn is_signed_in(&self) -> bool {
        self.step == Step::SignedIn
    }

    fn token(&mut self) -> [u8; 8] {
        self.next_token += 1;
        self.next_token.to_be_bytes()
    }

    fn write(&mut self, plaintext: &[u8]) -> Result<(), String> {
        self.tls
            .writer()
            .write_all(plaintext)
            .map_err(|e| format!("TLS client write: {e}"))
    }

    /// Appends the TLS bytes the device wants to send to `out`.
    pub fn transmit(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        while self.tls.wants_write() {
            self.tls
                .write_tls(out)
                .map_err(|e| format!("TLS client: {e}"))?;
        }
        Ok(())
    }

    /// Takes TLS bytes from the gateway and acts on the CoAP messages they
    /// carry (answers are queued for [`SetupDevice::transmit`]).
    pub fn receive(&mut self, mut wire: &[u8]) -> Result<(), String> {
        while !wire.is_empty() {
            self.tls
                .read_tls(&mut wire)
                .map_err(|e| format!("TLS client read: {e}"))?;
            let state = self
                .tls
                .process_new_packets()
                .map_err(|e| format!("TLS: {e}"))?;
            if state.peer_has_closed() {
                return Err(format!(
                    "the gateway closed the connection ({:?})",
                    self.step
                ));
            }
            let mut chunk = [0u8; 4096];
            loop {
                match self.tls.reader().read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => self.plain.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("TLS client read: {e}")),
                }
            }
        }
        self.handle_messages()
    }

    fn handle_messages(&mut self) -> Result<(), String> {
        let plain = std::mem::take(&mut self.plain);
        let mut used = 0;
        let mut answers = Vec::new();
        // Bounded by the bytes: every message consumes at least its header.
        while let Some((msg, len)) = deframer::next_message(&plain[used..], MAX_MESSAGE)
            .map_err(|e| format!("bad CoAP frame from the gateway: {e}"))?
        {
            used += len;
            self.handle(&msg, &mut answers)?;
        }
        if used < plain.len() {
            self.plain = plain[used..].to_vec();
        }
        if !answers.is_empty() {
            self.write(&answers)?;
        }
        Ok(())
    }

    fn handle(&mut self, msg: &MessageRef<'_>, out: &mut Vec<u8>) -> Result<(), String> {
        if msg.code == Code::PING {
            signal::write_pong(out, msg.token, false);
            self.pings_answered += 1;
            return Ok(());
        }
        if msg.code == Code::RELEASE || msg.code == Code::ABORT {
            return Err(format!(
                "the gateway sent {} during set-up: {}",
                msg.code,
                String::from_utf8_lossy(msg.payload)
            ));
        }
        if msg.code.is_signal() {
            // The gateway's CSM (spec §2.3).
            return Ok(());
        }
        if msg.code.is_request() {
            answer_request(msg, out);
            self.requests_answered += 1;
            return Ok(());
        }
        let answered = |what: &str| {
            format!(
                "{what} answered {}: {}",
                msg.code,
                String::from_utf8_lossy(msg.payload)
            )
        };
        match self.step {
            Step::SigningUp if msg.token == self.sign_up_token => {
                if msg.code != Code::CHANGED {
                    return Err(answered("sign-up"));
                }
                let Registration {
                    user_id,
                    access_token,
                } = ocf::parse_sign_up(msg.payload)?;
                self.sign_in_token = self.token();
                ocf::write_post(
                    out,
                    &self.sign_in_token,
                    &["oic", "sec", "session"],
                    &ocf::sign_in_body(&self.id, &user_id, &access_token),
                );
                self.step = Step::SigningIn;
            }
            Step::SigningIn if msg.token == self.sign_in_token => {
                if msg.code != Code::CHANGED {
                    return Err(answered("sign-in"));
                }
                self.step = Step::SignedIn;
            }
            // A response to nothing we asked: ignored, as a device does.
            _ => {}
        }
        Ok(())
    }

    /// Whether nothing is left to send or to read.
    pub fn is_quiet(&self) -> bool {
        !self.tls.wants_write() && self.plain.is_empty()
    }

    /// The device from now on: its traffic keys only (see the module
    /// comment). Fails unless signed in, quiet and on TLS 1.3.
    pub fn into_idle(self) -> Result<IdleDevice, String> {
        if !self.is_signed_in() || !self.is_quiet() {
            return Err(format!("not idle yet ({:?})", self.step));
        }
        if self.tls.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return Err("the in-memory idle device speaks TLS 1.3 only".into());
        }
        let secrets = self
            .tls
            .dangerous_extract_secrets()
            .map_err(|e| format!("cannot take the traffic keys: {e}"))?;
        Ok(IdleDevice {
            tx: Direction::new(secrets.tx)?,
            rx: Direction::new(secrets.rx)?,
        })
    }
}

/// Answers a request of the gateway: any GET gets the link list of a
/// device with nothing to observe (spec §6.3, §8.1), anything else 4.04.
fn answer_request(msg: &MessageRef<'_>, out: &mut Vec<u8>) {
    if msg.code == Code::GET {
        MessageWriter::new(out, Code::CONTENT, msg.token)
            .option_uint(option::CONTENT_FORMAT, ocf::OCF_CBOR)
            .payload(&ocf::local_links_body())
            .finish();
    } else {
        MessageWriter::new(out, Code::NOT_FOUND, msg.token).finish();
    }
}

/// The AEAD of a TLS 1.3 cipher suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// One direction's traffic key (RFC 8446 §7.3) and record sequence number
/// (§5.3). Raw bytes, no expanded key schedule: the key is set up again
/// for each record (a keepalive every 10 s does not make that matter).
struct Direction {
    suite: Suite,
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Direction, String> {
        let (suite, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Suite::Chacha20Poly1305, key, iv)
            }
            _ => return Err("unknown TLS 1.3 cipher suite".into()),
        };
        let mut d = Direction {
            suite,
            key: [0; 32],
            iv: [0; 12],
            seq,
        };
        let key = key.as_ref();
        d.key
            .get_mut(..key.len())
            .ok_or("traffic key longer than 32 bytes")?
            .copy_from_slice(key);
        let iv = iv.as_ref();
        if iv.len() != d.iv.len() {
            return Err("traffic IV is not 12 bytes".into());
        }
        d.iv.copy_from_slice(iv);
        Ok(d)
    }

    fn aead(&self) -> Result<LessSafeKey, String> {
        let (alg, len) = match self.suite {
            Suite::Aes128Gcm => (&aead::AES_128_GCM, 16),
            Suite::Aes256Gcm => (&aead::AES_256_GCM, 32),
            Suite::Chacha20Poly1305 => (&aead::CHACHA20_POLY1305, 32),
        };
        UnboundKey::new(alg, &self.key[..len])
            .map(LessSafeKey::new)
            .map_err(|_| "bad traffic key".to_owned())
    }

    /// RFC 8446 §5.3: the IV XOR the sequence number, left-padded.
    fn nonce(&mut self) -> Result<Nonce, String> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or("record sequence number exhausted")?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Appends one `application_data` record carrying `plaintext`
    /// (at most 2^14 bytes) to `out` (RFC 8446 §5.2).
    fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let len = plaintext.len() + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let key = self.aead()?;
        let nonce = self.nonce()?;
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(plaintext);
        out.push(APPLICATION_DATA);
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER..])
            .map_err(|_| "record encryption failed".to_owned())?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts one record in place; returns its content type and
    /// plaintext (RFC 8446 §5.4: padding removed).
    fn open<'a>(
        &mut self,
        header: [u8; HEADER],
        body: &'a mut [u8],
    ) -> Result<(u8, &'a [u8]), String> {
        let key = self.aead()?;
        let nonce = self.nonce()?;
        let plain = key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| "record decryption failed (bad key or sequence)".to_owned())?;
        let end = plain
            .iter()
            .rposition(|b| *b != 0)
            .ok_or("record without a content type")?;
        Ok((plain[end], &plain[..end]))
    }
}

/// What an idle device saw in one delivery from the gateway.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub pings: u32,
    /// Requests of the gateway (answered as during set-up).
    pub requests: u32,
    /// Other messages (responses, signals other than Ping).
    pub other: u32,
    /// The gateway closed (close_notify, Release or Abort).
    pub closed: bool,
}

/// An idle, signed-in device: its traffic keys and nothing else
/// (`size_of::<IdleDevice>()` bytes, no heap).
pub struct IdleDevice {
    tx: Direction,
    rx: Direction,
}

impl IdleDevice {
    /// Bytes this process holds per idle device (no heap).
    pub const BYTES: usize = std::mem::size_of::<IdleDevice>();

    /// Takes whole TLS records from the gateway (the driver emits whole
    /// records), answers what they carry into `out` (TLS bytes for the
    /// driver). An incomplete record or CoAP message is an error here:
    /// the in-memory transport never splits them.
    pub fn receive(&mut self, wire: &mut [u8], out: &mut Vec<u8>) -> Result<Seen, String> {
        let mut seen = Seen::default();
        let mut answers = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let rest = &mut wire[at..];
            if rest.len() < HEADER {
                return Err("incomplete TLS record header".into());
            }
            let header: [u8; HEADER] = [rest[0], rest[1], rest[2], rest[3], rest[4]];
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if len > MAX_CIPHERTEXT || rest.len() < HEADER + len {
                return Err(format!("bad or incomplete TLS record ({len} bytes)"));
            }
            at += HEADER + len;
            if header[0] != APPLICATION_DATA {
                return Err(format!("unexpected TLS record type {}", header[0]));
            }
            let (kind, plain) = self.rx.open(header, &mut rest[HEADER..HEADER + len])?;
            match kind {
                APPLICATION_DATA => self.handle(plain, &mut seen, &mut answers)?,
                ALERT => {
                    // close_notify (RFC 8446 §6.1) or a fatal alert: the
                    // connection is over either way.
                    seen.closed = true;
                }
                HANDSHAKE => {
                    // NewSessionTicket is ignored (no resumption); a
                    // KeyUpdate would change the keys, which this device
                    // does not follow.
                    if plain.first() == Some(&24) {
                        return Err("KeyUpdate is not supported by the in-memory device".into());
                    }
                }
                other => return Err(format!("unexpected TLS content type {other}")),
            }
        }
        if !answers.is_empty() {
            for chunk in answers.chunks(1 << 14) {
                self.tx.seal(chunk, out)?;
            }
        }
        Ok(seen)
    }

    fn handle(
        &mut self,
        mut plain: &[u8],
        seen: &mut Seen,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        // Bounded by the bytes: every message consumes at least its header.
        while !plain.is_empty() {
            let Some((msg, len)) = deframer::next_message(plain, MAX_MESSAGE)
                .map_err(|e| format!("bad CoAP frame from the gateway: {e}"))?
            else {
                return Err("a CoAP message split over TLS records".into());
            };
            if msg.code == Code::PING {
                signal::write_pong(out, msg.token, false);
                seen.pings += 1;
            } else if msg.code == Code::RELEASE || msg.code == Code::ABORT {
                seen.closed = true;
            } else if msg.code.is_request() {
                answer_request(&msg, out);
                seen.requests += 1;
            } else {
                seen.other += 1;
            }
            plain = &plain[len..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(suite: Suite) -> (Direction, Direction) {
        let d = |seq| Direction {
            suite,
            key: [7; 32],
            iv: [9; 12],
            seq,
        };
        (d(5), d(5))
    }

    #[test]
    fn records_round_trip_with_every_suite_and_a_wrong_sequence_fails() {
        for suite in [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305] {
            let (mut tx, mut rx) = pair(suite);
            let mut wire = Vec::new();
            tx.seal(b"hello", &mut wire).unwrap();
            tx.seal(b"again", &mut wire).unwrap();
            let first = HEADER + 5 + 1 + TAG;
            assert_eq!(wire.len(), 2 * first);
            let header: [u8; HEADER] = wire[..HEADER].try_into().unwrap();
            let (kind, plain) = rx.open(header, &mut wire[HEADER..first]).unwrap();
            assert_eq!((kind, plain), (APPLICATION_DATA, &b"hello"[..]));
            // Skipping a record breaks the nonce: the next one fails.
            rx.seq += 1;
            let header: [u8; HEADER] = wire[first..first + HEADER].try_into().unwrap();
            assert!(rx.open(header, &mut wire[first + HEADER..]).is_err());
        }
    }

    #[test]
    fn an_idle_device_answers_a_ping_and_sees_a_release() {
        let (gw_tx, dev_rx) = pair(Suite::Aes256Gcm);
        let (dev_tx, gw_rx) = pair(Suite::Aes256Gcm);
        let (mut gw_tx, mut gw_rx) = (gw_tx, gw_rx);
        let mut device = IdleDevice {
            tx: dev_tx,
            rx: dev_rx,
        };
        let mut plain = Vec::new();
        signal::write_ping(&mut plain, &[1, 2], false);
        let mut wire = Vec::new();
        gw_tx.seal(&plain, &mut wire).unwrap();
        let mut out = Vec::new();
        let seen = device.receive(&mut wire, &mut out).unwrap();
        assert_eq!((seen.pings, seen.closed), (1, false));
        let header: [u8; HEADER] = out[..HEADER].try_into().unwrap();
        let (_, pong) = gw_rx.open(header, &mut out[HEADER..]).unwrap();
        let msg = MessageRef::parse(pong).unwrap();
        assert_eq!((msg.code, msg.token), (Code::PONG, &[1u8, 2][..]));

        let mut plain = Vec::new();
        signal::write_release(&mut plain, &[]);
        let mut wire = Vec::new();
        gw_tx.seal(&plain, &mut wire).unwrap();
        let seen = device.receive(&mut wire, &mut Vec::new()).unwrap();
        assert!(seen.closed);
        // Garbage is an error, not a panic.
        assert!(device
            .receive(&mut [23, 3, 3, 0, 40, 1], &mut Vec::new())
            .is_err());
        assert!(device.receive(&mut [23, 3], &mut Vec::new()).is_err());
    }
}
