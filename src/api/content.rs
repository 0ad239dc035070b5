//! Resource content between the device's formats and the API's JSON
//! (spec §5.12 content types): CBOR (`application/cbor`, 60, and
//! `application/vnd.ocf+cbor`, 10000) is shown as JSON, JSON (50) is passed
//! through, text (0) becomes a JSON string; and a JSON request body becomes
//! the CBOR a device reads (10000 unless the request says otherwise).
//!
//! The CBOR → JSON mapping, for values JSON has no form for:
//! * byte strings (indefinite ones joined) → standard base64 strings;
//! * map keys that are not text → their text form: integers in decimal,
//!   byte strings in base64, anything else as its JSON text (`true`,
//!   `[1,2]`); a later key with the same text replaces an earlier one;
//! * tags are dropped, their content kept (tag 1 epoch time → its number,
//!   tags 2/3 bignums → base64 of the magnitude);
//! * `undefined` → `null`, NaN and infinities → `null`, simple values →
//!   their number, integers beyond ±2^63 (CBOR reaches −2^64) → decimal
//!   strings.
//!
//! Content that cannot be shown as JSON (an unknown Content-Format, CBOR or
//! JSON that does not decode, text that is not UTF-8) is given as the
//! base64 of its bytes and marked so ([`Shown::Base64`]); it is never an
//! error, the bytes are what the device sent.
//!
//! What it does not do: the OCF CBOR of spec §5 messages (that is
//! `ocf::cbor`), or any schema check of resource representations.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use minicbor::data::Type;
use minicbor::{Decoder, Encoder};
use serde_json::{Map, Number, Value};

use crate::hub::twin::content_type_name;
use crate::hub::Content;

/// How deep CBOR may nest before we stop (a device's payload must not
/// overflow the API thread's stack).
const MAX_DEPTH: usize = 64;

/// `application/vnd.ocf+cbor`, the format OCF devices expect (spec §5.12).
pub(super) const OCF_CBOR: i32 = 10000;

/// A device's content as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Shown {
    /// No content (`content_format = -1` and no bytes).
    Nothing,
    /// The content as JSON.
    Json(Value),
    /// Bytes JSON cannot show: their base64.
    Base64(String),
}

impl Shown {
    /// Adds `content`, `contentType` and, for raw bytes,
    /// `contentEncoding: "base64"` to a JSON object.
    pub(super) fn insert_into(self, object: &mut Map<String, Value>, content: &Content) {
        if let Some(name) = content.content_type() {
            object.insert("contentType".into(), name.into());
        } else if content.content_format >= 0 {
            object.insert("contentFormat".into(), content.content_format.into());
        }
        match self {
            Shown::Nothing => {
                object.insert("content".into(), Value::Null);
            }
            Shown::Json(value) => {
                object.insert("content".into(), value);
            }
            Shown::Base64(text) => {
                object.insert("content".into(), text.into());
                object.insert("contentEncoding".into(), "base64".into());
            }
        }
    }
}

/// The content of a resource or answer as JSON.
pub(super) fn show(content: &Content) -> Shown {
    if content.data.is_empty() && content_type_name(content.content_format).is_none() {
        return Shown::Nothing;
    }
    let json = match content.content_format {
        // An empty CBOR payload is "no value" (spec §5.0 reads it so).
        60 | OCF_CBOR if content.data.is_empty() => Some(Value::Null),
        60 | OCF_CBOR => cbor_to_json(&content.data).ok(),
        50 if content.data.is_empty() => Some(Value::Null),
        50 => serde_json::from_slice(&content.data).ok(),
        0 => std::str::from_utf8(&content.data)
            .ok()
            .map(|s| Value::String(s.to_owned())),
        _ => None,
    };
    match json {
        Some(value) => Shown::Json(value),
        None => Shown::Base64(STANDARD.encode(&content.data)),
    }
}

/// Why CBOR could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum CborError {
    #[error("not well-formed CBOR: {0}")]
    Malformed(String),
    #[error("CBOR nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("bytes after the CBOR value")]
    Trailing,
}

impl From<minicbor::decode::Error> for CborError {
    fn from(e: minicbor::decode::Error) -> CborError {
        CborError::Malformed(e.to_string())
    }
}

/// One CBOR data item as JSON. Bytes after it are ignored, as the
/// reference does (spec §5.0: Go decodes one value and stops); use
/// [`check_cbor`] to refuse them in what we send.
pub(super) fn cbor_to_json(data: &[u8]) -> Result<Value, CborError> {
    let mut d = Decoder::new(data);
    value(&mut d, 0)
}

