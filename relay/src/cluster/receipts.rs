//! Receipts' markers in the engine: every member's delivered and read markers of a room,
//! and what the offline hand-off handed off, kept on the room's slot so that every node
//! sees one set of markers (PROTOCOL.md §12 across nodes).
//!
//! # Keys (next to the room's meta hash and member hash, `{r:name}`)
//! - `pabal:{r:name}:k`: the markers, user → `epoch:delivered:read`; only members (the
//!   script checks the member hash `:u`), only forward, never past the room's head in Redis;
//!   a part of another epoch counts as 0;
//! - `pabal:{r:name}:d`: the offline hand-off's index, a sorted set, user → the sequence
//!   up to which nothing is owed to the member (`max(join point, delivered, handed off)`
//!   in the room's epoch); the meta hash's field `d` names the epoch it was built for;
//! - `pabal:{r:name}:h`: what the scripts before the index kept (user → `epoch:seq`
//!   handed off); read once by the index's build, then deleted.
//!
//! Both `:k` and `:d` lose a member's field when the member leaves (`ROOM_LEAVE` in
//! [`super::membership`]), so they hold at most one field per member.
//!
//! # How a marker travels
//! Each node's owner coalesces its phones' ACKs and READs per loop tick (as on one relay)
//! and sends one [`MARKERS`] call per room per tick with the latest marker of each member
//! that moved. The script moves the markers with `max()`, and publishes the ones that moved
//! on the room's channel as `R <epoch> (<delivered> <read> <user length> <user>)*` (a room
//! message starts with its epoch's digits, so the two never mix), which reaches every node
//! whose phones bind the room; their owners send RECEIPT frames as usual.
//!
//! # Offline hand-off
//! The node whose owner published a message (its script answered the sequence) is the one
//! that decides its hand-off: when its window is due, [`HANDOFF`] reads the members the
//! index holds below the window's last message (a page at a time), hands off what each is
//! owed and moves it in the index, in one script, so two nodes never hand off the same
//! message, a member who acked on any node is never handed off, and a window costs the
//! members behind it, not the room's size.
//!
//! Owns: these keys, their scripts, the markers' channel format. Must not touch: the
//! room's stream or member hash (read only), the meta hash but for its field `d`.

use std::collections::HashMap;

use pabal_codec::Text;

use super::resp::Value;
use super::script::Script;
use crate::core::Marker;
use crate::directory::JoinPoint;
use crate::handoff::detect::Noted;
use crate::ids::RoomName;
use crate::mesh::{RoomReceipts, RoomUnread};

/// A room's receipts are read for at most this many members (more: refused, 413).
pub const MAX_RECEIPTS_MEMBERS: usize = 100_000;

