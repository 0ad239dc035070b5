//! Options of requests and responses: numbers, the critical bit, value
//! formats, and the walk over the encoded option sequence (RFC 7252 §3.1).
//!
//! The walk is done twice on purpose: [`split_body`] checks the whole
//! sequence once when a message is parsed, and after that [`Options`] walks
//! the same bytes without error handling, because they are known to be good.
//!
//! Signalling messages number their options per code (RFC 8323 §5.2); those
//! numbers live in [`super::signal`], not here.

use super::error::FrameError;

// Option numbers (RFC 7252 §12.2, RFC 7641 §2, RFC 7959 §2.1 and §4,
// RFC 7967 §2, and the OCF Core specification for 2049 and 2053).
pub const IF_MATCH: u16 = 1;
pub const URI_HOST: u16 = 3;
pub const ETAG: u16 = 4;
pub const IF_NONE_MATCH: u16 = 5;
pub const OBSERVE: u16 = 6;
pub const URI_PORT: u16 = 7;
pub const LOCATION_PATH: u16 = 8;
pub const URI_PATH: u16 = 11;
pub const CONTENT_FORMAT: u16 = 12;
pub const MAX_AGE: u16 = 14;
pub const URI_QUERY: u16 = 15;
pub const ACCEPT: u16 = 17;
pub const LOCATION_QUERY: u16 = 20;
pub const BLOCK2: u16 = 23;
pub const BLOCK1: u16 = 27;
pub const SIZE2: u16 = 28;
pub const PROXY_URI: u16 = 35;
pub const PROXY_SCHEME: u16 = 39;
pub const SIZE1: u16 = 60;
pub const NO_RESPONSE: u16 = 258;
/// OCF-Accept-Content-Format-Version; IoTivity-Lite sends 0x0800 (spec §2.3).
pub const OCF_ACCEPT_CONTENT_FORMAT_VERSION: u16 = 2049;
/// OCF-Content-Format-Version; IoTivity-Lite sends 0x0800 (spec §2.3).
pub const OCF_CONTENT_FORMAT_VERSION: u16 = 2053;

/// Odd option numbers are critical: a receiver that does not understand one
/// must reject the message (RFC 7252 §5.4.1, §5.4.6).
pub const fn is_critical(number: u16) -> bool {
    number & 1 == 1
}

/// What a known option's value may look like (RFC 7252 §5.10 table and the
/// documents cited at the option numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionFormat {
    /// Shortest allowed value, in bytes.
    pub min_len: usize,
    /// Longest allowed value, in bytes.
    pub max_len: usize,
    /// Whether the option may occur more than once (RFC 7252 §5.4.5).
    pub repeatable: bool,
}

/// The format of an option we know, `None` for an unknown number.
///
/// The OCF options are accepted with any length and repetition: their format
/// is the OCF's business and devices put them on every request (spec §2.3),
/// so strictness here could only reject working devices.
pub const fn format(number: u16) -> Option<OptionFormat> {
    const fn f(min_len: usize, max_len: usize, repeatable: bool) -> Option<OptionFormat> {
        Some(OptionFormat {
            min_len,
            max_len,
            repeatable,
        })
    }
    match number {
        IF_MATCH => f(0, 8, true),
        URI_HOST => f(1, 255, false),
        ETAG => f(1, 8, true),
        IF_NONE_MATCH => f(0, 0, false),
        OBSERVE => f(0, 3, false),
        URI_PORT => f(0, 2, false),
        LOCATION_PATH => f(0, 255, true),
        URI_PATH => f(0, 255, true),
        CONTENT_FORMAT => f(0, 2, false),
        MAX_AGE => f(0, 4, false),
        URI_QUERY => f(0, 255, true),
        ACCEPT => f(0, 2, false),
        LOCATION_QUERY => f(0, 255, true),
        BLOCK2 | BLOCK1 => f(0, 3, false),
        SIZE2 | SIZE1 => f(0, 4, false),
        PROXY_URI => f(1, 1034, false),
        PROXY_SCHEME => f(1, 255, false),
        NO_RESPONSE => f(0, 1, false),
        OCF_ACCEPT_CONTENT_FORMAT_VERSION | OCF_CONTENT_FORMAT_VERSION => f(0, usize::MAX, true),
        _ => None,
    }
}

