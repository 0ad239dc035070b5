//! Reading the CBOR maps devices send, and the small encoding plumbing the
//! OCF messages share.
//!
//! spec §5.0: a request body is CBOR whatever its Content-Format says;
//! unknown keys are ignored; a key is matched to a field name exactly first
//! and case-insensitively as a fallback. [`Fields`] walks one map once and
//! remembers where the value of each wanted field starts; its typed getters
//! then decode those values on demand, borrowing text from the payload. A
//! value of the wrong CBOR type is a [`BodyError`] (4.00 upstream), never a
//! panic.
//!
//! Compatibility rules taken from the reference (Go, ugorji codec), so a
//! device sees the same answers:
//! * `null` (and `undefined`) stands for an absent value: Go decodes it to
//!   the field's zero value.
//! * Bytes after the first CBOR item are ignored: Go decodes one value from
//!   the stream and stops.
//! * When one field is matched by several keys, an exact match beats a
//!   case-insensitive one, and among equals the last key wins (Go overwrites
//!   the field with every matching key).
//!
//! Deliberately stricter than the reference: text must be a definite-length
//! text string (it is borrowed from the payload; IoTivity-Lite's tinycbor
//! never sends chunked text), and integer values must fit the field's type.
//!
//! What it does not do: message semantics (empty ids, the ttl rules); each
//! message's module checks those.

use std::convert::Infallible;
use std::fmt;

use minicbor::data::Type;
use minicbor::Decoder;

use super::EncodeError;

/// Where a bad value sits: `context` is the path of the enclosing map
/// (empty for the top level, `links[]` inside a link), `name` the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub context: &'static str,
    pub name: &'static str,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.context.is_empty() {
            f.write_str(self.name)
        } else {
            write!(f, "{}.{}", self.context, self.name)
        }
    }
}

/// A request body that cannot be read (spec §5.0: 4.00 upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// spec §5.0 and §14 item 16: an empty payload where a body is required
    /// is answered (4.00), unlike the reference which sends nothing.
    #[error("empty body")]
    Empty,
    /// Not well-formed CBOR: truncated, invalid UTF-8, a reserved byte, a
    /// misplaced break.
    #[error("malformed CBOR")]
    Malformed,
    /// Well-formed, but not the CBOR type the field has.
    #[error("{key}: expected {expected}")]
    WrongType { key: Key, expected: &'static str },
    /// An integer of the right kind that does not fit the field.
    #[error("{key}: value out of range")]
    OutOfRange { key: Key },
}

/// The key used for errors about the body itself (it is not a map).
pub const BODY: Key = Key {
    context: "",
    name: "body",
};

/// Where one wanted field's value starts, and how its key matched.
#[derive(Debug, Clone, Copy)]
struct Found {
    at: usize,
    exact: bool,
}

/// The wanted fields of one CBOR map, located but not yet decoded.
#[derive(Debug, Clone)]
pub struct Fields<'a, const N: usize> {
    input: &'a [u8],
    context: &'static str,
    names: [&'static str; N],
    found: [Option<Found>; N],
}

