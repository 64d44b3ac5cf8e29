//! What the cluster keeps in Redis and the scripts that change it.
//!
//! Keys of a room (all share the hash tag `{r:<name>}`, or `{c:<name>}` for a channel, so a
//! Redis Cluster keeps a room on one shard and runs its script there):
//! - `pabal:{r:name}:m`: the meta hash: `e` the epoch (set once), `s` the last sequence,
//!   `j` the last membership serial ([`super::membership::ROOM_JOIN`]);
//! - `pabal:{r:name}:s`: the stream, one entry per message with id `<seq>-0` (and per
//!   removal placed after message `<seq>`, id `<seq>-<n>`, see
//!   [`super::membership::ROOM_LEAVE`]) and either one
//!   field `m`, the channel message's tail `<ts> <tag> <sender length> <sender><payload>`
//!   ([`PUBLISH`], `cluster.stream_entry = "packed"`), or four, `t` (ms since the Unix
//!   epoch), `g` (the publishing node's tag), `u` (sender), `p` (payload)
//!   ([`PUBLISH_FIELDS`], as versions before `packed` wrote them); [`parse_entry`] reads
//!   both. Trimmed back to about `cluster.stream_max_len` entries (`XTRIM MAXLEN ~`) once
//!   every [`TRIM_EVERY`] sequences, so it holds at most that many more;
//! - `pabal:{r:name}:i`: the window of repeat keys (v2 publish ids `d<publisher>:<msg_id>`,
//!   API `k<Idempotency-Key>`), a sorted set scored by the key's sequence negated (newest
//!   first; by the sequence itself with `cluster.window_order = "ascending"` or
//!   `stream_entry = "fields"`, as versions before it wrote it) holding the keys of at least the room's last `window` sequences:
//!   trimmed back to those once every [`TRIM_EVERY`] sequences (by score, whatever the
//!   sign), so it holds keys of at most `window + TRIM_EVERY` (a trim per publish cost a
//!   call per publish);
//! - `pabal:{r:name}:x`: the room's last removals, as their channel messages
//!   ([`super::membership::ROOM_LEAVE`], read by [`OPEN`]);
//! - `pabal:{r:name}:c`: the pub/sub channel; a message on it is
//!   `<epoch> <seq> <ts> <tag> <sender length> <sender><payload>` (from either script).
//!
//! Every key a script touches is one of its `KEYS` (Redis Cluster routes by them, ACL key
//! patterns check them); a channel it publishes on is an argument. The engine sends a
//! script as `EVALSHA` and its text only after a `NOSCRIPT` ([`Script`]).
//!
//! Owns: key names, the scripts, the channel message format. Must not touch: connections.

use std::sync::{LazyLock, OnceLock};

use bytes::{Bytes, BytesMut};
use pabal_codec::Text;

use super::config::{StreamEntry, WindowOrder};
use super::resp::Value;
use super::{EngineMessage, RemovalMark};
use crate::ids::RoomName;

/// The start of both scripts: `e` is the room's epoch, created from ARGV[1] (the caller's
/// hint) if the engine does not hold the room.
macro_rules! epoch_prelude {
    () => {
        r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e)
end
"
    };
}

