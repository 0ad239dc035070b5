//! `POST /oic/sec/session`: sign-in (`login: true`, spec §5.4) and sign-out
//! (`login: false` or absent, spec §5.5), and the (di, uid, accesstoken)
//! triple that sign-in, sign-out and sign-off (§5.3) carry.
//!
//! Decoding only checks CBOR types. The emptiness checks are a separate step
//! ([`Credentials::check`]) because sign-out and sign-off first fill missing
//! values from the current session ([`Credentials::or`]).
//!
//! What it does not do: token validation, the session context, `expiresin`
//! arithmetic (§4.7: the caller computes it from its own clock).

use serde::Serialize;

use super::cbor::{self, BodyError, Fields};
use super::{ContentFormat, EncodeError};

/// The identity a request claims. Empty means "not given": the reference
/// reads an absent key as the empty string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Credentials<'a> {
    /// `di`.
    pub device_id: &'a str,
    /// `uid`.
    pub user_id: &'a str,
    /// `accesstoken`.
    pub access_token: &'a str,
}

/// A credential that is still empty (spec §5.3, §5.4: 4.00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("invalid device id")]
    InvalidDeviceId,
    #[error("invalid user id")]
    InvalidUserId,
    #[error("invalid access token")]
    InvalidAccessToken,
}

impl<'a> Credentials<'a> {
    /// Whether all three are given (sign-out looks at the session only when
    /// one is missing, spec §5.5).
    pub fn is_complete(&self) -> bool {
        !self.device_id.is_empty() && !self.user_id.is_empty() && !self.access_token.is_empty()
    }

    /// Each empty value replaced by `fallback`'s (spec §5.3, §5.5: missing
    /// values come from the current session). Lifetimes shorten to the
    /// shorter of the two by variance.
    pub fn or(self, fallback: Credentials<'a>) -> Credentials<'a> {
        let pick = |own: &'a str, other: &'a str| if own.is_empty() { other } else { own };
        Credentials {
            device_id: pick(self.device_id, fallback.device_id),
            user_id: pick(self.user_id, fallback.user_id),
            access_token: pick(self.access_token, fallback.access_token),
        }
    }

    /// spec §5.4 (and §5.3, checklist items 22 and 38): `di`, then `uid`,
    /// then `accesstoken` must be non-empty, checked in that order.
    pub fn check(&self) -> Result<(), CredentialsError> {
        if self.device_id.is_empty() {
            Err(CredentialsError::InvalidDeviceId)
        } else if self.user_id.is_empty() {
            Err(CredentialsError::InvalidUserId)
        } else if self.access_token.is_empty() {
            Err(CredentialsError::InvalidAccessToken)
        } else {
            Ok(())
        }
    }
}

/// The body of `POST /oic/sec/session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRequest<'a> {
    pub credentials: Credentials<'a>,
    /// `login`; absent means false, that is sign-out (spec §5.4).
    pub login: bool,
}

impl<'a> SessionRequest<'a> {
    /// Decodes the body (spec §5.0: CBOR whatever Content-Format says).
    /// Only types are checked here: a non-string `accesstoken` is an error
    /// (checklist item 22), an absent one is `""` for [`Credentials::check`].
    pub fn decode(payload: &'a [u8]) -> Result<SessionRequest<'a>, BodyError> {
        let f = Fields::body(payload, ["di", "uid", "accesstoken", "login"])?;
        Ok(SessionRequest {
            credentials: Credentials {
                device_id: f.text_or_empty("di")?,
                user_id: f.text_or_empty("uid")?,
                access_token: f.text_or_empty("accesstoken")?,
            },
            login: f.bool("login")?.unwrap_or(false),
        })
    }
}

/// The 2.04 body of a successful sign-in (spec §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SignInResponse {
    /// Whole seconds until the session expires, `-1` for never (§4.7).
    /// IoTivity-Lite requires an integer.
    #[serde(rename = "expiresin")]
    pub expires_in: i64,
}

impl SignInResponse {
    /// Appends the body in the Accept format.
    pub fn encode(&self, format: ContentFormat, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match format {
            ContentFormat::Json => cbor::json(self, out),
            ContentFormat::Cbor | ContentFormat::OcfCbor => {
                let mut e = cbor::Encoder::new(out);
                e.map(1)
                    .and_then(|e| e.str("expiresin"))
                    .and_then(|e| e.i64(self.expires_in))
                    .map_err(cbor::encode_error)?;
                Ok(())
            }
        }
    }
}

/// The 2.04 body of a successful sign-out: an empty CBOR map, sent with
/// Content-Format 10000 whatever Accept says (spec §5.5, checklist item 30).
pub const SIGN_OUT_RESPONSE: &[u8] = &[0xa0];

#[cfg(test)]
mod tests {
    use super::*;
    use minicbor::Encoder;

