//! A small HTTP/1.1 client for the gateway's HTTP API on loopback: one
//! keep-alive connection per [`Http`], `Content-Length` and chunked
//! bodies; a server-sent-events reader (`GET /api/v1/events`); the
//! OpenMetrics text of `/metrics`. No TLS, no redirects, no proxies:
//! what the bench needs and nothing else.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest response body we read.
const MAX_BODY: usize = 16 << 20;
/// Largest header section.
const MAX_HEADERS: usize = 64 << 10;

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A keep-alive HTTP/1.1 connection to `addr` (reopened when the server
/// closed it).
pub struct Http {
    addr: SocketAddr,
    bearer: Option<String>,
    timeout: Duration,
    conn: Option<BufReader<TcpStream>>,
    /// Connections opened (1 when keep-alive held).
    pub connects: u64,
}

impl Http {
    pub fn new(addr: SocketAddr, bearer: Option<String>, timeout: Duration) -> Http {
        Http {
            addr,
            bearer,
            timeout,
            conn: None,
            connects: 0,
        }
    }

    fn connect(&mut self) -> io::Result<&mut BufReader<TcpStream>> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            self.conn = Some(BufReader::with_capacity(16384, s));
            self.connects += 1;
        }
        self.conn
            .as_mut()
            .ok_or_else(|| io::Error::other("no connection"))
    }

    /// The request line and headers of a request.
    fn head(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Vec<u8> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: coap-gateway-bench\r\n",
            self.addr
        );
        if let Some(b) = &self.bearer {
            head.push_str("Authorization: Bearer ");
            head.push_str(b);
            head.push_str("\r\n");
        }
        match body {
            Some((content_type, bytes)) => head.push_str(&format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                bytes.len()
            )),
            None => head.push_str("\r\n"),
        }
        let mut out = head.into_bytes();
        if let Some((_, bytes)) = body {
            out.extend_from_slice(bytes);
        }
        out
    }

    /// Sends one request and reads its response. A keep-alive connection
    /// the server closed before answering is reopened once (only when not
    /// a byte of the answer came).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> io::Result<Response> {
        let bytes = self.head(method, path, body);
        for attempt in 0..2 {
            let reused = self.conn.is_some();
            let conn = self.connect()?;
            let result = conn
                .get_mut()
                .write_all(&bytes)
                .and_then(|()| read_response(conn));
            match result {
                Ok((response, keep_alive)) => {
                    if !keep_alive {
                        self.conn = None;
                    }
                    return Ok(response);
                }
                Err(e) => {
                    self.conn = None;
                    let stale = reused
                        && attempt == 0
                        && matches!(
                            e.kind(),
                            io::ErrorKind::UnexpectedEof
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::BrokenPipe
                        );
                    if !stale {
                        return Err(e);
                    }
                }
            }
        }
        Err(io::Error::other("unreachable: two attempts"))
    }

    /// `GET path` as text.
    pub fn get_text(&mut self, path: &str) -> Result<String, String> {
        let r = self
            .request("GET", path, None)
            .map_err(|e| format!("GET {path}: {e}"))?;
        if r.status != 200 {
            return Err(format!(
                "GET {path}: HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        String::from_utf8(r.body).map_err(|e| format!("GET {path}: {e}"))
    }
}

/// Reads a status line and headers; returns (status, content length,
/// chunked, keep-alive).
fn read_head(r: &mut impl BufRead) -> io::Result<(u16, Option<usize>, bool, bool)> {
    let mut line = String::new();
    let mut total = 0;
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if r.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or_default().to_owned();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let (mut length, mut chunked, mut keep_alive) = (None, false, version == "HTTP/1.1");
    loop {
        line.clear();
        let n = r.read_line(&mut line)?;
        total += n;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if total > MAX_HEADERS {
            return Err(bad("headers too long".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            return Err(bad(format!("bad header {l:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse()
                    .map_err(|_| bad(format!("bad Content-Length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        }
    }
    Ok((status, length, chunked, keep_alive))
}

/// Reads one response; returns it and whether the connection stays open.
pub fn read_response(r: &mut impl BufRead) -> io::Result<(Response, bool)> {
    let (status, length, chunked, keep_alive) = read_head(r)?;
    let body = if chunked {
        let mut d = Dechunker::default();
        let mut body = Vec::new();
        let mut buf = [0u8; 8192];
        while !d.is_done() {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // Bytes after the last chunk would belong to the next response;
            // HTTP/1.1 clients do not pipeline here, so there are none.
            d.feed(&buf[..n], &mut body)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if body.len() > MAX_BODY {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "body too long"));
            }
        }
        body
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "body too long"));
        }
        let mut body = vec![0; n];
        r.read_exact(&mut body)?;
        body
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else {
        // Until the server closes.
        let mut body = Vec::new();
        r.take(MAX_BODY as u64).read_to_end(&mut body)?;
        return Ok((Response { status, body }, false));
    };
    Ok((Response { status, body }, keep_alive))
}

/// An incremental decoder of `Transfer-Encoding: chunked` (RFC 9112
/// §7.1): feed it bytes as they come, it appends the data.
#[derive(Debug, Default)]
pub struct Dechunker {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// This many data bytes left.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last (0-size) chunk: trailer lines until an empty one.
    Trailer,
    Done,
}

impl Dechunker {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, appending chunk data to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Data(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if n == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n)
                    };
                }
                ChunkState::Done => return Ok(()),
                _ => {
                    let Some(at) = input.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(input);
                        if self.line.len() > 4096 {
                            return Err("chunk line too long".into());
                        }
                        return Ok(());
                    };
                    self.line.extend_from_slice(&input[..at]);
                    input = &input[at + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        ChunkState::Size => {
                            let text = std::str::from_utf8(line)
                                .map_err(|_| "chunk size is not text".to_owned())?;
                            let hex = text.split(';').next().unwrap_or_default().trim();
                            let size = usize::from_str_radix(hex, 16)
                                .map_err(|_| format!("bad chunk size {text:?}"))?;
                            if size == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data(size)
                            }
                        }
                        ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
                        ChunkState::DataEnd => return Err("no CRLF after chunk data".into()),
                        ChunkState::Trailer if line.is_empty() => ChunkState::Done,
                        ChunkState::Trailer => ChunkState::Trailer,
                        ChunkState::Data(_) | ChunkState::Done => unreachable_state(),
                    };
                }
            }
        }
        Ok(())
    }
}

