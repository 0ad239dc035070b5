//! `POST /oic/sec/tokenrefresh` (spec §5.6): the request body and the 2.04
//! response body.
//!
//! What it does not do: the OAuth refresh, the provider choice (empty
//! `authprovider` → try all), or updating the session context (§4.7).

use serde::Serialize;

use super::cbor::{self, BodyError, Fields};
use super::{ContentFormat, EncodeError};

/// The body of `POST /oic/sec/tokenrefresh`, checked as spec §5.6 asks
/// before any OAuth work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRefreshRequest<'a> {
    /// `di`, non-empty.
    pub device_id: &'a str,
    /// `uid`, non-empty: the owner when the new token has no owner claim.
    pub user_id: &'a str,
    /// `refreshtoken`, non-empty.
    pub refresh_token: &'a str,
    /// `authprovider`; empty means "try every provider" (§4.8).
    pub authorization_provider: &'a str,
}

/// Why a refresh body was refused (spec §5.6: all 4.00). The texts are the
/// reference's, as checklist item 34 quotes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefreshError {
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("invalid deviceID")]
    InvalidDeviceId,
    #[error("invalid refreshToken")]
    InvalidRefreshToken,
    #[error("invalid userId")]
    InvalidUserId,
}

impl<'a> TokenRefreshRequest<'a> {
    /// spec §5.6: decode, then `di`, `refreshtoken`, `uid` non-empty in that
    /// order. `granttype` (IoTivity-Lite sends `refresh_token`) and other
    /// keys are ignored.
    pub fn decode(payload: &'a [u8]) -> Result<TokenRefreshRequest<'a>, TokenRefreshError> {
        let f = Fields::body(payload, ["di", "uid", "refreshtoken", "authprovider"])?;
        let request = TokenRefreshRequest {
            device_id: f.text_or_empty("di")?,
            user_id: f.text_or_empty("uid")?,
            refresh_token: f.text_or_empty("refreshtoken")?,
            authorization_provider: f.text_or_empty("authprovider")?,
        };
        if request.device_id.is_empty() {
            Err(TokenRefreshError::InvalidDeviceId)
        } else if request.refresh_token.is_empty() {
            Err(TokenRefreshError::InvalidRefreshToken)
        } else if request.user_id.is_empty() {
            Err(TokenRefreshError::InvalidUserId)
        } else {
            Ok(request)
        }
    }
}

/// The 2.04 body of a successful refresh (spec §5.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenRefreshResponse<'a> {
    #[serde(rename = "accesstoken")]
    pub access_token: &'a str,
    #[serde(rename = "refreshtoken")]
    pub refresh_token: &'a str,
    /// Whole seconds until the OAuth expiry, `-1` for none (§4.7).
    #[serde(rename = "expiresin")]
    pub expires_in: i64,
}

