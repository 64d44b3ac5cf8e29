//! Membership, blocks and join points in the engine, and the per-user notices that carry
//! their changes to every node holding the user's connections.
//!
//! # Keys
//! - `pabal:{r:name}:u` (`{c:name}` for a channel): the room's member hash, user → join
//!   point `epoch:seq:serial`, on the room's slot (next to its meta hash, whose epoch and
//!   head the join point is read from atomically);
//! - `pabal:{u:user}:r`: the user's rooms, field `r:name` / `c:name` → the same join point;
//! - `pabal:{u:user}:b`: the channels the user blocked (a set of `c:name` fields);
//! - `pabal:{u:user}:n`: the user's notice channel (published on the user's slot, so a
//!   Redis Cluster can carry it as sharded pub/sub), subscribed by every worker that holds a
//!   connection of the user while it holds one.
//!
//! # A change is two scripts
//! A script may touch one slot only, and a room's and a user's keys lie on different slots.
//! A change runs the room's script first ([`ROOM_JOIN`] reads the room's epoch and head
//! and writes the member hash; [`ROOM_LEAVE`] deletes the member, its markers and its
//! place in the hand-off index, see [`super::receipts`]), then the user's
//! ([`USER_JOIN`]: checks blocks and the cap on rooms, writes the user's hash, publishes the
//! notice; [`USER_LEAVE`]: deletes, blocks, publishes). A join the user's side refuses is
//! undone on the room's side ([`ROOM_UNDO`], only if the member hash still holds that very
//! join point). A crash (or a lost connection) between the two leaves the room's side
//! changed and the user's not: a member the room counts but whose phones do not bind it
//! (nodes read the user's side), or a removed member whose phones still bind it. The API
//! call then failed (`unavailable`), and its retry repairs it: both scripts are idempotent,
//! the room's join script answers the join point already written, and the user's script
//! always runs, writes it and publishes the notice.
//!
//! # Notices (on `pabal:{u:user}:n`)
//! - `J <epoch>:<seq>:<serial> <field>`: joined at that join point;
//! - `L <epoch>:<seq>:<serial> <reason> <blocked> <field>`: left (reason `r` removed, `u`
//!   unsubscribed, `b` blocked; blocked `1` when the channel is now blocked);
//! - `K`: disconnect every connection of the user.
//!
//! Pub/sub is at most once: a worker whose subscription of the channel is (re)established
//! reads the user's rooms and blocks again ([`LOAD_USER`]) and applies the difference, so a
//! notice lost while the connection was down is not lost for good.
//!
//! # Bounds
//! [`LOAD_USER`] refuses (rather than pages) a user with more rooms than
//! `limits.max_rooms_per_user` or more blocks than `limits.max_blocked_per_user`: joins and
//! blocks are checked against the same caps, so only a lowered cap meets one, and that user
//! is refused with a typed `LimitExceeded` at HELLO instead of loading without bound.
//!
//! Owns: these keys, the scripts, the notice format. Must not touch: connections or rooms.

use bytes::Bytes;
use pabal_codec::{LeftReason, Text};

use super::resp::Value;
use super::script::Script;
use crate::directory::JoinPoint;
use crate::ids::RoomName;

/// A room's join: KEYS meta, members, hand-off index; ARGV epoch hint, user, serial hint.
/// Returns `{1, jp}` for a new member, `{0, jp}` with the join point in force for a member
/// already. A new member enters the hand-off index at its join point once the index of
/// this epoch is built (before, its build reads the member; see [`super::receipts`]).
///
/// The membership's serial is the room's: one past the last the room gave (meta field
/// `j`), and at least the caller's hint (a node's clock-based serial, as versions before
/// `j` used alone), so a room's serials only grow and no two of its memberships share one,
/// whichever nodes asked at once (a removal in the room's order names the membership it
/// ends by its join point: [`ROOM_LEAVE`]).
pub static ROOM_JOIN: Script = Script::new(
    "ROOM_JOIN",
    r"
local cur = redis.call('HGET', KEYS[2], ARGV[2])
if cur then return {0, cur} end
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e)
end
local s = redis.call('HGET', KEYS[1], 's') or '0'
local serial = math.max(tonumber(redis.call('HGET', KEYS[1], 'j') or '0') + 1, tonumber(ARGV[3]))
serial = string.format('%d', serial)
redis.call('HSET', KEYS[1], 'j', serial)
local jp = e .. ':' .. s .. ':' .. serial
redis.call('HSET', KEYS[2], ARGV[2], jp)
if redis.call('HGET', KEYS[1], 'd') == e or redis.call('HGET', KEYS[1], 'b') == e then
  redis.call('ZADD', KEYS[3], s, ARGV[2])