impl<'a, const N: usize> Fields<'a, N> {
    /// Locates `names` in the top-level map of a request body.
    pub fn body(payload: &'a [u8], names: [&'static str; N]) -> Result<Self, BodyError> {
        if payload.is_empty() {
            return Err(BodyError::Empty);
        }
        Fields::walk(&mut Decoder::new(payload), BODY, "", names)
    }

    /// Locates `names` in the map at `d`'s position and leaves `d` after it.
    /// `key` names the map itself in errors, `context` its entries.
    pub fn walk(
        d: &mut Decoder<'a>,
        key: Key,
        context: &'static str,
        names: [&'static str; N],
    ) -> Result<Self, BodyError> {
        let mut len = match datatype(d)? {
            Type::Map | Type::MapIndef => d.map().map_err(|_| BodyError::Malformed)?,
            _ => return Err(wrong(key, "map")),
        };
        let mut fields = Fields {
            input: d.input(),
            context,
            names,
            found: [None; N],
        };
        loop {
            match len {
                Some(0) => break,
                Some(n) => len = Some(n - 1),
                None => {
                    if datatype(d)? == Type::Break {
                        // Consume the break that ends an indefinite map.
                        d.set_position(d.position() + 1);
                        break;
                    }
                }
            }
            let name = match datatype(d)? {
                Type::String => Some(d.str().map_err(|_| BodyError::Malformed)?),
                // Keys other than text cannot name a field: ignored (§5.0).
                _ => {
                    skip(d)?;
                    None
                }
            };
            let at = d.position();
            skip(d)?;
            if let Some(name) = name {
                fields.record(name, at);
            }
        }
        Ok(fields)
    }

    /// spec §5.0: exact match first, case-insensitive match as a fallback.
    fn record(&mut self, key: &str, at: usize) {
        let exact = self
            .names
            .iter()
            .zip(self.found.iter_mut())
            .find(|(n, _)| **n == key);
        if let Some((_, slot)) = exact {
            *slot = Some(Found { at, exact: true });
            return;
        }
        for (name, slot) in self.names.iter().zip(self.found.iter_mut()) {
            if name.eq_ignore_ascii_case(key) && !slot.is_some_and(|f| f.exact) {
                *slot = Some(Found { at, exact: false });
            }
        }
    }

    fn key(&self, name: &'static str) -> Key {
        Key {
            context: self.context,
            name,
        }
    }

    /// A decoder positioned at `name`'s value, or `None` when the map has no
    /// such key.
    pub fn value(&self, name: &'static str) -> Option<Decoder<'a>> {
        let slot = self
            .names
            .iter()
            .zip(self.found.iter())
            .find(|(n, _)| **n == name);
        debug_assert!(slot.is_some(), "field {name} was not asked for");
        let found = slot.and_then(|(_, found)| *found)?;
        let mut d = Decoder::new(self.input);
        d.set_position(found.at);
        Some(d)
    }

    /// A value that is present and not `null`/`undefined`.
    fn present(&self, name: &'static str) -> Result<Option<Decoder<'a>>, BodyError> {
        match self.value(name) {
            Some(d) if !is_absent(&d)? => Ok(Some(d)),
            _ => Ok(None),
        }
    }

    /// A text field; `None` when absent or `null`.
    pub fn text(&self, name: &'static str) -> Result<Option<&'a str>, BodyError> {
        match self.present(name)? {
            Some(mut d) => text(&mut d, self.key(name)).map(Some),
            None => Ok(None),
        }
    }

    /// A text field, `""` when absent: the reference's zero value, which its
    /// handlers then reject with their own diagnostics ("invalid device id").
    pub fn text_or_empty(&self, name: &'static str) -> Result<&'a str, BodyError> {
        Ok(self.text(name)?.unwrap_or_default())
    }

    /// A signed integer field.
    pub fn int(&self, name: &'static str) -> Result<Option<i64>, BodyError> {
        match self.present(name)? {
            Some(mut d) => int(&mut d, self.key(name)).map(Some),
            None => Ok(None),
        }
    }

    /// An unsigned integer field that must fit `T`.
    pub fn uint<T: TryFrom<u64>>(&self, name: &'static str) -> Result<Option<T>, BodyError> {
        match self.present(name)? {
            Some(mut d) => uint(&mut d, self.key(name)).map(Some),
            None => Ok(None),
        }
    }

    /// A boolean field.
    pub fn bool(&self, name: &'static str) -> Result<Option<bool>, BodyError> {
        match self.present(name)? {
            Some(mut d) => match datatype(&d)? {
                Type::Bool => d.bool().map(Some).map_err(|_| BodyError::Malformed),
                _ => Err(wrong(self.key(name), "bool")),
            },
            None => Ok(None),
        }
    }

    /// An array of text strings (`rt`, `if`, `type`).
    pub fn text_array(&self, name: &'static str) -> Result<Option<Vec<&'a str>>, BodyError> {
        let Some(items) = self.array(name)? else {
            return Ok(None);
        };
        let key = self.key(name);
        // No capacity from the announced length: a peer could claim 2^64.
        let mut out = Vec::new();
        for item in items {
            out.push(text(&mut item?, key)?);
        }
        Ok(Some(out))
    }

    /// An array field, as an iterator over decoders at its elements.
    pub fn array(&self, name: &'static str) -> Result<Option<Items<'a>>, BodyError> {
        match self.present(name)? {
            Some(mut d) => Items::new(&mut d, self.key(name)).map(Some),
            None => Ok(None),
        }
    }

    /// A nested map field, located with its own wanted `names`.
    pub fn map<const M: usize>(
        &self,
        name: &'static str,
        context: &'static str,
        names: [&'static str; M],
    ) -> Result<Option<Fields<'a, M>>, BodyError> {
        match self.present(name)? {
            Some(mut d) => Fields::walk(&mut d, self.key(name), context, names).map(Some),
            None => Ok(None),
        }
    }
}

/// The elements of a CBOR array, each as a decoder positioned at it.
#[derive(Debug, Clone)]
pub struct Items<'a> {
    d: Decoder<'a>,
    /// `None` for an indefinite-length array.
    remaining: Option<u64>,
    done: bool,
}

impl<'a> Items<'a> {
    /// Starts at the array at `d`'s position; `key` names it in errors.
    pub fn new(d: &mut Decoder<'a>, key: Key) -> Result<Items<'a>, BodyError> {
        let remaining = match datatype(d)? {
            Type::Array | Type::ArrayIndef => d.array().map_err(|_| BodyError::Malformed)?,
            _ => return Err(wrong(key, "array")),
        };
        Ok(Items {
            d: d.clone(),
            remaining,
            done: false,
        })
    }

    fn step(&mut self) -> Result<Option<Decoder<'a>>, BodyError> {
        match self.remaining {
            Some(0) => return Ok(None),
            Some(n) => self.remaining = Some(n - 1),
            None => {
                if datatype(&self.d)? == Type::Break {
                    return Ok(None);
                }
            }
        }
        let item = self.d.clone();
        skip(&mut self.d)?;
        Ok(Some(item))
    }
}

impl<'a> Iterator for Items<'a> {
    type Item = Result<Decoder<'a>, BodyError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let step = self.step();
        if !matches!(step, Ok(Some(_))) {
            self.done = true;
        }
        step.transpose()
    }
}

impl std::iter::FusedIterator for Items<'_> {}

fn wrong(key: Key, expected: &'static str) -> BodyError {
    BodyError::WrongType { key, expected }
}

fn datatype(d: &Decoder<'_>) -> Result<Type, BodyError> {
    d.datatype().map_err(|_| BodyError::Malformed)
}

fn is_absent(d: &Decoder<'_>) -> Result<bool, BodyError> {
    Ok(matches!(datatype(d)?, Type::Null | Type::Undefined))
}

/// Skips one whole item; a break where an item must be is malformed.
fn skip(d: &mut Decoder<'_>) -> Result<(), BodyError> {
    if datatype(d)? == Type::Break {
        return Err(BodyError::Malformed);
    }
    d.skip().map_err(|_| BodyError::Malformed)
}

/// A definite-length text string at `d`'s position.
pub fn text<'a>(d: &mut Decoder<'a>, key: Key) -> Result<&'a str, BodyError> {
    match datatype(d)? {
        Type::String => d.str().map_err(|_| BodyError::Malformed),
        Type::StringIndef => Err(wrong(key, "definite-length text string")),
        _ => Err(wrong(key, "text string")),
    }
}

/// A signed integer at `d`'s position, within `i64`.
pub fn int(d: &mut Decoder<'_>, key: Key) -> Result<i64, BodyError> {
    match datatype(d)? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => {}
        Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => {}
        _ => return Err(wrong(key, "integer")),
    }
    // The type is an integer, so the only failure left is the range.
    d.i64().map_err(|_| BodyError::OutOfRange { key })
}

/// An unsigned integer at `d`'s position that fits `T`.
pub fn uint<T: TryFrom<u64>>(d: &mut Decoder<'_>, key: Key) -> Result<T, BodyError> {
    match datatype(d)? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => {
            let value = d.u64().map_err(|_| BodyError::Malformed)?;
            T::try_from(value).map_err(|_| BodyError::OutOfRange { key })
        }
        // A negative integer is the right kind of value, out of range.
        Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => {
            Err(BodyError::OutOfRange { key })
        }
        _ => Err(wrong(key, "unsigned integer")),
    }
}

