//! Encoding one message into a caller-owned buffer (RFC 8323 §3.2).
//!
//! The writer appends to a `Vec<u8>` it is handed (other frames may already
//! be in it) and allocates nothing of its own. The length field comes first
//! on the wire but is known last, so the header is written with room for a
//! 0-byte extended length and widened in [`MessageWriter::finish`]: one small
//! move of the body for messages of 13 bytes and more.
//!
//! Mistakes here are the programmer's, not the peer's: they `debug_assert!`
//! and, in release builds, are dropped rather than put on the wire malformed.

use std::io;

use super::code::Code;
use super::deframer::MAX_TOKEN_LEN;
use super::option;

/// Largest option value the option header can describe: length nibble 14
/// with a 16-bit extension is at most 65535 + 269 (RFC 7252 §3.1).
pub const MAX_OPTION_VALUE_LEN: usize = 65535 + 269;

/// Largest Len the frame header can describe: nibble 15 with a 32-bit
/// extension is at most 2^32 - 1 + 65805 (RFC 8323 §3.2).
const MAX_BODY_LEN: u64 = u32::MAX as u64 + 65805;

/// Builds one message at the end of a caller-owned buffer.
///
/// Options must be added in non-decreasing number order, because the wire
/// format encodes each number as a delta from the previous one (RFC 7252
/// §3.1). An out-of-order option or one added after the payload trips a
/// `debug_assert!` and is left out in release builds.
///
/// A writer dropped without [`finish`](MessageWriter::finish) removes what it
/// wrote, so the buffer never holds a half-built frame.
///
/// ```
/// use coap_gateway::coap::{option, Code, MessageWriter};
///
/// let mut out = Vec::new();
/// MessageWriter::new(&mut out, Code::CONTENT, &[0x42])
///     .option_uint(option::CONTENT_FORMAT, 10000)
///     .payload(&[0xa0])
///     .finish();
/// assert_eq!(out, [0x51, 0x45, 0x42, 0xc2, 0x27, 0x10, 0xff, 0xa0]);
/// ```
///
/// With a named writer, an early return between `new` and `finish` (a `?`
/// on an encoding error) rolls the message back:
///
/// ```
/// # use coap_gateway::coap::{Code, MessageWriter};
/// # fn encode(_: &mut MessageWriter<'_>) -> Result<(), ()> { Err(()) }
/// # fn respond(out: &mut Vec<u8>) -> Result<usize, ()> {
/// let mut w = MessageWriter::new(out, Code::CONTENT, &[]);
/// encode(&mut w)?;
/// Ok(w.finish())
/// # }
/// let mut out = vec![0x00, 0xe1];
/// assert!(respond(&mut out).is_err());
/// assert_eq!(out, [0x00, 0xe1]);
/// ```
#[must_use = "a MessageWriter that is not finished removes its message"]
#[derive(Debug)]
pub struct MessageWriter<'o> {
    out: &'o mut Vec<u8>,
    /// Where this frame starts in `out`.
    start: usize,
    /// Where the options start in `out`, after code and token.
    body_start: usize,
    /// Number of the last option written, for the delta encoding.
    last_option: u16,
    /// Offset just after the payload marker, once one is written.
    payload_start: Option<usize>,
    /// Length of the frame once `finish` has run.
    finished: Option<usize>,
}

