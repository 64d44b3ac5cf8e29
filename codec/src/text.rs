//! [`Text`]: a UTF-8 string that shares the buffer it was decoded from.
//!
//! Owns: validated string fields (names, user ids, error messages). Touches nothing else.

use std::fmt;

use bytes::Bytes;

/// A UTF-8 string held as [`Bytes`], so decoding a name or user id copies nothing and a
/// clone is a reference-count increment. The bytes are validated when the value is built.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Text(Bytes);

/// Hashes as the `str` it holds, so that a map keyed by `Text` can be searched with a `&str`
/// (`Borrow<str>` requires equal hashes).
impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl Text {
    /// Wraps bytes that must be UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Text(bytes))
    }

    /// A `Text` over a static string, without allocating.
    pub const fn from_static(s: &'static str) -> Self {
        Text(Bytes::from_static(s.as_bytes()))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // Validated at construction, so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether both share the same memory (a cheap first test before comparing bytes).
    pub fn same_buffer(&self, other: &Text) -> bool {
        self.0.as_ptr() == other.0.as_ptr() && self.0.len() == other.0.len()
    }
}

/// A user id in the form its holder keeps it: what a connection's table of sender aliases
/// ([`crate::SenderAliases`]) keeps per slot and a DELIVER that (re)defines an alias writes.
/// [`Text`] is one; a relay may use a shared handle of its own, so that neither a message's
/// sender nor a delivery ever copies the name.
pub trait SenderId: Clone {
    /// The id's UTF-8 bytes.
    fn as_bytes(&self) -> &[u8];

    /// Whether both are known to be the same id without comparing bytes (shared memory);
    /// `false` says nothing.
    fn same(&self, other: &Self) -> bool;

    /// The id as a `Text` (for a RECEIPT entry that defines it; a copy where the holder
    /// keeps it otherwise).
    fn to_text(&self) -> Text;
}

impl SenderId for Text {
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn same(&self, other: &Self) -> bool {
        self.same_buffer(other)
    }

    fn to_text(&self) -> Text {
        self.clone()
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Text(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text(Bytes::from(s.into_bytes()))
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::borrow::Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

#[cfg(test)]
mod hash_tests {
    use super::*;

    #[test]
    fn a_map_keyed_by_text_is_searched_by_str() {
        let mut map = std::collections::HashMap::new();
        map.insert(Text::from("ann"), 1);
        assert_eq!(map.get("ann"), Some(&1));
    }
}