end
return {1, jp}
",
);

/// A room's side of a join the user's side refused: KEYS members, hand-off index; ARGV
/// user, join point.
pub static ROOM_UNDO: Script = Script::new(
    "ROOM_UNDO",
    r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
",
);

/// A room's leave: KEYS members, markers, hand-off index, meta, stream, removals; ARGV
/// user, reason letter (`r`, `u`; empty: no removal mark), channel, the publish command
/// (`PUBLISH`, or `SPUBLISH` on a Redis Cluster), the stream's max length
/// (`cluster.stream_max_len`; empty: not trimmed here), the history's expiry (ms; empty
/// or absent: left as it is). Returns the join point removed, or `''`.
/// The member's markers and its place in the hand-off index (see [`super::receipts`]) go
/// with the membership.
///
/// With a reason (the engine gives one for a room's plain removal, not a channel's or a
/// block), the removal is also placed in the room's own order: an entry of the
/// room's stream right after its head message, id `<head>-*` (Redis numbers it after the
/// removals already there, so the `n`-th removal after message `s` is `s-n` and the next
/// message, `s+1-0`, sorts after every one), with one field `l`: `<join point> <reason>
/// <user>`; and the same on the room's channel, `<epoch> <id> <join point> <reason>
/// <user>`. Every node reads the room's channel and stream in that order and applies the
/// removal before the message after it ([`crate::cluster::RemovalMark`]), so no message
/// published after the removal reaches the user's phones on any node. The room's last
/// [`REMOVALS_KEPT`] removals are also kept as their channel messages in a sorted set
/// (`pabal:{r:name}:x`, by sequence; the removal's own number zero-padded in the member,
/// so that the oldest go first when removals after one message outnumber the set), which
/// [`super::script::OPEN`] returns: a node that
/// opens the room (subscribing its channel only now) learns the removals before the tail
/// it reads too, whose notices may still be on their way to it. A room the engine holds
/// no epoch of has no messages, and no mark is needed. An `XADD` Redis refuses (a stream
/// ahead of its meta hash, which lost it) leaves the removal to the user's notice. A room's
/// stream is trimmed to its max length here too once removals took it 64 past it, as the
/// publish script trims it, so that removals in a room nobody publishes to do not grow it;
/// and its stream and last removals are set to expire as a publish sets them
/// (`core/cluster/history_expiry.rs`), so that they do not outlive the room's use either.
pub static ROOM_LEAVE: Script = Script::new(
    "ROOM_LEAVE",
    r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  local e = redis.call('HGET', KEYS[4], 'e')
  if ARGV[2] ~= '' and e then
    local s = redis.call('HGET', KEYS[4], 's') or '0'
    local body = cur .. ' ' .. ARGV[2] .. ' ' .. ARGV[1]
    local id = redis.pcall('XADD', KEYS[5], s .. '-*', 'l', body)
    if type(id) == 'string' then
      redis.call(ARGV[4], ARGV[3], e .. ' ' .. id .. ' ' .. body)
      local n = string.format('%010d', tonumber(string.match(id, '-(%d+)$')))
      redis.call('ZADD', KEYS[6], s, e .. ' ' .. s .. '-' .. n .. ' ' .. body)
      if redis.call('ZCARD', KEYS[6]) > 1024 then
        redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -1025)
      end
      local max = tonumber(ARGV[5])
      if max and redis.call('XLEN', KEYS[5]) > max + 64 then
        redis.call('XTRIM', KEYS[5], 'MAXLEN', '~', max)
      end
      if ARGV[6] and ARGV[6] ~= '' then
        redis.call('PEXPIRE', KEYS[5], ARGV[6])
        redis.call('PEXPIRE', KEYS[6], ARGV[6])
      end
    end
  end
