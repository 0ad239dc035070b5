//! `/oic/sec/account`: sign-up (`POST`, spec §5.2) and sign-off (`DELETE`
//! with Uri-Query parameters, spec §5.3).
//!
//! What it does not do: the OAuth exchange, provider lookup (an unknown or
//! absent `authprovider` is a 4.01 the handler gives), token validation, or
//! filling sign-off parameters from the session (see
//! [`Credentials::or`](super::session::Credentials::or)).

use std::borrow::Cow;

use serde::Serialize;

use super::cbor::{self, BodyError, Fields};
use super::query::{self, QueryError};
use super::session::Credentials;
use super::{ContentFormat, EncodeError};

/// The body of `POST /oic/sec/account`, checked as far as spec §5.2 goes
/// before the provider lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignUpRequest<'a> {
    /// `di`, non-empty.
    pub device_id: &'a str,
    /// `accesstoken`, or the legacy `authcode` when `accesstoken` is empty;
    /// non-empty. An authorization code, or a JWT for client-credentials
    /// providers (§4.8).
    pub authorization_code: &'a str,
    /// `authprovider`; may be empty (then the lookup fails with 4.01).
    pub authorization_provider: &'a str,
}

/// Why a sign-up body was refused (spec §5.2: all 4.00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignUpError {
    #[error(transparent)]
    Body(#[from] BodyError),
    /// Checklist item 13.
    #[error("invalid device id")]
    InvalidDeviceId,
    /// Checklist item 14.
    #[error("invalid authorization code")]
    InvalidAuthorizationCode,
}

impl<'a> SignUpRequest<'a> {
    /// spec §5.2 steps "CBOR decode", "`di` empty", "code empty (after
    /// `authcode` fallback)", in that order. Every understood key is
    /// type-checked, as the reference decodes them all; `uid`, `devicetype`
    /// (Appendix A item 1) and any other key are ignored.
    pub fn decode(payload: &'a [u8]) -> Result<SignUpRequest<'a>, SignUpError> {
        let f = Fields::body(payload, ["di", "accesstoken", "authcode", "authprovider"])?;
        let device_id = f.text_or_empty("di")?;
        let access_token = f.text_or_empty("accesstoken")?;
        let legacy = f.text_or_empty("authcode")?;
        let authorization_provider = f.text_or_empty("authprovider")?;
        // §5.2: `authcode` is used only when `accesstoken` is empty.
        let authorization_code = if access_token.is_empty() {
            legacy
        } else {
            access_token
        };
        if device_id.is_empty() {
            return Err(SignUpError::InvalidDeviceId);
        }
        if authorization_code.is_empty() {
            return Err(SignUpError::InvalidAuthorizationCode);
        }
        Ok(SignUpRequest {
            device_id,
            authorization_code,
            authorization_provider,
        })
    }
}

/// The 2.04 body of a successful sign-up (spec §5.2). IoTivity-Lite needs
/// non-empty `accesstoken`, `refreshtoken`, `uid` and an integer
/// `expiresin` (Appendix A item 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SignUpResponse<'a> {
    #[serde(rename = "accesstoken")]
    pub access_token: &'a str,
    /// The owner claim of the access token.
    #[serde(rename = "uid")]
    pub user_id: &'a str,
    #[serde(rename = "refreshtoken")]
    pub refresh_token: &'a str,
    /// Whole seconds until the OAuth expiry, `-1` for none (§4.7).
    #[serde(rename = "expiresin")]
    pub expires_in: i64,
    /// Always sent; §5.2: must stay `""`, as IoTivity-Lite treats anything
    /// else as a redirect to another server.
    #[serde(rename = "redirecturi")]
    pub redirect_uri: &'a str,
}

