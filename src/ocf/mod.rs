//! OCF cloud messages (CBOR) exchanged with devices. Today: the content
//! formats and `/x.plgd.dev/time` (spec §5.10); account, session, token
//! refresh, resource directory and discovery arrive with the OCF protocol.

pub mod time;

/// The response formats a device may ask for with Accept (spec §5.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    /// 50 `application/json`.
    Json,
    /// 60 `application/cbor`.
    Cbor,
    /// 10000 `application/vnd.ocf+cbor`.
    OcfCbor,
}

impl ContentFormat {
    /// spec §5.0: no Accept → 10000; 50 → JSON; 60 or 10000 → CBOR; anything
    /// else is an encoding error (`None`).
    pub fn from_accept(accept: Option<u16>) -> Option<ContentFormat> {
        match accept {
            None | Some(10000) => Some(ContentFormat::OcfCbor),
            Some(60) => Some(ContentFormat::Cbor),
            Some(50) => Some(ContentFormat::Json),
            Some(_) => None,
        }
    }

    /// The CoAP Content-Format number (RFC 7252 §12.3, OCF 10000).
    pub fn number(self) -> u16 {
        match self {
            ContentFormat::Json => 50,
            ContentFormat::Cbor => 60,
            ContentFormat::OcfCbor => 10000,
        }
    }
}

/// A body could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode body: {0}")]
pub struct EncodeError(pub String);