/// The line states above never reach the data states' arm.
fn unreachable_state() -> ChunkState {
    ChunkState::Done
}

/// One server-sent event (WHATWG HTML §9.2.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// An incremental `text/event-stream` parser.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: String,
    data: String,
}

impl SseParser {
    /// Parses `input`, calling `f` for every complete event.
    pub fn feed(&mut self, input: &[u8], mut f: impl FnMut(SseEvent)) {
        for &b in input {
            if b != b'\n' {
                if self.line.len() < MAX_BODY {
                    self.line.push(b);
                }
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let line = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(&line));
            if line.is_empty() {
                if !self.data.is_empty() {
                    f(SseEvent {
                        event: if self.event.is_empty() {
                            "message".into()
                        } else {
                            std::mem::take(&mut self.event)
                        },
                        data: std::mem::take(&mut self.data),
                    });
                }
                self.event.clear();
                self.data.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_ref(), ""),
            };
            match field {
                "event" => self.event = value.to_owned(),
                "data" => {
                    if !self.data.is_empty() {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                }
                _ => {}
            }
        }
    }
}

/// A `GET /api/v1/events` stream, read with a short timeout so that its
/// reader can stop.
pub struct SseStream {
    reader: BufReader<TcpStream>,
    chunked: Option<Dechunker>,
    parser: SseParser,
    scratch: Vec<u8>,
}

