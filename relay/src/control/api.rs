//! The server API app servers use: publish, membership, room info, history, disconnect,
//! stats (`/v1/...`, described in relay/openapi.yaml).
//!
//! Each call becomes a [`ControlOp`] sent to the worker that owns the room (or to every
//! worker holding a user's connections); the call awaits the answer for
//! `control.reply_timeout`. A call that times out answers 504: the operation may still
//! complete, and a publish retried with the same `Idempotency-Key` is not published twice.
//! While the relay drains, mutations are refused with 503 and `Retry-After`; reads work.
//!
//! Owns: validation, JSON, the mapping of answers to HTTP. Must not touch: worker state,
//! sockets (the server owns the connection; this sees a parsed request).

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use pabal_codec::Text;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Response, Settings};
use crate::cluster::presence::{self, Lookup, LookupAnswer};
use crate::idempotency::IdempotencyKey;
use crate::ids::RoomName;
use crate::mesh::{ControlOp, ControlRefusal, ControlReply, CoreMsg, Published};
use crate::runtime::Relay;

/// Most users in one membership call, rooms in one multi-publish, messages in one history
/// read.
const MAX_USERS: usize = 10_000;
const MAX_ROOMS: usize = 1_000;
const MAX_HISTORY: usize = 1_000;
const MAX_NAME: usize = 255;

/// A refused request: HTTP status, a stable code, a message saying what is wrong, and when
/// to retry if that helps.
#[derive(Debug)]
pub struct ApiError {
    status: u16,
    code: &'static str,
    message: String,
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// 400: the request is malformed.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found", message)
    }

    /// 413: a body or payload past its bound.
    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(413, code, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    /// 503 `starting`, retry in a second: the operations endpoints the binary adds are not
    /// in place yet (the control API listens a moment before).
    pub fn starting() -> Self {
        ApiError {
            retry_after_s: Some(1),
            ..Self::new(503, "starting", "the relay is starting")
        }
    }

    /// 503 with `Retry-After: 1`: a bound of the control plane is reached.
    pub fn busy(message: impl Into<String>) -> Self {
        ApiError {
            retry_after_s: Some(1),
            ..Self::new(503, "busy", message)
        }
    }

    /// 408: the body did not arrive in time.
    pub fn timeout_reading(limit: Duration) -> Self {
        Self::new(
            408,
            "body_timeout",
            format!(
                "the body did not arrive within control.body_timeout = {} s",
                limit.as_secs_f64()
            ),
        )
    }

    /// The answer.
    pub fn response(&self) -> Response {
        let mut r = Response::json(
            self.status,
            &json!({"error": {"code": self.code, "message": self.message}}),
        );
        r.retry_after_s = self.retry_after_s;
        r
    }
}

/// 401.
pub fn unauthorized() -> Response {
    ApiError::new(
        401,
        "unauthorized",
        "missing or wrong API key (Authorization: Bearer KEY)",
    )
    .response()
}

/// 503 with `Retry-After`: the relay is shutting down and takes no more changes (what it
/// accepted now would reach nobody before the GOAWAYs); a retry reaches the next process.
pub fn draining(relay: &Relay) -> ApiError {
    let c = relay.config();
    let after = (c.shutdown.grace + c.shutdown.reconnect_spread)
        .as_secs()
        .max(1);
    ApiError {
        retry_after_s: Some(after),
        ..ApiError::new(
            503,
            "draining",
            "the relay is shutting down and accepts no changes; retry after Retry-After seconds",
        )
    }
}

/// 504: the worker did not answer in time; what was asked may still happen.
fn timed_out(limit: Duration) -> ApiError {
    ApiError::new(
        504,
        "timeout",
        format!(
            "the relay did not answer within control.reply_timeout = {} s; the operation may \
             still complete (retry a publish with the same Idempotency-Key: it is not published \
             twice)",
            limit.as_secs_f64()
        ),
    )
}

