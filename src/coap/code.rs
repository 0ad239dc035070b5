//! The message code: a class (3 bits) and a detail (5 bits), written `c.dd`.
//!
//! `Code` is our own type rather than `coap_lite::MessageClass` because
//! coap-lite knows no 7.xx signalling codes (RFC 8323 §5.1): they come out as
//! `Reserved`, and a gateway on TCP sends and receives them all the time.
//! Conversions to and from `MessageClass` are provided where they fit.

use std::fmt;

use coap_lite::{MessageClass, RequestType, ResponseType};

/// A CoAP message code (RFC 7252 §3, §12.1; RFC 8323 §5.1).
///
/// Any byte is a valid `Code`: what a code means is asked with
/// [`is_request`](Code::is_request) and friends, so an unknown code from a
/// peer is representable and can be answered or ignored by policy.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code(pub u8);

impl Code {
    /// Builds `class.detail`; bits beyond 3 (class) and 5 (detail) are dropped.
    pub const fn new(class: u8, detail: u8) -> Code {
        Code(((class & 0x07) << 5) | (detail & 0x1f))
    }

    /// 0.00 Empty (RFC 8323 §4.4: always allowed, carries no meaning on TCP).
    pub const EMPTY: Code = Code::new(0, 0);

    // Methods (RFC 7252 §12.1.1).
    pub const GET: Code = Code::new(0, 1);
    pub const POST: Code = Code::new(0, 2);
    pub const PUT: Code = Code::new(0, 3);
    pub const DELETE: Code = Code::new(0, 4);

    // Success (RFC 7252 §12.1.2).
    pub const CREATED: Code = Code::new(2, 1);
    pub const DELETED: Code = Code::new(2, 2);
    pub const VALID: Code = Code::new(2, 3);
    pub const CHANGED: Code = Code::new(2, 4);
    pub const CONTENT: Code = Code::new(2, 5);
    /// 2.31 Continue (RFC 7959 §2.9.1).
    pub const CONTINUE: Code = Code::new(2, 31);

    // Client errors (RFC 7252 §12.1.2).
    pub const BAD_REQUEST: Code = Code::new(4, 0);
    pub const UNAUTHORIZED: Code = Code::new(4, 1);
    pub const BAD_OPTION: Code = Code::new(4, 2);
    pub const FORBIDDEN: Code = Code::new(4, 3);
    pub const NOT_FOUND: Code = Code::new(4, 4);
    pub const METHOD_NOT_ALLOWED: Code = Code::new(4, 5);
    pub const NOT_ACCEPTABLE: Code = Code::new(4, 6);
    /// 4.08 Request Entity Incomplete (RFC 7959 §2.9.2).
    pub const REQUEST_ENTITY_INCOMPLETE: Code = Code::new(4, 8);
    pub const PRECONDITION_FAILED: Code = Code::new(4, 12);
    pub const REQUEST_ENTITY_TOO_LARGE: Code = Code::new(4, 13);
    pub const UNSUPPORTED_CONTENT_FORMAT: Code = Code::new(4, 15);

    // Server errors (RFC 7252 §12.1.2).
    pub const INTERNAL_SERVER_ERROR: Code = Code::new(5, 0);
    pub const NOT_IMPLEMENTED: Code = Code::new(5, 1);
    pub const BAD_GATEWAY: Code = Code::new(5, 2);
    pub const SERVICE_UNAVAILABLE: Code = Code::new(5, 3);
    pub const GATEWAY_TIMEOUT: Code = Code::new(5, 4);
    pub const PROXYING_NOT_SUPPORTED: Code = Code::new(5, 5);

    // Signalling (RFC 8323 §5.1, §11.1).
    pub const CSM: Code = Code::new(7, 1);
    pub const PING: Code = Code::new(7, 2);
    pub const PONG: Code = Code::new(7, 3);
    pub const RELEASE: Code = Code::new(7, 4);
    pub const ABORT: Code = Code::new(7, 5);

    /// The class, the `c` of `c.dd` (0–7).
    pub const fn class(self) -> u8 {
        self.0 >> 5
    }

    /// The detail, the `dd` of `c.dd` (0–31).
    pub const fn detail(self) -> u8 {
        self.0 & 0x1f
    }

