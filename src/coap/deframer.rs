//! Finding frame boundaries in a byte stream (RFC 8323 §3.2).
//!
//! "Check, then parse": [`frame_len`] looks only at the first few bytes and
//! answers whether a whole frame is buffered and how long it is. Needing more
//! bytes is the normal answer `Ok(None)`, not an error. An announced length
//! above the limit is refused as soon as the length field is readable, so a
//! peer cannot make us buffer (or allocate for) a body we will never accept.
//!
//! ```text
//!   0   1   2   3   4   5   6   7
//! +---------------+---------------+
//! |      Len      |      TKL      |   then 0, 1, 2 or 4 bytes Extended Length,
//! +---------------+---------------+   1 byte Code, TKL bytes Token,
//!                                     Len bytes of options + marker + payload
//! ```

use super::error::FrameError;
use super::message::MessageRef;

/// Largest token length (RFC 8323 §3.2: TKL 9–15 are reserved).
pub const MAX_TOKEN_LEN: usize = 8;

/// What the fixed part of a frame says, read before the body is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    /// Token length, 0–8.
    pub(crate) token_len: usize,
    /// Bytes before the token: first byte, extended length, code.
    /// The code is the last of them.
    pub(crate) code_at: usize,
    /// Len: options + payload marker + payload (RFC 8323 §3.2).
    pub(crate) body_len: usize,
}

impl FrameHeader {
    /// Offset of the options, after the token.
    pub(crate) fn body_at(&self) -> usize {
        self.code_at + 1 + self.token_len
    }

    /// Length of the whole frame.
    pub(crate) fn frame_len(&self) -> usize {
        // At most 14 header bytes on top of a Len already bounded by the
        // caller's limit; saturating keeps an absurd limit from wrapping
        // (a saturated length is never buffered, so it stays "incomplete").
        self.body_at().saturating_add(self.body_len)
    }
}

/// Reads the length and token-length fields.
///
/// `Ok(None)` when the extended length bytes are not all there yet. Lengths
/// above `max_message_size` fail here, before the code or token are needed.
pub(crate) fn read_header(
    buf: &[u8],
    max_message_size: usize,
) -> Result<Option<FrameHeader>, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let len_nibble = first >> 4;
    let tkl = first & 0x0f;
    // RFC 8323 §3.2 / RFC 7252 §3: "Lengths 9-15 are reserved, MUST NOT be
    // sent, and MUST be processed as a message format error."
    if usize::from(tkl) > MAX_TOKEN_LEN {
        return Err(FrameError::TokenLengthReserved(tkl));
    }
    let ext = buf.get(1..).unwrap_or_default();
    // RFC 8323 §3.2: Len 13 → 8-bit extended length + 13, 14 → 16-bit + 269,
    // 15 → 32-bit + 65805. Computed in u64: 0xFFFF_FFFF + 65805 overflows u32.
    let (body_len, ext_len): (u64, usize) = match len_nibble {
        0..=12 => (u64::from(len_nibble), 0),
        13 => match ext {
            [b, ..] => (u64::from(*b) + 13, 1),
            _ => return Ok(None),
        },
        14 => match ext {
            [a, b, ..] => (u64::from(u16::from_be_bytes([*a, *b])) + 269, 2),
            _ => return Ok(None),
        },
        _ => match ext {
            [a, b, c, d, ..] => (u64::from(u32::from_be_bytes([*a, *b, *c, *d])) + 65805, 4),
            _ => return Ok(None),
        },
    };
    // RFC 8323 §5.3.1 and spec §2.2: refuse before waiting for the body.
    // A length that does not even fit usize (32-bit targets) is too large too.
    let body_len = usize::try_from(body_len).unwrap_or(usize::MAX);
    if body_len > max_message_size {
        return Err(FrameError::TooLarge {
            len: body_len,
            max: max_message_size,
        });
    }
    Ok(Some(FrameHeader {
        token_len: usize::from(tkl),
        code_at: 1 + ext_len,
        body_len,
    }))
}