/// Whether `data` is exactly one well-formed CBOR item: what a raw CBOR
/// request body must be before it goes to a device.
pub(super) fn check_cbor(data: &[u8]) -> Result<(), CborError> {
    let mut d = Decoder::new(data);
    value(&mut d, 0)?;
    if d.position() != data.len() {
        return Err(CborError::Trailing);
    }
    Ok(())
}

fn value(d: &mut Decoder<'_>, depth: usize) -> Result<Value, CborError> {
    if depth > MAX_DEPTH {
        return Err(CborError::TooDeep);
    }
    Ok(match d.datatype()? {
        Type::Bool => Value::Bool(d.bool()?),
        Type::Null => {
            d.null()?;
            Value::Null
        }
        Type::Undefined => {
            d.undefined()?;
            Value::Null
        }
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => Value::from(d.u64()?),
        Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => {
            let n = i128::from(d.int()?);
            match (i64::try_from(n), u64::try_from(n)) {
                (Ok(i), _) => Value::from(i),
                (_, Ok(u)) => Value::from(u),
                _ => Value::String(n.to_string()),
            }
        }
        Type::F16 => float(f64::from(half(d)?)),
        Type::F32 => float(f64::from(d.f32()?)),
        Type::F64 => float(d.f64()?),
        Type::Simple => Value::from(d.simple()?),
        Type::Bytes | Type::BytesIndef => {
            let mut bytes = Vec::new();
            for chunk in d.bytes_iter()? {
                bytes.extend_from_slice(chunk?);
            }
            Value::String(STANDARD.encode(bytes))
        }
        Type::String | Type::StringIndef => {
            let mut text = String::new();
            for chunk in d.str_iter()? {
                text.push_str(chunk?);
            }
            Value::String(text)
        }
        Type::Array | Type::ArrayIndef => {
            let len = d.array()?;
            let mut items = Vec::new();
            match len {
                Some(n) => {
                    for _ in 0..n {
                        items.push(value(d, depth + 1)?);
                    }
                }
                None => {
                    while d.datatype()? != Type::Break {
                        items.push(value(d, depth + 1)?);
                    }
                    // The break byte (0xff) that ends an indefinite item.
                    d.set_position(d.position() + 1);
                }
            }
            Value::Array(items)
        }
        Type::Map | Type::MapIndef => {
            let len = d.map()?;
            let mut object = Map::new();
            match len {
                Some(n) => {
                    for _ in 0..n {
                        let k = key(d, depth + 1)?;
                        object.insert(k, value(d, depth + 1)?);
                    }
                }
                None => {
                    while d.datatype()? != Type::Break {
                        let k = key(d, depth + 1)?;
                        object.insert(k, value(d, depth + 1)?);
                    }
                    // The break byte (0xff) that ends an indefinite item.
                    d.set_position(d.position() + 1);
                }
            }
            Value::Object(object)
        }
        Type::Tag => {
            d.tag()?;
            value(d, depth + 1)?
        }
        Type::Break | Type::Unknown(_) => {
            return Err(CborError::Malformed(format!(
                "unexpected CBOR item at byte {}",
                d.position()
            )))
        }
    })
}

/// A map key as JSON object key text.
fn key(d: &mut Decoder<'_>, depth: usize) -> Result<String, CborError> {
    Ok(match value(d, depth)? {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    })
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// An IEEE 754 half float (RFC 8949 Appendix D), read by hand: the
/// `half` feature of minicbor is not built.
fn half(d: &mut Decoder<'_>) -> Result<f32, CborError> {
    let start = d.position();
    let input = d.input();
    let bits = match input.get(start + 1..start + 3) {
        Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
        _ => return Err(CborError::Malformed("truncated half float".into())),
    };
    d.set_position(start + 3);
    let exponent = i32::from((bits >> 10) & 0x1f);
    let mantissa = f32::from(bits & 0x3ff);
    let magnitude = match exponent {
        0 => mantissa * 2f32.powi(-24),
        31 if mantissa == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (mantissa + 1024.0) * 2f32.powi(e - 25),
    };
    Ok(if bits & 0x8000 != 0 {
        -magnitude
    } else {
        magnitude
    })
}

/// A JSON request body as the CBOR a device reads. Integers stay integers
/// (CBOR major types 0/1), other numbers become 64-bit floats.
pub(super) fn json_to_cbor(value: &Value) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new());
    encode(&mut e, value);
    e.into_writer()
}

