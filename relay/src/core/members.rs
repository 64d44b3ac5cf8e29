//! [`MemberSet`]: the users of one owned room (its members) or channel (its subscribers),
//! as shared handles to their names (the directory's, see `Added::user`).
//!
//! Owns: the set's representation, sized for the common case. Most rooms are small (a 1:1
//! room has two members) and every one of them costs its owner this set, so a small set is
//! an exact boxed slice (16 bytes in the room's record: a vector's capacity field was 8
//! more per room); a large one (a channel's subscribers) is a hash set.
//! Must not touch: the directory, or anything else of the room.

use std::collections::HashSet;

use pabal_codec::Text;

use crate::ids::UserName;

/// Up to this many users a set is a vector searched linearly.
const FEW_MAX: usize = 16;

/// A room's members by user name.
#[derive(Debug, Clone)]
pub(super) enum MemberSet {
    /// At most [`FEW_MAX`] users, unordered, each once; reallocated exactly at each join
    /// and leave (never per message).
    Few(Box<[UserName]>),
    /// More; boxed, so that the many small sets stay the size of a boxed slice.
    #[allow(clippy::box_collection)]
    // reason: the box keeps the enum at a boxed slice's 16 bytes, not a hash set's 48
    Many(Box<HashSet<UserName>>),
}

impl Default for MemberSet {
    fn default() -> Self {
        MemberSet::Few(Box::default())
    }
}

impl MemberSet {
    /// Whether `user` is in the set.
    pub(super) fn contains(&self, user: &str) -> bool {
        match self {
            MemberSet::Few(users) => users.iter().any(|u| u == user),
            MemberSet::Many(users) => users.contains(user),
        }
    }

    /// Adds `user`; false if it was there already. Pass the directory's handle (see
    /// `Added::user`) to share its record; a `Text` makes a record of its own.
    pub(super) fn insert(&mut self, user: impl Into<UserName>) -> bool {
        let user = user.into();
        match self {
            MemberSet::Few(users) => {
                if users.contains(&user) {
                    return false;
                }
                let mut list = std::mem::take(users).into_vec();
                if list.len() < FEW_MAX {
                    list.reserve_exact(1);
                    list.push(user);
                    *users = list.into_boxed_slice();
                } else {
                    let mut many: HashSet<UserName> = list.into_iter().collect();
                    many.insert(user);
                    *self = MemberSet::Many(Box::new(many));
                }
                true
            }
            MemberSet::Many(users) => users.insert(user),
        }
    }

    /// Removes `user` and returns the set's handle to the name; `None` if it was not there.
    /// A large set that shrinks to half the small size becomes a vector again.
    pub(super) fn remove(&mut self, user: &str) -> Option<UserName> {
        match self {
            MemberSet::Few(users) => {
                let i = users.iter().position(|u| u == user)?;
                let mut list = std::mem::take(users).into_vec();
                let removed = list.swap_remove(i);
                *users = list.into_boxed_slice();
                Some(removed)
            }
            MemberSet::Many(users) => {
                let removed = users.take(user);
                if users.len() <= FEW_MAX / 2 {
                    *self = MemberSet::Few(users.drain().collect());
                }
                removed
            }
        }
    }

    /// How many users.
    pub(super) fn len(&self) -> usize {
        match self {
            MemberSet::Few(users) => users.len(),
            MemberSet::Many(users) => users.len(),
        }
    }

    /// Whether there are none.
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The users, in no particular order.
    pub(super) fn iter(&self) -> MemberIter<'_> {
        match self {
            MemberSet::Few(users) => MemberIter::Few(users.iter()),
            MemberSet::Many(users) => MemberIter::Many(users.iter()),
        }
    }

    /// The users, as a hash set (for set arithmetic; not on any per-message path).
    pub(super) fn to_set(&self) -> HashSet<Text> {
        match self {
            MemberSet::Few(users) => users.iter().map(UserName::text).collect(),
            MemberSet::Many(users) => users.iter().map(UserName::text).collect(),
        }
    }
}

/// The users of a [`MemberSet`], borrowed (no allocation).
pub(super) enum MemberIter<'a> {
    Few(std::slice::Iter<'a, UserName>),
    Many(std::collections::hash_set::Iter<'a, UserName>),
}

impl<'a> Iterator for MemberIter<'a> {
    type Item = &'a UserName;

    fn next(&mut self) -> Option<&'a UserName> {
        match self {
            MemberIter::Few(users) => users.next(),
            MemberIter::Many(users) => users.next(),
        }
    }
}

impl<'a> IntoIterator for &'a MemberSet {
    type Item = &'a UserName;
    type IntoIter = MemberIter<'a>;

    fn into_iter(self) -> MemberIter<'a> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(i: usize) -> Text {
        Text::from(format!("u{i}").as_str())
    }

    #[test]
    fn a_small_set_is_an_exact_vector_and_a_large_one_a_hash_set() {
        // A room holds this inline: a boxed slice's size, not a vector's 24 bytes or a hash
        // set's 48.
        let inline = std::mem::size_of::<MemberSet>();
        assert!(inline <= 16, "the member set grew to {inline} bytes");
        let mut set = MemberSet::default();
        assert!(set.insert(user(0)) && set.insert(user(1)));
        assert!(!set.insert(user(1)), "each user once");
        match &set {
            MemberSet::Few(users) => assert_eq!(users.len(), 2, "an exact slice of two"),
            MemberSet::Many(_) => panic!("two members made a hash set"),
        }
        for i in 2..100 {
            assert!(set.insert(user(i)));
        }
        assert!(matches!(set, MemberSet::Many(_)));
        assert_eq!(set.len(), 100);
        assert!((0..100).all(|i| set.contains(user(i).as_str())));
        assert_eq!(set.to_set().len(), 100);
        for i in 0..95 {
            assert_eq!(set.remove(user(i).as_str()), Some(UserName::from(user(i))));
            assert!(set.remove(user(i).as_str()).is_none(), "removed once");
        }
        assert!(matches!(set, MemberSet::Few(_)), "shrunk back to a vector");
        assert_eq!(set.len(), 5);
        assert!(
            (95..100).all(|i| set.contains(user(i).as_str())) && !set.contains(user(0).as_str())
        );
        for i in 95..100 {
            assert!(set.remove(user(i).as_str()).is_some());
        }
        assert!(set.is_empty());
    }

    #[test]
    fn both_shapes_iterate_every_member_once() {
        let mut set = MemberSet::default();
        for n in [3, 40] {
            for i in 0..n {
                set.insert(user(i));
            }
            let mut seen: Vec<&UserName> = (&set).into_iter().collect();
            seen.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            seen.dedup();
            assert_eq!(seen.len(), n, "{n} members");
            assert!((0..n).all(|i| set.iter().any(|u| *u == user(i))));
        }
    }
}