impl<'o> MessageWriter<'o> {
    /// Starts a message with `code` and `token` at the end of `out`.
    ///
    /// A token longer than 8 bytes is a programmer error (RFC 8323 §3.2):
    /// `debug_assert!`, then only its first 8 bytes are used.
    pub fn new(out: &'o mut Vec<u8>, code: Code, token: &[u8]) -> MessageWriter<'o> {
        debug_assert!(
            token.len() <= MAX_TOKEN_LEN,
            "CoAP token of {} bytes",
            token.len()
        );
        let token = token.get(..MAX_TOKEN_LEN).unwrap_or(token);
        let start = out.len();
        // Len 0 for now; finish() writes the real one. TKL fits the nibble.
        out.push(token.len() as u8);
        out.push(code.0);
        out.extend_from_slice(token);
        let body_start = out.len();
        MessageWriter {
            out,
            start,
            body_start,
            last_option: 0,
            payload_start: None,
            finished: None,
        }
    }

    /// Adds an option. See the type's documentation for the ordering rule;
    /// values longer than [`MAX_OPTION_VALUE_LEN`] are programmer errors.
    pub fn option(&mut self, number: u16, value: &[u8]) -> &mut Self {
        debug_assert!(self.finished.is_none(), "option {number} after finish");
        debug_assert!(
            self.payload_start.is_none(),
            "option {number} after the payload"
        );
        debug_assert!(
            number >= self.last_option,
            "option {number} after option {}",
            self.last_option
        );
        debug_assert!(
            value.len() <= MAX_OPTION_VALUE_LEN,
            "option {number} value of {} bytes",
            value.len()
        );
        let Some(delta) = number.checked_sub(self.last_option) else {
            return self;
        };
        if self.finished.is_some()
            || self.payload_start.is_some()
            || value.len() > MAX_OPTION_VALUE_LEN
        {
            return self;
        }
        // RFC 7252 §3.1: one byte of nibbles, then the delta's extended
        // bytes, then the length's.
        let (delta_nibble, delta_ext) = extended_nibble(usize::from(delta));
        let (len_nibble, len_ext) = extended_nibble(value.len());
        self.out.push((delta_nibble << 4) | len_nibble);
        self.out.extend_from_slice(delta_ext.as_slice());
        self.out.extend_from_slice(len_ext.as_slice());
        self.out.extend_from_slice(value);
        self.last_option = number;
        self
    }

    /// Adds a uint option in its shortest form (RFC 7252 §3.2: 0 is empty).
    pub fn option_uint(&mut self, number: u16, value: u32) -> &mut Self {
        self.option(number, option::encode_uint(value).as_ref())
    }

    /// Adds a string option (RFC 7252 §3.2: UTF-8).
    pub fn option_str(&mut self, number: u16, value: &str) -> &mut Self {
        self.option(number, value.as_bytes())
    }

    /// Appends payload bytes. The payload marker is written before the first
    /// non-empty piece; an empty payload gets no marker (RFC 7252 §3).
    /// May be called several times; no option may follow.
    pub fn payload(&mut self, bytes: &[u8]) -> &mut Self {
        debug_assert!(self.finished.is_none(), "payload after finish");
        if bytes.is_empty() || self.finished.is_some() {
            return self;
        }
        self.open_payload();
        self.out.extend_from_slice(bytes);
        self
    }

    /// Length of the payload written so far.
    pub fn payload_len(&self) -> usize {
        self.payload_start
            .map_or(0, |at| self.out.len().saturating_sub(at))
    }

    fn open_payload(&mut self) {
        if self.payload_start.is_none() {
            self.out.push(0xff);
            self.payload_start = Some(self.out.len());
        }
    }

    /// Writes the length field and returns the length of the whole frame,
    /// which is then the last bytes of `out`.
    ///
    /// Takes `&mut self` so that a chain of calls can end in `finish()`.
    /// Options or payload added afterwards trip a `debug_assert!` and are
    /// dropped; calling `finish` again returns the same length. A body
    /// beyond what the 32-bit extended length can say (4 GiB) is a
    /// programmer error: the message is removed and 0 returned.
    pub fn finish(&mut self) -> usize {
        if let Some(len) = self.finished {
            return len;
        }
        let len = self.close_frame();
        self.finished = Some(len);
        len
    }

    fn close_frame(&mut self) -> usize {
        if self.payload_start == Some(self.out.len()) {
            // Marker opened through io::Write but nothing written after it.
            self.out.pop();
        }
        let body_len = self.out.len().saturating_sub(self.body_start);
        let Some((len_nibble, ext)) = frame_len_field(body_len) else {
            debug_assert!(false, "CoAP message body of {body_len} bytes");
            self.out.truncate(self.start);
            return 0;
        };
        if let Some(first) = self.out.get_mut(self.start) {
            *first |= len_nibble << 4;
        }
        // RFC 8323 §3.2: the extended length sits between the first byte and
        // the code.
        let ext = ext.as_slice();
        if !ext.is_empty() {
            let at = self.start + 1;
            self.out.splice(at..at, ext.iter().copied());
        }
        self.out.len() - self.start
    }
}

impl Drop for MessageWriter<'_> {
    fn drop(&mut self) {
        if self.finished.is_none() {
            self.out.truncate(self.start);
        }
    }
}