/// The publish scripts' next sequence: `n` (a number) and `s` (its string), past the
/// owner's head when ARGV[`$epoch`] names the room's epoch and ARGV[`$head`] a head at or
/// past it (see [`PUBLISH`]); `first`: Redis holds no sequence of the room's epoch (the
/// room's first message, or the first after every one of its epoch was lost), whose
/// publish empties what an earlier epoch left (the raise does not change that).
macro_rules! next_sequence {
    ($epoch:literal, $head:literal) => {
        concat!(
            r"
local n = redis.call('HINCRBY', KEYS[1], 's', '1')
local first = n == 1
local s = string.format('%d', n)
if ARGV[",
            $epoch,
            r"] == e then
  local h = ARGV[",
            $head,
            r"]
  if h and (#s < #h or (#s == #h and s <= h)) then
    n = tonumber(h) + 1
    s = string.format('%d', n)
    redis.call('HSET', KEYS[1], 's', s)
  end
end"
        )
    };
}

/// The body of the `if` that empties what an earlier epoch left in a room holding no
/// sequence of its own (KEYS[2] the stream, KEYS[3] the window), closing it: the window
/// whole, the stream if it holds a message (a removal of this epoch before its first
/// message, `0-n`, is kept). Run by the epoch's first publish, or by the raise past it.
macro_rules! empty_earlier_epoch {
    () => {
        r"
  redis.call('DEL', KEYS[3])
  if #redis.call('XRANGE', KEYS[2], '1-0', '+', 'COUNT', 1) > 0 then redis.call('DEL', KEYS[2]) end
end"
    };
}

/// `text` with its one `from` made `to`; panics unless `from` occurs exactly once (a
/// script that changed shape under a derived form).
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "the script changed shape");
    text.replace(from, to)
}

/// The stream is trimmed back to its size (`XTRIM MAXLEN ~`), and the window of repeat keys
/// back to the keys of its last `window` sequences, when the room's sequence is a multiple
/// of this (any publish, with a repeat key or not): the window never holds keys of more
/// than `window + TRIM_EVERY` sequences and never drops one of the last `window`, and the
/// stream never holds more than `TRIM_EVERY` entries past what `XTRIM MAXLEN ~` keeps (a
/// `MAXLEN ~` on every `XADD` cost Redis 3.5% more instructions per call). A raise (Redis
/// lost writes: [`RAISE`], or a publish past its owner's head) can jump over one multiple:
/// until the next, twice that many publishes' keys and entries.
pub const TRIM_EVERY: u64 = 64;

/// Sequence one message: KEYS meta, stream, repeat window; ARGV epoch hint, the message's
/// tail (`<ts> <tag> <sender length> <sender><payload>`, [`message_tail`]), channel,
/// repeat key (empty: none), window (sequences), the history's expiry (ms; empty or
/// absent: left as it is, see `core/cluster/history_expiry.rs`), and the publishing
/// owner's epoch and head (empty or absent: none; see below). The stream's length
/// (`'10000'`) and the publish command (`'PUBLISH'`) are written in the text, which a node
/// sets to its own ([`node_publish_script`]: `cluster.stream_max_len`, and `SPUBLISH`,
/// sharded pub/sub, on a Redis Cluster). Appends the tail
/// as the stream entry's one field `m` and publishes `<epoch> <seq> <tail>`. Answers
/// `"<epoch> <seq>"` (a bulk string), or `{epoch, first seq, 1}` for a repeat key the
/// window holds ([`parse_published`] reads both).
///
/// What each part saves Redis (`relay_cluster -- instructions`, benches/RESULTS.md):
/// - The tail comes joined by the caller, once for both the stream and the channel (against
///   [`PUBLISH_FIELDS`]' four fields, 8.8% fewer instructions per call).
/// - The new sequence is made a string once (`s`), by `string.format('%d')`: a Lua number
///   passed to `redis.call` or joined into a string is formatted by `printf("%.17g")` or
///   `("%.14g")` each time, about 2,000 instructions a number. So the increments are
///   strings too.
/// - The answer of a new publish is one string: a Lua table costs Redis its conversion
///   (the `err`/`ok` field lookups, a deferred length).
/// - A repeat key costs one `ZADD NX` (it adds the key at the new sequence or finds it
///   there; a repeat gives the sequence back, unseen by anyone, and answers the first
///   one), scored by the sequence **negated**: the newest key goes first, where Redis'
///   small sorted sets (a listpack, up to 128 keys) insert it without reading every
///   other score first. [`PUBLISH_ASCENDING`] and [`PUBLISH_FIELDS`] score by the sequence
///   itself, as versions before `cluster.window_order` did; all three read either sign
///   (`math.abs`) and trim by score, so windows written in either order, or both, stay
///   right.
/// - The trims (the window's and the stream's) run once every [`TRIM_EVERY`] sequences.
/// - What a node never changes (the stream's length, the publish command) is in the text,
///   not an argument: an argument costs Redis about 1,200 instructions a call.
/// - The owner's head (below) is compared with the sequence as strings, by length first
///   (both decimal, no leading zeros): `tonumber` on every call cost 800 instructions
///   more. Its two arguments cost about 1,200 instructions each, and a node leaves them
///   out when it holds no head.
///
/// The room's first sequence empties the window: a key there is of an earlier epoch (the
/// meta hash lost, the window kept), and its sequence names another message now. So does
/// it the stream when the stream holds a message: that is of an earlier epoch too (a meta
/// hash evicted or lost while its stream was kept), whose sequences would otherwise refuse
/// every `XADD` of this one for good. (A removal of this epoch before its first message,
/// `0-n`, cannot sit beside it: its `XADD` is refused below an entry past it.)
///
/// With an expiry, the stream and the window expire that long after this publish (the
/// node sends one every so often, not on every publish: `core/cluster/history_expiry.rs`): a room nobody
/// publishes to any more gives back its history's memory, its meta hash and members kept.
///
/// A sequence at or below the owner's head, in the owner's epoch, is one Redis gave out
/// before and lost (a failover to a replica behind, a restart from an AOF synced once a
/// second): every node that delivered the lost message would drop this one as delivered.
/// The publish takes the sequence past the head instead, as [`RAISE`] would, in the same
/// call: nodes read their open rooms again after a failover and raise them, but a publish
/// the new master runs before those reads come back would otherwise be lost this way.
///
/// An `XADD` Redis refuses (an ID at or below the stream's top: a meta hash lost while its
/// stream was kept) takes the sequence and the key back before the error is answered, so a
/// retry is never told a sequence that holds no message.
pub const PUBLISH: &str = concat!(
    epoch_prelude!(),
    next_sequence!("7", "8"),
    r"
if first then",
    empty_earlier_epoch!(),
    r"
if ARGV[4] ~= '' and redis.call('ZADD', KEYS[3], 'NX', '-' .. s, ARGV[4]) == 0 then
  redis.call('HINCRBY', KEYS[1], 's', '-1')
  return {e, math.abs(tonumber(redis.call('ZSCORE', KEYS[3], ARGV[4]))), 1}
end
local added = redis.pcall('XADD', KEYS[2], s .. '-0', 'm', ARGV[2])
if type(added) == 'table' and added.err then
  if ARGV[4] ~= '' then redis.call('ZREM', KEYS[3], ARGV[4]) end
  redis.call('HINCRBY', KEYS[1], 's', '-1')
  return added
end
local head = e .. ' ' .. s
redis.call('PUBLISH', ARGV[3], head .. ' ' .. ARGV[2])
if ARGV[6] and ARGV[6] ~= '' then
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
if n % 64 == 0 then
  redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', '10000')
  local old = n - tonumber(ARGV[5])
  if old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], -old, old) end
