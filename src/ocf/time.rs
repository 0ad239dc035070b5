//! `GET /x.plgd.dev/time` (spec §5.10): `{"time": "<RFC 3339 with
//! nanoseconds>"}` in the requested format. IoTivity-Lite's plgd-time
//! feature reads it to set its clock before certificate validation matters.

use std::time::SystemTime;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{ContentFormat, EncodeError};

/// Appends the time response body for `wall` to `out`.
pub fn encode_time_response(
    wall: SystemTime,
    format: ContentFormat,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let text = OffsetDateTime::from(wall)
        .format(&Rfc3339)
        .map_err(|e| EncodeError(e.to_string()))?;
    match format {
        ContentFormat::Json => {
            serde_json::to_writer(&mut *out, &serde_json::json!({ "time": text }))
                .map_err(|e| EncodeError(e.to_string()))?;
        }
        ContentFormat::Cbor | ContentFormat::OcfCbor => {
            let mut encoder = minicbor::Encoder::new(&mut *out);
            encoder
                .map(1)
                .and_then(|e| e.str("time"))
                .and_then(|e| e.str(&text))
                .map_err(|e| EncodeError(e.to_string()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn cbor_time_is_a_one_key_map_with_nanoseconds() {
        let wall = UNIX_EPOCH + Duration::new(1_764_000_000, 123_456_789);
        let mut out = Vec::new();
        encode_time_response(wall, ContentFormat::OcfCbor, &mut out).unwrap();
        let text = "2025-11-24T16:00:00.123456789Z";
        let mut expected = vec![0xa1, 0x64];
        expected.extend_from_slice(b"time");
        // 30 bytes of text: major type 3 with a one-byte length (0x78).
        expected.extend_from_slice(&[0x78, text.len() as u8]);
        expected.extend_from_slice(text.as_bytes());
        assert_eq!(out, expected);
    }

    #[test]
    fn json_time() {
        let wall = UNIX_EPOCH + Duration::new(1_764_000_000, 0);
        let mut out = Vec::new();
        encode_time_response(wall, ContentFormat::Json, &mut out).unwrap();
        assert_eq!(out, br#"{"time":"2025-11-24T16:00:00Z"}"#);
    }

    #[test]
    fn accept_mapping() {
        assert_eq!(
            ContentFormat::from_accept(None),
            Some(ContentFormat::OcfCbor)
        );
        assert_eq!(
            ContentFormat::from_accept(Some(60)),
            Some(ContentFormat::Cbor)
        );
        assert_eq!(
            ContentFormat::from_accept(Some(50)),
            Some(ContentFormat::Json)
        );
        assert_eq!(ContentFormat::from_accept(Some(0)), None);
    }
}