impl SseStream {
    /// Opens the stream; each later read waits at most `poll`.
    pub fn open(
        addr: SocketAddr,
        path: &str,
        bearer: &str,
        timeout: Duration,
        poll: Duration,
    ) -> io::Result<SseStream> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\nAccept: text/event-stream\r\n\r\n"
        );
        (&s).write_all(req.as_bytes())?;
        let mut reader = BufReader::with_capacity(65536, s);
        let (status, _, chunked, _) = read_head(&mut reader)?;
        if status != 200 {
            return Err(io::Error::other(format!("GET {path}: HTTP {status}")));
        }
        reader.get_ref().set_read_timeout(Some(poll))?;
        Ok(SseStream {
            reader,
            chunked: chunked.then(Dechunker::default),
            parser: SseParser::default(),
            scratch: Vec::new(),
        })
    }

    /// Reads what arrived within the poll time and calls `f` for each
    /// complete event; `Ok(false)` when the stream ended.
    pub fn poll(&mut self, f: impl FnMut(SseEvent)) -> io::Result<bool> {
        let mut buf = [0u8; 65536];
        let n = match self.reader.read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(true)
            }
            Err(e) => return Err(e),
        };
        let bytes: &[u8] = match self.chunked.as_mut() {
            Some(d) => {
                self.scratch.clear();
                d.feed(&buf[..n], &mut self.scratch)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if d.is_done() {
                    self.parser.feed(&self.scratch, f);
                    return Ok(false);
                }
                &self.scratch
            }
            None => &buf[..n],
        };
        self.parser.feed(bytes, f);
        Ok(true)
    }
}

/// The sum of the samples of metric `name` (all label sets) in an
/// OpenMetrics/Prometheus text; `None` when there is none.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(labelled) = rest.strip_prefix('{') {
            labelled.split_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_across_any_split() {
        let wire =
            b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..wire.len() {
            let mut d = Dechunker::default();
            let mut out = Vec::new();
            d.feed(&wire[..split], &mut out).unwrap();
            d.feed(&wire[split..], &mut out).unwrap();
            assert!(d.is_done(), "split at {split}");
            assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.");
        }
        let mut d = Dechunker::default();
        assert!(d.feed(b"zz\r\n", &mut Vec::new()).is_err());
        let mut d = Dechunker::default();
        assert!(d.feed(b"1\r\nab\r\n", &mut Vec::new()).is_err());
    }

    #[test]
    fn responses_with_length_and_chunked() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 504 Gateway Timeout\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let mut r = BufReader::new(&wire[..]);
        let (a, keep) = read_response(&mut r).unwrap();
        assert_eq!(
            (a.status, a.body.as_slice(), keep),
            (200, &b"hello"[..], true)
        );
        let (b, keep) = read_response(&mut r).unwrap();
        assert_eq!(
            (b.status, b.body.as_slice(), keep),
            (504, &b"abc"[..], false)
        );
        assert!(read_response(&mut BufReader::new(&b"HTTP/1.1 2xx\r\n\r\n"[..])).is_err());
        assert_eq!(
            read_response(&mut BufReader::new(&b""[..]))
                .unwrap_err()
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn sse_events_and_comments() {
        let wire = b": keep-alive\n\nevent: resource_changed\nid: 4\ndata: {\"a\":1}\n\nevent: x\r\ndata: one\r\ndata: two\r\n\r\ndata: plain\n\n";
        let mut all = Vec::new();
        let mut p = SseParser::default();
        for chunk in wire.chunks(3) {
            p.feed(chunk, |e| all.push(e));
        }
        assert_eq!(
            all,
            vec![
                SseEvent {
                    event: "resource_changed".into(),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    event: "x".into(),
                    data: "one\ntwo".into()
                },
                SseEvent {
                    event: "message".into(),
                    data: "plain".into()
                },
            ]
        );
    }

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# TYPE coapgw_hub_notifications counter\ncoapgw_hub_notifications_total 1234\ncoapgw_hub_notifications_total_x 9\ncoapgw_hub_commands_answered_total{status=\"OK\"} 3\ncoapgw_hub_commands_answered_total{status=\"NOT_FOUND\"} 2\n# EOF\n";
        assert_eq!(metric(text, "coapgw_hub_notifications_total"), Some(1234.0));
        assert_eq!(
            metric(text, "coapgw_hub_commands_answered_total"),
            Some(5.0)
        );
        assert_eq!(metric(text, "coapgw_hub_twin_updates_total"), None);
    }
}