impl TokenRefreshResponse<'_> {
    /// Appends the body in the Accept format.
    pub fn encode(&self, format: ContentFormat, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match format {
            ContentFormat::Json => cbor::json(self, out),
            ContentFormat::Cbor | ContentFormat::OcfCbor => {
                let mut e = cbor::Encoder::new(out);
                e.map(3)
                    .and_then(|e| e.str("accesstoken")?.str(self.access_token))
                    .and_then(|e| e.str("refreshtoken")?.str(self.refresh_token))
                    .and_then(|e| e.str("expiresin")?.i64(self.expires_in))
                    .map_err(cbor::encode_error)?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minicbor::Encoder;

    fn encode(build: impl FnOnce(&mut Encoder<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        build(&mut Encoder::new(&mut out));
        out
    }

    /// What IoTivity-Lite sends, `granttype` included.
    #[test]
    fn iotivity_lite_request_decodes() {
        let bytes = encode(|e| {
            e.map(5).unwrap();
            e.str("di").unwrap().str("d").unwrap();
            e.str("uid").unwrap().str("u").unwrap();
            e.str("refreshtoken").unwrap().str("r").unwrap();
            e.str("granttype").unwrap().str("refresh_token").unwrap();
            e.str("authprovider").unwrap().str("plgd").unwrap();
        });
        assert_eq!(
            TokenRefreshRequest::decode(&bytes).unwrap(),
            TokenRefreshRequest {
                device_id: "d",
                user_id: "u",
                refresh_token: "r",
                authorization_provider: "plgd",
            }
        );
    }

    #[test]
    fn exact_request_bytes_decode() {
        // {"di":"d","uid":"u","refreshtoken":"r"}
        let mut bytes = vec![0xa3, 0x62, b'd', b'i', 0x61, b'd', 0x63];
        bytes.extend_from_slice(b"uid");
        bytes.extend_from_slice(&[0x61, b'u', 0x6c]);
        bytes.extend_from_slice(b"refreshtoken");
        bytes.extend_from_slice(&[0x61, b'r']);
        let r = TokenRefreshRequest::decode(&bytes).unwrap();
        assert_eq!(r.authorization_provider, "");
        assert_eq!(r.refresh_token, "r");
    }

    /// Checklist item 34.
    #[test]
    fn checklist_34_validation_order_and_texts() {
        assert_eq!(
            TokenRefreshRequest::decode(&[0xa0])
                .unwrap_err()
                .to_string(),
            "invalid deviceID"
        );
        let di = encode(|e| {
            e.map(2).unwrap();
            e.str("di").unwrap().str("d").unwrap();
            e.str("uid").unwrap().str("u").unwrap();
        });
        assert_eq!(
            TokenRefreshRequest::decode(&di).unwrap_err().to_string(),
            "invalid refreshToken"
        );
        let no_uid = encode(|e| {
            e.map(2).unwrap();
            e.str("di").unwrap().str("d").unwrap();
            e.str("refreshtoken").unwrap().str("r").unwrap();
        });
        assert_eq!(
            TokenRefreshRequest::decode(&no_uid)
                .unwrap_err()
                .to_string(),
            "invalid userId"
        );
    }

    #[test]
    fn wrong_types_are_errors() {
        for key in ["di", "uid", "refreshtoken", "authprovider"] {
            let bytes = encode(|e| {
                e.map(1).unwrap().str(key).unwrap().bool(true).unwrap();
            });
            assert_eq!(
                TokenRefreshRequest::decode(&bytes).unwrap_err().to_string(),
                format!("{key}: expected text string")
            );
        }
    }

    #[test]
    fn case_insensitive_keys_and_empty_payload() {
        let bytes = encode(|e| {
            e.map(3).unwrap();
            e.str("Di").unwrap().str("d").unwrap();
            e.str("UID").unwrap().str("u").unwrap();
            e.str("RefreshToken").unwrap().str("r").unwrap();
        });
        assert!(TokenRefreshRequest::decode(&bytes).is_ok());
        assert_eq!(
            TokenRefreshRequest::decode(&[]),
            Err(TokenRefreshError::Body(BodyError::Empty))
        );
    }

    /// Checklist item 35.
    #[test]
    fn checklist_35_response_bytes() {
        let response = TokenRefreshResponse {
            access_token: "a",
            refresh_token: "r",
            expires_in: 100,
        };
        let mut out = Vec::new();
        response.encode(ContentFormat::OcfCbor, &mut out).unwrap();
        let mut expected = vec![0xa3, 0x6b];
        expected.extend_from_slice(b"accesstoken");
        expected.extend_from_slice(&[0x61, b'a', 0x6c]);
        expected.extend_from_slice(b"refreshtoken");
        expected.extend_from_slice(&[0x61, b'r', 0x69]);
        expected.extend_from_slice(b"expiresin");
        expected.extend_from_slice(&[0x18, 100]);
        assert_eq!(out, expected);

        out.clear();
        response.encode(ContentFormat::Json, &mut out).unwrap();
        assert_eq!(
            out,
            br#"{"accesstoken":"a","refreshtoken":"r","expiresin":100}"#
        );
    }
}