/// Whether `buf` starts with a whole frame, and if so how many bytes it spans.
///
/// `Ok(None)` means "read more": it is returned for an empty buffer and for
/// every proper prefix of a valid frame. `max_message_size` bounds Len (the
/// options, payload marker and payload; RFC 8323 §3.2), not the few header
/// bytes before it. Only the header is examined: the body is checked by
/// [`MessageRef::parse`].
pub fn frame_len(buf: &[u8], max_message_size: usize) -> Result<Option<usize>, FrameError> {
    Ok(read_header(buf, max_message_size)?
        .map(|header| header.frame_len())
        .filter(|&len| buf.len() >= len))
}

/// The first message in `buf` and the number of bytes it used, or `Ok(None)`
/// if `buf` does not yet hold a whole frame.
///
/// The message borrows from `buf`; consume `used` bytes only after you are
/// done with it.
pub fn next_message(
    buf: &[u8],
    max_message_size: usize,
) -> Result<Option<(MessageRef<'_>, usize)>, FrameError> {
    let Some(len) = frame_len(buf, max_message_size)? else {
        return Ok(None);
    };
    // frame_len only answers Some(len) with len <= buf.len().
    let frame = buf.get(..len).ok_or(FrameError::Truncated)?;
    Ok(Some((MessageRef::parse(frame)?, len)))
}

/// A deframer configured with the connection's receive limit.
///
/// Holds no bytes: the caller owns the receive buffer and keeps only the
/// unconsumed tail between reads (ARCHITECTURE.md, memory per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deframer {
    max_message_size: usize,
}

impl Deframer {
    /// `max_message_size` bounds Len of every inbound frame
    /// (`apis.coap.maxMessageSize`, spec §2.2).
    pub const fn new(max_message_size: usize) -> Deframer {
        Deframer { max_message_size }
    }

    /// The limit given to [`Deframer::new`].
    pub const fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// See [`frame_len`].
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        frame_len(buf, self.max_message_size)
    }

    /// See [`next_message`].
    pub fn next_message<'a>(
        &self,
        buf: &'a [u8],
    ) -> Result<Option<(MessageRef<'a>, usize)>, FrameError> {
        next_message(buf, self.max_message_size)
    }

    /// All whole messages at the start of `buf`, in order.
    ///
    /// The iterator stops at the first incomplete frame (its offset is
    /// [`Messages::consumed`]) or yields one error and then stops.
    pub fn messages<'a>(&self, buf: &'a [u8]) -> Messages<'a> {
        Messages {
            buf,
            consumed: 0,
            max_message_size: self.max_message_size,
            failed: false,
        }
    }
}

/// Iterator over the whole messages in a receive buffer; see [`Deframer::messages`].
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    buf: &'a [u8],
    consumed: usize,
    max_message_size: usize,
    failed: bool,
}

