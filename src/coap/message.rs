//! A parsed message that borrows every byte from the receive buffer.
//!
//! [`MessageRef::parse`] checks one whole frame (header, token, every option,
//! payload marker) and allocates nothing. The option bytes it keeps are
//! private, so a `MessageRef` can only exist for a sequence that passed the
//! check, and the accessors below walk it without error paths.

use super::code::Code;
use super::deframer::read_header;
use super::error::FrameError;
use super::option::{self, OptionValues, Options};
use super::signal;

/// One CoAP-over-TCP message (RFC 8323 §3.2), borrowed from its frame.
///
/// There is no message ID or type on TCP: responses match requests by token
/// alone (spec §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageRef<'a> {
    pub code: Code,
    /// 0–8 bytes.
    pub token: &'a [u8],
    /// Empty when the message has no payload marker.
    pub payload: &'a [u8],
    /// The encoded option sequence, checked by `option::split_body`.
    options: &'a [u8],
}

impl<'a> MessageRef<'a> {
    /// Parses exactly one frame, as delimited by
    /// [`frame_len`](super::deframer::frame_len).
    ///
    /// No size limit is applied here; that is the deframer's job.
    pub fn parse(frame: &'a [u8]) -> Result<MessageRef<'a>, FrameError> {
        let header = read_header(frame, usize::MAX)?.ok_or(FrameError::Truncated)?;
        let end = header.frame_len();
        if frame.len() < end {
            return Err(FrameError::Truncated);
        }
        if frame.len() > end {
            return Err(FrameError::TrailingBytes);
        }
        let code = frame
            .get(header.code_at)
            .copied()
            .ok_or(FrameError::Truncated)?;
        let token = frame
            .get(header.code_at + 1..header.body_at())
            .ok_or(FrameError::Truncated)?;
        let body = frame.get(header.body_at()..).unwrap_or_default();
        let (options, payload) = option::split_body(body)?;
        Ok(MessageRef {
            code: Code(code),
            token,
            payload,
            options,
        })
    }

    /// The encoded option sequence (without payload marker), as on the wire.
    pub fn raw_options(&self) -> &'a [u8] {
        self.options
    }