/// Decodes a uint option value (RFC 7252 §3.2): big-endian, 0–4 bytes, the
/// empty value is 0. Leading zero bytes are accepted on input even though
/// senders should not produce them. `None` for more than 4 bytes.
pub fn decode_uint(value: &[u8]) -> Option<u32> {
    if value.len() > 4 {
        return None;
    }
    Some(value.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
}

/// Encodes a uint option value in the fewest bytes (RFC 7252 §3.2): 0 is the
/// empty value, 255 one byte, 256 two bytes and so on.
pub fn encode_uint(value: u32) -> UintBytes {
    // leading_zeros is 0..=32, so this is 0..=4.
    let skip = (value.leading_zeros() / 8) as u8;
    UintBytes {
        bytes: value.to_be_bytes(),
        skip,
    }
}

/// A minimally encoded uint, on the stack; see [`encode_uint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UintBytes {
    bytes: [u8; 4],
    skip: u8,
}

impl AsRef<[u8]> for UintBytes {
    fn as_ref(&self) -> &[u8] {
        self.bytes.get(usize::from(self.skip)..).unwrap_or_default()
    }
}

/// One option of a parsed message, borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OptionRef<'a> {
    pub number: u16,
    pub value: &'a [u8],
}

impl<'a> OptionRef<'a> {
    /// See [`is_critical`].
    pub const fn is_critical(&self) -> bool {
        is_critical(self.number)
    }

    /// The value as a uint (RFC 7252 §3.2), `None` if longer than 4 bytes.
    pub fn uint(&self) -> Option<u32> {
        decode_uint(self.value)
    }

    /// The value as a string option (RFC 7252 §3.2: UTF-8), `None` if not UTF-8.
    pub fn str(&self) -> Option<&'a str> {
        std::str::from_utf8(self.value).ok()
    }
}

/// An option's header as decoded from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OptionHeader {
    /// Added to the previous option number (RFC 7252 §3.1), at most 65804.
    delta: u32,
    /// Length of the value that follows the header.
    value_len: usize,
    /// Bytes of the header itself: 1 plus 0–4 extended bytes.
    header_len: usize,
}

/// Reads one option header at the start of `bytes`, which must not begin
/// with the payload marker (the caller checks for 0xFF first).
fn read_option_header(bytes: &[u8]) -> Result<OptionHeader, FrameError> {
    let (&first, ext) = bytes.split_first().ok_or(FrameError::OptionOverrun)?;
    // RFC 7252 §3.1: the delta's extended bytes come first, then the length's.
    let (delta, delta_ext) = extended_nibble(first >> 4, ext)?;
    let (value_len, len_ext) =
        extended_nibble(first & 0x0f, ext.get(delta_ext..).unwrap_or_default())?;
    Ok(OptionHeader {
        delta,
        value_len: value_len as usize,
        header_len: 1 + delta_ext + len_ext,
    })
}

/// RFC 7252 §3.1: nibble 0–12 is the value itself, 13 means one more byte
/// plus 13, 14 means two more bytes plus 269, 15 is reserved (it only
/// appears as half of the 0xFF payload marker). Returns the value and the
/// number of extended bytes used.
fn extended_nibble(nibble: u8, ext: &[u8]) -> Result<(u32, usize), FrameError> {
    match (nibble, ext) {
        (0..=12, _) => Ok((u32::from(nibble), 0)),
        (13, [b, ..]) => Ok((u32::from(*b) + 13, 1)),
        (14, [a, b, ..]) => Ok((u32::from(u16::from_be_bytes([*a, *b])) + 269, 2)),
        (13 | 14, _) => Err(FrameError::OptionOverrun),
        _ => Err(FrameError::ReservedOptionNibble),
    }
}

