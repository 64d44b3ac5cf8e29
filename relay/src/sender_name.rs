//! [`SenderName`]: who published a message, as the message carries it from the publishing
//! connection through the mesh into the room's history and to every recipient's encoder.
//!
//! Owns: the type only. Must not hold state or copy a name: a local publish shares the
//! connection's [`UserName`] record, and a message that arrived as bytes keeps its slice.

use pabal_codec::{SenderId, Text};

use crate::ids::UserName;

/// A message's sender: the publishing connection's shared name record (a local publish:
/// a reference count, no copy, no allocation), or the bytes the message arrived in (from
/// Redis, the storage log, another node or the server API: a zero-copy slice). 32 bytes,
/// as the `Text` it replaces in [`crate::ids::Stored`]. Compares as the name, whichever
/// form, so a connection's table of sender aliases names one user once.
#[derive(Clone)]
pub enum SenderName {
    /// A local connection's user: its record, shared.
    User(UserName),
    /// A name that arrived as bytes, sliced out of them.
    Wire(Text),
}

impl SenderName {
    /// The name.
    pub fn as_str(&self) -> &str {
        match self {
            SenderName::User(u) => u.as_str(),
            SenderName::Wire(t) => t.as_str(),
        }
    }

    /// The name's UTF-8 bytes (no validation: both forms hold validated names).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            SenderName::User(u) => u.as_str().as_bytes(),
            SenderName::Wire(t) => t.as_bytes(),
        }
    }

    /// The name's length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the name is empty (a publish through the server API may name no one).
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    /// The name as a `Text`, for a record or frame that needs one: a clone of the slice, or
    /// a copy of a user's record (never per message on the publish path).
    pub fn text(&self) -> Text {
        match self {
            SenderName::User(u) => u.text(),
            SenderName::Wire(t) => t.clone(),
        }
    }
}

impl Default for SenderName {
    /// No one (a connection before HELLO): an empty static slice, no allocation.
    fn default() -> Self {
        SenderName::Wire(Text::default())
    }
}

impl SenderId for SenderName {
    fn as_bytes(&self) -> &[u8] {
        SenderName::as_bytes(self)
    }

    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (SenderName::User(a), SenderName::User(b)) => a.same_record(b),
            (SenderName::Wire(a), SenderName::Wire(b)) => a.same_buffer(b),
            _ => false,
        }
    }

    fn to_text(&self) -> Text {
        self.text()
    }
}

impl From<UserName> for SenderName {
    fn from(user: UserName) -> Self {
        SenderName::User(user)
    }
}

impl From<Text> for SenderName {
    fn from(name: Text) -> Self {
        SenderName::Wire(name)
    }
}

impl PartialEq for SenderName {
    fn eq(&self, other: &Self) -> bool {
        SenderId::same(self, other) || self.as_bytes() == other.as_bytes()
    }
}

impl Eq for SenderName {}

impl PartialEq<str> for SenderName {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

crate::ids::fmt_as_str!(SenderName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_is_either_form_and_compares_as_the_name() {
        // As large as the `Text` it replaces: a message's record does not grow.
        assert_eq!(
            std::mem::size_of::<SenderName>(),
            std::mem::size_of::<Text>()
        );
        let ann = UserName::from("ann");
        let local = SenderName::from(ann.clone());
        let arrived = SenderName::from(Text::from("ann"));
        assert_eq!(local, arrived);
        assert!(SenderId::same(&local, &SenderName::User(ann.clone())));
        assert!(
            !SenderId::same(&local, &arrived),
            "not known without the bytes"
        );
        assert_ne!(local, SenderName::from(Text::from("bob")));
        assert_eq!((local.as_str(), local.len()), ("ann", 3));
        assert_eq!(arrived.as_bytes(), b"ann");
        assert_eq!(local.text(), Text::from("ann"));
        assert!(SenderName::default().is_empty());
        assert_eq!(format!("{local} {arrived:?}"), "ann \"ann\"");
    }
}