end
return cur or ''
",
);

/// How many of a room's last removals [`ROOM_LEAVE`] keeps for [`super::script::OPEN`].
pub const REMOVALS_KEPT: usize = 1024;

/// A user's join: KEYS rooms, blocks; ARGV field, join point, unblock (`1`), max rooms,
/// notice channel. Returns `new`, `same`, `blocked` or `full`.
pub static USER_JOIN: Script = Script::new(
    "USER_JOIN",
    r"
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  if ARGV[3] ~= '1' then return 'blocked' end
  redis.call('SREM', KEYS[2], ARGV[1])
end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 'full' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[5], 'J ' .. ARGV[2] .. ' ' .. ARGV[1])
if cur then return 'same' end
return 'new'
",
);

/// A user's leave: KEYS rooms, blocks; ARGV field, block (`1`), max blocks, notice channel,
/// reason. Returns `{join point removed or '', block}`: block `1` blocked, `2` refused (the
/// user blocks too many channels; left all the same, reason `u`), `0` not asked.
pub static USER_LEAVE: Script = Script::new(
    "USER_LEAVE",
    r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then redis.call('HDEL', KEYS[1], ARGV[1]) end
local blocked = 0
local reason = ARGV[5]
if ARGV[2] == '1' then
  if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
    blocked = 1
  elseif redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[3]) then
    blocked = 2
    reason = 'u'
  else
    redis.call('SADD', KEYS[2], ARGV[1])
    blocked = 1
  end
end
if cur or blocked == 1 then
  local b = '0'
  if blocked == 1 then b = '1' end
  redis.call('PUBLISH', ARGV[4], 'L ' .. (cur or '0:0:0') .. ' ' .. reason .. ' ' .. b .. ' ' .. ARGV[1])
end
return {cur or '', blocked}
",
);

/// A user's rooms and blocks: KEYS rooms, blocks; ARGV max rooms, max blocks. Returns
/// `{'ok', [field, join point, ...], [field, ...]}`, or `{'full', count}` past a cap.
pub static LOAD_USER: Script = Script::new(
    "LOAD_USER",
    r"
local n = redis.call('HLEN', KEYS[1])
if n > tonumber(ARGV[1]) then return {'full', n} end
local b = redis.call('SCARD', KEYS[2])
if b > tonumber(ARGV[2]) then return {'full', b} end
return {'ok', redis.call('HGETALL', KEYS[1]), redis.call('SMEMBERS', KEYS[2])}
",
);

/// A room's members: KEYS members; ARGV max. Returns `{'ok', [user, ...]}`, or
/// `{'full', count}` past the cap.
pub static READ_MEMBERS: Script = Script::new(
    "READ_MEMBERS",
    r"
local n = redis.call('HLEN', KEYS[1])
if n > tonumber(ARGV[1]) then return {'full', n} end
return {'ok', redis.call('HKEYS', KEYS[1])}
",
);

/// Parses [`READ_MEMBERS`]' answer: `Ok(users)`, `Err(Some(count))` past the cap,
/// `Err(None)` when the answer is not one.
pub fn parse_members(reply: &Value) -> Result<Vec<Text>, Option<u64>> {
    let a = reply.array().ok_or(None)?;
    match a.first().and_then(Value::bytes).map(|b| &b[..]) {
        Some(b"full") => Err(Some(a.get(1).and_then(Value::int).unwrap_or(0) as u64)),
        Some(b"ok") => Ok(a
            .get(1)
            .and_then(Value::array)
            .ok_or(None)?
            .iter()
            .filter_map(|v| Text::from_utf8(v.bytes()?.clone()).ok())
            .collect()),
        _ => Err(None),
    }
}

