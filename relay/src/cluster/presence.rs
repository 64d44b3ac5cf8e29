//! A user across nodes: how many connections each node's workers hold (presence, and the
//! cluster-wide `limits.max_connections_per_user`), and the reads the server API answers
//! from the engine rather than from one node (a user's presence, a user's rooms, a room's
//! member count).
//!
//! # Keys
//! `pabal:{u:user}:p`, on the user's slot (next to the user's rooms and blocks): a hash,
//! field `<node>/<worker>/<run>` (one per worker of one run of a node) → `count:expiry`,
//! the worker's live connections of the user and, in ms of Redis' own clock (`TIME`), when
//! the entry stops counting. A worker rewrites its entries every third of
//! `cluster.presence_lease` (like Centrifugo's presence refresh), so a node killed with -9
//! stops counting once its entries' lease runs out: readers skip an expired entry and the
//! next claim deletes it. The hash itself expires a lease after its last write.
//!
//! # A HELLO's claim
//! Every HELLO of a cluster node runs [`CLAIM`] before its session opens: in one script
//! it sums the live entries and, below `limits.max_connections_per_user`, adds one to the
//! worker's own entry; at the cap it changes nothing and refuses. Two HELLOs racing on two
//! nodes are ordered by Redis, so the cap holds exactly while every node holding the user
//! is alive; a node killed with -9 keeps its connections counted until its lease runs out
//! (the cap errs on the side of refusing). A connection's close is not a script of its
//! own: a worker's closes of one user in one loop tick become one [`SET`] of the new
//! count (`0` deletes the entry).
//!
//! Owns: these keys, the scripts, the lookups' wire format. Must not touch: connections
//! (the worker counts them), the membership keys (read only, [`super::membership`]).

use pabal_codec::Text;

use super::membership;
use super::resp::Value;
use super::script::Script;
use crate::ids::RoomName;