    /// All options in wire order: sorted by number, repeats in sending order.
    pub fn options(&self) -> Options<'a> {
        Options::new(self.options)
    }

    /// Every value of option `number`, in order.
    pub fn option_values(&self, number: u16) -> OptionValues<'a> {
        OptionValues::new(self.options(), number)
    }

    /// The first value of option `number`.
    pub fn option(&self, number: u16) -> Option<&'a [u8]> {
        self.option_values(number).next()
    }

    /// Uri-Path segments (RFC 7252 §5.10.1); none at all means `/`.
    pub fn uri_path(&self) -> OptionValues<'a> {
        self.option_values(option::URI_PATH)
    }

    /// Whether the Uri-Path segments are exactly `segments`
    /// (`&["oic", "sec", "account"]` for `/oic/sec/account`).
    pub fn uri_path_is(&self, segments: &[&str]) -> bool {
        let mut path = self.uri_path();
        segments
            .iter()
            .all(|segment| path.next() == Some(segment.as_bytes()))
            && path.next().is_none()
    }

    /// Uri-Query arguments (RFC 7252 §5.10.1), each one `key=value` or `key`.
    pub fn uri_queries(&self) -> OptionValues<'a> {
        self.option_values(option::URI_QUERY)
    }

    /// Content-Format (RFC 7252 §5.10.3). `None` when absent, or longer than
    /// its 2-byte format allows (RFC 7252 §5.4.1: treat as unrecognized).
    pub fn content_format(&self) -> Option<u16> {
        self.short_uint(option::CONTENT_FORMAT)
    }

    /// Accept (RFC 7252 §5.10.4), with the same rules as `content_format`.
    pub fn accept(&self) -> Option<u16> {
        self.short_uint(option::ACCEPT)
    }

    /// Observe (RFC 7641 §2): 0 registers, 1 deregisters in a request; a
    /// sequence number in a notification. `None` when absent or longer than
    /// its 3-byte format.
    pub fn observe(&self) -> Option<u32> {
        self.option(option::OBSERVE)
            .filter(|value| value.len() <= 3)
            .and_then(option::decode_uint)
    }

    /// The first ETag (RFC 7252 §5.10.6). Repeats only occur in requests.
    pub fn etag(&self) -> Option<&'a [u8]> {
        self.option(option::ETAG)
    }

    /// The first critical option that must make a request fail with 4.02 Bad
    /// Option (RFC 7252 §5.4.1): an unknown critical number, a known critical
    /// option whose value length is outside its format (§5.4.1), or a repeat
    /// of a critical option that is not repeatable (§5.4.5).
    ///
    /// "Known" is the option numbers of [`option`](super::option), which
    /// includes the OCF options 2049 and 2053 devices always send. For a
    /// signalling code the per-code numbering of RFC 8323 §5.2 applies
    /// instead (see [`Signal::parse`](super::signal::Signal::parse)).
    pub fn first_unknown_critical_option(&self) -> Option<u16> {
        if self.code.is_signal() {
            return self
                .options()
                .find(|o| o.is_critical() && !signal::is_known_option(self.code, o.number))
                .map(|o| o.number);
        }
        let mut previous: Option<u16> = None;
        for o in self.options() {
            let repeated = previous == Some(o.number);
            previous = Some(o.number);
            if !o.is_critical() {
                continue;
            }
            let Some(format) = option::format(o.number) else {
                return Some(o.number);
            };
            let bad_len = o.value.len() < format.min_len || o.value.len() > format.max_len;
            if bad_len || (repeated && !format.repeatable) {
                return Some(o.number);
            }
        }
        None
    }

    /// A uint option of at most 2 bytes (Content-Format, Accept).
    fn short_uint(&self, number: u16) -> Option<u16> {
        self.option(number)
            .filter(|value| value.len() <= 2)
            .and_then(option::decode_uint)
            .and_then(|v| u16::try_from(v).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coap::deframer::{frame_len, next_message};
    use crate::coap::writer::MessageWriter;

    const MAX: usize = 262_144;

    /// GET /x.plgd.dev/time with token 0x42, derived by hand (RFC 8323 §3.2):
    /// Len = 11 (option 11, 10 bytes) + 5 (delta 0, 4 bytes) = 16 → nibble 13,
    /// extended 16 - 13 = 3; TKL 1.
    const GET_TIME: &[u8] = b"\xd1\x03\x01\x42\xbax.plgd.dev\x04time";

    #[test]
    fn get_time_bytes_parse() {
        assert_eq!(frame_len(GET_TIME, MAX), Ok(Some(GET_TIME.len())));
        let m = MessageRef::parse(GET_TIME).unwrap();
        assert_eq!(m.code, Code::GET);
        assert_eq!(m.token, &[0x42]);
        assert!(m.payload.is_empty());
        assert!(m.uri_path_is(&["x.plgd.dev", "time"]));
        assert!(!m.uri_path_is(&["x.plgd.dev"]));
        assert!(!m.uri_path_is(&["x.plgd.dev", "time", "more"]));
        assert!(!m.uri_path_is(&[]));
        assert_eq!(m.uri_queries().count(), 0);
        assert_eq!(m.first_unknown_critical_option(), None);
    }

    #[test]
    fn get_time_bytes_write() {
        let mut out = vec![0xaa];
        let len = MessageWriter::new(&mut out, Code::GET, &[0x42])
            .option_str(option::URI_PATH, "x.plgd.dev")
            .option_str(option::URI_PATH, "time")
            .finish();
        assert_eq!(len, GET_TIME.len());
        assert_eq!(&out[..1], &[0xaa], "writer appends after earlier bytes");
        assert_eq!(&out[1..], GET_TIME);
    }

    /// An IoTivity-Lite style sign-in: POST /oic/sec/session, Content-Format
    /// 10000 (application/vnd.ocf+cbor), Accept 10000, the two OCF version
    /// options 0x0800, a CBOR payload.
    fn ocf_post() -> Vec<u8> {
        let mut out = Vec::new();
        MessageWriter::new(&mut out, Code::POST, &[1, 2, 3, 4, 5, 6, 7, 8])
            .option_str(option::URI_PATH, "oic")
            .option_str(option::URI_PATH, "sec")
            .option_str(option::URI_PATH, "session")
            .option_uint(option::CONTENT_FORMAT, 10000)
            .option_str(option::URI_QUERY, "a=1")
            .option_str(option::URI_QUERY, "b")
            .option_uint(option::ACCEPT, 10000)
            .option_uint(option::OCF_ACCEPT_CONTENT_FORMAT_VERSION, 0x0800)
            .option_uint(option::OCF_CONTENT_FORMAT_VERSION, 0x0800)
            .payload(&[0xa1, 0x61, 0x6c, 0xf5])
            .finish();
        out
    }

    #[test]
    fn ocf_request_accessors() {
        let frame = ocf_post();
        let (m, used) = next_message(&frame, MAX).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(m.token, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(m.uri_path_is(&["oic", "sec", "session"]));
        let queries: Vec<_> = m.uri_queries().collect();
        assert_eq!(queries, [&b"a=1"[..], &b"b"[..]]);
        assert_eq!(m.content_format(), Some(10000));
        assert_eq!(m.accept(), Some(10000));
        assert_eq!(m.observe(), None);
        assert_eq!(
            m.option(option::OCF_CONTENT_FORMAT_VERSION),
            Some(&[8, 0][..])
        );
        assert_eq!(m.first_unknown_critical_option(), None);
        assert_eq!(m.payload, &[0xa1, 0x61, 0x6c, 0xf5]);
        let numbers: Vec<u16> = m.options().map(|o| o.number).collect();
        assert_eq!(numbers, [11, 11, 11, 12, 15, 15, 17, 2049, 2053]);
    }

    #[test]
    fn observe_and_etag() {
        let mut out = Vec::new();
        MessageWriter::new(&mut out, Code::CONTENT, &[9])
            .option(option::ETAG, &[1, 2])
            .option(option::ETAG, &[3])
            .option_uint(option::OBSERVE, 0x01_0203)
            .finish();
        let m = MessageRef::parse(&out).unwrap();
        assert_eq!(m.etag(), Some(&[1, 2][..]));
        assert_eq!(m.observe(), Some(0x01_0203));
        // Observe registration is the empty value (uint 0).
        out.clear();
        MessageWriter::new(&mut out, Code::GET, &[9])
            .option_uint(option::OBSERVE, 0)
            .finish();
        assert_eq!(MessageRef::parse(&out).unwrap().observe(), Some(0));
    }

    #[test]
    fn malformed_uint_options_read_as_absent() {
        let mut out = Vec::new();
        MessageWriter::new(&mut out, Code::CONTENT, &[])
            .option(option::OBSERVE, &[0, 0, 0, 1])
            .option(option::CONTENT_FORMAT, &[0, 0, 50])
            .finish();
        let m = MessageRef::parse(&out).unwrap();
        assert_eq!(m.observe(), None);
        assert_eq!(m.content_format(), None);
        // Leading zeros inside the allowed length are fine.
        out.clear();
        MessageWriter::new(&mut out, Code::CONTENT, &[])
            .option(option::CONTENT_FORMAT, &[0, 50])
            .finish();
        assert_eq!(MessageRef::parse(&out).unwrap().content_format(), Some(50));
    }

    #[test]
    fn unknown_critical_options() {
        let check = |build: &dyn Fn(&mut MessageWriter<'_>)| {
            let mut out = Vec::new();
            let mut w = MessageWriter::new(&mut out, Code::GET, &[]);
            build(&mut w);
            w.finish();
            drop(w);
            MessageRef::parse(&out)
                .unwrap()
                .first_unknown_critical_option()
        };
        // Unknown odd number → reported; unknown even number → ignored.
        assert_eq!(
            check(&|w| {
                w.option(9, b"x");
            }),
            Some(9)
        );
        assert_eq!(
            check(&|w| {
                w.option(10, b"x").option(2051, b"");
            }),
            Some(2051)
        );
        assert_eq!(
            check(&|w| {
                w.option(10, b"x").option(2050, b"");
            }),
            None
        );
        // Accept longer than 2 bytes is a malformed critical option.
        assert_eq!(
            check(&|w| {
                w.option(option::ACCEPT, &[0, 0, 1]);
            }),
            Some(17)
        );
        // Uri-Host is not repeatable; Uri-Path is.
        assert_eq!(
            check(&|w| {
                w.option_str(option::URI_HOST, "a")
                    .option_str(option::URI_HOST, "b");
            }),
            Some(3)
        );
        assert_eq!(
            check(&|w| {
                w.option_str(option::URI_PATH, "a")
                    .option_str(option::URI_PATH, "b");
            }),
            None
        );
        // A repeated elective option is not this function's business.
        assert_eq!(
            check(&|w| {
                w.option_uint(option::MAX_AGE, 1)
                    .option_uint(option::MAX_AGE, 2);
            }),
            None
        );
    }

    #[test]
    fn frame_boundaries_are_exact() {
        let frame = ocf_post();
        let mut longer = frame.clone();
        longer.push(0);
        assert_eq!(MessageRef::parse(&longer), Err(FrameError::TrailingBytes));
        for cut in 0..frame.len() {
            assert_eq!(frame_len(&frame[..cut], MAX), Ok(None));
            assert_eq!(MessageRef::parse(&frame[..cut]), Err(FrameError::Truncated));
        }
    }

    #[test]
    fn empty_payload_after_marker_is_refused() {
        // Len 1: just the marker. RFC 7252 §3.
        assert_eq!(
            MessageRef::parse(&[0x10, 0x45, 0xff]),
            Err(FrameError::EmptyPayloadAfterMarker)
        );
        assert_eq!(
            next_message(&[0x10, 0x45, 0xff], MAX),
            Err(FrameError::EmptyPayloadAfterMarker)
        );
    }
}
