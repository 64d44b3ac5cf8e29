//! A bounded idempotency window: which keys were seen recently and what each one produced
//! (the server API's `Idempotency-Key` on publishes; a room's owner keeps one per room), so
//! a retried request returns the original result instead of doing the work twice.
//!
//! Bounded by count and by age, both passed in on every call (a reload changes them for
//! every window at its next use): at most `max_keys` entries, each forgotten `max_age` after
//! it was recorded, oldest first. Memory never exceeds what `max_keys` entries take; keys are
//! [`IdempotencyKey`]s of at most [`IdempotencyKey::MAX_LEN`] bytes held inline (no heap
//! per key). Sans-IO: time is an argument.
//!
//! Owns: the window. Must not touch: rooms, sequences, HTTP (it stores whatever `V` the
//! caller gives it).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use thiserror::Error;

/// A client-chosen key naming one logical request: 1 to [`IdempotencyKey::MAX_LEN`] bytes
/// of visible ASCII (`!` to `~`), stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    len: u8,
    bytes: [u8; IdempotencyKey::MAX_LEN],
}

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Empty or longer than [`IdempotencyKey::MAX_LEN`].
    #[error("an idempotency key must be 1..={} bytes", IdempotencyKey::MAX_LEN)]
    Length,
    /// A byte outside visible ASCII.
    #[error("an idempotency key must be visible ASCII (no spaces or control characters)")]
    Charset,
}

impl IdempotencyKey {
    /// The longest key.
    pub const MAX_LEN: usize = 64;

    /// Validates and copies a key.
    pub fn new(key: &[u8]) -> Result<Self, KeyError> {
        if key.is_empty() || key.len() > Self::MAX_LEN {
            return Err(KeyError::Length);
        }
        if !key.iter().all(|b| (b'!'..=b'~').contains(b)) {
            return Err(KeyError::Charset);
        }
        let mut bytes = [0; Self::MAX_LEN];
        bytes[..key.len()].copy_from_slice(key);
        Ok(IdempotencyKey {
            len: key.len() as u8,
            bytes,
        })
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Visible ASCII by construction.
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// Keys seen recently and what each produced.
#[derive(Debug)]
pub struct IdempotencyWindow<V, K = IdempotencyKey> {
    results: HashMap<K, V>,
    /// Keys in the order recorded, with when: the front is the oldest.
    order: VecDeque<(K, Instant)>,
}

impl<V, K> Default for IdempotencyWindow<V, K> {
    fn default() -> Self {
        IdempotencyWindow {
            results: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V: Copy, K: Copy + Eq + Hash> IdempotencyWindow<V, K> {
    /// An empty window; it allocates as keys arrive, up to the bound.
    pub fn new() -> Self {
        Self::default()
    }

    /// What `key` produced, if it was recorded less than `max_age` before `now`.
    pub fn get(&mut self, key: &K, now: Instant, max_age: Duration) -> Option<V> {
        self.expire(now, max_age);
        self.results.get(key).copied()
    }

    /// Records what `key` produced at `now`, forgetting the oldest keys beyond `max_keys`
    /// and those older than `max_age`. A key already present keeps its first result.
    pub fn record(&mut self, key: K, value: V, now: Instant, max_keys: usize, max_age: Duration) {
        self.expire(now, max_age);
        if max_keys == 0 || self.results.contains_key(&key) {
            return;
        }
        while self.order.len() >= max_keys {
            self.forget_oldest();
        }
        self.results.insert(key, value);
        self.order.push_back((key, now));
        if self.order.capacity() > max_keys.saturating_mul(2).max(16) {
            // The bound was lowered by a reload: give the memory back.
            self.order.shrink_to(max_keys);
            self.results.shrink_to(max_keys);
        }
    }

    /// Keys remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.order.len()
    }

    fn expire(&mut self, now: Instant, max_age: Duration) {
        while let Some(&(_, at)) = self.order.front() {
            if now.saturating_duration_since(at) < max_age {
                break;
            }
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((key, _)) = self.order.pop_front() {
            self.results.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::new(text.as_bytes()).unwrap()
    }

    const AGE: Duration = Duration::from_secs(60);

    #[test]
    fn a_recorded_key_returns_its_first_result() {
        let t0 = Instant::now();
        let mut w = IdempotencyWindow::new();
        assert_eq!(w.get(&key("a"), t0, AGE), None);
        w.record(key("a"), 7u64, t0, 10, AGE);
        w.record(key("a"), 9u64, t0, 10, AGE);
        assert_eq!(w.get(&key("a"), t0 + Duration::from_secs(59), AGE), Some(7));
    }

    #[test]
    fn keys_are_forgotten_by_age() {
        let t0 = Instant::now();
        let mut w = IdempotencyWindow::new();
        w.record(key("old"), 1u64, t0, 10, AGE);
        w.record(key("new"), 2u64, t0 + Duration::from_secs(30), 10, AGE);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(w.get(&key("old"), later, AGE), None);
        assert_eq!(w.get(&key("new"), later, AGE), Some(2));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn the_count_bound_forgets_the_oldest_first_and_holds() {
        let t0 = Instant::now();
        let mut w = IdempotencyWindow::new();
        for i in 0..1000u64 {
            w.record(key(&format!("k{i}")), i, t0, 100, AGE);
            assert!(w.len() <= 100);
        }
        assert_eq!(w.get(&key("k899"), t0, AGE), None);
        assert_eq!(w.get(&key("k900"), t0, AGE), Some(900));
        // A lower bound (a reload) applies at the next record.
        w.record(key("last"), 0, t0, 10, AGE);
        assert_eq!(w.len(), 10);
        assert_eq!(w.get(&key("k990"), t0, AGE), None);
        assert_eq!(w.get(&key("k999"), t0, AGE), Some(999));
    }

    #[test]
    fn keys_are_bounded_visible_ascii() {
        assert_eq!(IdempotencyKey::new(b""), Err(KeyError::Length));
        assert_eq!(IdempotencyKey::new(&[b'a'; 65]), Err(KeyError::Length));
        assert_eq!(IdempotencyKey::new(b"a b"), Err(KeyError::Charset));
        assert_eq!(IdempotencyKey::new(b"a\n"), Err(KeyError::Charset));
        let k = IdempotencyKey::new(&[b'z'; 64]).unwrap();
        assert_eq!(k.as_bytes(), &[b'z'; 64][..]);
    }
}