end
return head
"
);

/// [`PUBLISH`] writing the stream entry as four fields (`t`, `g`, `u`, `p`), the only form
/// versions before `cluster.stream_entry` read (`stream_entry = "fields"`, for a rolling
/// upgrade from one). KEYS meta, stream, repeat window; ARGV epoch hint, ts, tag, sender,
/// payload, channel, repeat key (empty: none), window (sequences), the sender's length in
/// bytes (decimal), the history's expiry (ms; empty or absent: none), the publishing
/// owner's epoch and head (empty or absent: none); the stream's length and the publish
/// command in the text, as in [`PUBLISH`].
/// Answers as [`PUBLISH`] does, and is otherwise as it is (the sequence a string once,
/// past the owner's head in its epoch,
/// the window and an earlier epoch's stream emptied by the first sequence, the window trimmed
/// by score, the trims every [`TRIM_EVERY`] sequences, a refused `XADD` taken back) but for
/// one thing: it scores the window's keys by the sequence itself, as [`PUBLISH_ASCENDING`]
/// does, since the versions it is for predate `window_order` too.
pub const PUBLISH_FIELDS: &str = concat!(
    epoch_prelude!(),
    next_sequence!("11", "12"),
    r"
if first then",
    empty_earlier_epoch!(),
    r"
if ARGV[7] ~= '' and redis.call('ZADD', KEYS[3], 'NX', s, ARGV[7]) == 0 then
  redis.call('HINCRBY', KEYS[1], 's', '-1')
  return {e, math.abs(tonumber(redis.call('ZSCORE', KEYS[3], ARGV[7]))), 1}
end
local added = redis.pcall('XADD', KEYS[2], s .. '-0',
  't', ARGV[2], 'g', ARGV[3], 'u', ARGV[4], 'p', ARGV[5])
if type(added) == 'table' and added.err then
  if ARGV[7] ~= '' then redis.call('ZREM', KEYS[3], ARGV[7]) end
  redis.call('HINCRBY', KEYS[1], 's', '-1')
  return added
end
local head = e .. ' ' .. s
redis.call('PUBLISH', ARGV[6], head .. ' ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' ..
  ARGV[9] .. ' ' .. ARGV[4] .. ARGV[5])
if ARGV[10] and ARGV[10] ~= '' then
  redis.call('PEXPIRE', KEYS[2], ARGV[10])
  redis.call('PEXPIRE', KEYS[3], ARGV[10])
end
if n % 64 == 0 then
  redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', '10000')
  local old = n - tonumber(ARGV[8])
  if old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], -old, old) end
end
return head
"
);

/// How [`PUBLISH`] scores a repeat key, and how [`PUBLISH_ASCENDING`] does instead.
const NEGATED_SCORE: &str = "'NX', '-' .. s,";
const SEQUENCE_SCORE: &str = "'NX', s,";

/// [`PUBLISH`] scoring the window's keys by the sequence itself, as versions before
/// `cluster.window_order` did and still read: for a rolling upgrade from one
/// (`window_order = "ascending"`). Those versions trim the window by rank, the lowest
/// scores first, so a key scored negated would be the first they drop.
pub static PUBLISH_ASCENDING: LazyLock<String> =
    LazyLock::new(|| replace_once(PUBLISH, NEGATED_SCORE, SEQUENCE_SCORE));

/// What [`PUBLISH`] and its forms write in their text for a node to set.
const STREAM_LENGTH: &str = "'MAXLEN', '~', '10000')";
const PUBLISH_COMMAND: &str = "redis.call('PUBLISH',";