impl<'a> Messages<'a> {
    /// Bytes of the buffer taken by the messages yielded so far; the tail
    /// from here on is an incomplete frame to keep for the next read.
    pub fn consumed(&self) -> usize {
        self.consumed
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<MessageRef<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let rest = self.buf.get(self.consumed..)?;
        match next_message(rest, self.max_message_size) {
            Ok(Some((message, used))) => {
                self.consumed += used;
                Some(Ok(message))
            }
            Ok(None) => None,
            Err(error) => {
                // After a format error the stream has no known boundary left.
                self.failed = true;
                Some(Err(error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coap::code::Code;

    const MAX: usize = 262_144;

    /// (Len, header bytes before the code) around each boundary of RFC 8323 §3.2.
    const LEN_FORMS: &[(usize, &[u8])] = &[
        (0, &[0x00]),
        (12, &[0xc0]),
        (13, &[0xd0, 0x00]),
        (14, &[0xd0, 0x01]),
        (268, &[0xd0, 0xff]),
        (269, &[0xe0, 0x00, 0x00]),
        (270, &[0xe0, 0x00, 0x01]),
        (65804, &[0xe0, 0xff, 0xff]),
        (65805, &[0xf0, 0x00, 0x00, 0x00, 0x00]),
        (65806, &[0xf0, 0x00, 0x00, 0x00, 0x01]),
    ];

    /// A 2.05 frame without token whose Len is `body_len`, built by hand.
    fn hand_frame(prefix: &[u8], body_len: usize) -> Vec<u8> {
        let mut frame = prefix.to_vec();
        frame.push(Code::CONTENT.0);
        if body_len > 0 {
            frame.push(0xff);
            frame.extend((1..body_len).map(|i| i as u8 | 1));
        }
        frame
    }

    #[test]
    fn every_len_form_is_measured_exactly() {
        for &(body_len, prefix) in LEN_FORMS {
            let frame = hand_frame(prefix, body_len);
            assert_eq!(frame.len(), prefix.len() + 1 + body_len);
            assert_eq!(
                frame_len(&frame, MAX),
                Ok(Some(frame.len())),
                "Len {body_len}"
            );
            let (message, used) = next_message(&frame, MAX).unwrap().unwrap();
            assert_eq!(used, frame.len());
            assert_eq!(message.code, Code::CONTENT);
            assert_eq!(message.payload.len(), body_len.saturating_sub(1));
        }
    }

    #[test]
    fn every_proper_prefix_is_incomplete() {
        for &(body_len, prefix) in LEN_FORMS {
            let frame = hand_frame(prefix, body_len);
            for cut in 0..frame.len() {
                assert_eq!(
                    frame_len(&frame[..cut], MAX),
                    Ok(None),
                    "Len {body_len} cut {cut}"
                );
                assert!(MessageRef::parse(&frame[..cut]).is_err());
            }
        }
    }

    #[test]
    fn oversized_len_is_refused_from_the_header_alone() {
        // 32-bit extended length 0xFFFF_FFFF: 4 GiB announced in five bytes.
        let header = [0xf0, 0xff, 0xff, 0xff, 0xff];
        let len = usize::try_from(0xffff_ffffu64 + 65805).unwrap_or(usize::MAX);
        assert_eq!(
            frame_len(&header, MAX),
            Err(FrameError::TooLarge { len, max: MAX })
        );
        // One over the limit fails, the limit itself is fine.
        assert_eq!(
            frame_len(&[0xd0, 0x00], 12),
            Err(FrameError::TooLarge { len: 13, max: 12 })
        );
        assert_eq!(frame_len(&[0xd0, 0x00], 13), Ok(None));
        assert_eq!(
            frame_len(&[0x10, 0x01], 0),
            Err(FrameError::TooLarge { len: 1, max: 0 })
        );
        assert_eq!(
            frame_len(&[0xe0, 0x01, 0x00], 500),
            Err(FrameError::TooLarge { len: 525, max: 500 })
        );
    }

    #[test]
    fn reserved_token_lengths_are_errors_at_the_first_byte() {
        for tkl in 9u8..=15 {
            assert_eq!(
                frame_len(&[tkl], MAX),
                Err(FrameError::TokenLengthReserved(tkl))
            );
            assert_eq!(
                MessageRef::parse(&[0x30 | tkl, 0x01]),
                Err(FrameError::TokenLengthReserved(tkl))
            );
        }
        assert_eq!(frame_len(&[0x08], MAX), Ok(None));
    }

    #[test]
    fn back_to_back_frames_split_and_the_tail_is_kept() {
        // Ping with token 01, an empty CSM, then half of a Pong.
        let stream = [0x01, 0xe2, 0x01, 0x00, 0xe1, 0x02, 0xe3, 0xaa];
        let deframer = Deframer::new(MAX);
        let mut messages = deframer.messages(&stream);
        let ping = messages.next().unwrap().unwrap();
        assert_eq!((ping.code, ping.token), (Code::PING, &[0x01][..]));
        let csm = messages.next().unwrap().unwrap();
        assert_eq!((csm.code, csm.token), (Code::CSM, &[][..]));
        assert!(messages.next().is_none());
        assert_eq!(messages.consumed(), 5);
    }

    #[test]
    fn iteration_stops_after_an_error() {
        let stream = [0x00, 0xe1, 0x0f, 0x00, 0xe1];
        let mut messages = Deframer::new(MAX).messages(&stream);
        assert!(messages.next().unwrap().is_ok());
        assert_eq!(
            messages.next(),
            Some(Err(FrameError::TokenLengthReserved(15)))
        );
        assert!(messages.next().is_none());
        assert_eq!(messages.consumed(), 2);
    }
}