/// One of a user's keys: `pabal:{u:user}:<suffix>`.
pub fn user_key(user: &Text, suffix: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(user.as_bytes().len() + 12);
    out.extend_from_slice(b"pabal:{u:");
    out.extend_from_slice(user.as_bytes());
    out.extend_from_slice(b"}:");
    out.extend_from_slice(suffix.as_bytes());
    out
}

/// The user's notice channel.
pub fn notice_channel(user: &Text) -> Bytes {
    Bytes::from(user_key(user, "n"))
}

/// A room as a field of the user's hash: `r:name` or `c:name`.
pub fn room_field(room: &RoomName) -> Vec<u8> {
    let mut out = Vec::with_capacity(room.name.len() + 2);
    out.extend_from_slice(if room.channel { b"c:" } else { b"r:" });
    out.extend_from_slice(room.name.as_bytes());
    out
}

/// The room a field names.
pub fn parse_field(field: &[u8]) -> Option<RoomName> {
    let channel = match field.get(..2)? {
        b"c:" => true,
        b"r:" => false,
        _ => return None,
    };
    let name = std::str::from_utf8(&field[2..]).ok()?;
    (!name.is_empty()).then(|| RoomName::new(channel, Text::from(name)))
}

/// A join point as the engine holds it: `epoch:seq:serial`.
pub fn join_point_text(join: JoinPoint) -> String {
    format!("{}:{}:{}", join.epoch, join.seq, join.serial)
}

/// Parses `epoch:seq:serial`.
pub fn parse_join_point(text: &[u8]) -> Option<JoinPoint> {
    let text = std::str::from_utf8(text).ok()?;
    let mut parts = text.splitn(3, ':').map(str::parse::<u64>);
    Some(JoinPoint {
        epoch: parts.next()?.ok()?,
        seq: parts.next()?.ok()?,
        serial: parts.next()?.ok()?,
    })
}

/// The reason letter a leave notice carries.
pub fn reason_code(reason: LeftReason) -> &'static str {
    match reason {
        LeftReason::Blocked => "b",
        LeftReason::Unsubscribed => "u",
        _ => "r",
    }
}

pub(super) fn reason_of(code: &[u8]) -> Option<LeftReason> {
    match code {
        b"b" => Some(LeftReason::Blocked),
        b"u" => Some(LeftReason::Unsubscribed),
        b"r" => Some(LeftReason::Removed),
        _ => None,
    }
}

/// A change of one user's membership, as another node (or this one) made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The user joined `room` at `join`.
    Joined {
        /// The room.
        room: RoomName,
        /// Where the user's stream starts.
        join: JoinPoint,
    },
    /// The user left `room` (the membership `join` ended; serial 0: the user was not a
    /// member, and only the block is news).
    Left {
        /// The room.
        room: RoomName,
        /// The membership that ended.
        join: JoinPoint,
        /// What the user's connections are told.
        reason: LeftReason,
        /// The channel is blocked now.
        blocked: bool,
    },
    /// Every connection of the user is to be closed.
    Kick,
}

/// Parses a notice; `None` when the body is not one.
pub fn parse_notice(body: &[u8]) -> Option<Notice> {
    let mut parts = body.splitn(2, |&b| b == b' ');
    let kind = parts.next()?;
    let rest = parts.next().unwrap_or_default();
    match kind {
        b"K" => Some(Notice::Kick),
        b"J" => {
            let mut p = rest.splitn(2, |&b| b == b' ');
            let join = parse_join_point(p.next()?)?;
            let room = parse_field(p.next()?)?;
            Some(Notice::Joined { room, join })
        }
        b"L" => {
            let mut p = rest.splitn(4, |&b| b == b' ');
            let join = parse_join_point(p.next()?)?;
            let reason = reason_of(p.next()?)?;
            let blocked = p.next()? == b"1";
            let room = parse_field(p.next()?)?;
            Some(Notice::Left {
                room,
                join,
                reason,
                blocked,
            })
        }
        _ => None,
    }
}

/// A user's rooms (with their join points) and blocked channels as the engine holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserRooms {
    /// Rooms and channels, with their join points.
    pub rooms: Vec<(RoomName, JoinPoint)>,
    /// Blocked channels.
    pub blocks: Vec<RoomName>,
}