    fn encode(build: impl FnOnce(&mut Encoder<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        build(&mut Encoder::new(&mut out));
        out
    }

    /// Appendix A item 2, as IoTivity-Lite sends it.
    fn appendix_a_sign_in() -> Vec<u8> {
        encode(|e| {
            e.map(4).unwrap();
            e.str("uid").unwrap().str("owner-1").unwrap();
            e.str("di").unwrap();
            e.str("5bbc55bb-686f-4068-6c2d-75c4a8b4f49a").unwrap();
            e.str("accesstoken").unwrap().str("eyJ.jwt.sig").unwrap();
            e.str("login").unwrap().bool(true).unwrap();
        })
    }

    #[test]
    fn appendix_a_sign_in_decodes() {
        let bytes = appendix_a_sign_in();
        let request = SessionRequest::decode(&bytes).unwrap();
        assert_eq!(
            request,
            SessionRequest {
                credentials: Credentials {
                    device_id: "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a",
                    user_id: "owner-1",
                    access_token: "eyJ.jwt.sig",
                },
                login: true,
            }
        );
        assert_eq!(request.credentials.check(), Ok(()));
    }

    #[test]
    fn exact_request_bytes_decode() {
        // {"di":"d","uid":"u","accesstoken":"t","login":false}
        let mut bytes = vec![0xa4, 0x62, b'd', b'i', 0x61, b'd', 0x63];
        bytes.extend_from_slice(b"uid");
        bytes.extend_from_slice(&[0x61, b'u', 0x6b]);
        bytes.extend_from_slice(b"accesstoken");
        bytes.extend_from_slice(&[0x61, b't', 0x65]);
        bytes.extend_from_slice(b"login");
        bytes.push(0xf4);
        let request = SessionRequest::decode(&bytes).unwrap();
        assert!(!request.login);
        assert_eq!(request.credentials.access_token, "t");
    }

    #[test]
    fn login_absent_means_sign_out() {
        let bytes = encode(|e| {
            e.map(1).unwrap().str("di").unwrap().str("d").unwrap();
        });
        assert!(!SessionRequest::decode(&bytes).unwrap().login);
    }

    /// Checklist item 22: each missing field gives its diagnostic, in order.
    #[test]
    fn checklist_22_missing_fields_in_order() {
        let login_only = encode(|e| {
            e.map(1).unwrap().str("login").unwrap().bool(true).unwrap();
        });
        let r = SessionRequest::decode(&login_only).unwrap();
        assert_eq!(
            r.credentials.check().unwrap_err().to_string(),
            "invalid device id"
        );
        let no_uid = Credentials {
            device_id: "d",
            ..Credentials::default()
        };
        assert_eq!(no_uid.check(), Err(CredentialsError::InvalidUserId));
        assert_eq!(no_uid.check().unwrap_err().to_string(), "invalid user id");
        let no_token = Credentials {
            user_id: "u",
            ..no_uid
        };
        assert_eq!(
            no_token.check().unwrap_err().to_string(),
            "invalid access token"
        );
    }

    #[test]
    fn wrong_types_are_errors() {
        for (key, expected) in [
            ("di", "text string"),
            ("uid", "text string"),
            ("accesstoken", "text string"),
            ("login", "bool"),
        ] {
            let bytes = encode(|e| {
                e.map(1).unwrap().str(key).unwrap().u32(12345).unwrap();
            });
            let err = SessionRequest::decode(&bytes).unwrap_err();
            assert_eq!(err.to_string(), format!("{key}: expected {expected}"));
        }
        // `login: 1` is not a bool either.
        let bytes = encode(|e| {
            e.map(1).unwrap().str("login").unwrap().u8(1).unwrap();
        });
        assert!(SessionRequest::decode(&bytes).is_err());
    }

    #[test]
    fn case_insensitive_keys() {
        let bytes = encode(|e| {
            e.map(4).unwrap();
            e.str("DI").unwrap().str("d").unwrap();
            e.str("Uid").unwrap().str("u").unwrap();
            e.str("AccessToken").unwrap().str("t").unwrap();
            e.str("LOGIN").unwrap().bool(true).unwrap();
        });
        let r = SessionRequest::decode(&bytes).unwrap();
        assert!(r.login);
        assert_eq!(r.credentials.check(), Ok(()));
    }

    #[test]
    fn empty_payload_is_an_error() {
        assert_eq!(SessionRequest::decode(&[]), Err(BodyError::Empty));
        assert_eq!(BodyError::Empty.to_string(), "empty body");
    }

    #[test]
    fn sign_out_fills_from_the_session() {
        let session = String::from("session-token");
        let request = Credentials {
            device_id: "d",
            user_id: "",
            access_token: "",
        };
        let filled = request.or(Credentials {
            device_id: "other",
            user_id: "u",
            access_token: &session,
        });
        assert_eq!(
            filled,
            Credentials {
                device_id: "d",
                user_id: "u",
                access_token: "session-token",
            }
        );
        assert!(filled.is_complete());
        assert!(!request.is_complete());
    }

    #[test]
    fn sign_in_response_bytes() {
        let mut out = Vec::new();
        SignInResponse { expires_in: 3480 }
            .encode(ContentFormat::OcfCbor, &mut out)
            .unwrap();
        let mut expected = vec![0xa1, 0x69];
        expected.extend_from_slice(b"expiresin");
        expected.extend_from_slice(&[0x19, 0x0d, 0x98]);
        assert_eq!(out, expected);

        out.clear();
        SignInResponse { expires_in: -1 }
            .encode(ContentFormat::Cbor, &mut out)
            .unwrap();
        assert_eq!(out.last(), Some(&0x20), "-1 is a plain CBOR integer");

        out.clear();
        SignInResponse { expires_in: -1 }
            .encode(ContentFormat::Json, &mut out)
            .unwrap();
        assert_eq!(out, br#"{"expiresin":-1}"#);
    }

    #[test]
    fn sign_out_response_is_an_empty_map() {
        assert_eq!(SIGN_OUT_RESPONSE, [0xa0]);
    }
}