/// Payload bytes can be streamed in by an encoder (CBOR, JSON) without an
/// intermediate buffer. Fails only after `finish`.
impl io::Write for MessageWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.finished.is_some() {
            return Err(io::Error::other("CoAP message already finished"));
        }
        self.payload(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Up to four extended bytes, on the stack.
#[derive(Debug, Clone, Copy)]
struct ExtBytes {
    bytes: [u8; 4],
    len: u8,
}

impl ExtBytes {
    const NONE: ExtBytes = ExtBytes {
        bytes: [0; 4],
        len: 0,
    };

    fn as_slice(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
}

/// RFC 7252 §3.1 option delta/length: 0–12 in the nibble, 13 with one byte
/// plus 13, 14 with two bytes plus 269. Callers keep `value` at most
/// 65535 + 269.
fn extended_nibble(value: usize) -> (u8, ExtBytes) {
    match value {
        0..=12 => (value as u8, ExtBytes::NONE),
        13..=268 => (
            13,
            ExtBytes {
                bytes: [(value - 13) as u8, 0, 0, 0],
                len: 1,
            },
        ),
        _ => {
            let [a, b] = ((value - 269) as u16).to_be_bytes();
            (
                14,
                ExtBytes {
                    bytes: [a, b, 0, 0],
                    len: 2,
                },
            )
        }
    }
}

/// RFC 8323 §3.2 Len: 0–12 in the nibble, 13 with one byte plus 13, 14 with
/// two bytes plus 269, 15 with four bytes plus 65805. `None` beyond that.
fn frame_len_field(body_len: usize) -> Option<(u8, ExtBytes)> {
    let len = body_len as u64;
    Some(match len {
        0..=12 => (len as u8, ExtBytes::NONE),
        13..=268 => (
            13,
            ExtBytes {
                bytes: [(len - 13) as u8, 0, 0, 0],
                len: 1,
            },
        ),
        269..=65804 => {
            let [a, b] = ((len - 269) as u16).to_be_bytes();
            (
                14,
                ExtBytes {
                    bytes: [a, b, 0, 0],
                    len: 2,
                },
            )
        }
        65805..=MAX_BODY_LEN => (
            15,
            ExtBytes {
                bytes: ((len - 65805) as u32).to_be_bytes(),
                len: 4,
            },
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coap::deframer::frame_len;
    use crate::coap::message::MessageRef;
    use crate::coap::option::{OptionRef, CONTENT_FORMAT, OCF_CONTENT_FORMAT_VERSION, URI_PATH};
    use proptest::prelude::*;
    use std::io::Write;

    const MAX: usize = 1 << 20;

    #[test]
    fn four_len_forms_exact_header_bytes() {
        // (Len, bytes before the code), both sides of each boundary.
        let cases: &[(usize, &[u8])] = &[
            (12, &[0xc0]),
            (13, &[0xd0, 0x00]),
            (268, &[0xd0, 0xff]),
            (269, &[0xe0, 0x00, 0x00]),
            (65804, &[0xe0, 0xff, 0xff]),
            (65805, &[0xf0, 0x00, 0x00, 0x00, 0x00]),
            (65806, &[0xf0, 0x00, 0x00, 0x00, 0x01]),
        ];
        for &(body_len, prefix) in cases {
            // Len counts the marker, so the payload is one byte shorter.
            let payload = vec![0x5a; body_len - 1];
            let mut out = Vec::new();
            let n = MessageWriter::new(&mut out, Code::CONTENT, &[])
                .payload(&payload)
                .finish();
            assert_eq!(n, out.len());
            assert_eq!(&out[..prefix.len()], prefix, "Len {body_len}");
            assert_eq!(out[prefix.len()], 0x45);
            assert_eq!(out[prefix.len() + 1], 0xff);
            assert_eq!(out.len(), prefix.len() + 1 + body_len);
            assert_eq!(frame_len(&out, MAX), Ok(Some(out.len())));
            assert_eq!(MessageRef::parse(&out).unwrap().payload, &payload[..]);
        }
    }

    #[test]
    fn empty_payload_has_no_marker() {
        let mut out = Vec::new();
        MessageWriter::new(&mut out, Code::DELETED, &[7])
            .payload(&[])
            .finish();
        assert_eq!(out, [0x01, 0x42, 0x07]);
        // An io::Write that wrote nothing leaves no marker either.
        out.clear();
        let mut w = MessageWriter::new(&mut out, Code::CHANGED, &[]);
        w.write_all(&[]).unwrap();
        w.open_payload();
        w.finish();
        drop(w);
        assert_eq!(out, [0x00, 0x44]);
    }

    #[test]
    fn payload_streamed_through_io_write() {
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, Code::CONTENT, &[1]);
        w.option_uint(CONTENT_FORMAT, 10000);
        write!(w, "{}", "x".repeat(20)).unwrap();
        assert_eq!(w.payload_len(), 20);
        w.finish();
        drop(w);
        let m = MessageRef::parse(&out).unwrap();
        assert_eq!(m.payload, "x".repeat(20).as_bytes());
        assert_eq!(m.content_format(), Some(10000));
    }

    #[test]
    fn option_header_forms_exact_bytes() {
        let mut out = Vec::new();
        MessageWriter::new(&mut out, Code::GET, &[])
            .option(URI_PATH, &[b'a'; 13])
            .option(OCF_CONTENT_FORMAT_VERSION, &[0x08, 0x00])
            .finish();
        // 11/13: delta nibble 11, length 13 → 0xbd 0x00; then 2053 - 11 = 2042
        // → nibble 14, 2042 - 269 = 1773 = 0x06ed, length 2.
        let mut expected = vec![0xd0, 20 - 13, 0x01, 0xbd, 0x00];
        expected.extend([b'a'; 13]);
        expected.extend([0xe2, 0x06, 0xed, 0x08, 0x00]);
        assert_eq!(out, expected);
    }

    #[test]
    fn appends_after_other_frames_and_drop_rolls_back() {
        let mut out = vec![0x00, 0xe1];
        {
            let mut w = MessageWriter::new(&mut out, Code::CONTENT, &[1, 2]);
            w.payload(b"abandoned");
        }
        assert_eq!(out, [0x00, 0xe1]);
        let n = MessageWriter::new(&mut out, Code::CONTENT, &[1, 2])
            .payload(&[0; 20])
            .finish();
        assert_eq!(n, out.len() - 2);
        assert_eq!(frame_len(&out, MAX), Ok(Some(2)));
        assert_eq!(frame_len(&out[2..], MAX), Ok(Some(n)));
    }

    #[cfg(not(debug_assertions))]
    #[test]
    fn programmer_errors_do_not_reach_the_wire() {
        let mut out = Vec::new();
        MessageWriter::new(&mut out, Code::GET, &[0; 12])
            .option(URI_PATH, b"b")
            .option(10, b"out of order")
            .payload(b"p")
            .option(60, b"after payload")
            .finish();
        let m = MessageRef::parse(&out).unwrap();
        assert_eq!(m.token, &[0; 8]);
        assert_eq!(m.options().count(), 1);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "option 10 after option 11")]
    fn out_of_order_option_trips_debug_assert() {
        let mut out = Vec::new();
        let _ = MessageWriter::new(&mut out, Code::GET, &[])
            .option(URI_PATH, b"b")
            .option(10, b"x");
    }

    /// A message as plain data, for round trips.
    #[derive(Debug, Clone)]
    struct Plain {
        code: u8,
        token: Vec<u8>,
        options: Vec<(u16, Vec<u8>)>,
        payload: Vec<u8>,
    }

    fn option_number() -> impl Strategy<Value = u16> {
        prop_oneof![
            0u16..=20,
            0u16..=300,
            Just(2049u16),
            Just(2053u16),
            Just(65000u16),
            Just(65535u16),
            any::<u16>(),
        ]
    }

    fn option_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => prop::collection::vec(any::<u8>(), 0..=14),
            2 => prop::collection::vec(any::<u8>(), 0..=320),
            1 => (0usize..=MAX_OPTION_VALUE_LEN).prop_map(|n| vec![0x6f; n]),
        ]
    }

    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => prop::collection::vec(any::<u8>(), 0..=300),
            // Large payloads are filled from a seed: generating 70,000 bytes
            // one by one makes the test slow without finding more.
            1 => (0usize..=70_000, any::<u8>()).prop_map(|(n, seed)| {
                (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
            }),
        ]
    }

    prop_compose! {
        fn plain()(
            code in any::<u8>(),
            token in prop::collection::vec(any::<u8>(), 0..=8),
            mut options in prop::collection::vec((option_number(), option_value()), 0..24),
            payload in payload(),
        ) -> Plain {
            // Stable sort: repeats of a number keep their order.
            options.sort_by_key(|(number, _)| *number);
            Plain { code, token, options, payload }
        }
    }

    fn write(plain: &Plain, out: &mut Vec<u8>) -> usize {
        let mut w = MessageWriter::new(out, Code(plain.code), &plain.token);
        for (number, value) in &plain.options {
            w.option(*number, value);
        }
        w.payload(&plain.payload);
        w.finish()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn write_then_parse_round_trips(plain in plain(), before in prop::collection::vec(any::<u8>(), 0..4)) {
            let mut out = before.clone();
            let n = write(&plain, &mut out);
            prop_assert_eq!(&out[..before.len()], &before[..]);
            let frame = &out[before.len()..];
            prop_assert_eq!(n, frame.len());
            prop_assert_eq!(frame_len(frame, usize::MAX), Ok(Some(n)));
            prop_assert_eq!(frame_len(&frame[..n - 1], usize::MAX), Ok(None));
            let m = MessageRef::parse(frame).unwrap();
            prop_assert_eq!(m.code, Code(plain.code));
            prop_assert_eq!(m.token, &plain.token[..]);
            prop_assert_eq!(m.payload, &plain.payload[..]);
            let options: Vec<OptionRef<'_>> = m.options().collect();
            let expected: Vec<OptionRef<'_>> = plain
                .options
                .iter()
                .map(|(number, value)| OptionRef { number: *number, value })
                .collect();
            prop_assert_eq!(options, expected);
        }

        #[test]
        fn uint_options_round_trip(number in option_number(), value in any::<u32>()) {
            let mut out = Vec::new();
            MessageWriter::new(&mut out, Code::CONTENT, &[]).option_uint(number, value).finish();
            let m = MessageRef::parse(&out).unwrap();
            let o = m.options().next().unwrap();
            prop_assert_eq!(o.number, number);
            prop_assert_eq!(o.uint(), Some(value));
            // Minimal encoding: no leading zero byte.
            prop_assert!(o.value.first() != Some(&0));
        }
    }
}
