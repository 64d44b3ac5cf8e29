//! The engine's topology: which Redis serves which room. A single Redis serves every
//! room; a Redis Cluster splits the 16384 hash slots over its shards, and a room's keys
//! and channel share one slot (the CRC16 of their hash tag `{r:<name>}`), so each room's
//! script and stream live on one shard. The slot map is read from a seed with
//! `CLUSTER SLOTS` at start, after a `MOVED` and when a shard is lost. Behind Sentinel,
//! the one Redis is the master the sentinels name (`SENTINEL get-master-addr-by-name`),
//! asked at start and whenever its connection is lost or it answers as a replica.
//!
//! Owns: the slot function, the slot map and reading the seeds' and sentinels' answers.
//! Must not touch: connections (the engine asks the seeds and sentinels without
//! blocking, `engine/topology.rs`).

use super::RedisAddr;
use super::resp::Value;

/// Hash slots of a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM), as Redis Cluster hashes keys.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of `key`: the CRC16 of its hash tag (the part between the first `{` and
/// the next `}`, when not empty), or of the whole key.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS as u16
}

/// Which shard serves each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// The shards' masters.
    pub shards: Vec<RedisAddr>,
    /// Slot -> index into `shards`.
    slots: Vec<u16>,
}

impl SlotMap {
    /// One Redis serving every slot.
    pub fn single(addr: RedisAddr) -> Self {
        SlotMap {
            shards: vec![addr],
            slots: vec![0; SLOTS],
        }
    }

    /// The shard serving `slot`.
    pub fn shard_of(&self, slot: u16) -> usize {
        usize::from(self.slots[usize::from(slot) % SLOTS])
    }

    /// `slot` is served by shard `shard` now (a `MOVED` said so).
    pub fn set(&mut self, slot: u16, shard: usize) {
        if let (Some(s), Ok(shard)) = (self.slots.get_mut(usize::from(slot)), u16::try_from(shard))
        {
            *s = shard;
        }
    }

    /// The shard serving `key`.
    pub fn shard_of_key(&self, key: &[u8]) -> usize {
        self.shard_of(key_slot(key))
    }

    /// Reads a `CLUSTER SLOTS` answer: `[start, end, [host, port, id, ...], replicas...]`
    /// per range. `seed` stands in for a master that reports no host. `None` if it is
    /// malformed or leaves a slot unserved.
    pub fn from_cluster_slots(reply: &Value, seed: &RedisAddr) -> Option<Self> {
        const UNSET: u16 = u16::MAX;
        let mut map = SlotMap {
            shards: Vec::new(),
            slots: vec![UNSET; SLOTS],
        };
        for range in reply.array()? {
            let r = range.array()?;
            let (start, end) = (r.first()?.int()?, r.get(1)?.int()?);
            let master = r.get(2)?.array()?;
            let host = master.first()?.bytes()?;
            let host = match std::str::from_utf8(host).ok()? {
                "" | "?" => seed.host.clone(),
                h => h.to_owned(),
            };
            let port = u16::try_from(master.get(1)?.int()?).ok()?;
            let addr = RedisAddr { host, port };
            let shard = match map.shards.iter().position(|a| *a == addr) {
                Some(i) => i,
                None => {
                    map.shards.push(addr);
                    map.shards.len() - 1
                }
            };
            let (start, end) = (usize::try_from(start).ok()?, usize::try_from(end).ok()?);
            if start > end || end >= SLOTS {
                return None;
            }
            for slot in &mut map.slots[start..=end] {
                *slot = shard as u16;
            }
        }
        (!map.slots.contains(&UNSET)).then_some(map)
    }
}

/// The master's address in a `SENTINEL get-master-addr-by-name` answer (`[host, port]`;
/// nil when the sentinel knows no such master).
pub fn master_from_sentinel(reply: &Value) -> Option<RedisAddr> {
    let a = reply.array()?;
    let host = std::str::from_utf8(a.first()?.bytes()?).ok()?.to_owned();
    let port = u16::try_from(a.get(1)?.int()?).ok()?;
    Some(RedisAddr { host, port })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // The reference values of the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(key_slot(b"pabal:{r:x}:m"), 9129, "as CLUSTER KEYSLOT says");
        assert_eq!(key_slot(b"pabal:{r:x}:m"), key_slot(b"pabal:{r:x}:c"));
    }

    #[test]
    fn a_map_covers_every_slot_or_is_refused() {
        let seed = RedisAddr {
            host: "10.0.0.1".into(),
            port: 7000,
        };
        let node = |host: &str, port| {
            Value::Array(Some(vec![
                Value::Bulk(Some(bytes::Bytes::copy_from_slice(host.as_bytes()))),
                Value::Int(port),
            ]))
        };
        let range = |a, b, m| Value::Array(Some(vec![Value::Int(a), Value::Int(b), m]));
        let full = Value::Array(Some(vec![
            range(0, 8000, node("", 7000)),
            range(8001, 16383, node("10.0.0.2", 7001)),
        ]));
        let map = SlotMap::from_cluster_slots(&full, &seed).unwrap();
        assert_eq!(map.shards.len(), 2);
        assert_eq!(map.shards[map.shard_of(0)], seed);
        assert_eq!(map.shards[map.shard_of(16383)].port, 7001);
        let hole = Value::Array(Some(vec![range(0, 8000, node("", 7000))]));
        assert!(SlotMap::from_cluster_slots(&hole, &seed).is_none());
    }
}
