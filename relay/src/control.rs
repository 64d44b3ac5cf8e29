//! The control listener: the server API app servers use (publish, membership, room info,
//! history, disconnect, stats), and the operations endpoints registered as [`Route`]s
//! (metrics, health). HTTP/1.1 with JSON bodies, on its own address, never the client port.
//!
//! Requests become [`ControlOp`]s sent to the worker that owns the room (or to every worker
//! holding a user's connections) through the same mesh the workers use among themselves;
//! the API thread waits for the answer with a deadline. Nothing here touches a worker's
//! state directly.
//!
//! Owns: HTTP parsing, authentication by API key, validation, JSON. Must not touch: worker
//! state, sockets of clients.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use pabal_codec::Text;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::config::ControlConfig;
use crate::ids::RoomName;
use crate::mesh::{ControlOp, ControlReply, CoreMsg};
use crate::runtime::Relay;

/// How long the API waits for a worker's answer.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);
/// Most users in one membership call, rooms in one multi-publish, messages in one history
/// read.
const MAX_USERS: usize = 10_000;
const MAX_ROOMS: usize = 1_000;
const MAX_HISTORY: usize = 1_000;
const MAX_NAME: usize = 255;

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Response {
    /// A JSON answer.
    pub fn json(status: u16, value: &Value) -> Self {
        Response {
            status,
            content_type: "application/json",
            body: value.to_string(),
        }
    }

    /// A plain-text answer.
    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Response {
            status,
            content_type,
            body,
        }
    }
}

/// An operations endpoint (`GET /metrics`, health checks) added by the binary.
#[derive(Clone)]
pub struct Route {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The exact path.
    pub path: &'static str,
    /// Reachable without the API key (unless `control.metrics_need_key`).
    pub public: bool,
    /// Produces the answer.
    pub handler: Arc<dyn Fn(&Relay) -> Response + Send + Sync>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// A refused request: HTTP status, a stable code, and a message saying what is wrong.
#[derive(Debug)]
struct ApiError {
    status: u16,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            code: "bad_request",
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: 404,
            code: "not_found",
            message: message.into(),
        }
    }

    fn response(&self) -> Response {
        Response::json(
            self.status,
            &json!({"error": {"code": self.code, "message": self.message}}),
        )
    }
}

/// The running control listener.
pub struct ControlServer {
    server: Arc<tiny_http::Server>,
    threads: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("addr", &self.addr)
            .finish()
    }
}

struct Ctx {
    relay: Arc<Relay>,
    key: Option<String>,
    max_body: usize,
    metrics_need_key: bool,
}

