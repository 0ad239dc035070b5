//! Session errors and the one mapping from an error to what goes on the wire
//! (STYLE.md §5): a response code (and whether the connection then closes),
//! or an RFC 8323 Abort.

use crate::coap::signal::SignalError;
use crate::coap::{Code, FrameError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The bytes are not a CoAP-over-TCP message (RFC 8323 §3.2).
    #[error("{0}")]
    Frame(FrameError),
    /// A signalling message we must refuse (RFC 8323 §5.3.2 unknown critical
    /// CSM option).
    #[error("{0}")]
    Signal(SignalError),
    /// spec §4.6: a request that needs a signed-in session came without one.
    #[error("unauthorized: sign in first")]
    Unauthorized,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// 4.00 with the spec's diagnostic text (e.g. "invalid device id").
    #[error("{0}")]
    Invalid(String),
    /// 4.01 from a token, ownership or device-ID check (spec §4.3, §4.5).
    #[error("{0}")]
    Denied(String),
    #[error("unrecognised critical option {0}")]
    BadOption(u16),
    /// 4.02 for a Uri-Query that does not parse (spec §5.3).
    #[error("{0}")]
    BadQuery(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// spec §5.1: an unknown path on a signed-in connection.
    #[error("unknown path")]
    UnknownPath,
    /// 5.03 for a transient cause: the device retries (spec §5.0).
    #[error("temporary error: {0}")]
    Unavailable(String),
    /// 5.03 while the issuer's key set is fetched again for a token's
    /// unknown `kid` (spec §4.1); sign-up and refresh wait for it instead.
    #[error("temporary error: {0}")]
    KeysPending(String),
    /// 5.03 without the transient prefix (spec §5.2/§5.6: the OAuth step
    /// failed for good, and the reference still answers 5.03).
    #[error("{0}")]
    ServiceUnavailable(String),
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// 5.00 with a diagnostic.
    #[error("{0}")]
    Failed(String),
}

/// What the wire sees for an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireAction {
    /// A response on the request's token; `close` closes the connection
    /// after it is sent.
    Respond { code: Code, close: bool },
    /// RFC 8323 §5.6 Abort, then close.
    Abort { bad_csm_option: Option<u16> },
}

impl SessionError {
    pub fn wire_action(&self) -> WireAction {
        let respond = |code| WireAction::Respond { code, close: false };
        match self {
            SessionError::Frame(_) => WireAction::Abort {
                bad_csm_option: None,
            },
            SessionError::Signal(e) => WireAction::Abort {
                bad_csm_option: e.bad_csm_option(),
            },
            // spec §4.6: 4.01 with a diagnostic, then the connection closes.
            SessionError::Unauthorized => WireAction::Respond {
                code: Code::UNAUTHORIZED,
                close: true,
            },
            SessionError::BadRequest(_) | SessionError::Invalid(_) => respond(Code::BAD_REQUEST),
            SessionError::Denied(_) => respond(Code::UNAUTHORIZED),
            SessionError::BadOption(_) | SessionError::BadQuery(_) => respond(Code::BAD_OPTION),
            // spec §5.1: an unsupported method on a known path is 4.04, as
            // is an unknown path.
            SessionError::MethodNotAllowed | SessionError::UnknownPath => respond(Code::NOT_FOUND),
            SessionError::Unavailable(_)
            | SessionError::KeysPending(_)
            | SessionError::ServiceUnavailable(_) => respond(Code::SERVICE_UNAVAILABLE),
            SessionError::Internal(_) | SessionError::Failed(_) => {
                respond(Code::INTERNAL_SERVER_ERROR)
            }
        }
    }
}
