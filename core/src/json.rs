//! The strict JSON reader for signed payloads and envelopes.
//!
//! serde_json keeps the last of two duplicate keys silently (`{"version":1,"version":999}`
//! reads as 999), so a verifier could approve one reading of a document while another part
//! of the system acts on a different one. Every signed payload therefore goes through
//! [`from_slice`]: a size bound, a first pass that rejects duplicate keys at any depth and
//! nesting deeper than [`MAX_DEPTH`], then the typed parse.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};

/// Deepest nesting accepted; our documents are a few levels deep.
pub const MAX_DEPTH: usize = 32;

/// Why a JSON document was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// Longer than the caller's bound.
    #[error("document is {len} bytes, above the {max}-byte limit")]
    TooLarge {
        /// Document length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The same key twice in one object.
    #[error("duplicate JSON key {key:?}: refused, since readers could disagree on its value")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// Not valid JSON, or not the expected shape.
    #[error("invalid document: {0}")]
    Invalid(#[source] serde_json::Error),
}

/// Parses `bytes` as `T` after checking its size, duplicate keys and depth.
///
/// # Errors
/// [`JsonError`] naming the first problem found.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, JsonError> {
    check(bytes, max_len)?;
    serde_json::from_slice(bytes).map_err(JsonError::Invalid)
}

/// Runs the size, duplicate-key and depth checks without building a value.
///
/// # Errors
/// [`JsonError`] naming the first problem found.
pub fn check(bytes: &[u8], max_len: usize) -> Result<(), JsonError> {
    if bytes.len() > max_len {
        return Err(JsonError::TooLarge { len: bytes.len(), max: max_len });
    }
    let problem = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let res = StrictSeed { depth: 0, problem: &problem }.deserialize(&mut de).and_then(|()| de.end());
    if let Some(p) = problem.into_inner() {
        return Err(p);
    }
    res.map_err(JsonError::Invalid)
}

#[derive(Clone, Copy)]
struct StrictSeed<'a> {
    depth: usize,
    problem: &'a RefCell<Option<JsonError>>,
}

impl StrictSeed<'_> {
    fn fail<E: de::Error>(&self, problem: JsonError) -> E {
        let msg = problem.to_string();
        *self.problem.borrow_mut() = Some(problem);
        E::custom(msg)
    }

    fn nested<E: de::Error>(&self) -> Result<Self, E> {
        if self.depth >= MAX_DEPTH {
            return Err(self.fail(JsonError::TooDeep));
        }
        Ok(Self { depth: self.depth + 1, problem: self.problem })
    }
}

impl<'de> DeserializeSeed<'de> for StrictSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(self.fail(JsonError::DuplicateKey { key }));
            }
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_rejected_at_any_depth() {
        let top = br#"{"version":1,"version":999}"#;
        assert!(matches!(check(top, 1024), Err(JsonError::DuplicateKey { key }) if key == "version"));
        let nested = br#"{"a":[{"b":{"c":1,"c":2}}]}"#;
        assert!(matches!(check(nested, 1024), Err(JsonError::DuplicateKey { key }) if key == "c"));
        assert!(check(br#"{"a":{"c":1},"b":{"c":2}}"#, 1024).is_ok());
    }

    #[test]
    fn depth_and_size_bounded() {
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        assert!(matches!(check(deep.as_bytes(), 1024), Err(JsonError::TooDeep)));
        assert!(matches!(check(b"{}", 1), Err(JsonError::TooLarge { .. })));
        assert!(matches!(check(b"{} x", 100), Err(JsonError::Invalid(_))));
    }
}