impl SignUpResponse<'_> {
    /// Appends the body in the Accept format, keys in the reference's order.
    pub fn encode(&self, format: ContentFormat, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match format {
            ContentFormat::Json => cbor::json(self, out),
            ContentFormat::Cbor | ContentFormat::OcfCbor => {
                let mut e = cbor::Encoder::new(out);
                e.map(5)
                    .and_then(|e| e.str("accesstoken")?.str(self.access_token))
                    .and_then(|e| e.str("uid")?.str(self.user_id))
                    .and_then(|e| e.str("refreshtoken")?.str(self.refresh_token))
                    .and_then(|e| e.str("expiresin")?.i64(self.expires_in))
                    .and_then(|e| e.str("redirecturi")?.str(self.redirect_uri))
                    .map_err(cbor::encode_error)?;
                Ok(())
            }
        }
    }
}

/// The Uri-Query parameters of `DELETE /oic/sec/account` (spec §5.3).
/// Empty means not given; the handler fills those from the session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SignOffQuery<'a> {
    pub device_id: Cow<'a, str>,
    pub user_id: Cow<'a, str>,
    pub access_token: Cow<'a, str>,
}

impl<'a> SignOffQuery<'a> {
    /// Parses every Uri-Query option as a URL-encoded form (§5.3). A parse
    /// error is 4.02 Bad Option (checklist item 37).
    ///
    /// As in the reference, each option contributes the first value of each
    /// key, and only when it is non-empty; a later option overrides an
    /// earlier one.
    pub fn parse<I>(queries: I) -> Result<SignOffQuery<'a>, QueryError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut out = SignOffQuery::default();
        for option in queries {
            let (mut di, mut uid, mut token) = (None, None, None);
            for (key, value) in query::pairs(option)? {
                let slot = match key.as_ref() {
                    "di" => &mut di,
                    "uid" => &mut uid,
                    "accesstoken" => &mut token,
                    _ => continue,
                };
                slot.get_or_insert(value);
            }
            for (value, into) in [
                (di, &mut out.device_id),
                (uid, &mut out.user_id),
                (token, &mut out.access_token),
            ] {
                if let Some(value) = value.filter(|v| !v.is_empty()) {
                    *into = value;
                }
            }
        }
        Ok(out)
    }

    /// The parameters as credentials, to be completed from the session with
    /// [`Credentials::or`] and then [`Credentials::check`]ed (§5.3: still
    /// empty → 4.00 "invalid user id" etc., checklist item 38).
    pub fn credentials(&self) -> Credentials<'_> {
        Credentials {
            device_id: &self.device_id,
            user_id: &self.user_id,
            access_token: &self.access_token,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ocf::session::CredentialsError;
    use minicbor::Encoder;

    fn encode(build: impl FnOnce(&mut Encoder<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        build(&mut Encoder::new(&mut out));
        out
    }

    const DI: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";

    /// Appendix A item 1, with its extra `devicetype` key.
    #[test]
    fn appendix_a_sign_up_decodes() {
        let bytes = encode(|e| {
            e.map(4).unwrap();
            e.str("di").unwrap().str(DI).unwrap();
            e.str("authprovider").unwrap().str("plgd").unwrap();
            e.str("accesstoken").unwrap().str("code-123").unwrap();
            e.str("devicetype").unwrap().str("device").unwrap();
        });
        assert_eq!(
            SignUpRequest::decode(&bytes).unwrap(),
            SignUpRequest {
                device_id: DI,
                authorization_code: "code-123",
                authorization_provider: "plgd",
            }
        );
    }

    #[test]
    fn exact_request_bytes_decode() {
        // {"di":"d","accesstoken":"c","authprovider":"p"}
        let mut bytes = vec![0xa3, 0x62, b'd', b'i', 0x61, b'd', 0x6b];
        bytes.extend_from_slice(b"accesstoken");
        bytes.extend_from_slice(&[0x61, b'c', 0x6c]);
        bytes.extend_from_slice(b"authprovider");
        bytes.extend_from_slice(&[0x61, b'p']);
        let r = SignUpRequest::decode(&bytes).unwrap();
        assert_eq!(
            (r.device_id, r.authorization_code, r.authorization_provider),
            ("d", "c", "p")
        );
    }

    /// Checklist items 13 and 14.
    #[test]
    fn checklist_13_14_validation_order() {
        let empty_map = [0xa0];
        assert_eq!(
            SignUpRequest::decode(&empty_map).unwrap_err().to_string(),
            "invalid device id"
        );
        let di_only = encode(|e| {
            e.map(1).unwrap().str("di").unwrap().str(DI).unwrap();
        });
        assert_eq!(
            SignUpRequest::decode(&di_only).unwrap_err().to_string(),
            "invalid authorization code"
        );
        // The code check comes after the di check.
        let code_only = encode(|e| {
            e.map(1)
                .unwrap()
                .str("accesstoken")
                .unwrap()
                .str("c")
                .unwrap();
        });
        assert_eq!(
            SignUpRequest::decode(&code_only),
            Err(SignUpError::InvalidDeviceId)
        );
    }

    /// Checklist item 21; `accesstoken` wins when both are given.
    #[test]
    fn checklist_21_legacy_authcode() {
        let legacy = encode(|e| {
            e.map(2).unwrap();
            e.str("di").unwrap().str(DI).unwrap();
            e.str("authcode").unwrap().str("old").unwrap();
        });
        assert_eq!(
            SignUpRequest::decode(&legacy).unwrap().authorization_code,
            "old"
        );
        let both = encode(|e| {
            e.map(3).unwrap();
            e.str("di").unwrap().str(DI).unwrap();
            e.str("authcode").unwrap().str("old").unwrap();
            e.str("accesstoken").unwrap().str("new").unwrap();
        });
        assert_eq!(
            SignUpRequest::decode(&both).unwrap().authorization_code,
            "new"
        );
        // An empty accesstoken falls back too.
        let empty = encode(|e| {
            e.map(3).unwrap();
            e.str("di").unwrap().str(DI).unwrap();
            e.str("accesstoken").unwrap().str("").unwrap();
            e.str("authcode").unwrap().str("old").unwrap();
        });
        assert_eq!(
            SignUpRequest::decode(&empty).unwrap().authorization_code,
            "old"
        );
    }

    /// Checklist item 15 and every other understood key; ignored keys may
    /// have any type.
    #[test]
    fn checklist_15_wrong_types() {
        for key in ["di", "accesstoken", "authcode", "authprovider"] {
            let bytes = encode(|e| {
                e.map(1).unwrap().str(key).unwrap().i64(42).unwrap();
            });
            assert_eq!(
                SignUpRequest::decode(&bytes).unwrap_err().to_string(),
                format!("{key}: expected text string")
            );
        }
        let bytes = encode(|e| {
            e.map(4).unwrap();
            e.str("di").unwrap().str(DI).unwrap();
            e.str("accesstoken").unwrap().str("c").unwrap();
            e.str("uid").unwrap().u8(1).unwrap();
            e.str("devicetype").unwrap().array(0).unwrap();
        });
        assert!(SignUpRequest::decode(&bytes).is_ok());
    }

    #[test]
    fn case_insensitive_keys() {
        let bytes = encode(|e| {
            e.map(3).unwrap();
            e.str("DI").unwrap().str(DI).unwrap();
            e.str("AccessToken").unwrap().str("c").unwrap();
            e.str("AuthProvider").unwrap().str("plgd").unwrap();
        });
        let r = SignUpRequest::decode(&bytes).unwrap();
        assert_eq!(r.authorization_provider, "plgd");
    }

    /// spec §14 item 16: an empty payload is an error, not a silent drop.
    #[test]
    fn empty_payload_is_an_error() {
        assert_eq!(
            SignUpRequest::decode(&[]),
            Err(SignUpError::Body(BodyError::Empty))
        );
    }

    fn response() -> SignUpResponse<'static> {
        SignUpResponse {
            access_token: "at",
            user_id: "u",
            refresh_token: "rt",
            expires_in: 3600,
            redirect_uri: "",
        }
    }

    /// Checklist item 17: every key, `expiresin` an integer,
    /// `redirecturi: ""`.
    #[test]
    fn checklist_17_response_bytes() {
        let mut out = Vec::new();
        response().encode(ContentFormat::OcfCbor, &mut out).unwrap();
        let mut expected = vec![0xa5];
        for (key, value) in [("accesstoken", "at"), ("uid", "u"), ("refreshtoken", "rt")] {
            expected.push(0x60 + key.len() as u8);
            expected.extend_from_slice(key.as_bytes());
            expected.push(0x60 + value.len() as u8);
            expected.extend_from_slice(value.as_bytes());
        }
        expected.push(0x69);
        expected.extend_from_slice(b"expiresin");
        expected.extend_from_slice(&[0x19, 0x0e, 0x10]);
        expected.push(0x6b);
        expected.extend_from_slice(b"redirecturi");
        expected.push(0x60);
        assert_eq!(out, expected);

        let mut cbor60 = Vec::new();
        response().encode(ContentFormat::Cbor, &mut cbor60).unwrap();
        assert_eq!(cbor60, expected, "60 and 10000 are the same bytes");
    }

    #[test]
    fn json_response() {
        let mut out = b"prefix:".to_vec();
        SignUpResponse {
            expires_in: -1,
            ..response()
        }
        .encode(ContentFormat::Json, &mut out)
        .unwrap();
        assert_eq!(
            out,
            br#"prefix:{"accesstoken":"at","uid":"u","refreshtoken":"rt","expiresin":-1,"redirecturi":""}"#
        );
    }

    fn sign_off(options: &[&'static str]) -> Result<SignOffQuery<'static>, QueryError> {
        SignOffQuery::parse(options.iter().map(|o| o.as_bytes()))
    }

    #[test]
    fn sign_off_one_option_or_one_per_pair() {
        let one = sign_off(&["di=d&uid=u&accesstoken=t"]).unwrap();
        let many = sign_off(&["di=d", "uid=u", "accesstoken=t"]).unwrap();
        assert_eq!(one, many);
        assert_eq!(
            one.credentials(),
            Credentials {
                device_id: "d",
                user_id: "u",
                access_token: "t",
            }
        );
    }

    #[test]
    fn sign_off_value_rules_follow_the_reference() {
        // First value within an option, later options override, empty
        // values never override.
        let q = sign_off(&["di=a&di=b", "uid=x", "uid=y", "uid="]).unwrap();
        assert_eq!((q.device_id.as_ref(), q.user_id.as_ref()), ("a", "y"));
        // An empty first value hides a later one in the same option.
        let q = sign_off(&["di=&di=b"]).unwrap();
        assert_eq!(q.device_id, "");
        // Escapes are decoded; unknown keys ignored.
        let q = sign_off(&["uid=a%40b+c", "rt=x"]).unwrap();
        assert_eq!(q.user_id, "a@b c");
        assert_eq!(sign_off(&[]).unwrap(), SignOffQuery::default());
    }

    /// Checklist item 37: `?di=%` is a parse error (4.02).
    #[test]
    fn checklist_37_bad_escape() {
        assert!(matches!(
            sign_off(&["di=%"]),
            Err(QueryError::InvalidEscape(_))
        ));
    }

    /// Checklist item 38: without a session, the first missing value names
    /// the error.
    #[test]
    fn checklist_38_missing_values() {
        let q = sign_off(&["di=D"]).unwrap();
        let no_session = Credentials::default();
        let err = q.credentials().or(no_session).check().unwrap_err();
        assert_eq!(err, CredentialsError::InvalidUserId);
        assert_eq!(err.to_string(), "invalid user id");
        let q = sign_off(&["di=D&uid=0"]).unwrap();
        assert_eq!(
            q.credentials()
                .or(no_session)
                .check()
                .unwrap_err()
                .to_string(),
            "invalid access token"
        );
        // Checklist item 39: with a session and no query, all from the session.
        let session = Credentials {
            device_id: "D",
            user_id: "U",
            access_token: "T",
        };
        let q = sign_off(&[]).unwrap();
        assert_eq!(q.credentials().or(session), session);
    }
}