/// The text of publish script `script` ([`publish_script`]) as a node runs it: the
/// stream kept to `stream_max_len` entries, and published with `SPUBLISH` (sharded pub/sub)
/// when `sharded` (a Redis Cluster).
pub fn node_publish_script(script: &str, stream_max_len: u64, sharded: bool) -> String {
    let length = format!("'MAXLEN', '~', '{stream_max_len}')");
    let command = if sharded {
        "redis.call('SPUBLISH',"
    } else {
        PUBLISH_COMMAND
    };
    replace_once(
        &replace_once(script, STREAM_LENGTH, &length),
        PUBLISH_COMMAND,
        command,
    )
}

/// The publish script a node runs: by how it writes stream entries and window keys.
/// [`PUBLISH_FIELDS`] scores ascending whatever `order` says: the versions it is for
/// predate `window_order` too, and validation refuses `fields` with `descending`.
pub fn publish_script(entry: StreamEntry, order: WindowOrder) -> &'static str {
    match (entry, order) {
        (StreamEntry::Packed, WindowOrder::Descending) => PUBLISH,
        (StreamEntry::Packed, WindowOrder::Ascending) => PUBLISH_ASCENDING.as_str(),
        (StreamEntry::Fields, _) => PUBLISH_FIELDS,
    }
}

/// A publish script's answer: `(epoch, seq, repeated)`, from `"<epoch> <seq>"` (a new
/// message) or `{epoch, seq}` / `{epoch, first seq, 1}` (a repeat; and every answer of the
/// versions before the string); `None` for anything else.
pub fn parse_published(reply: &Value) -> Option<(u64, u64, bool)> {
    if let Some(head) = reply.bytes() {
        let ([epoch], at) = fields::<1>(head, 0)?;
        return Some((num(epoch)?, num(head.get(at..)?)?, false));
    }
    let a = reply.array()?;
    let repeated = a.get(2).and_then(Value::int) == Some(1);
    let (epoch, seq) = (a.first()?.int()?, a.get(1)?.int()?);
    Some((
        u64::try_from(epoch).ok()?,
        u64::try_from(seq).ok()?,
        repeated,
    ))
}

/// A room's state: KEYS meta, stream, removals; ARGV epoch hint, tail length. Returns
/// `{epoch, seq, entries of the last <tail> sequences (with the removals after the message
/// before them), the room's last removals}` (see [`super::membership::ROOM_LEAVE`]). The
/// tail ends at the room's sequence: a stream past it is of an earlier epoch (its meta
/// hash lost), emptied by the epoch's first publish.
pub const OPEN: &str = concat!(
    epoch_prelude!(),
    r"
local s = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local from = s - tonumber(ARGV[2])
if from < 0 then from = 0 end
local to = '(' .. string.format('%d', s + 1) .. '-0'
return {e, s, redis.call('XRANGE', KEYS[2], from .. '-1', to), redis.call('ZRANGE', KEYS[3], 0, -1)}
"
);

/// A page of a room's stream for its owner: KEYS stream, removals, meta; ARGV start
/// (`(<seq>-<sub>`, exclusive), count, the start's sequence, the start's sub. Returns
/// `{epoch, entries, removals, seq}`: the room's epoch now (`0`: none) and, last, its
/// sequence (which tells an owner holding more that Redis lost writes: [`RAISE`]), at most
/// `count` entries
/// after the start, and, when the stream's oldest entry is past the start (retention
/// dropped what followed it), the room's last removals placed at or after the start's
/// message (at most `count`, from its set: [`super::membership::ROOM_LEAVE`]) — those the
/// stream no longer holds. The epoch tells a page of the stream the owner holds from one
/// of a stream the engine started again ([`parse_fill`]). The page ends at the room's
/// sequence, as [`OPEN`]'s tail does.
pub const FILL: &str = r"
local meta = redis.call('HMGET', KEYS[3], 'e', 's')
local to = '(' .. string.format('%d', tonumber(meta[2] or '0') + 1) .. '-0'
local page = redis.call('XRANGE', KEYS[1], ARGV[1], to, 'COUNT', ARGV[2])
local gone = {}
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
local trimmed = true
if oldest then
  local s, n = string.match(oldest[1], '^(%d+)-(%d+)$')
  s, n = tonumber(s), tonumber(n)
  local as, an = tonumber(ARGV[3]), tonumber(ARGV[4])
  local past = s > as or (s == as and n > an)
  trimmed = past and not (s == as and n == an + 1)
end
if trimmed then
  gone = redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[3], '+inf', 'LIMIT', 0, ARGV[2])
end
return {meta[1] or '0', page, gone, meta[2] or '0'}
";