/// Splits a message body (what follows the token) into the encoded option
/// sequence and the payload, checking every option on the way.
///
/// After this succeeds, walking the options with [`Options`] cannot fail.
pub(crate) fn split_body(body: &[u8]) -> Result<(&[u8], &[u8]), FrameError> {
    let mut at = 0usize;
    let mut number = 0u32;
    loop {
        let rest = body.get(at..).unwrap_or_default();
        match rest.first() {
            // No payload marker: all options, no payload (RFC 7252 §3).
            None => return Ok((body, &[])),
            Some(0xff) => {
                let payload = rest.get(1..).unwrap_or_default();
                // RFC 7252 §3: "The presence of a marker followed by a
                // zero-length payload MUST be processed as a message format
                // error."
                if payload.is_empty() {
                    return Err(FrameError::EmptyPayloadAfterMarker);
                }
                return Ok((body.get(..at).unwrap_or_default(), payload));
            }
            Some(_) => {
                let header = read_option_header(rest)?;
                number += header.delta;
                if number > u32::from(u16::MAX) {
                    return Err(FrameError::OptionNumberOverflow);
                }
                let end = header.header_len + header.value_len;
                if end > rest.len() {
                    return Err(FrameError::OptionOverrun);
                }
                at += end;
            }
        }
    }
}

/// Iterator over the options of a parsed message, in wire order (so sorted
/// by number, repeated options in the order they were sent).
#[derive(Debug, Clone)]
pub struct Options<'a> {
    rest: &'a [u8],
    number: u16,
}

impl<'a> Options<'a> {
    /// `encoded` must have passed [`split_body`]; `MessageRef` guarantees it.
    pub(crate) fn new(encoded: &'a [u8]) -> Options<'a> {
        Options {
            rest: encoded,
            number: 0,
        }
    }

    fn step(&mut self) -> Option<OptionRef<'a>> {
        let header = read_option_header(self.rest).ok()?;
        let number = u16::try_from(u32::from(self.number) + header.delta).ok()?;
        let end = header.header_len + header.value_len;
        let value = self.rest.get(header.header_len..end)?;
        self.rest = self.rest.get(end..)?;
        self.number = number;
        Some(OptionRef { number, value })
    }
}

impl<'a> Iterator for Options<'a> {
    type Item = OptionRef<'a>;

    fn next(&mut self) -> Option<OptionRef<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        let option = self.step();
        if option.is_none() {
            // Unreachable for validated bytes; stop for good rather than
            // yield something half-decoded.
            self.rest = &[];
        }
        option
    }
}

impl std::iter::FusedIterator for Options<'_> {}

/// The values of every occurrence of one option number, in order.
#[derive(Debug, Clone)]
pub struct OptionValues<'a> {
    options: Options<'a>,
    number: u16,
}

impl<'a> OptionValues<'a> {
    pub(crate) fn new(options: Options<'a>, number: u16) -> OptionValues<'a> {
        OptionValues { options, number }
    }
}

impl<'a> Iterator for OptionValues<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        for option in self.options.by_ref() {
            if option.number == self.number {
                return Some(option.value);
            }
            if option.number > self.number {
                // Options are sorted on the wire (RFC 7252 §3.1 deltas).
                self.options.rest = &[];
                return None;
            }
        }
        None
    }
}

