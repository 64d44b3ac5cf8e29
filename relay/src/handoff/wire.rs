//! What goes to the app server: the JSON body of a batch, each item's idempotency id, and the
//! signature header.
//!
//! ```text
//! POST <handoff.url>
//! Content-Type: application/json
//! X-Pabal-Signature: t=1764358800,v1=<hex HMAC-SHA256(secret, "1764358800." + body)>
//!
//! {"items":[{"id":"h1-6f1c...","kind":"room","room":"group:42","epoch":1764358800123,
//!   "user":"bob","first_seq":17,"last_seq":19,"publisher":"ann","time_ms":1764358812345}]}
//! ```
//!
//! The id is derived from (kind, room, epoch, first_seq, last_seq, user) alone, so every
//! retry of an item carries the same id and an app server dedupes by it. The timestamp is
//! inside the MAC: an app server rejects a signature older than its tolerance (say 5 min),
//! so a captured request cannot be replayed later.
//!
//! Owns: the encoding only. Must not touch: queues, sockets, clocks (time is an argument).

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Handoff;

/// The signature header's name.
pub const SIGNATURE_HEADER: &str = "x-pabal-signature";

/// Bytes of SHA-256 kept in an idempotency id (hex: twice as many characters).
const ID_BYTES: usize = 16;

/// An item's idempotency id: `h1-` and 32 hex digits of SHA-256 over its identifying fields,
/// each length-prefixed so no two different items share an input.
pub fn idempotency_id(item: &Handoff) -> String {
    let mut h = Sha256::new();
    h.update([u8::from(item.room.channel)]);
    for field in [item.room.name.as_bytes(), item.user.as_bytes()] {
        h.update((field.len() as u32).to_be_bytes());
        h.update(field);
    }
    h.update(item.epoch.to_be_bytes());
    h.update(item.first_seq.to_be_bytes());
    h.update(item.last_seq.to_be_bytes());
    let digest = h.finalize();
    let mut id = String::with_capacity(3 + 2 * ID_BYTES);
    id.push_str("h1-");
    push_hex(&mut id, &digest[..ID_BYTES]);
    id
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

#[derive(Serialize)]
struct Item<'a> {
    id: String,
    kind: &'static str,
    room: &'a str,
    epoch: u64,
    user: &'a str,
    first_seq: u64,
    last_seq: u64,
    publisher: &'a str,
    time_ms: u64,
}

#[derive(Serialize)]
struct Body<'a> {
    items: Vec<Item<'a>>,
}