/// Markers update: KEYS meta, members, markers, hand-off index; ARGV epoch, channel,
/// publish command, then `user, delivered, read` per member. Returns how many moved
/// (published on the channel). A delivered marker that moved moves the member's place in
/// the hand-off index (once the index of this epoch is built or being built: its build
/// reads the markers).
pub static MARKERS: Script = Script::new(
    "MARKERS",
    r"
local e = redis.call('HGET', KEYS[1], 'e')
if e ~= ARGV[1] then return 0 end
local head = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local indexed = redis.call('HGET', KEYS[1], 'd') == e or redis.call('HGET', KEYS[1], 'b') == e
local out = {}
for i = 4, #ARGV, 3 do
  local u = ARGV[i]
  if redis.call('HEXISTS', KEYS[2], u) == 1 then
    local d, r = 0, 0
    local cur = redis.call('HGET', KEYS[3], u)
    if cur then
      local ce, cd, cr = string.match(cur, '^(%d+):(%d+):(%d+)$')
      if ce == e then d = tonumber(cd); r = tonumber(cr) end
    end
    local nr = math.max(r, math.min(tonumber(ARGV[i + 2]) or 0, head))
    local nd = math.max(d, math.min(tonumber(ARGV[i + 1]) or 0, head), nr)
    if nd ~= d or nr ~= r then
      redis.call('HSET', KEYS[3], u, e .. ':' .. nd .. ':' .. nr)
      if indexed and nd ~= d then redis.call('ZADD', KEYS[4], 'GT', nd, u) end
      out[#out + 1] = nd .. ' ' .. nr .. ' ' .. string.len(u) .. ' ' .. u
    end
  end
end
if #out > 0 then
  redis.call(ARGV[3], ARGV[2], 'R ' .. e .. ' ' .. table.concat(out, ' '))
end
return #out
",
);

/// A room's markers for a node opening the room (or resubscribing its channel): KEYS meta,
/// markers; ARGV max. Returns `{epoch, [user, marker, ...]}`, `{epoch}` past the cap (the
/// node learns markers as they move), `{''}` for a room the engine does not hold.
pub static LOAD_MARKERS: Script = Script::new(
    "LOAD_MARKERS",
    r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then return {''} end
if redis.call('HLEN', KEYS[2]) > tonumber(ARGV[1]) then return {e} end
return {e, redis.call('HGETALL', KEYS[2])}
",
);

/// A room's receipts: KEYS meta, members, markers; ARGV max members. Returns
/// `{epoch, head, [user, join point, ...], [user, marker, ...]}`, `{''}` for a room the
/// engine does not hold, `{'full', count}` past the cap.
pub static READ_RECEIPTS: Script = Script::new(
    "READ_RECEIPTS",
    r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then return {''} end
local n = redis.call('HLEN', KEYS[2])
if n > tonumber(ARGV[1]) then return {'full', n} end
local s = redis.call('HGET', KEYS[1], 's') or '0'
return {e, s, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
",
);

/// One room of a user's unread counts: KEYS meta, markers; ARGV user. Returns
/// `{epoch, head, marker or ''}`, or `{''}` for a room the engine does not hold.
pub static ROOM_UNREAD: Script = Script::new(
    "ROOM_UNREAD",
    r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then return {''} end
local s = redis.call('HGET', KEYS[1], 's') or '0'
return {e, s, redis.call('HGET', KEYS[2], ARGV[1]) or ''}
",
);

/// A user's rooms: KEYS the user's rooms hash; ARGV max. Returns `{'ok', [field, join
/// point, ...]}` or `{'full', count}`.
pub static USER_ROOMS: Script = Script::new(
    "USER_ROOMS",
    r"
local n = redis.call('HLEN', KEYS[1])
if n > tonumber(ARGV[1]) then return {'full', n} end
return {'ok', redis.call('HGETALL', KEYS[1])}
",
);

/// Members a [`HANDOFF`] call reads from the index at most (one page; a window with more
/// members behind is decided in several calls, each moving its page's marks).
pub const HANDOFF_PAGE: usize = 1_000;

/// A hand-off window is due: KEYS meta, members, markers, old hand-off marks (`:h`, read
/// once, by the index's build), hand-off index; ARGV epoch, the window's last sequence,
/// its publisher, the last sequence by someone else (0: none), page size.
///
/// The index holds every member at the sequence up to which nothing is owed to it
/// (`max(join point, delivered, handed off)` in this epoch), so the members behind the
/// window's last message are a range of it: at most a page of them is read, and each
/// owed one (for the publisher: up to the last message by someone else) is moved to the
/// window's end in the same step. A room whose index of this epoch does not exist yet (a
/// room from before the index, or one whose epoch changed) has it built first, once, from
/// the member hash, the markers and the old marks (which then go), a page at a time: each
/// call reads about a page of members (`HSCAN` with `COUNT` page, a hint Redis may
/// exceed by a few) and keeps its cursor in the meta hash (`b` the epoch being built,
/// `bc` the cursor), answering `{read, 1, {}}` until the scan is through; meanwhile joins
/// and markers write the index as they do once it is built (`d`).
///
/// Returns `{read, more, [user, first, last, ...]}`: `read` how many members the call
/// read (the build's included), `more` 1 when the page was full (the engine calls again
/// for the next one: those moved are no longer behind).
pub static HANDOFF: Script = Script::new(
    "HANDOFF",
    r"
local e = redis.call('HGET', KEYS[1], 'e')
if e ~= ARGV[1] then return {0, 0, {}} end
local read = 0
local page = tonumber(ARGV[5])
if redis.call('HGET', KEYS[1], 'd') ~= e then
  local cursor = '0'
  if redis.call('HGET', KEYS[1], 'b') == e then
    cursor = redis.call('HGET', KEYS[1], 'bc') or '0'
  else
    redis.call('DEL', KEYS[5])
    redis.call('HSET', KEYS[1], 'b', e)
  end
  local scan = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', page)
  local m = scan[2]
  for i = 1, #m, 2 do
    local u = m[i]
    local done = 0
    local je, js = string.match(m[i + 1], '^(%d+):(%d+):')
    if je == e then done = tonumber(js) end
    local k = redis.call('HGET', KEYS[3], u)
    if k then
      local ke, kd = string.match(k, '^(%d+):(%d+):')
      if ke == e then done = math.max(done, tonumber(kd)) end
    end
    local h = redis.call('HGET', KEYS[4], u)
    if h then
      local he, hs = string.match(h, '^(%d+):(%d+)$')
      if he == e then done = math.max(done, tonumber(hs)) end
    end
    redis.call('ZADD', KEYS[5], done, u)
  end
  read = #m / 2
  if scan[1] ~= '0' then
    redis.call('HSET', KEYS[1], 'bc', scan[1])
    return {read, 1, {}}
  end
  redis.call('DEL', KEYS[4])
  redis.call('HDEL', KEYS[1], 'b', 'bc')
  redis.call('HSET', KEYS[1], 'd', e)
end
local last = tonumber(ARGV[2])
local behind = redis.call('ZRANGE', KEYS[5], '-inf', '(' .. last, 'BYSCORE', 'LIMIT', 0, page,
  'WITHSCORES')
read = read + #behind / 2
local out = {}
for i = 1, #behind, 2 do
  local u = behind[i]
  local done = tonumber(behind[i + 1])
  local upto = last
  if u == ARGV[3] then upto = tonumber(ARGV[4]) end
  if done < upto then
    redis.call('ZADD', KEYS[5], upto, u)
    out[#out + 1] = u
    out[#out + 1] = done + 1
    out[#out + 1] = upto
  end
end
local more = 0
if #behind / 2 >= page and #out > 0 then more = 1 end
return {read, more, out}
",
);

/// A due hand-off window sent to the engine for its decision.
#[derive(Debug, Clone)]
pub struct HandoffCheck {
    /// The room.
    pub room: RoomName,
    /// The window's epoch.
    pub epoch: u64,
    /// Its last message.
    pub last: Noted,
    /// Its last message by someone other than `last.publisher`.
    pub other: Option<Noted>,
}

impl HandoffCheck {
    /// The message a hand-off ending at `last_seq` names (the window's last, or the last
    /// by someone else).
    pub fn ending_at(&self, last_seq: u64) -> &Noted {
        match &self.other {
            Some(o) if o.seq == last_seq => o,
            _ => &self.last,
        }
    }
}

fn num(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// An integer or a decimal bulk string.
fn value_num(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => num(other.bytes()?),
    }
}

/// Parses a stored marker `epoch:delivered:read` if it is of `epoch` (another epoch's is
/// none).
fn parse_marker(text: &[u8], epoch: u64) -> Option<Marker> {
    let mut parts = text.splitn(3, |&b| b == b':').map(num);
    let e = parts.next()??;
    let delivered = parts.next()??;
    let read = parts.next()??;
    (e == epoch).then_some(Marker { delivered, read })
}

/// Parses a markers message from a room's channel: `(epoch, [(user, marker)])`; `None`
/// when `body` is not one (a room message, or malformed).
pub fn parse_markers_message(body: &[u8]) -> Option<(u64, Vec<(Text, Marker)>)> {
    let rest = body.strip_prefix(b"R ")?;
    let mut fields = rest.splitn(2, |&b| b == b' ');
    let epoch = num(fields.next()?)?;
    let mut rest = fields.next().unwrap_or_default();
    let mut out = Vec::new();
    while !rest.is_empty() {
        let mut nums = [0u64; 3];
        for n in &mut nums {
            let end = rest.iter().position(|&b| b == b' ')?;
            *n = num(&rest[..end])?;
            rest = &rest[end + 1..];
        }
        let [delivered, read, len] = nums;
        let len = usize::try_from(len).ok()?;
        let user = std::str::from_utf8(rest.get(..len)?).ok()?;
        out.push((Text::from(user), Marker { delivered, read }));
        rest = rest.get(len..)?;
        rest = rest.strip_prefix(b" ").unwrap_or(rest);
    }
    Some((epoch, out))
}

/// Parses [`LOAD_MARKERS`]' answer: `(epoch, markers of that epoch)`; `None` for a room
/// the engine does not hold, or a malformed answer.
pub fn parse_loaded_markers(reply: &Value) -> Option<(u64, Vec<(Text, Marker)>)> {
    let a = reply.array()?;
    let epoch = value_num(a.first()?)?;
    let markers = match a.get(1) {
        None => Vec::new(),
        Some(pairs) => pairs
            .array()?
            .chunks_exact(2)
            .filter_map(|p| {
                let user = Text::from_utf8(p[0].bytes()?.clone()).ok()?;
                Some((user, parse_marker(p[1].bytes()?, epoch)?))
            })
            .collect(),
    };
    Some((epoch, markers))
}

/// What one [`HANDOFF`] call decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffPage {
    /// Members the call read (about a page more while it builds the room's index).
    pub read: u64,
    /// The page was full, or the index's build is not through: more members may be
    /// behind (the engine calls again).
    pub more: bool,
    /// `(user, first, last)` per member owed.
    pub owed: Vec<(Text, u64, u64)>,
}

/// Parses [`HANDOFF`]'s answer.
pub fn parse_handoff(reply: &Value) -> Option<HandoffPage> {
    let a = reply.array()?;
    let owed = a
        .get(2)?
        .array()?
        .chunks_exact(3)
        .map(|c| {
            let user = Text::from_utf8(c[0].bytes()?.clone()).ok()?;
            Some((user, value_num(&c[1])?, value_num(&c[2])?))
        })
        .collect::<Option<_>>()?;
    Some(HandoffPage {
        read: value_num(a.first()?)?,
        more: value_num(a.get(1)?)? == 1,
        owed,
    })
}

/// What [`READ_RECEIPTS`] answered.
#[derive(Debug)]
pub enum ReceiptsAnswer {
    /// The room's markers.
    Room(RoomReceipts),
    /// The engine does not hold the room.
    NoRoom,
    /// More members than asked for.
    Full(u64),
}

/// Parses [`READ_RECEIPTS`]' answer (members sorted by user id, join points of another
/// epoch counting as 0, as on one relay).
pub fn parse_receipts(reply: &Value) -> Option<ReceiptsAnswer> {
    let a = reply.array()?;
    match a.first()?.bytes().map(|b| &b[..]) {
        Some(b"") => return Some(ReceiptsAnswer::NoRoom),
        Some(b"full") => return Some(ReceiptsAnswer::Full(value_num(a.get(1)?)?)),
        _ => {}
    }
    let epoch = value_num(a.first()?)?;
    let head = value_num(a.get(1)?)?;
    // By user, so that a room of many members is one pass over each list, not one pass
    // over the markers per member.
    let markers: HashMap<&[u8], &Value> = a
        .get(3)?
        .array()?
        .chunks_exact(2)
        .filter_map(|m| Some((&m[0].bytes()?[..], &m[1])))
        .collect();
    let mut members = Vec::new();
    for pair in a.get(2)?.array()?.chunks_exact(2) {
        let user = pair[0].bytes()?;
        let join = super::membership::parse_join_point(pair[1].bytes()?)?;
        let joined_at = if join.epoch == epoch { join.seq } else { 0 };
        let marker = markers
            .get(&user[..])
            .and_then(|m| parse_marker(m.bytes()?, epoch))
            .unwrap_or_default();
        members.push((
            Text::from_utf8(user.clone()).ok()?,
            joined_at.min(head),
            marker,
        ));
    }
    members.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    Some(ReceiptsAnswer::Room(RoomReceipts {
        head,
        epoch,
        members,
    }))
}

/// Parses [`ROOM_UNREAD`]'s answer for `user`'s membership `join` of `room`; `Some(None)`
/// for a room the engine does not hold.
pub fn parse_room_unread(
    reply: &Value,
    room: RoomName,
    join: JoinPoint,
) -> Option<Option<RoomUnread>> {
    let a = reply.array()?;
    if a.first()?.bytes().is_some_and(|b| b.is_empty()) {
        return Some(None);
    }
    let epoch = value_num(a.first()?)?;
    let head = value_num(a.get(1)?)?;
    let marker = parse_marker(a.get(2)?.bytes()?, epoch).unwrap_or_default();
    let joined_at = if join.epoch == epoch { join.seq } else { 0 }.min(head);
    let unread = head - marker.read.max(joined_at).min(head);
    Some(Some(RoomUnread {
        room,
        head,
        joined_at,
        marker,
        unread,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn markers_messages_parse_and_room_messages_do_not() {
        let (epoch, markers) = parse_markers_message(b"R 77 5 3 3 bob 9 9 7 ann lee").unwrap();
        assert_eq!(epoch, 77);
        assert_eq!(
            markers,
            vec![
                (
                    Text::from("bob"),
                    Marker {
                        delivered: 5,
                        read: 3
                    }
                ),
                (
                    Text::from("ann lee"),
                    Marker {
                        delivered: 9,
                        read: 9
                    }
                ),
            ]
        );
        for bad in [
            &b"77 5 1000 n1/0/42 3 bobhello"[..],
            b"R x 1 1 1 a",
            b"R 7 1 1 9 bob",
            b"R 7 1 1",
        ] {
            assert!(parse_markers_message(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn receipts_and_unread_answers_parse_with_other_epochs_as_zero() {
        let bulk = |s: &str| Value::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())));
        let arr = |v: Vec<Value>| Value::Array(Some(v));
        let reply = arr(vec![
            bulk("7"),
            bulk("10"),
            arr(vec![bulk("bob"), bulk("7:4:1"), bulk("ann"), bulk("6:9:1")]),
            arr(vec![bulk("bob"), bulk("7:8:6"), bulk("ann"), bulk("6:9:9")]),
        ]);
        let Some(ReceiptsAnswer::Room(r)) = parse_receipts(&reply) else {
            panic!("not a room");
        };
        assert_eq!((r.epoch, r.head), (7, 10));
        assert_eq!(
            r.members,
            vec![
                (Text::from("ann"), 0, Marker::default()),
                (
                    Text::from("bob"),
                    4,
                    Marker {
                        delivered: 8,
                        read: 6
                    }
                ),
            ]
        );
        assert!(matches!(
            parse_receipts(&arr(vec![bulk("")])),
            Some(ReceiptsAnswer::NoRoom)
        ));
        assert!(matches!(
            parse_receipts(&arr(vec![bulk("full"), Value::Int(9)])),
            Some(ReceiptsAnswer::Full(9))
        ));
        let room = RoomName::new(false, Text::from("r"));
        let join = JoinPoint {
            epoch: 7,
            seq: 4,
            serial: 1,
        };
        let u = parse_room_unread(
            &arr(vec![bulk("7"), bulk("10"), bulk("")]),
            room.clone(),
            join,
        )
        .unwrap()
        .unwrap();
        assert_eq!((u.head, u.joined_at, u.unread), (10, 4, 6));
        let u = parse_room_unread(
            &arr(vec![bulk("7"), bulk("10"), bulk("7:9:8")]),
            room.clone(),
            join,
        )
        .unwrap()
        .unwrap();
        assert_eq!(u.unread, 2);
        assert!(
            parse_room_unread(&arr(vec![bulk("")]), room, join)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_large_rooms_receipts_pair_each_member_with_their_own_marker() {
        // Markers listed in another order than the members, some members without one.
        let bulk = |s: String| Value::Bulk(Some(Bytes::from(s)));
        let n = 20_000;
        let mut members = Vec::new();
        let mut markers = Vec::new();
        for i in 0..n {
            members.extend([bulk(format!("u{i:05}")), bulk("7:0:1".into())]);
        }
        for i in (0..n).rev().filter(|i| i % 3 != 0) {
            markers.extend([bulk(format!("u{i:05}")), bulk(format!("7:{}:{}", i + 1, i))]);
        }
        let reply = Value::Array(Some(vec![
            bulk("7".into()),
            bulk(n.to_string()),
            Value::Array(Some(members)),
            Value::Array(Some(markers)),
        ]));
        let Some(ReceiptsAnswer::Room(r)) = parse_receipts(&reply) else {
            panic!("not a room");
        };
        assert_eq!(r.members.len(), n);
        for (i, (user, _, marker)) in r.members.iter().enumerate() {
            assert_eq!(user.as_str(), format!("u{i:05}"));
            let want = if i % 3 == 0 {
                Marker::default()
            } else {
                Marker {
                    delivered: i as u64 + 1,
                    read: i as u64,
                }
            };
            assert_eq!(*marker, want, "{user}");
        }
    }

    #[test]
    fn loaded_markers_parse_and_skip_other_epochs() {
        let bulk = |s: &str| Value::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())));
        let reply = Value::Array(Some(vec![
            bulk("7"),
            Value::Array(Some(vec![
                bulk("bob"),
                bulk("7:4:2"),
                bulk("ann"),
                bulk("6:9:9"),
            ])),
        ]));
        let (epoch, markers) = parse_loaded_markers(&reply).unwrap();
        assert_eq!(epoch, 7);
        assert_eq!(
            markers,
            vec![(
                Text::from("bob"),
                Marker {
                    delivered: 4,
                    read: 2
                }
            )]
        );
        let capped = Value::Array(Some(vec![bulk("7")]));
        assert_eq!(parse_loaded_markers(&capped), Some((7, Vec::new())));
        assert_eq!(
            parse_loaded_markers(&Value::Array(Some(vec![bulk("")]))),
            None
        );
    }

    #[test]
    fn a_handoff_page_parses() {
        let arr = |v: Vec<Value>| Value::Array(Some(v));
        let reply = arr(vec![
            Value::Int(4),
            Value::Int(1),
            arr(vec![
                Value::Bulk(Some(Bytes::from_static(b"cy"))),
                Value::Int(3),
                Value::Int(5),
            ]),
        ]);
        assert_eq!(
            parse_handoff(&reply),
            Some(HandoffPage {
                read: 4,
                more: true,
                owed: vec![(Text::from("cy"), 3, 5)],
            })
        );
        let empty = arr(vec![Value::Int(0), Value::Int(0), arr(vec![])]);
        assert_eq!(parse_handoff(&empty).map(|p| p.owed.len()), Some(0));
        assert_eq!(parse_handoff(&arr(vec![Value::Int(0)])), None);
    }
}