fn encode(e: &mut Encoder<Vec<u8>>, value: &Value) {
    // Writing to a Vec cannot fail (its io::Write never errors), so the
    // results are dropped.
    let _ = match value {
        Value::Null => e.null().map(|_| ()),
        Value::Bool(b) => e.bool(*b).map(|_| ()),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => e.u64(u).map(|_| ()),
            (_, Some(i), _) => e.i64(i).map(|_| ()),
            (_, _, Some(f)) => e.f64(f).map(|_| ()),
            _ => e.null().map(|_| ()),
        },
        Value::String(s) => e.str(s).map(|_| ()),
        Value::Array(items) => {
            let _ = e.array(items.len() as u64);
            for item in items {
                encode(e, item);
            }
            Ok(())
        }
        Value::Object(object) => {
            let _ = e.map(object.len() as u64);
            for (k, v) in object {
                let _ = e.str(k);
                encode(e, v);
            }
            Ok(())
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn content(data: Vec<u8>, content_format: i32) -> Content {
        Content {
            data,
            content_format,
        }
    }

    #[test]
    fn json_round_trips_through_cbor() {
        let v = json!({"state": true, "power": 40, "neg": -3, "f": 1.5, "s": "x",
                       "a": [null, {"n": 18446744073709551615u64}]});
        let cbor = json_to_cbor(&v);
        check_cbor(&cbor).unwrap();
        assert_eq!(cbor_to_json(&cbor).unwrap(), v);
        assert_eq!(show(&content(cbor, OCF_CBOR)), Shown::Json(v));
    }

    #[test]
    fn cbor_without_a_json_form_is_mapped() {
        // {1: h'0102', h'ff': -18446744073709551616, "h": f16 1.5,
        //  "t": 1(1700000000), "i": [_ "a", "b"] (indefinite), "u": undefined,
        //  [1]: simple(16)}
        let data = [
            0xa7, 0x01, 0x42, 0x01, 0x02, // 1: h'0102'
            0x41, 0xff, 0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // h'ff': -2^64
            0x61, b'h', 0xf9, 0x3e, 0x00, // "h": 1.5
            0x61, b't', 0xc1, 0x1a, 0x65, 0x53, 0xf1, 0x00, // "t": 1(1700000000)
            0x61, b'i', 0x9f, 0x61, b'a', 0x61, b'b', 0xff, // "i": [_ "a", "b"]
            0x61, b'u', 0xf7, // "u": undefined
            0x81, 0x01, 0xf0, // [1]: simple(16)
        ];
        assert_eq!(
            cbor_to_json(&data).unwrap(),
            json!({"1": "AQI=", "/w==": "-18446744073709551616", "h": 1.5,
                   "t": 1700000000, "i": ["a", "b"], "u": null, "[1]": 16})
        );
    }

    #[test]
    fn half_floats_decode() {
        let f = |bits: u16| {
            let [hi, lo] = bits.to_be_bytes();
            cbor_to_json(&[0xf9, hi, lo]).unwrap()
        };
        assert_eq!(f(0x3c00), json!(1.0));
        assert_eq!(f(0xc400), json!(-4.0));
        assert_eq!(f(0x0001), json!(5.960464477539063e-8));
        assert_eq!(f(0x7c00), Value::Null, "infinity has no JSON form");
        assert_eq!(f(0x7bff), json!(65504.0));
    }

    #[test]
    fn bad_or_unknown_content_is_base64() {
        assert_eq!(
            show(&content(vec![0xa1, 0x61], OCF_CBOR)),
            Shown::Base64("oWE=".into())
        );
        assert_eq!(show(&content(vec![1, 2], 42)), Shown::Base64("AQI=".into()));
        assert_eq!(
            show(&content(b"{\"a\":1}".to_vec(), 50)),
            Shown::Json(json!({"a": 1}))
        );
        assert_eq!(show(&content(b"hi".to_vec(), 0)), Shown::Json(json!("hi")));
        assert_eq!(show(&Content::none()), Shown::Nothing);
        assert_eq!(show(&content(Vec::new(), 60)), Shown::Json(Value::Null));
    }

    #[test]
    fn deep_or_trailing_cbor_is_refused() {
        let deep = vec![0x81; MAX_DEPTH + 2];
        assert_eq!(cbor_to_json(&deep), Err(CborError::TooDeep));
        assert_eq!(check_cbor(&[0x01, 0x02]), Err(CborError::Trailing));
        assert!(matches!(
            check_cbor(&[0x62, b'a']),
            Err(CborError::Malformed(_))
        ));
        assert!(matches!(check_cbor(&[]), Err(CborError::Malformed(_))));
    }
}