/// [`FILL`]'s answer read: the room's epoch (`0`: the engine holds none), its sequence
/// and the page, with the removals the stream no longer held between `after` and the
/// page's first entry merged in their places; `None` if malformed.
pub fn parse_fill(
    reply: &Value,
    prefix: &[u8],
    after: (u64, u64),
) -> Option<(u64, u64, StreamSpan)> {
    let [epoch, page, gone, seq] = reply.array()? else {
        return None;
    };
    let number = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => num(other.bytes()?),
    };
    let (epoch, seq) = (number(epoch)?, number(seq)?);
    let mut span = parse_entries(page, prefix)?;
    let first = span.first_place();
    let mut merged = false;
    for member in gone.array()? {
        let body = Bytes::copy_from_slice(member.bytes()?);
        let (e, mark) = parse_channel_removal(&body)?;
        if e == epoch && mark.place() > after && mark.place() < first {
            span.marks.push(mark);
            merged = true;
        }
    }
    if merged {
        span.marks.sort_by_key(RemovalMark::place);
        span.marks.dedup_by_key(|m| m.place());
    }
    Some((epoch, seq, span))
}

/// A room's sequence moved up to what an owner holds: KEYS meta, stream, repeat window;
/// ARGV epoch, the owner's head. Answers `1` if it did, `0` if the room is in another
/// epoch or its sequence is there already. A room holding no sequence of its epoch is
/// emptied of what an earlier epoch left first, as its first publish would have done
/// ([`PUBLISH`]): past the raise, no publish is its first.
///
/// Redis can lose writes it acknowledged: a failover to a replica that had not received
/// them, a restart from an AOF synced once a second. The room's sequence then goes back
/// below what nodes delivered, in the same epoch, and its next publishes are given those
/// sequences again: every node that delivered the lost messages drops the new ones as
/// already delivered, until the sequence passes the highest it held. An owner that sees
/// the room's sequence below its head ([`FILL`]'s answer, an open's, its own publish
/// answered at or below its head) sends this: the sequences past it then start past what
/// any node delivered, and what was lost is a gap (its messages exist only on the nodes
/// that delivered them).
pub static RAISE: Script = Script::new(
    "RAISE",
    concat!(
        r"
if redis.call('HGET', KEYS[1], 'e') ~= ARGV[1] then return 0 end
local s = redis.call('HGET', KEYS[1], 's') or '0'
if tonumber(s) >= tonumber(ARGV[2]) then return 0 end
if s == '0' then",
        empty_earlier_epoch!(),
        r"
redis.call('HSET', KEYS[1], 's', ARGV[2])
return 1
"
    ),
);