/// Redis' clock in ms, as the scripts compute it.
macro_rules! now_ms {
    () => {
        "local t = redis.call('TIME')\n\
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// Keeps the hash alive a lease after this write (never shortens it).
macro_rules! keep_alive {
    () => {
        "if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then\n\
         \x20 redis.call('PEXPIRE', KEYS[1], ARGV[3])\n\
         end\n"
    };
}

/// A HELLO's claim: KEYS presence; ARGV own field, max connections, lease ms. Returns
/// `{1, total}` (claimed: `total` counts this one) or `{0, total}` (refused at the cap).
pub static CLAIM: Script = Script::new(
    "PRESENCE_CLAIM",
    concat!(
        now_ms!(),
        r"local all = redis.call('HGETALL', KEYS[1])
local others, own = 0, 0
for i = 1, #all, 2 do
  local c, exp = string.match(all[i + 1], '^(%d+):(%d+)$')
  if c and tonumber(exp) > now then
    if all[i] == ARGV[1] then own = tonumber(c) else others = others + tonumber(c) end
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
if others + own >= tonumber(ARGV[2]) then return {0, others + own} end
own = own + 1
redis.call('HSET', KEYS[1], ARGV[1], own .. ':' .. (now + tonumber(ARGV[3])))
",
        keep_alive!(),
        "return {1, others + own}\n"
    ),
);

/// A worker's count of a user, and its lease renewed: KEYS presence; ARGV own field,
/// count (`0`: the entry goes), lease ms.
pub static SET: Script = Script::new(
    "PRESENCE_SET",
    concat!(
        now_ms!(),
        r"if ARGV[2] == '0' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + tonumber(ARGV[3])))
",
        keep_alive!(),
        "return 1\n"
    ),
);

/// A user's live entries: KEYS presence. Returns `[field, count, ...]` of the entries
/// whose lease has not run out.
pub static READ: Script = Script::new(
    "PRESENCE_READ",
    concat!(
        now_ms!(),
        r"local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  local c, exp = string.match(all[i + 1], '^(%d+):(%d+)$')
  if c and tonumber(exp) > now then
    live[#live + 1] = all[i]
    live[#live + 1] = c
  end
end
return live
",
    ),
);

/// The user's presence hash.
pub fn presence_key(user: &Text) -> Vec<u8> {
    membership::user_key(user, "p")
}

/// What the server API asks the engine about a user or a room.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The user's live connections on every node ([`READ`]).
    Presence {
        /// The user.
        user: Text,
    },
    /// The user's rooms and channels (`HKEYS pabal:{u:user}:r`; bounded by
    /// `limits.max_rooms_per_user`, which every join is checked against).
    Rooms {
        /// The user.
        user: Text,
    },
    /// A room's members (`HLEN pabal:{r:name}:u`).
    MemberCount {
        /// The room.
        room: RoomName,
    },
}

/// What the engine answered to a [`Lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupAnswer {
    /// Live connections: each live worker entry (`node/worker/run`) with its count.
    Presence(Vec<(String, u64)>),
    /// The user's rooms and channels.
    Rooms(Vec<RoomName>),
    /// The room's members.
    MemberCount(u64),
}

impl Lookup {
    /// The key the lookup reads (its slot routes it).
    pub fn key(&self) -> Vec<u8> {
        match self {
            Lookup::Presence { user } => presence_key(user),
            Lookup::Rooms { user } => membership::user_key(user, "r"),
            Lookup::MemberCount { room } => {
                let mut k = Vec::new();
                super::script::key(&mut k, room, "u");
                k
            }
        }
    }

    /// Parses the engine's answer; `None` when it is not one.
    pub fn parse(&self, reply: &Value) -> Option<LookupAnswer> {
        match self {
            Lookup::Presence { .. } => {
                let flat = reply.array()?;
                let mut entries = Vec::with_capacity(flat.len() / 2);
                for pair in flat.chunks_exact(2) {
                    let field = String::from_utf8(pair[0].bytes()?.to_vec()).ok()?;
                    let count = std::str::from_utf8(pair[1].bytes()?).ok()?.parse().ok()?;
                    entries.push((field, count));
                }
                Some(LookupAnswer::Presence(entries))
            }
            Lookup::Rooms { .. } => Some(LookupAnswer::Rooms(
                reply
                    .array()?
                    .iter()
                    .filter_map(|v| membership::parse_field(v.bytes()?))
                    .collect(),
            )),
            Lookup::MemberCount { .. } => {
                Some(LookupAnswer::MemberCount(u64::try_from(reply.int()?).ok()?))
            }
        }
    }
}

/// The nodes among presence entries (`node/worker/run` → `node`), each once, sorted.
pub fn nodes_of(entries: &[(String, u64)]) -> Vec<&str> {
    let mut nodes: Vec<&str> = entries
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(f, _)| f.split('/').next().unwrap_or(f))
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use bytes::Bytes;

    use super::*;

    fn bulk(s: &str) -> Value {
        Value::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())))
    }

    #[test]
    fn lookups_parse_and_bad_answers_are_refused() {
        let user = Text::from("ann");
        let presence = Lookup::Presence { user: user.clone() };
        assert_eq!(presence.key(), b"pabal:{u:ann}:p");
        let live = Value::Array(Some(vec![
            bulk("n1/0/5"),
            bulk("2"),
            bulk("n2/1/9"),
            bulk("1"),
            bulk("n1/1/5"),
            bulk("1"),
        ]));
        let Some(LookupAnswer::Presence(entries)) = presence.parse(&live) else {
            panic!("a presence answer");
        };
        assert_eq!(entries.iter().map(|e| e.1).sum::<u64>(), 4);
        assert_eq!(nodes_of(&entries), vec!["n1", "n2"]);
        assert_eq!(presence.parse(&Value::Int(3)), None);
        let bad = Value::Array(Some(vec![bulk("n1/0/5"), bulk("many")]));
        assert_eq!(presence.parse(&bad), None);

        let rooms = Lookup::Rooms { user };
        assert_eq!(rooms.key(), b"pabal:{u:ann}:r");
        let fields = Value::Array(Some(vec![
            bulk("r:club"),
            bulk("x:skipped"),
            bulk("c:news"),
        ]));
        assert_eq!(
            rooms.parse(&fields),
            Some(LookupAnswer::Rooms(vec![
                RoomName::new(false, Text::from("club")),
                RoomName::new(true, Text::from("news")),
            ]))
        );

        let count = Lookup::MemberCount {
            room: RoomName::new(false, Text::from("club")),
        };
        assert_eq!(count.key(), b"pabal:{r:club}:u");
        assert_eq!(
            count.parse(&Value::Int(7)),
            Some(LookupAnswer::MemberCount(7))
        );
        assert_eq!(count.parse(&Value::Int(-1)), None);
    }
}