fn refusal(relay: &Relay, why: ControlRefusal) -> ApiError {
    match why {
        ControlRefusal::Draining => draining(relay),
        ControlRefusal::StorageFull => ApiError {
            retry_after_s: Some(1),
            ..ApiError::new(
                507,
                "storage_full",
                "the relay's storage is full (storage.max_disk_bytes or the file system); \
                 nothing was stored; retry later",
            )
        },
        ControlRefusal::StorageFailed => ApiError::new(
            503,
            "storage_failed",
            "the relay's storage failed and refuses writes until the relay restarts; nothing \
             was stored",
        ),
        ControlRefusal::Unavailable => ApiError {
            retry_after_s: Some(1),
            ..ApiError::new(
                503,
                "unavailable",
                "the cluster's engine (Redis) is unavailable; nothing was sequenced; retry later",
            )
        },
        ControlRefusal::TooManyMembers { members, max } => ApiError::new(
            413,
            "too_many_members",
            format!(
                "the room has {members} members; a replacing PUT reads at most {max}: add \
                 (POST) and remove (DELETE) instead"
            ),
        ),
    }
}

/// One API request, parsed by the server.
#[derive(Debug)]
pub struct Call<'a> {
    /// The relay.
    pub relay: &'a Relay,
    /// The settings in force.
    pub settings: &'a Settings,
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The path, still percent-encoded.
    pub path: &'a str,
    /// The query string.
    pub query: &'a str,
    /// The whole body (empty for reads).
    pub body: &'a [u8],
    /// The `Idempotency-Key` header (publishes only).
    pub key: Option<IdempotencyKey>,
}

impl Call<'_> {
    /// Runs the call and answers.
    pub async fn run(&self) -> Response {
        match self.route().await {
            Ok(value) => Response::json(200, &value),
            Err(e) => e.response(),
        }
    }

    /// Sends `op` to `worker` and awaits the answer within `control.reply_timeout`.
    async fn call(&self, worker: usize, op: ControlOp) -> Result<ControlReply, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.relay.send(worker, CoreMsg::Control { op, reply: tx });
        let limit = self.settings.config().reply_timeout;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(ControlReply::Refused(why))) => Err(refusal(self.relay, why)),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(worker_gone()),
            Err(_) => Err(timed_out(limit)),
        }
    }
}