/// The SHA1 (hex) Redis names a script by.
pub fn sha1_hex(script: &str) -> Bytes {
    use sha1::Digest;
    let digest = sha1::Sha1::digest(script.as_bytes());
    let mut out = BytesMut::with_capacity(40);
    for b in digest {
        out.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    out.freeze()
}

/// A script the engine runs by its SHA1 (`EVALSHA`), sending its text (`EVAL`) only when
/// Redis answers `NOSCRIPT` (a new or restarted Redis, a `SCRIPT FLUSH`, a failover to a
/// replica that never ran it): Redis then holds it for every later call, from any
/// connection.
#[derive(Debug)]
pub struct Script {
    /// Its name in logs and tests.
    pub name: &'static str,
    /// Its text.
    pub text: &'static str,
    sha: OnceLock<Bytes>,
}

impl Script {
    /// A script named `name`.
    pub const fn new(name: &'static str, text: &'static str) -> Self {
        Script {
            name,
            text,
            sha: OnceLock::new(),
        }
    }

    /// The SHA1 (hex) Redis names it by, computed once.
    pub fn sha(&self) -> &Bytes {
        self.sha.get_or_init(|| sha1_hex(self.text))
    }
}

/// Every script the engine runs: `(name, text)`.
pub fn all_scripts() -> Vec<(&'static str, &'static str)> {
    use super::{membership as m, presence as p, receipts as r};
    let mut all = vec![
        ("PUBLISH", PUBLISH),
        ("PUBLISH_ASCENDING", PUBLISH_ASCENDING.as_str()),
        ("PUBLISH_FIELDS", PUBLISH_FIELDS),
        ("OPEN", OPEN),
        ("FILL", FILL),
    ];
    all.extend(
        [
            &RAISE,
            &m::ROOM_JOIN,
            &m::ROOM_UNDO,
            &m::ROOM_LEAVE,
            &m::USER_JOIN,
            &m::USER_LEAVE,
            &m::LOAD_USER,
            &m::READ_MEMBERS,
            &r::MARKERS,
            &r::LOAD_MARKERS,
            &r::READ_RECEIPTS,
            &r::ROOM_UNREAD,
            &r::USER_ROOMS,
            &r::HANDOFF,
            &p::CLAIM,
            &p::SET,
            &p::READ,
        ]
        .map(|s| (s.name, s.text)),
    );
    all
}

/// One of a room's keys: `pabal:{r:name}:<suffix>` (`c:` for a channel) into `out`.
pub fn key(out: &mut Vec<u8>, room: &RoomName, suffix: &str) {
    out.clear();
    out.extend_from_slice(b"pabal:{");
    out.extend_from_slice(if room.channel { b"c:" } else { b"r:" });
    out.extend_from_slice(room.name.as_bytes());
    out.extend_from_slice(b"}:");
    out.extend_from_slice(suffix.as_bytes());
}

/// A repeat key as the window holds it: `d<publisher>:<msg_id>` or `k<Idempotency-Key>`
/// (empty: none).
pub fn repeat_key(out: &mut Vec<u8>, key: Option<&super::RepeatKey>) {
    out.clear();
    let mut digits = [0; 20];
    match key {
        None => {}
        Some(super::RepeatKey::Device { publisher, msg_id }) => {
            out.push(b'd');
            out.extend_from_slice(super::resp::decimal(*publisher, &mut digits));
            out.push(b':');
            out.extend_from_slice(super::resp::decimal(*msg_id, &mut digits));
        }
        Some(super::RepeatKey::Api(key)) => {
            out.push(b'k');
            out.extend_from_slice(key.as_bytes());
        }
    }
}

/// A publisher's tag: `node/worker/ticket`.
pub fn tag(out: &mut Vec<u8>, node: &str, worker: usize, ticket: u64) {
    out.clear();
    out.extend_from_slice(node.as_bytes());
    let mut digits = [0; 20];
    out.push(b'/');
    out.extend_from_slice(super::resp::decimal(worker as u64, &mut digits));
    out.push(b'/');
    out.extend_from_slice(super::resp::decimal(ticket, &mut digits));
}

/// The ticket in `tag` if it is this node's worker's (`prefix` = `node/worker/`).
fn own_ticket(tag: &[u8], prefix: &[u8]) -> Option<u64> {
    std::str::from_utf8(tag.strip_prefix(prefix)?)
        .ok()?
        .parse()
        .ok()
}

fn num(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Appends a message's tail, `<ts> <tag> <sender length> <sender><payload>`, to `out`
/// (cleared first): the stream entry [`PUBLISH`] writes and the channel message after its
/// `<epoch> <seq> `.
pub fn message_tail(out: &mut Vec<u8>, ts_ms: u64, tag: &[u8], sender: &[u8], payload: &[u8]) {
    message_head(out, ts_ms, tag, sender);
    out.extend_from_slice(payload);
}

/// [`message_tail`] up to the payload: `<ts> <tag> <sender length> <sender>` (the engine
/// sends the payload after it as the same argument, not copied here first).
pub fn message_head(out: &mut Vec<u8>, ts_ms: u64, tag: &[u8], sender: &[u8]) {
    let mut digits = [0; 20];
    out.clear();
    out.extend_from_slice(super::resp::decimal(ts_ms, &mut digits));
    out.push(b' ');
    out.extend_from_slice(tag);
    out.push(b' ');
    out.extend_from_slice(super::resp::decimal(sender.len() as u64, &mut digits));
    out.push(b' ');
    out.extend_from_slice(sender);
}

/// The next `N` space-ended fields of `body` from `at`, and where the rest starts.
fn fields<const N: usize>(body: &[u8], mut at: usize) -> Option<([&[u8]; N], usize)> {
    let mut fields = [&b""[..]; N];
    for field in &mut fields {
        let end = at + body.get(at..)?.iter().position(|&b| b == b' ')?;
        *field = &body[at..end];
        at = end + 1;
    }
    Some((fields, at))
}

/// Parses a message's tail (`<ts> <tag> <sender length> <sender><payload>`) starting at
/// `at` of `body`, as the message of sequence `seq`.
fn parse_tail(body: &Bytes, at: usize, seq: u64, prefix: &[u8]) -> Option<EngineMessage> {
    let ([ts, tag, sender_len], at) = fields::<3>(body, at)?;
    let sender_end = at.checked_add(num(sender_len)? as usize)?;
    let sender = Text::from_utf8(
        body.get(at..sender_end)
            .map(|_| body.slice(at..sender_end))?,
    )
    .ok()?;
    Some(EngineMessage {
        seq,
        ts_ms: num(ts)?,
        ticket: own_ticket(tag, prefix),
        sender,
        payload: body.slice(sender_end..),
    })
}

/// Parses a channel message: `(epoch, message)`, or `None` when it is not one.
pub fn parse_channel_message(body: &Bytes, prefix: &[u8]) -> Option<(u64, EngineMessage)> {
    let ([epoch, seq], at) = fields::<2>(body, 0)?;
    Some((num(epoch)?, parse_tail(body, at, num(seq)?, prefix)?))
}

/// One `XRANGE` entry: a message, or a removal placed between two ([`RemovalMark`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A message.
    Message(EngineMessage),
    /// A removal.
    Removal(RemovalMark),
}

/// Parses one `XRANGE` entry: `[id, [field, value, ...]]`: a message (id `<seq>-0`),
/// packed (`m`, the message's tail) or in fields (`t`, `g`, `u`, `p`), or a removal (id
/// `<seq>-<sub>`, `sub` ≥ 1, field `l`: `<join point> <reason> <user>`, see
/// [`super::membership::ROOM_LEAVE`]).
pub fn parse_entry(entry: &Value, prefix: &[u8]) -> Option<Entry> {
    let [id, fields] = entry.array()? else {
        return None;
    };
    let id = id.bytes()?;
    let (seq, sub) = parse_id(id)?;
    let fields = fields.array()?;
    if sub > 0 {
        let [name, body] = fields else {
            return None;
        };
        if &name.bytes()?[..] != b"l" {
            return None;
        }
        let (join, reason, user) = parse_removal_body(body.bytes()?, 0)?;
        return Some(Entry::Removal(RemovalMark {
            seq,
            sub,
            user,
            join,
            reason,
        }));
    }
    let (mut ts, mut tag, mut sender, mut payload) = (None, None, None, None);
    for pair in fields.chunks_exact(2) {
        let value = pair[1].bytes()?;
        match &pair[0].bytes()?[..] {
            b"m" => return parse_tail(value, 0, seq, prefix).map(Entry::Message),
            b"t" => ts = num(value),
            b"g" => tag = Some(value.clone()),
            b"u" => sender = Text::from_utf8(value.clone()).ok(),
            b"p" => payload = Some(value.clone()),
            _ => {}
        }
    }
    Some(Entry::Message(EngineMessage {
        seq,
        ts_ms: ts?,
        ticket: own_ticket(&tag?, prefix),
        sender: sender?,
        payload: payload?,
    }))
}

/// A stream id `<seq>-<sub>`.
fn parse_id(id: &[u8]) -> Option<(u64, u64)> {
    let dash = id.iter().position(|&b| b == b'-')?;
    Some((num(&id[..dash])?, num(&id[dash + 1..])?))
}

/// `<join point> <reason> <user>` from `at` of `body`.
fn parse_removal_body(
    body: &Bytes,
    at: usize,
) -> Option<(crate::directory::JoinPoint, pabal_codec::LeftReason, Text)> {
    let ([join, reason], at) = fields::<2>(body, at)?;
    let join = super::membership::parse_join_point(join)?;
    let reason = super::membership::reason_of(reason)?;
    let user = body.get(at..).filter(|u| !u.is_empty())?;
    let user = Text::from_utf8(body.slice(at..at + user.len())).ok()?;
    Some((join, reason, user))
}

/// Parses a removal on a room's channel, `<epoch> <seq>-<sub> <join point> <reason>
/// <user>`: `(epoch, removal)`, or `None` when the body is not one.
pub fn parse_channel_removal(body: &Bytes) -> Option<(u64, RemovalMark)> {
    let ([epoch, id], at) = fields::<2>(body, 0)?;
    let (seq, sub) = parse_id(id)?;
    if sub == 0 {
        return None;
    }
    let (join, reason, user) = parse_removal_body(body, at)?;
    Some((
        num(epoch)?,
        RemovalMark {
            seq,
            sub,
            user,
            join,
            reason,
        },
    ))
}

/// What an `XRANGE` reply holds: its messages and the removals among them, each ascending.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamSpan {
    /// The messages.
    pub msgs: Vec<EngineMessage>,
    /// The removals.
    pub marks: Vec<RemovalMark>,
    /// Entries read, of either kind (a page of `COUNT n` is full at `n`).
    pub entries: usize,
    /// The sequence of the last entry's id (0: none).
    pub last: u64,
}