impl ControlServer {
    /// Starts the listener (`None` if `control.listen` is empty).
    pub fn start(config: &ControlConfig, relay: Arc<Relay>) -> anyhow::Result<Option<Self>> {
        let Some(addr) = config.listen_addr()? else {
            return Ok(None);
        };
        let key = config.load_api_key()?;
        let server = tiny_http::Server::http(addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on control address {addr}: {e}"))?;
        let addr = server
            .server_addr()
            .to_ip()
            .context("control listener has no IP address")?;
        let server = Arc::new(server);
        let ctx = Arc::new(Ctx {
            relay,
            key,
            max_body: config.max_body,
            metrics_need_key: config.metrics_need_key,
        });
        let mut threads = Vec::new();
        for i in 0..2 {
            let server = server.clone();
            let ctx = ctx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("pabal-control-{i}"))
                    .spawn(move || {
                        while let Ok(request) = server.recv() {
                            serve(&ctx, request);
                        }
                    })
                    .context("cannot spawn control thread")?,
            );
        }
        Ok(Some(ControlServer {
            server,
            threads,
            addr,
        }))
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting requests and waits for the threads.
    pub fn stop(self) {
        for _ in &self.threads {
            self.server.unblock();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn serve(ctx: &Ctx, mut request: tiny_http::Request) {
    let response = handle(ctx, &mut request);
    let mut reply =
        tiny_http::Response::from_string(response.body).with_status_code(response.status);
    // The content types are static ASCII, so the header always parses.
    if let Ok(header) = tiny_http::Header::from_bytes(&b"Content-Type"[..], response.content_type) {
        reply = reply.with_header(header);
    }
    if let Err(e) = request.respond(reply) {
        tracing::debug!("control API: cannot answer: {e}");
    }
}

fn authorized(ctx: &Ctx, request: &tiny_http::Request) -> bool {
    let Some(key) = &ctx.key else {
        // No key configured: the listener is loopback-only (config validation enforces it).
        return true;
    };
    request.headers().iter().any(|h| {
        let value = h.value.as_str();
        let presented = if h.field.equiv("Authorization") {
            value.strip_prefix("Bearer ").unwrap_or("")
        } else if h.field.equiv("X-Api-Key") {
            value
        } else {
            return false;
        };
        presented.len() == key.len() && bool::from(presented.as_bytes().ct_eq(key.as_bytes()))
    })
}

fn handle(ctx: &Ctx, request: &mut tiny_http::Request) -> Response {
    let method = request.method().as_str().to_ascii_uppercase();
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let routes = ctx.relay.routes();
    if let Some(route) = routes.iter().find(|r| r.method == method && r.path == path) {
        if (!route.public || ctx.metrics_need_key) && !authorized(ctx, request) {
            return unauthorized();
        }
        return (route.handler)(&ctx.relay);
    }
    if !authorized(ctx, request) {
        return unauthorized();
    }
    let mut body = Vec::new();
    let limit = ctx.max_body as u64 + 1;
    if let Err(e) = request.as_reader().take(limit).read_to_end(&mut body) {
        return ApiError::bad(format!("cannot read the body: {e}")).response();
    }
    if body.len() > ctx.max_body {
        return ApiError {
            status: 413,
            code: "body_too_large",
            message: format!("the body exceeds {} bytes", ctx.max_body),
        }
        .response();
    }
    match route(ctx, &method, path, query, &body) {
        Ok(value) => Response::json(200, &value),
        Err(e) => e.response(),
    }
}

fn unauthorized() -> Response {
    ApiError {
        status: 401,
        code: "unauthorized",
        message: "missing or wrong API key (Authorization: Bearer KEY)".into(),
    }
    .response()
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

fn call(relay: &Relay, worker: usize, op: ControlOp) -> Result<ControlReply, ApiError> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    relay.send(worker, CoreMsg::Control { op, reply: tx });
    rx.recv_timeout(REPLY_DEADLINE).map_err(|_| ApiError {
        status: 503,
        code: "unavailable",
        message: "the relay did not answer in time (shutting down or overloaded)".into(),
    })
}

fn unexpected() -> ApiError {
    ApiError {
        status: 500,
        code: "internal",
        message: "unexpected answer from the worker".into(),
    }
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
        return Err(ApiError {
            status: 413,
            code: "payload_too_large",
            message: format!(
                "the payload of {} bytes exceeds limits.max_payload = {max}",
                bytes.len()
            ),
        });
    }
    Ok(bytes)
}

fn users(list: Vec<String>) -> Result<Vec<Text>, ApiError> {
    if list.len() > MAX_USERS {
        return Err(ApiError::bad(format!("at most {MAX_USERS} users per call")));
    }
    list.iter().map(|u| name("a user id", u)).collect()
}

fn route(ctx: &Ctx, method: &str, path: &str, query: &str, body: &[u8]) -> Result<Value, ApiError> {
    let relay = &*ctx.relay;
    let segs = segments(path)?;
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (method, segs.as_slice()) {
        ("GET", ["v1", "stats"]) => Ok(stats_json(relay)),
        ("POST", ["v1", "messages"]) => publish_many(relay, parse(body)?),
        ("POST", ["v1", coll, room, "messages"]) => {
            let room = room_of(coll, room)?;
            let b: PublishBody = parse(body)?;
            let sender = name("`sender`", &b.sender)?;
            let payload = payload(relay, b.text, b.data)?;
            let worker = room.owner(relay.workers());
            match call(
                relay,
                worker,
                ControlOp::Publish {
                    room,
                    sender,
                    payload,
                    ephemeral: b.ephemeral,
                },
            )? {
                ControlReply::Published { seq } => Ok(json!({ "seq": seq })),
                _ => Err(unexpected()),
            }
        }
        ("GET", ["v1", coll, room, "messages"]) => {
            let room = room_of(coll, room)?;
            let q = query_map(query);
            let after = q_num(&q, "after", 0)?;
            let limit = q_num(&q, "limit", 100)?.clamp(1, MAX_HISTORY as u64) as usize;
            let worker = room.owner(relay.workers());
            match call(
                relay,
                worker,
                ControlOp::History {
                    room: room.clone(),
                    after,
                    limit,
                },
            )? {
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
            match call(relay, worker, ControlOp::Info { room: room.clone() })? {
                ControlReply::Info(Some(info)) => Ok(json!({
                    "name": room.name.as_str(),
                    "kind": if room.channel { "channel" } else { "room" },
                    "id": room.id.to_string(),
                    "members": info.members,
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
            let b: UsersBody = parse(body)?;
            let add = users(b.users)?;
            members(relay, room, add, Vec::new(), method == "PUT")
        }
        ("DELETE", ["v1", coll @ ("rooms" | "channels"), room, member_coll, user]) => {
            member_collection(coll, member_coll)?;
            let room = room_of(coll, room)?;
            let user = name("a user id", user)?;
            members(relay, room, Vec::new(), vec![user], false)
        }
        ("POST", ["v1", "users", user, "disconnect"]) => {
            let user = name("a user id", user)?;
            let mut closed = 0;
            for worker in relay.directory().cores_of(&user) {
                match call(relay, worker, ControlOp::Kick { user: user.clone() })? {
                    ControlReply::Kicked { connections } => closed += connections,
                    _ => return Err(unexpected()),
                }
            }
            Ok(json!({ "closed": closed }))
        }
        ("GET", ["v1", "users", user, "rooms"]) => {
            let user = name("a user id", user)?;
            let rooms: Vec<Value> = relay
                .directory()
                .rooms_of(&user)
                .iter()
                .map(|r| json!({"name": r.name.as_str(), "kind": if r.channel { "channel" } else { "room" }}))
                .collect();
            Ok(json!({ "rooms": rooms }))
        }
        _ => Err(ApiError::not_found(format!("no endpoint {method} {path}"))),
    }
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

fn members(
    relay: &Relay,
    room: RoomName,
    add: Vec<Text>,
    remove: Vec<Text>,
    set: bool,
) -> Result<Value, ApiError> {
    let worker = room.owner(relay.workers());
    match call(
        relay,
        worker,
        ControlOp::Members {
            room,
            add,
            remove,
            set,
        },
    )? {
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

fn publish_many(relay: &Relay, b: PublishManyBody) -> Result<Value, ApiError> {
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
    let mut by_worker: HashMap<usize, Vec<RoomName>> = HashMap::new();
    for (coll, list) in [("rooms", &b.rooms), ("channels", &b.channels)] {
        for n in list {
            let room = room_of(coll, n)?;
            by_worker
                .entry(room.owner(relay.workers()))
                .or_default()
                .push(room);
        }
    }
    let mut results = Vec::new();
    for (worker, rooms) in by_worker {
        match call(
            relay,
            worker,
            ControlOp::PublishMany {
                rooms,
                sender: sender.clone(),
                payload: payload.clone(),
            },
        )? {
            ControlReply::PublishedMany(done) => {
                for (room, seq) in done {
                    results.push(json!({
                        "kind": if room.channel { "channel" } else { "room" },
                        "name": room.name.as_str(),
                        "seq": seq,
                    }));
                }
            }
            _ => return Err(unexpected()),
        }
    }
    Ok(json!({ "results": results }))
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