fn segments(path: &str) -> Result<Vec<String>, ApiError> {
    path.trim_matches('/')
        .split('/')
        .map(|s| {
            percent_decode(s).ok_or_else(|| ApiError::bad(format!("bad percent-encoding in `{s}`")))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

fn name(kind: &str, value: &str) -> Result<Text, ApiError> {
    if value.is_empty() || value.len() > MAX_NAME {
        return Err(ApiError::bad(format!(
            "{kind} must be 1..={MAX_NAME} bytes"
        )));
    }
    Ok(Text::from(value))
}

fn room_of(collection: &str, value: &str) -> Result<RoomName, ApiError> {
    let channel = match collection {
        "rooms" => false,
        "channels" => true,
        other => return Err(ApiError::not_found(format!("no such collection `{other}`"))),
    };
    Ok(RoomName::new(channel, name("the name", value)?))
}

fn unexpected() -> ApiError {
    ApiError::internal("unexpected answer from the worker")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    sender: String,
    text: Option<String>,
    data: Option<String>,
    #[serde(default)]
    ephemeral: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishManyBody {
    #[serde(default)]
    rooms: Vec<String>,
    #[serde(default)]
    channels: Vec<String>,
    sender: String,
    text: Option<String>,
    data: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersBody {
    users: Vec<String>,
}

fn payload(relay: &Relay, text: Option<String>, data: Option<String>) -> Result<Bytes, ApiError> {
    let bytes = match (text, data) {
        (Some(t), None) => Bytes::from(t.into_bytes()),
        (None, Some(d)) => Bytes::from(
            BASE64
                .decode(d.as_bytes())
                .map_err(|e| ApiError::bad(format!("`data` is not base64: {e}")))?,
        ),
        _ => {
            return Err(ApiError::bad(
                "give exactly one of `text` or `data` (base64)",
            ));
        }
    };
    let max = relay.config().limits.max_payload;
    if bytes.len() > max {
        return Err(ApiError::too_large(
            "payload_too_large",
            format!(
                "the payload of {} bytes exceeds limits.max_payload = {max}",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

fn users(list: Vec<String>) -> Result<Vec<Text>, ApiError> {
    if list.len() > MAX_USERS {
        return Err(ApiError::bad(format!("at most {MAX_USERS} users per call")));
    }
    list.iter().map(|u| name("a user id", u)).collect()
}

fn kind(room: &RoomName) -> &'static str {
    if room.channel { "channel" } else { "room" }
}

impl Call<'_> {
    async fn route(&self) -> Result<Value, ApiError> {
        let relay = self.relay;
        let (method, query) = (self.method, self.query);
        let segs = segments(self.path)?;
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        match (method, segs.as_slice()) {
            ("GET", ["v1", "stats"]) => Ok(stats_json(relay)),
            ("POST", ["v1", "messages"]) => self.publish_many(parse(self.body)?).await,
            ("POST", ["v1", coll, room, "messages"]) => {
                let room = room_of(coll, room)?;
                let b: PublishBody = parse(self.body)?;
                let sender = name("`sender`", &b.sender)?;
                let payload = payload(relay, b.text, b.data)?;
                if b.ephemeral && self.key.is_some() {
                    return Err(ApiError::bad(
                        "an ephemeral event is not stored: it takes no Idempotency-Key",
                    ));
                }
                let worker = room.owner(relay.workers());
                let op = ControlOp::Publish {
                    room,
                    sender,
                    payload,
                    ephemeral: b.ephemeral,
                    key: self.key,
                };
                match self.call(worker, op).await? {
                    ControlReply::Published(None) => Ok(json!({ "seq": null })),
                    ControlReply::Published(Some(done)) => Ok(json!({
                        "seq": done.seq(),
                        "repeated": matches!(done, Published::Repeat { .. }),
                    })),
                    _ => Err(unexpected()),
                }
            }
            ("GET", ["v1", "rooms", room, "receipts"]) => {
                let room = room_of("rooms", room)?;
                let worker = room.owner(relay.workers());
                match self
                    .call(worker, ControlOp::Receipts { room: room.clone() })
                    .await?
                {
                    ControlReply::Receipts(Some(r)) => Ok(json!({
                        "name": room.name.as_str(),
                        "last_seq": r.head,
                        "epoch": r.epoch,
                        "members": r.members.iter().map(|(user, joined_at, m)| json!({
                            "user": user.as_str(),
                            "joined_at": joined_at,
                            "delivered_up_to": m.delivered,
                            "read_up_to": m.read,
                        })).collect::<Vec<_>>(),
                    })),
                    ControlReply::Receipts(None) => Err(ApiError::not_found(format!(
                        "no room named `{}`",
                        room.name
                    ))),
                    // With [cluster]: read from the engine, which may be unavailable.
                    ControlReply::Refused(why) => Err(refusal(relay, why)),
                    _ => Err(unexpected()),
                }
            }
            ("GET", ["v1", "users", user, "unread"]) => self.unread(name("a user id", user)?).await,
            ("GET", ["v1", coll, room, "messages"]) => {
                let room = room_of(coll, room)?;
                let q = query_map(query);
                let after = q_num(&q, "after", 0)?;
                let limit = q_num(&q, "limit", 100)?.clamp(1, MAX_HISTORY as u64) as usize;
                let worker = room.owner(relay.workers());
                let op = ControlOp::History {
                    room: room.clone(),
                    after,
                    limit,
                };
                match self.call(worker, op).await? {
                    ControlReply::History {
                        msgs,
                        gap,
                        head,
                        epoch,
                    } => {
                        let messages: Vec<Value> = msgs
                            .iter()
                            .map(|m| {
                                let mut v = json!({
                                    "seq": m.seq,
                                    "sender": m.sender.as_str(),
                                    "ts_ms": m.ts_ms,
                                    "data": BASE64.encode(&m.payload),
                                });
                                if let Ok(text) = std::str::from_utf8(&m.payload) {
                                    v["text"] = json!(text);
                                }
                                v
                            })
                            .collect();
                        Ok(json!({
                            "messages": messages,
                            "gap": gap.map(|(from, to)| json!({"from": from, "to": to})),
                            "last_seq": head,
                            "epoch": epoch,
                        }))
                    }
                    ControlReply::Info(None) => Err(ApiError::not_found(format!(
                        "no {coll} named `{}`",
                        room.name
                    ))),
                    _ => Err(unexpected()),
                }
            }
            ("GET", ["v1", coll, room]) => {
                let room = room_of(coll, room)?;
                let worker = room.owner(relay.workers());
                match self
                    .call(worker, ControlOp::Info { room: room.clone() })
                    .await?
                {
                    ControlReply::Info(Some(info)) => Ok(json!({
                        "name": room.name.as_str(),
                        "kind": kind(&room),
                        "id": room.id.to_string(),
                        "members": self.member_count(&room, info.members).await?,
                        "last_seq": info.head,
                        "epoch": info.epoch,
                        "retained": {
                            "messages": info.retained_messages,
                            "bytes": info.retained_bytes,
                            "first_seq": info.first_seq,
                        },
                        "retention": {
                            "max_messages": info.retention.max_messages,
                            "max_bytes": info.retention.max_bytes,
                            "max_age_s": info.retention.max_age.as_secs(),
                        },
                    })),
                    ControlReply::Info(None) => Err(ApiError::not_found(format!(
                        "no {coll} named `{}`",
                        room.name
                    ))),
                    _ => Err(unexpected()),
                }
            }
            ("PUT" | "POST", ["v1", coll @ ("rooms" | "channels"), room, member_coll]) => {
                member_collection(coll, member_coll)?;
                let room = room_of(coll, room)?;
                let b: UsersBody = parse(self.body)?;
                let add = users(b.users)?;
                self.members(room, add, Vec::new(), method == "PUT").await
            }
            ("DELETE", ["v1", coll @ ("rooms" | "channels"), room, member_coll, user]) => {
                member_collection(coll, member_coll)?;
                let room = room_of(coll, room)?;
                let user = name("a user id", user)?;
                self.members(room, Vec::new(), vec![user], false).await
            }
            ("POST", ["v1", "users", user, "disconnect"]) => {
                let user = name("a user id", user)?;
                let mut closed = 0;
                for worker in relay.directory().cores_of(user.as_str()) {
                    match self
                        .call(worker, ControlOp::Kick { user: user.clone() })
                        .await?
                    {
                        ControlReply::Kicked { connections } => closed += connections,
                        _ => return Err(unexpected()),
                    }
                }
                if relay.cluster().is_some() {
                    // The other nodes close theirs when the engine's notice reaches them.
                    let worker = RoomName::new(false, user.clone()).owner(relay.workers());
                    match self
                        .call(worker, ControlOp::KickEverywhere { user: user.clone() })
                        .await?
                    {
                        ControlReply::Kicked { .. } => {}
                        ControlReply::Refused(why) => return Err(refusal(relay, why)),
                        _ => return Err(unexpected()),
                    }
                }
                Ok(json!({ "closed": closed }))
            }
            ("GET", ["v1", "users", user, "presence"]) => {
                let user = name("a user id", user)?;
                if relay.cluster().is_some() {
                    // Every node's live count, from the engine.
                    let LookupAnswer::Presence(entries) =
                        self.lookup(Lookup::Presence { user: user.clone() }).await?
                    else {
                        return Err(unexpected());
                    };
                    let connections: u64 = entries.iter().map(|(_, n)| n).sum();
                    return Ok(json!({
                        "user": user.as_str(),
                        "online": connections > 0,
                        "connections": connections,
                        "nodes": presence::nodes_of(&entries),
                    }));
                }
                // From the membership directory, which counts every live connection: no
                // worker is asked, so an app server may call it before every push.
                let online = !relay.directory().cores_of(user.as_str()).is_empty();
                Ok(json!({ "user": user.as_str(), "online": online }))
            }
            ("GET", ["v1", "users", user, "rooms"]) => {
                let user = name("a user id", user)?;
                let rooms = if relay.cluster().is_some() {
                    // The user's rooms as the engine holds them, connected or not.
                    let LookupAnswer::Rooms(rooms) = self.lookup(Lookup::Rooms { user }).await?
                    else {
                        return Err(unexpected());
                    };
                    rooms
                } else {
                    relay.directory().rooms_of(user.as_str())
                };
                let rooms: Vec<Value> = rooms
                    .iter()
                    .map(|r| json!({"name": r.name.as_str(), "kind": kind(r)}))
                    .collect();
                Ok(json!({ "rooms": rooms }))
            }
            _ => Err(ApiError::not_found(format!(
                "no endpoint {method} {}",
                self.path
            ))),
        }
    }

    async fn members(
        &self,
        room: RoomName,
        add: Vec<Text>,
        remove: Vec<Text>,
        set: bool,
    ) -> Result<Value, ApiError> {
        let worker = room.owner(self.relay.workers());
        let op = ControlOp::Members {
            room,
            add,
            remove,
            set,
        };
        match self.call(worker, op).await? {
            ControlReply::Members {
                added,
                removed,
                refused,
                count,
            } => Ok(json!({
                "added": added.iter().map(Text::as_str).collect::<Vec<_>>(),
                "removed": removed.iter().map(Text::as_str).collect::<Vec<_>>(),
                "refused": refused.iter().map(|(u, why)| json!({"user": u.as_str(), "reason": why})).collect::<Vec<_>>(),
                "count": count,
            })),
            _ => Err(unexpected()),
        }
    }

    /// Reads `lookup` from the engine (a cluster node only), through the worker its user or
    /// room names.
    async fn lookup(&self, lookup: Lookup) -> Result<LookupAnswer, ApiError> {
        let worker = match &lookup {
            Lookup::Presence { user } | Lookup::Rooms { user } => {
                RoomName::new(false, user.clone()).owner(self.relay.workers())
            }
            Lookup::MemberCount { room } => room.owner(self.relay.workers()),
        };
        match self.call(worker, ControlOp::Lookup(lookup)).await? {
            ControlReply::LookedUp(answer) => Ok(answer),
            _ => Err(unexpected()),
        }
    }

    /// A room's members: on a cluster node every node's (the engine's member hash), else
    /// `local`, the owner's count.
    async fn member_count(&self, room: &RoomName, local: usize) -> Result<u64, ApiError> {
        if self.relay.cluster().is_none() {
            return Ok(local as u64);
        }
        match self
            .lookup(Lookup::MemberCount { room: room.clone() })
            .await?
        {
            LookupAnswer::MemberCount(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    /// Groups `rooms` by owner worker and sends each owner `op(its rooms)`, all at once: the
    /// rooms asked of each owner, with where its answer comes.
    fn ask_owners(
        &self,
        rooms: Vec<RoomName>,
        op: impl Fn(Vec<RoomName>) -> ControlOp,
    ) -> Vec<(Vec<RoomName>, tokio::sync::oneshot::Receiver<ControlReply>)> {
        let mut by_worker: HashMap<usize, Vec<RoomName>> = HashMap::new();
        for room in rooms {
            by_worker
                .entry(room.owner(self.relay.workers()))
                .or_default()
                .push(room);
        }
        by_worker
            .into_iter()
            .map(|(worker, rooms)| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let op = op(rooms.clone());
                self.relay.send(worker, CoreMsg::Control { op, reply: tx });
                (rooms, rx)
            })
            .collect()
    }

    /// A user's unread counts: the user's rooms (from the directory) grouped by owner, every
    /// owner asked at once, one round trip each.
    async fn unread(&self, user: Text) -> Result<Value, ApiError> {
        let waiting = if self.relay.cluster().is_some() {
            // The user's rooms, markers and heads are the engine's: one worker reads them
            // all there (the same answer on every node).
            let worker = RoomName::new(false, user.clone()).owner(self.relay.workers());
            let (tx, rx) = tokio::sync::oneshot::channel();
            let op = ControlOp::UnreadEverywhere { user: user.clone() };
            self.relay.send(worker, CoreMsg::Control { op, reply: tx });
            vec![(Vec::new(), rx)]
        } else {
            let mut rooms = self.relay.directory().rooms_of(user.as_str());
            rooms.retain(|r| !r.channel);
            self.ask_owners(rooms, |rooms| ControlOp::Unread {
                user: user.clone(),
                rooms,
            })
        };
        let limit = self.settings.config().reply_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let mut rooms = Vec::new();
        let mut total: u64 = 0;
        for (_, rx) in waiting {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(ControlReply::Unread(counts))) => {
                    for c in counts {
                        total += c.unread;
                        rooms.push(json!({
                            "name": c.room.name.as_str(),
                            "unread": c.unread,
                            "last_seq": c.head,
                            "joined_at": c.joined_at,
                            "read_up_to": c.marker.read,
                            "delivered_up_to": c.marker.delivered,
                        }));
                    }
                }
                Ok(Ok(ControlReply::Refused(why))) => return Err(refusal(self.relay, why)),
                Ok(Ok(_)) => return Err(unexpected()),
                Ok(Err(_)) => return Err(worker_gone()),
                Err(_) => return Err(timed_out(limit)),
            }
        }
        rooms.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(json!({ "user": user.as_str(), "total": total, "rooms": rooms }))
    }

    /// One message into many rooms: every owner is asked at once, and each room is
    /// answered on its own: `published` (with its sequence), `refused` (with a code), or
    /// `unknown` (its owner did not answer in time: it may still publish; retry with the
    /// same `Idempotency-Key`).
    async fn publish_many(&self, b: PublishManyBody) -> Result<Value, ApiError> {
        let relay = self.relay;
        let sender = name("`sender`", &b.sender)?;
        let payload = payload(relay, b.text, b.data)?;
        if b.rooms.len() + b.channels.len() > MAX_ROOMS {
            return Err(ApiError::bad(format!(
                "at most {MAX_ROOMS} rooms and channels per call"
            )));
        }
        if b.rooms.is_empty() && b.channels.is_empty() {
            return Err(ApiError::bad("name at least one of `rooms` or `channels`"));
        }
        let mut rooms = Vec::with_capacity(b.rooms.len() + b.channels.len());
        for (coll, list) in [("rooms", &b.rooms), ("channels", &b.channels)] {
            for n in list {
                rooms.push(room_of(coll, n)?);
            }
        }
        let waiting = self.ask_owners(rooms, |rooms| ControlOp::PublishMany {
            rooms,
            sender: sender.clone(),
            payload: payload.clone(),
            key: self.key,
        });
        let deadline = tokio::time::Instant::now() + self.settings.config().reply_timeout;
        let mut results = Vec::new();
        for (rooms, rx) in waiting {
            let answer = tokio::time::timeout_at(deadline, rx).await;
            let per_room: Vec<(RoomName, Value)> = match answer {
                Ok(Ok(ControlReply::PublishedMany(done))) => done
                    .into_iter()
                    .map(|(room, outcome)| {
                        let v = match outcome {
                            Ok(p) => json!({
                                "status": "published",
                                "seq": p.seq(),
                                "repeated": matches!(p, Published::Repeat { .. }),
                            }),
                            Err(why) => refused(why),
                        };
                        (room, v)
                    })
                    .collect(),
                Ok(Ok(ControlReply::Refused(why))) => {
                    rooms.into_iter().map(|r| (r, refused(why))).collect()
                }
                Ok(Ok(_)) => return Err(unexpected()),
                Ok(Err(_)) | Err(_) => rooms
                    .into_iter()
                    .map(|r| (r, json!({"status": "unknown"})))
                    .collect(),
            };
            for (room, mut v) in per_room {
                v["kind"] = json!(kind(&room));
                v["name"] = json!(room.name.as_str());
                results.push(v);
            }
        }
        Ok(json!({ "results": results }))
    }
}

/// 503: the worker that was asked is gone (the relay is stopping).
fn worker_gone() -> ApiError {
    ApiError::new(
        503,
        "unavailable",
        "the worker is gone (the relay is stopping)",
    )
}

fn refused(why: ControlRefusal) -> Value {
    let code = match why {
        ControlRefusal::Draining => "draining",
        ControlRefusal::StorageFull => "storage_full",
        ControlRefusal::StorageFailed => "storage_failed",
        ControlRefusal::Unavailable => "unavailable",
        ControlRefusal::TooManyMembers { .. } => "too_many_members",
    };
    json!({"status": "refused", "code": code})
}

/// Rooms have `members`, channels `subscribers`.
fn member_collection(coll: &str, member_coll: &str) -> Result<(), ApiError> {
    let expected = if coll == "rooms" {
        "members"
    } else {
        "subscribers"
    };
    if member_coll != expected {
        return Err(ApiError::not_found(format!(
            "use /v1/{coll}/NAME/{expected}"
        )));
    }
    Ok(())
}

fn query_map(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn q_num(q: &HashMap<String, String>, key: &str, default: u64) -> Result<u64, ApiError> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            ApiError::bad(format!(
                "query parameter `{key}` must be a number, got `{v}`"
            ))
        }),
    }
}

fn stats_json(relay: &Relay) -> Value {
    let total = relay.stats();
    let workers = relay.worker_stats();
    json!({
        "backend": relay.backend(),
        "epoch": relay.epoch(),
        "uptime_s": relay.started().elapsed().as_secs(),
        "total": total,
        "workers": workers,
        "inbox_depths": relay.inbox_depths(),
    })
}