impl StreamSpan {
    /// The place of its first entry, message (`(seq, 0)`) or removal; past every place
    /// when it has none.
    pub fn first_place(&self) -> (u64, u64) {
        let msg = self.msgs.first().map(|m| (m.seq, 0));
        let mark = self.marks.first().map(RemovalMark::place);
        msg.into_iter()
            .chain(mark)
            .min()
            .unwrap_or((u64::MAX, u64::MAX))
    }
}

/// Parses the entries of an `XRANGE` reply, ascending; `None` if any is malformed.
pub fn parse_entries(reply: &Value, prefix: &[u8]) -> Option<StreamSpan> {
    let mut span = StreamSpan::default();
    for entry in reply.array()? {
        span.entries += 1;
        match parse_entry(entry, prefix)? {
            Entry::Message(m) => {
                span.last = m.seq;
                span.msgs.push(m);
            }
            Entry::Removal(r) => {
                span.last = r.seq;
                span.marks.push(r);
            }
        }
    }
    Some(span)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;

    #[test]
    fn channel_messages_parse_and_recognise_own_tags() {
        let body = Bytes::from_static(b"77 5 1000 n1/0/42 3 bobhello world");
        let (epoch, m) = parse_channel_message(&body, b"n1/0/").unwrap();
        assert_eq!((epoch, m.seq, m.ts_ms, m.ticket), (77, 5, 1000, Some(42)));
        assert_eq!(m.sender.as_str(), "bob");
        assert_eq!(&m.payload[..], b"hello world");
        let (_, other) = parse_channel_message(&body, b"n2/0/").unwrap();
        assert_eq!(other.ticket, None);
        for bad in [&b"77 5 1000 n1/0/42 9 bob"[..], b"x 5 1 t 0 ", b"1 2 3"] {
            assert!(parse_channel_message(&Bytes::from_static(bad), b"n/").is_none());
        }
    }

    #[test]
    fn a_message_tail_parses_back_from_the_channel_and_from_either_stream_entry() {
        let mut tail = Vec::new();
        message_tail(
            &mut tail,
            1000,
            b"n1/0/42",
            "짱구".as_bytes(),
            b"hello world",
        );
        assert_eq!(&tail[..], "1000 n1/0/42 6 짱구hello world".as_bytes());
        let mut body = b"77 5 ".to_vec();
        body.extend_from_slice(&tail);
        let (epoch, m) = parse_channel_message(&Bytes::from(body), b"n1/0/").unwrap();
        assert_eq!((epoch, m.seq, m.ts_ms, m.ticket), (77, 5, 1000, Some(42)));
        assert_eq!(
            (m.sender.as_str(), &m.payload[..]),
            ("짱구", &b"hello world"[..])
        );
        let bulk = |b: &[u8]| Value::Bulk(Some(Bytes::copy_from_slice(b)));
        let entry = |id: &[u8], fields: Vec<Value>| {
            Value::Array(Some(vec![bulk(id), Value::Array(Some(fields))]))
        };
        let packed = entry(b"5-0", vec![bulk(b"m"), bulk(&tail)]);
        let fields = entry(
            b"6-0",
            ["t", "1000", "g", "n2/0/1", "u", "짱구", "p", "hello world"]
                .map(|f| bulk(f.as_bytes()))
                .to_vec(),
        );
        let msgs = parse_entries(&Value::Array(Some(vec![packed, fields])), b"n1/0/")
            .unwrap()
            .msgs;
        assert_eq!(msgs.len(), 2);
        for (m, (seq, ticket)) in msgs.iter().zip([(5, Some(42)), (6, None)]) {
            assert_eq!((m.seq, m.ts_ms, m.ticket), (seq, 1000, ticket));
            assert_eq!(
                (m.sender.as_str(), &m.payload[..]),
                ("짱구", &b"hello world"[..])
            );
        }
        // A packed entry whose sender runs past its end, or a tail with no length, is
        // malformed, not a message.
        for bad in [&b"1000 n1/0/42 9 bob"[..], b"1000 n1/0/42"] {
            let e = entry(b"7-0", vec![bulk(b"m"), bulk(bad)]);
            assert!(parse_entry(&e, b"n1/0/").is_none(), "{bad:?}");
        }
    }

    #[test]
    fn the_publish_scripts_trim_runs_every_trim_every_sequences() {
        for script in [PUBLISH, PUBLISH_FIELDS, &PUBLISH_ASCENDING] {
            assert!(script.contains(&format!("if n % {TRIM_EVERY} == 0 then")));
        }
        assert!(!PUBLISH_ASCENDING.contains(NEGATED_SCORE));
        assert!(!PUBLISH_FIELDS.contains(NEGATED_SCORE));
        let names: Vec<_> = all_scripts().into_iter().map(|(name, _)| name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }

    #[test]
    fn a_publish_answer_is_a_string_or_a_table_and_nothing_else() {
        let bulk = |b: &'static [u8]| Value::Bulk(Some(Bytes::from_static(b)));
        let table = |v: &[i64]| Value::Array(Some(v.iter().map(|&n| Value::Int(n)).collect()));
        assert_eq!(parse_published(&bulk(b"77 5")), Some((77, 5, false)));
        assert_eq!(parse_published(&table(&[77, 5])), Some((77, 5, false)));
        assert_eq!(parse_published(&table(&[77, 3, 1])), Some((77, 3, true)));
        // A negative sequence (what a version before `window_order` answers for a key
        // scored negated: this version's scripts never do) and anything malformed.
        for bad in [
            bulk(b"77"),
            bulk(b"77 "),
            bulk(b"x 5"),
            bulk(b"77 5 1"),
            table(&[77, -3, 1]),
            table(&[77]),
            Value::Error(Bytes::from_static(b"ERR boom")),
        ] {
            assert_eq!(parse_published(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn room_keys_share_one_hash_tag() {
        let room = RoomName::new(false, Text::from("room:x"));
        let mut k = Vec::new();
        key(&mut k, &room, "m");
        assert_eq!(&k[..], b"pabal:{r:room:x}:m");
        assert_eq!(sha1_hex("").len(), 40);
    }
}