/// Parses [`LOAD_USER`]'s answer: `Ok(rooms)`, `Err(Some(count))` past a cap, `Err(None)`
/// when the answer is not one.
pub fn parse_user_rooms(reply: &Value) -> Result<UserRooms, Option<u64>> {
    let a = reply.array().ok_or(None)?;
    match a.first().and_then(Value::bytes).map(|b| &b[..]) {
        Some(b"full") => Err(Some(a.get(1).and_then(Value::int).unwrap_or(0) as u64)),
        Some(b"ok") => {
            let pairs = a.get(1).and_then(Value::array).ok_or(None)?;
            let mut rooms = Vec::with_capacity(pairs.len() / 2);
            for pair in pairs.chunks_exact(2) {
                let (Some(field), Some(jp)) = (pair[0].bytes(), pair[1].bytes()) else {
                    return Err(None);
                };
                // A field or join point this version cannot read is skipped, not fatal.
                if let (Some(room), Some(join)) = (parse_field(field), parse_join_point(jp)) {
                    rooms.push((room, join));
                }
            }
            let blocks = a
                .get(2)
                .and_then(Value::array)
                .ok_or(None)?
                .iter()
                .filter_map(|v| parse_field(v.bytes()?))
                .collect();
            Ok(UserRooms { rooms, blocks })
        }
        _ => Err(None),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_bad_ones_are_refused() {
        let room = RoomName::new(true, Text::from("news feed"));
        let join = JoinPoint {
            epoch: 7,
            seq: 3,
            serial: 99,
        };
        let field = room_field(&room);
        assert_eq!(&field[..], b"c:news feed");
        let joined = format!("J {} {}", join_point_text(join), "c:news feed");
        assert_eq!(
            parse_notice(joined.as_bytes()),
            Some(Notice::Joined {
                room: room.clone(),
                join
            })
        );
        assert_eq!(
            parse_notice(b"L 7:3:99 b 1 c:news feed"),
            Some(Notice::Left {
                room,
                join,
                reason: LeftReason::Blocked,
                blocked: true
            })
        );
        assert_eq!(parse_notice(b"K"), Some(Notice::Kick));
        for bad in [
            &b""[..],
            b"J 7:3 r:x",
            b"J 7:3:1 x:y",
            b"L 7:3:1 q 0 r:x",
            b"J 7:3:1 r:",
            b"Z",
        ] {
            assert_eq!(parse_notice(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_users_rooms_parse_and_a_cap_is_reported() {
        let bulk = |s: &str| Value::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())));
        let arr = |v: Vec<Value>| Value::Array(Some(v));
        let ok = arr(vec![
            bulk("ok"),
            arr(vec![
                bulk("r:club"),
                bulk("7:3:99"),
                bulk("x:skipped"),
                bulk("1:1:1"),
            ]),
            arr(vec![bulk("c:news")]),
        ]);
        let rooms = parse_user_rooms(&ok).unwrap();
        assert_eq!(
            rooms.rooms,
            vec![(
                RoomName::new(false, Text::from("club")),
                JoinPoint {
                    epoch: 7,
                    seq: 3,
                    serial: 99
                }
            )]
        );
        assert_eq!(rooms.blocks, vec![RoomName::new(true, Text::from("news"))]);
        let full = arr(vec![bulk("full"), Value::Int(5000)]);
        assert_eq!(parse_user_rooms(&full), Err(Some(5000)));
        assert_eq!(parse_members(&full), Err(Some(5000)));
        assert_eq!(parse_user_rooms(&bulk("OK")), Err(None));
        let members = arr(vec![bulk("ok"), arr(vec![bulk("ann"), bulk("bob")])]);
        assert_eq!(
            parse_members(&members),
            Ok(vec![Text::from("ann"), Text::from("bob")])
        );
    }

    #[test]
    fn user_keys_share_the_users_hash_tag() {
        let ann = Text::from("ann");
        assert_eq!(&user_key(&ann, "r")[..], b"pabal:{u:ann}:r");
        assert_eq!(&notice_channel(&ann)[..], b"pabal:{u:ann}:n");
    }
}