/// The encoder every response writes with: into the caller's buffer.
pub(crate) type Encoder<'w> = minicbor::Encoder<&'w mut Vec<u8>>;

/// Writing into a `Vec` cannot fail, but the encoder's signature says it
/// can; this keeps that error typed instead of unwrapping it.
pub(crate) fn encode_error(e: minicbor::encode::Error<Infallible>) -> EncodeError {
    EncodeError(e.to_string())
}

/// Appends `value` as JSON (Accept 50, spec §5.0).
pub(crate) fn json<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    serde_json::to_writer(out, value).map_err(|e| EncodeError(e.to_string()))
}

/// The map header for `count` present fields (definite length, so the
/// output is canonical and exact-byte testable).
pub(crate) fn map_len(count: usize) -> u64 {
    u64::try_from(count).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use minicbor::Encoder as Enc;

    fn body(build: impl FnOnce(&mut Enc<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        build(&mut Enc::new(&mut out));
        out
    }

    #[test]
    fn exact_key_beats_case_insensitive_in_either_order() {
        for exact_first in [true, false] {
            let bytes = body(|e| {
                e.map(2).unwrap();
                if exact_first {
                    e.str("di").unwrap().str("exact").unwrap();
                    e.str("DI").unwrap().str("folded").unwrap();
                } else {
                    e.str("DI").unwrap().str("folded").unwrap();
                    e.str("di").unwrap().str("exact").unwrap();
                }
            });
            let f = Fields::body(&bytes, ["di"]).unwrap();
            assert_eq!(f.text("di").unwrap(), Some("exact"));
        }
    }

    #[test]
    fn case_insensitive_fallback_and_last_wins() {
        let bytes = body(|e| {
            e.map(2).unwrap();
            e.str("Di").unwrap().str("one").unwrap();
            e.str("dI").unwrap().str("two").unwrap();
        });
        let f = Fields::body(&bytes, ["di"]).unwrap();
        assert_eq!(f.text("di").unwrap(), Some("two"));
    }

    #[test]
    fn indefinite_maps_and_arrays_and_non_text_keys() {
        let bytes = body(|e| {
            e.begin_map().unwrap();
            e.u8(7).unwrap().str("ignored").unwrap();
            e.str("rt").unwrap();
            e.begin_array().unwrap().str("a").unwrap().str("b").unwrap();
            e.end().unwrap();
            e.str("n").unwrap().i64(-3).unwrap();
            e.end().unwrap();
        });
        let f = Fields::body(&bytes, ["rt", "n"]).unwrap();
        assert_eq!(f.text_array("rt").unwrap(), Some(vec!["a", "b"]));
        assert_eq!(f.int("n").unwrap(), Some(-3));
    }

    #[test]
    fn null_is_absent_and_types_are_checked() {
        let bytes = body(|e| {
            e.map(4).unwrap();
            e.str("a").unwrap().null().unwrap();
            e.str("b").unwrap().u64(u64::MAX).unwrap();
            e.str("c").unwrap().i64(-1).unwrap();
            e.str("d").unwrap().bytes(b"x").unwrap();
        });
        let f = Fields::body(&bytes, ["a", "b", "c", "d"]).unwrap();
        assert_eq!(f.text("a").unwrap(), None);
        let b = Key {
            context: "",
            name: "b",
        };
        assert_eq!(f.int("b"), Err(BodyError::OutOfRange { key: b }));
        assert_eq!(f.uint::<u64>("b").unwrap(), Some(u64::MAX));
        assert!(matches!(
            f.uint::<u16>("c"),
            Err(BodyError::OutOfRange { .. })
        ));
        assert_eq!(
            f.text("d").unwrap_err().to_string(),
            "d: expected text string"
        );
        assert!(matches!(f.bool("d"), Err(BodyError::WrongType { .. })));
    }

    #[test]
    fn structural_errors() {
        assert_eq!(Fields::body(&[], ["a"]).unwrap_err(), BodyError::Empty);
        assert_eq!(
            Fields::body(&[0x80], ["a"]).unwrap_err().to_string(),
            "body: expected map"
        );
        // A map announcing one entry with nothing behind it.
        assert_eq!(
            Fields::body(&[0xa1], ["a"]).unwrap_err(),
            BodyError::Malformed
        );
        // A break in value position of an indefinite map.
        assert_eq!(
            Fields::body(&[0xbf, 0x61, 0x61, 0xff, 0xff], ["a"]).unwrap_err(),
            BodyError::Malformed
        );
        // Chunked text is refused, not misread.
        let bytes = [0xa1, 0x61, 0x61, 0x7f, 0x61, 0x78, 0xff];
        let f = Fields::body(&bytes, ["a"]).unwrap();
        assert_eq!(
            f.text("a").unwrap_err().to_string(),
            "a: expected definite-length text string"
        );
    }

    #[test]
    fn trailing_bytes_after_the_body_are_ignored_like_the_reference() {
        let f = Fields::body(&[0xa0, 0xff, 0x00], ["a"]).unwrap();
        assert_eq!(f.text("a").unwrap(), None);
    }
}