    /// 0.01–0.31: a request method (RFC 7252 §5.8; 0.00 is Empty, not a request).
    pub const fn is_request(self) -> bool {
        self.class() == 0 && self.detail() != 0
    }

    /// 2.xx, 4.xx or 5.xx. Classes 1, 3 and 6 are reserved (RFC 7252 §12.1).
    pub const fn is_response(self) -> bool {
        matches!(self.class(), 2 | 4 | 5)
    }

    /// 7.xx: a signalling message (RFC 8323 §5), including unassigned 7.xx codes.
    pub const fn is_signal(self) -> bool {
        self.class() == 7
    }

    /// 0.00 Empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Code {
    /// `2.05`, the notation of RFC 7252 §12.1.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.class(), self.detail())
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code({self})")
    }
}

impl From<u8> for Code {
    fn from(byte: u8) -> Code {
        Code(byte)
    }
}

impl From<Code> for u8 {
    fn from(code: Code) -> u8 {
        code.0
    }
}

/// Every code has a `MessageClass`; signalling codes become `Reserved(0xE1..)`.
impl From<Code> for MessageClass {
    fn from(code: Code) -> MessageClass {
        MessageClass::from(code.0)
    }
}

/// coap-lite's catch-all `UnKnown` method and status have no code of their own
/// (coap-lite writes them as 0xFF, which would read back as signal 7.31).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("coap-lite message class {0:?} has no CoAP code")]
pub struct NoCodeForClass(pub MessageClass);

impl TryFrom<MessageClass> for Code {
    type Error = NoCodeForClass;

    fn try_from(class: MessageClass) -> Result<Code, NoCodeForClass> {
        match class {
            MessageClass::Request(RequestType::UnKnown)
            | MessageClass::Response(ResponseType::UnKnown) => Err(NoCodeForClass(class)),
            other => Ok(Code(u8::from(other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_class_dot_two_digit_detail() {
        assert_eq!(Code::CONTENT.to_string(), "2.05");
        assert_eq!(Code::REQUEST_ENTITY_TOO_LARGE.to_string(), "4.13");
        assert_eq!(Code::CSM.to_string(), "7.01");
        assert_eq!(Code::EMPTY.to_string(), "0.00");
        assert_eq!(format!("{:?}", Code::GET), "Code(0.01)");
    }

    #[test]
    fn wire_values_match_rfc_registries() {
        // RFC 7252 §12.1 and RFC 8323 §11.1, as bytes.
        assert_eq!(Code::GET.0, 0x01);
        assert_eq!(Code::DELETE.0, 0x04);
        assert_eq!(Code::CONTENT.0, 0x45);
        assert_eq!(Code::UNSUPPORTED_CONTENT_FORMAT.0, 0x8f);
        assert_eq!(Code::GATEWAY_TIMEOUT.0, 0xa4);
        assert_eq!(Code::CSM.0, 0xe1);
        assert_eq!(Code::ABORT.0, 0xe5);
    }

    #[test]
    fn classification() {
        assert!(Code::GET.is_request() && !Code::GET.is_response());
        assert!(!Code::EMPTY.is_request() && Code::EMPTY.is_empty());
        assert!(Code::CONTENT.is_response() && Code::NOT_FOUND.is_response());
        assert!(Code::SERVICE_UNAVAILABLE.is_response());
        assert!(!Code::new(3, 0).is_response() && !Code::new(6, 0).is_response());
        assert!(Code::PING.is_signal() && !Code::PING.is_response());
        assert!(Code(0xff).is_signal());
        assert_eq!((Code::NOT_FOUND.class(), Code::NOT_FOUND.detail()), (4, 4));
    }

    #[test]
    fn coap_lite_conversions() {
        for byte in 0..=u8::MAX {
            let class = MessageClass::from(Code(byte));
            assert_eq!(u8::from(class), byte);
            assert_eq!(Code::try_from(class), Ok(Code(byte)));
        }
        assert_eq!(
            MessageClass::from(Code::CONTENT),
            MessageClass::Response(ResponseType::Content)
        );
        assert_eq!(
            Code::try_from(MessageClass::Request(RequestType::Post)),
            Ok(Code::POST)
        );
        assert!(Code::try_from(MessageClass::Request(RequestType::UnKnown)).is_err());
        assert!(Code::try_from(MessageClass::Response(ResponseType::UnKnown)).is_err());
    }
}
