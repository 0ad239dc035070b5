//! Why bytes from a peer are not a CoAP-over-TCP message.
//!
//! Every variant is a message format error (RFC 7252 §3, RFC 8323 §3.2) or an
//! over-size announcement (RFC 8323 §5.3.1). On a reliable transport there is
//! no way to skip a bad frame, so the caller's only choices are to send an
//! Abort (RFC 8323 §5.6) and close. The `Display` text is short and plain so
//! it can go straight into that Abort's diagnostic payload.

/// A frame that cannot be a valid CoAP-over-TCP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// TKL 9–15 is reserved (RFC 8323 §3.2, RFC 7252 §3).
    #[error("reserved token length {0}")]
    TokenLengthReserved(u8),

    /// The announced Len (options + payload marker + payload) exceeds what we
    /// accept (RFC 8323 §5.3.1; spec §2.2: terminate the connection).
    #[error("message length {len} exceeds maximum {max}")]
    TooLarge { len: usize, max: usize },

    /// The frame handed to `MessageRef::parse` is shorter than its header says.
    #[error("frame shorter than its length field")]
    Truncated,

    /// The frame handed to `MessageRef::parse` is longer than its header says.
    #[error("bytes after the end of the frame")]
    TrailingBytes,

    /// An option's extended delta/length or value runs past the end of the message.
    #[error("option runs past end of message")]
    OptionOverrun,

    /// Option delta or length nibble 15 outside the 0xFF payload marker
    /// (RFC 7252 §3.1).
    #[error("reserved option nibble 15")]
    ReservedOptionNibble,

    /// A payload marker followed by nothing (RFC 7252 §3: a format error).
    #[error("payload marker with empty payload")]
    EmptyPayloadAfterMarker,

    /// Option deltas add up beyond option number 65535 (RFC 7252 §3.1).
    #[error("option number above 65535")]
    OptionNumberOverflow,
}