/// The JSON body of a batch.
pub fn encode<'a>(items: impl Iterator<Item = &'a Handoff>) -> Vec<u8> {
    let body = Body {
        items: items
            .map(|h| Item {
                id: idempotency_id(h),
                kind: if h.room.channel { "channel" } else { "room" },
                room: h.room.name.as_str(),
                epoch: h.epoch,
                user: h.user.as_str(),
                first_seq: h.first_seq,
                last_seq: h.last_seq,
                publisher: h.publisher.as_str(),
                time_ms: h.time_ms,
            })
            .collect(),
    };
    // Strings, integers and a static str: serializing into a Vec cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The `X-Pabal-Signature` value for `body` sent at `unix_s`: `t=<unix_s>,v1=<hex MAC>`.
pub fn signature(secret: &[u8], unix_s: u64, body: &[u8]) -> String {
    let t = unix_s.to_string();
    let mut out = String::with_capacity(t.len() + 6 + 64);
    out.push_str("t=");
    out.push_str(&t);
    out.push_str(",v1=");
    push_hex(&mut out, &mac(secret, &t, body));
    out
}

fn mac(secret: &[u8], t: &str, body: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(t.as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().into()
}

/// Checks a signature header as an app server would: the MAC over `t.body` with `secret`
/// (constant time), and `t` within `tolerance_s` of `now_s`. For tests and for app servers
/// written in Rust.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now_s: u64, tolerance_s: u64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = Some(value),
            Some(("v1", value)) => v1 = Some(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(unix_s) = t.parse::<u64>() else {
        return false;
    };
    if unix_s.abs_diff(now_s) > tolerance_s {
        return false;
    }
    let mut expected = String::with_capacity(64);
    push_hex(&mut expected, &mac(secret, t, body));
    subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), v1.as_bytes()).into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::ids::RoomName;
    use pabal_codec::Text;

    fn item(room: &'static str, user: &'static str, seq: u64) -> Handoff {
        Handoff {
            room: RoomName::new(false, Text::from_static(room)),
            epoch: 7,
            first_seq: seq,
            last_seq: seq,
            user: Text::from_static(user),
            publisher: Text::from_static("ann"),
            time_ms: 1_764_358_800_000 + seq,
        }
    }

    #[test]
    fn ids_are_stable_and_tell_items_apart() {
        let a = item("group:1", "bob", 5);
        assert_eq!(idempotency_id(&a), idempotency_id(&a.clone()));
        assert_eq!(idempotency_id(&a).len(), 3 + 32);
        let mut other_user = a.clone();
        other_user.user = Text::from_static("cy");
        let mut other_epoch = a.clone();
        other_epoch.epoch = 8;
        let mut channel = a.clone();
        channel.room = RoomName::new(true, Text::from_static("group:1"));
        // The name/user boundary is length-prefixed: "ab"+"c" differs from "a"+"bc".
        let split1 = item("ab", "c", 5);
        let split2 = item("a", "bc", 5);
        let ids = [
            idempotency_id(&a),
            idempotency_id(&other_user),
            idempotency_id(&other_epoch),
            idempotency_id(&channel),
            idempotency_id(&item("group:1", "bob", 6)),
            idempotency_id(&split1),
            idempotency_id(&split2),
        ];
        for (i, x) in ids.iter().enumerate() {
            for y in &ids[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }

    #[test]
    fn the_body_carries_every_field() {
        let body = encode([item("group:1", "bob", 5)].iter());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let i = &v["items"][0];
        assert_eq!(i["kind"], "room");
        assert_eq!(i["room"], "group:1");
        assert_eq!(i["user"], "bob");
        assert_eq!(i["epoch"], 7);
        assert_eq!(i["first_seq"], 5);
        assert_eq!(i["last_seq"], 5);
        assert_eq!(i["publisher"], "ann");
        assert_eq!(i["time_ms"], 1_764_358_800_005u64);
        assert_eq!(i["id"], idempotency_id(&item("group:1", "bob", 5)));
    }

    #[test]
    fn a_signature_verifies_and_a_tampered_one_does_not() {
        let secret = b"0123456789abcdef";
        let body = br#"{"items":[]}"#;
        let sig = signature(secret, 1000, body);
        assert!(sig.starts_with("t=1000,v1="));
        assert!(verify(secret, &sig, body, 1000, 300));
        assert!(!verify(secret, &sig, b"{\"items\":[1]}", 1000, 300));
        assert!(!verify(b"another-secret-16", &sig, body, 1000, 300));
        assert!(!verify(secret, &sig, body, 2000, 300), "too old");
        let retimed = sig.replace("t=1000", "t=1001");
        assert!(
            !verify(secret, &retimed, body, 1000, 300),
            "t is in the MAC"
        );
    }

    #[test]
    fn the_mac_matches_a_reference_value() {
        // RFC 4231 test case 2 pins the HMAC and the hex encoding.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let mut hex = String::new();
        push_hex(&mut hex, &m.finalize().into_bytes());
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // And ours is that construction over "t.body" (the value Python's
        // `hmac.new(b"Jefe", b"12.3", hashlib.sha256).hexdigest()` gives, as README.md's
        // verifier computes it).
        assert_eq!(
            signature(b"Jefe", 12, b"3"),
            "t=12,v1=3423c5930b3554ade827bd2dcf96ddcefdb5f5b620b7ee0c055cf9caad14172a"
        );
    }
}