impl std::iter::FusedIterator for OptionValues<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint_decoding_accepts_leading_zeros_and_refuses_five_bytes() {
        assert_eq!(decode_uint(&[]), Some(0));
        assert_eq!(decode_uint(&[0x2a]), Some(42));
        assert_eq!(decode_uint(&[0x00, 0x00, 0x2a]), Some(42));
        assert_eq!(decode_uint(&[0x08, 0x00]), Some(2048));
        assert_eq!(decode_uint(&[0xff; 4]), Some(u32::MAX));
        assert_eq!(decode_uint(&[0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn uint_encoding_is_minimal() {
        let cases: &[(u32, &[u8])] = &[
            (0, &[]),
            (1, &[1]),
            (255, &[0xff]),
            (256, &[1, 0]),
            (0xffff, &[0xff, 0xff]),
            (0x10000, &[1, 0, 0]),
            (0x0100_0000, &[1, 0, 0, 0]),
            (u32::MAX, &[0xff; 4]),
        ];
        for &(value, bytes) in cases {
            assert_eq!(encode_uint(value).as_ref(), bytes, "{value}");
            assert_eq!(decode_uint(bytes), Some(value));
        }
    }

    #[test]
    fn critical_is_odd() {
        assert!(is_critical(URI_PATH) && is_critical(ACCEPT) && is_critical(IF_MATCH));
        assert!(is_critical(OCF_ACCEPT_CONTENT_FORMAT_VERSION));
        assert!(is_critical(OCF_CONTENT_FORMAT_VERSION));
        assert!(!is_critical(CONTENT_FORMAT) && !is_critical(OBSERVE) && !is_critical(ETAG));
        assert!(!is_critical(NO_RESPONSE));
    }

    #[test]
    fn option_walk_extended_forms() {
        // Delta 13+0 → option 13 with 13+1 bytes; then delta 269+0 → 282 with
        // 269+0 bytes; then delta 0 with a 0-byte value.
        let mut encoded = vec![0xdd, 0x00, 0x01];
        encoded.extend([7u8; 14]);
        encoded.extend([0xee, 0x00, 0x00, 0x00, 0x00]);
        encoded.extend([9u8; 269]);
        encoded.push(0x00);
        let (options, payload) = split_body(&encoded).unwrap();
        assert!(payload.is_empty());
        let walked: Vec<_> = Options::new(options)
            .map(|o| (o.number, o.value.len()))
            .collect();
        assert_eq!(walked, [(13, 14), (282, 269), (282, 0)]);
    }

    #[test]
    fn option_walk_errors() {
        // Reserved delta nibble, reserved length nibble.
        assert_eq!(split_body(&[0xf0]), Err(FrameError::ReservedOptionNibble));
        assert_eq!(split_body(&[0x1f]), Err(FrameError::ReservedOptionNibble));
        // Extended delta/length bytes missing, value too short.
        assert_eq!(split_body(&[0xd0]), Err(FrameError::OptionOverrun));
        assert_eq!(split_body(&[0xe0, 0x00]), Err(FrameError::OptionOverrun));
        assert_eq!(split_body(&[0x1d]), Err(FrameError::OptionOverrun));
        assert_eq!(split_body(&[0x13, 1, 2]), Err(FrameError::OptionOverrun));
        // Marker with nothing after it.
        assert_eq!(
            split_body(&[0x10, 0xff]),
            Err(FrameError::EmptyPayloadAfterMarker)
        );
        // 65535 is the last option number; one more delta overflows.
        assert!(split_body(&[0xe0, 0xfe, 0xf2]).is_ok());
        assert_eq!(
            split_body(&[0xe0, 0xfe, 0xf2, 0x10]),
            Err(FrameError::OptionNumberOverflow)
        );
        assert_eq!(
            split_body(&[0xe0, 0xff, 0xff]),
            Err(FrameError::OptionNumberOverflow)
        );
    }

    #[test]
    fn values_of_one_number_stop_after_passing_it() {
        // Uri-Path "a", Uri-Path "bc", Uri-Query "q", Uri-Path-like 11 never again.
        let encoded = [0xb1, b'a', 0x02, b'b', b'c', 0x41, b'q'];
        let (options, _) = split_body(&encoded).unwrap();
        let path: Vec<_> = OptionValues::new(Options::new(options), URI_PATH).collect();
        assert_eq!(path, [&b"a"[..], &b"bc"[..]]);
        let query: Vec<_> = OptionValues::new(Options::new(options), URI_QUERY).collect();
        assert_eq!(query, [&b"q"[..]]);
        assert_eq!(OptionValues::new(Options::new(options), 12).next(), None);
    }
}
