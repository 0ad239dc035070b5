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
    #[error("unrecognised critical option {0}")]
    BadOption(u16),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal error: {0}")]
    Internal(&'static str),
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
            SessionError::BadRequest(_) => WireAction::Respond {
                code: Code::BAD_REQUEST,
                close: false,
            },
            SessionError::BadOption(_) => WireAction::Respond {
                code: Code::BAD_OPTION,
                close: false,
            },
            // spec §5.1: an unsupported method on a known path is 4.04.
            SessionError::MethodNotAllowed => WireAction::Respond {
                code: Code::NOT_FOUND,
                close: false,
            },
            SessionError::Internal(_) => WireAction::Respond {
                code: Code::INTERNAL_SERVER_ERROR,
                close: false,
            },
        }
    }
}
