//! The client protocol: what a connection's frames do. HELLO (authentication, the resume
//! list, binding the user's rooms), SUBSCRIBE/UNSUBSCRIBE (asking the room's owner), PUBLISH
//! (checked, then sent to the owner), ACK, PING/PONG, BYE; decoding of the bytes that arrive.
//!
//! Owns: turning client frames into requests to owners and answers to the client. Must not
//! touch: owned rooms (only messages to their owner), other connections, sockets.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pabal_codec::{
    ClientFrame, DecodeError, DeliverContext, ErrorCode, Left, LeftReason, Pong, ServerFrame, Text,
    Welcome,
};

use super::*;
use crate::config::AuthMode;
use crate::conn::{Bucket, BucketRates, Phase, Sub, heartbeat_ms};
use crate::ids::{RoomName, UserName};
use crate::io::Token;
use crate::mesh::{CoreMsg, PublishedBy, StartFrom};
use crate::stats::inc;

/// Who a version-2 connection publishes as: FNV-1a (64-bit) over the user id, a zero byte
/// and the device id, never 0 (0 means "not recognised"). Two devices collide only with
/// probability 2^-64, and then only share recognition of their own msg_ids in a room.
pub(super) fn publisher_of(user: &Text, device: u64) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for &byte in user
        .as_bytes()
        .iter()
        .chain(&[0])
        .chain(&device.to_le_bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash.max(1)
}

impl Core {
    pub(super) fn on_frame(&mut self, token: Token, frame: ClientFrame) {
        inc(&self.stats.frames_in, 1);
        let Some(conn) = self.conn(token) else { return };
        let phase = conn.phase();
        match (phase, frame) {
            (Phase::Failing | Phase::Closing, _) => {}
            (Phase::Handshake, ClientFrame::Hello(hello)) => self.on_hello(token, hello),
            (Phase::Handshake, other) => self.fatal(
                token,
                ErrorCode::ProtocolViolation,
                format!("{} before HELLO", other.name()),
            ),
            (Phase::Open, ClientFrame::Hello(_)) => {
                self.fatal(token, ErrorCode::ProtocolViolation, "second HELLO".into())
            }
            (Phase::Open, ClientFrame::Subscribe(_) | ClientFrame::Unsubscribe(_))
                if !self.take_subscribe_budget(token) =>
            {
                inc(&self.stats.subscribe_rate_limited, 1);
                self.refuse(
                    token,
                    ErrorCode::RateLimited,
                    0,
                    "subscribe rate limit; slow down".into(),
                );
            }
            (Phase::Open, ClientFrame::Subscribe(s)) => self.on_subscribe(token, s.room, s.name),
            (Phase::Open, ClientFrame::Unsubscribe(u)) => {
                self.on_unsubscribe(token, u.alias, u.block)
            }
            (Phase::Open, ClientFrame::Publish(p)) => self.on_publish(token, p),
            (Phase::Open, ClientFrame::Ack(ack)) => {
                // PROTOCOL.md §12: an ACK of an unbound alias is ignored (a LEFT may be in
                // flight), and one past what was sent counts only up to what was sent.
                for (alias, seq) in ack.iter() {
                    self.ack(token, alias, seq);
                }
            }
            (Phase::Open, ClientFrame::Ping(ping)) => {
                let granted = ping.interval_secs.map(|secs| {
                    let granted = self.negotiate_heartbeat(secs);
                    let clock = self.clock;
                    let now = self.now;
                    if let Some(conn) = self.conn(token) {
                        let interval = Duration::from_secs(u64::from(granted));
                        conn.heartbeat_ms = heartbeat_ms(interval);
                        let at = clock.instant_of(conn.last_rx, now) + interval;
                        self.arm(token, at);
                    }
                    granted
                });
                self.write(
                    token,
                    &ServerFrame::Pong(Pong {
                        interval_secs: granted,
                    }),
                );
            }
            (Phase::Open, ClientFrame::Pong(_)) => {
                if let Some(conn) = self.conn(token) {
                    conn.pong();
                }
            }
            (Phase::Open, ClientFrame::Bye) => self.begin_close(token),
            (Phase::Open, ClientFrame::Read(read)) => {
                if self.conn(token).is_some_and(|c| c.receipts()) {
                    self.on_read(token, read.alias, read.seq);
                } else {
                    // Before version 3 there is no READ: answered as any unknown type was.
                    let unknown = DecodeError::UnknownFrameType(pabal_codec::frame::kind::READ);
                    self.decode_failed(token, unknown);
                }
            }
        }
    }

    /// A cumulative ACK of `seq` on `alias` (PROTOCOL.md §12): ignored for an unbound alias
    /// (a LEFT may be in flight), counted only up to what was sent; when it moves the
    /// binding's `acked`, the user's delivered marker may move too.
    pub(super) fn ack(&mut self, token: Token, alias: u32, seq: u64) {
        let Some(conn) = self.conn(token) else { return };
        let Some(Some(sub)) = conn.subs.get_mut(alias as usize) else {
            return;
        };
        if !sub.ack(seq) {
            return;
        }
        let channel = sub.room.channel;
        self.note_acked(token, alias, channel);
    }

    /// READ (version 3) of `seq` on `alias`: like an ACK, ignored for an unbound alias and
    /// counted only up to what was sent; the user's read marker may move.
    pub(super) fn on_read(&mut self, token: Token, alias: u32, seq: u64) {
        let Some(conn) = self.conn(token) else { return };
        let Some(Some(sub)) = conn.subs.get(alias as usize) else {
            return;
        };
        let read = seq.min(sub.position());
        // A pending binding's `epoch` holds the start it asked for, not a stream's: its
        // READ names no stream yet (epoch 0, as before the owner answers).
        let epoch = if sub.is_pending() { 0 } else { sub.epoch };
        let room = sub.room.clone();
        let Some(user) = conn.user.clone() else {
            return;
        };
        self.note_read(&room, &user, epoch, read);
    }

    pub(super) fn take_subscribe_budget(&mut self, token: Token) -> bool {
        let now = self.clock.stamp(self.now);
        let rates = BucketRates::from(&self.config.limits);
        self.conn(token)
            .is_some_and(|c| c.service() || c.buckets.take(Bucket::Subscribe, now, rates))
    }

    pub(super) fn negotiate_heartbeat(&self, asked_secs: u32) -> u32 {
        let hb = &self.config.heartbeat;
        if asked_secs == 0 {
            return hb.interval.as_secs() as u32;
        }
        (u64::from(asked_secs)).clamp(hb.min_interval.as_secs(), hb.max_interval.as_secs()) as u32
    }

    /// Checks HELLO's credential; the user and, with tokens, the claims.
    pub(super) fn authenticate(
        &self,
        token: &Bytes,
    ) -> Result<(Text, Option<crate::auth::Claims>), (ErrorCode, String)> {
        let user = match self.config.auth.mode {
            AuthMode::None => {
                let user = std::str::from_utf8(token)
                    .map_err(|_| (ErrorCode::AuthFailed, "user id is not UTF-8".to_string()))?;
                // A copy of its own: a slice of the frame would keep the whole read buffer
                // it arrived in alive for as long as the session lasts.
                (Text::from(user), None)
            }
            AuthMode::Jwt => {
                let verifier = self.shared.verifier.read().clone();
                let Some(verifier) = verifier else {
                    return Err((ErrorCode::Internal, "no token keys loaded".to_string()));
                };
                let now_s = self.now_ms() / 1000;
                match verifier.verify(token, now_s) {
                    Ok(claims) => (Text::from(claims.user.as_str()), Some(claims)),
                    Err(e) if e.is_expiry() => {
                        return Err((ErrorCode::TokenExpired, e.to_string()));
                    }
                    Err(e) => return Err((ErrorCode::AuthFailed, e.to_string())),
                }
            }
        };
        if user.0.is_empty() || user.0.len() > self.decoder.limits().max_name_len {
            return Err((
                ErrorCode::AuthFailed,
                "user id must be 1..=255 bytes".to_string(),
            ));
        }
        Ok(user)
    }

    pub(super) fn on_hello(&mut self, token: Token, hello: pabal_codec::Hello) {
        let (user, claims) = match self.authenticate(&hello.token) {
            Ok(found) => found,
            Err((code, message)) => {
                inc(&self.stats.auth_failures, 1);
                return self.fatal(token, code, message);
            }
        };
        // A cluster node reads the user's rooms from the engine first (the HELLO waits).
        let Some(hello) = self.cluster_hello_gate(token, hello, user.as_str()) else {
            return;
        };
        // Register with the directory first: a refusal must come before the session opens.
        // The connection, the worker's user map and the user's member sets share the
        // directory's handle to the name.
        let (handle, rooms) = match self.directory.connect(
            user.as_str(),
            self.id,
            self.config.limits.max_connections_per_user,
        ) {
            Ok(found) => found,
            Err(e) => {
                inc(&self.stats.limit_refusals, 1);
                // Its claim counted on every node (a cluster node): it counts no more.
                self.cluster_release(user.as_str());
                return self.fatal(token, ErrorCode::LimitExceeded, e.to_string());
            }
        };
        let granted = self.negotiate_heartbeat(hello.heartbeat_secs);
        let now_ms = self.now_ms();
        let max_rooms = self.config.connection.max_rooms;
        let max_frame_len = self.config.connection.max_frame_len as u32;
        let Some(conn) = self.conn(token) else { return };
        conn.set_phase(Phase::Open);
        conn.user = Some(handle.clone());
        conn.set_service(claims.as_ref().is_some_and(|c| c.service));
        conn.set_receipts(hello.version >= 3);
        conn.claims = claims.map(Box::new);
        conn.heartbeat_ms = heartbeat_ms(Duration::from_secs(u64::from(granted)));
        conn.ctx = DeliverContext::new(now_ms);
        conn.publisher = hello
            .device_id
            .map_or(0, |device| publisher_of(&user, device));
        // The relay-wide id is given with the WELCOME (a connection that never opens takes
        // none), not kept in the record: the log line below ties it to the token.
        self.next_conn_id += 1;
        let conn_id = ((self.id as u64) << 48) | self.next_conn_id;
        tracing::trace!(token, conn_id, "connection opened");
        self.write(
            token,
            &ServerFrame::Welcome(Welcome {
                // The decoder took only versions this relay speaks: the session speaks the
                // client's.
                version: hello.version,
                conn_id,
                server_time_ms: now_ms,
                heartbeat_secs: granted,
                max_frame_len,
                user: user.clone(),
            }),
        );
        self.users.add(&handle, token);

        // Resolve resume entries against the user's own rooms: entry i is alias i.
        let mut by_id: HashMap<u64, usize> = HashMap::with_capacity(rooms.len());
        for (i, (room, _)) in rooms.iter().enumerate() {
            by_id
                .entry(room.id)
                .and_modify(|slot| *slot = usize::MAX) // ambiguous: never resolve it
                .or_insert(i);
        }
        // An entry from an earlier run of the relay naming a room it does not know for
        // the user may only mean the app server has not re-sent membership yet.
        let restarted = self.now < self.booted + self.config.connection.restart_grace;
        let mut taken = vec![false; rooms.len()];
        let resume: Vec<_> = hello.resume.iter().collect();
        let mut subscribe = Vec::new();
        let mut left = Vec::new();
        let mut over_limit = Vec::new();
        let mut subs: Vec<Option<Sub>> = Vec::with_capacity(resume.len().max(rooms.len()));
        for (alias, entry) in resume.iter().enumerate() {
            match by_id.get(&entry.room_id) {
                Some(&i) if i != usize::MAX && !taken[i] => {
                    taken[i] = true;
                    if subscribe.len() >= max_rooms {
                        subs.push(None);
                        over_limit.push((Some(alias as u32), rooms[i].0.clone()));
                        continue;
                    }
                    let from = StartFrom::Resume {
                        epoch: entry.epoch,
                        last_seq: entry.last_seq,
                    };
                    let request = self.new_request();
                    let serial = rooms[i].1.serial;
                    subs.push(Some(Sub::pending(
                        rooms[i].0.clone(),
                        from,
                        request,
                        serial,
                    )));
                    subscribe.push((alias as u32, rooms[i].0.clone(), from, request));
                }
                _ => {
                    subs.push(None);
                    let reason = if restarted && entry.epoch < self.epoch {
                        LeftReason::Restarted
                    } else {
                        LeftReason::UnknownRoom
                    };
                    left.push((alias as u32, reason));
                }
            }
        }
        inc(&self.stats.resumes, subscribe.len() as u64);
        for (i, (room, join)) in rooms.into_iter().enumerate() {
            if taken[i] {
                continue;
            }
            if subscribe.len() >= max_rooms {
                over_limit.push((None, room));
                continue;
            }
            // Aliases answered with LEFT are not reused in this HELLO's answer (§6.5).
            let alias = match subs.iter().position(Option::is_none) {
                Some(a) if !left.iter().any(|&(l, _)| l == a as u32) => a,
                _ => {
                    subs.push(None);
                    subs.len() - 1
                }
            };
            let from = StartFrom::Join {
                epoch: join.epoch,
                seq: join.seq,
            };
            let request = self.new_request();
            subs[alias] = Some(Sub::pending(room.clone(), from, request, join.serial));
            subscribe.push((alias as u32, room, from, request));
        }
        if let Some(conn) = self.conn(token) {
            conn.subs = subs.into();
        }
        for (alias, reason) in left {
            self.write(token, &ServerFrame::Left(Left { alias, reason }));
            if let Some(conn) = self.conn(token) {
                conn.retire(alias);
            }
        }
        for (alias, room) in over_limit {
            self.refuse_room_limit(token, alias, &room);
        }
        let origin = self.origin(token);
        for (alias, room, from, request) in subscribe {
            self.send_to_owner(
                &room.clone(),
                CoreMsg::Subscribe {
                    room,
                    origin,
                    alias,
                    user: handle.clone(),
                    from,
                    request,
                },
            );
        }
        let next = self.now + Duration::from_secs(u64::from(granted));
        self.arm(token, next);
    }

    pub(super) fn new_request(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    /// A room the connection cannot bind: it already holds `connection.max_rooms`. The
    /// client gets a non-fatal ERROR `LimitExceeded` naming the room (and, for a resume
    /// entry, a LEFT for its alias); the refusal is counted.
    pub(super) fn refuse_room_limit(&mut self, token: Token, alias: Option<u32>, room: &RoomName) {
        inc(&self.stats.limit_refusals, 1);
        let max = self.config.connection.max_rooms;
        if let Some(alias) = alias {
            self.write(
                token,
                &ServerFrame::Left(Left {
                    alias,
                    reason: LeftReason::UnknownRoom,
                }),
            );
            if let Some(conn) = self.conn(token) {
                conn.retire(alias);
            }
        }
        self.refuse(
            token,
            ErrorCode::LimitExceeded,
            room.id,
            format!("{}: a connection binds at most {max} rooms", room.name),
        );
    }

    pub(super) fn on_subscribe(&mut self, token: Token, is_room: bool, name: Text) {
        let room = self.shared_name(RoomName::new(!is_room, name));
        let Some(conn) = self.conn(token) else { return };
        let user = user_handle(conn);
        if let Some(alias) = conn.alias_of(&room) {
            // Already bound: restate the binding so a client waiting for ROOM gets one, with
            // the cursor past everything processed (own messages included: the client keeps
            // those above the new cursor).
            if let Some(Some(sub)) = conn.subs.get_mut(alias as usize)
                && !sub.is_pending()
            {
                sub.cursor = sub.position();
                let frame = room_frame(alias, sub, sub.position());
                self.write(token, &frame);
            }
            return;
        }
        if conn.bound() >= self.config.connection.max_rooms {
            let max = self.config.connection.max_rooms;
            return self.refuse(
                token,
                ErrorCode::LimitExceeded,
                0,
                format!("{}: a connection binds at most {max} rooms", room.name),
            );
        }
        let permitted = self
            .conn(token)
            .is_some_and(|c| match (&c.claims, is_room) {
                (None, _) => true, // no auth: development mode, clients manage themselves
                (Some(_), true) => c.service(),
                (Some(claims), false) => claims.may_subscribe(room.name.as_str()),
            });
        if !permitted {
            let why = if is_room {
                "rooms are joined through the app server"
            } else {
                "the token does not allow this channel"
            };
            return self.refuse(
                token,
                ErrorCode::NotPermitted,
                0,
                format!("{}: {why}", room.name),
            );
        }
        let requester = Some(self.origin(token));
        self.send_to_owner(
            &room.clone(),
            CoreMsg::Join {
                room,
                user,
                unblock: false,
                requester,
            },
        );
    }

    pub(super) fn on_unsubscribe(&mut self, token: Token, alias: u32, block: bool) {
        let Some(conn) = self.conn(token) else { return };
        let user = user_handle(conn);
        let Some(Some(sub)) = conn.subs.get(alias as usize) else {
            return self.refuse(
                token,
                ErrorCode::UnknownAlias,
                u64::from(alias),
                format!("alias {alias} is not bound"),
            );
        };
        let room = sub.room.clone();
        let reason = if block {
            LeftReason::Blocked
        } else {
            LeftReason::Unsubscribed
        };
        self.send_to_owner(
            &room.clone(),
            CoreMsg::Leave {
                room,
                user,
                block,
                reason,
            },
        );
    }

    pub(super) fn on_publish(&mut self, token: Token, p: pabal_codec::Publish) {
        if let Some(ack) = p.ack {
            // The ACK riding on the PUBLISH counts whatever becomes of the publish.
            self.ack(token, p.alias, ack);
        }
        let origin = self.origin(token);
        let now = self.clock.stamp(self.now);
        let max_payload = self.config.limits.max_payload;
        let auth_none = self.config.auth.mode == AuthMode::None;
        let reference = p.msg_id.unwrap_or(0);
        if p.payload.len() > max_payload {
            inc(&self.stats.limit_refusals, 1);
            return self.refuse(
                token,
                ErrorCode::PayloadTooLarge,
                reference,
                format!("payload of {} bytes exceeds {max_payload}", p.payload.len()),
            );
        }
        let rates = BucketRates::from(&self.config.limits);
        let Some(conn) = self.conn(token) else { return };
        if !conn.service() && !conn.buckets.take(Bucket::Publish, now, rates) {
            inc(&self.stats.rate_limited, 1);
            return self.refuse(
                token,
                ErrorCode::RateLimited,
                reference,
                "publish rate limit; slow down".into(),
            );
        }
        let service = conn.service();
        let may_publish = |name: &str| {
            auth_none || service || conn.claims.as_ref().is_some_and(|c| c.may_publish(name))
        };
        let sender = conn.sender();
        let Some(Some(sub)) = conn.subs.get_mut(p.alias as usize) else {
            let reference = p.msg_id.unwrap_or(0);
            return self.refuse(
                token,
                ErrorCode::UnknownAlias,
                reference,
                format!("alias {} is not bound", p.alias),
            );
        };
        let room = sub.room.clone();
        if room.channel && !may_publish(room.name.as_str()) {
            // With tokens, a channel takes publishes from service connections and from
            // users whose token names it in `pub`; everyone else only reads it.
            return self.refuse(
                token,
                ErrorCode::NotPermitted,
                reference,
                format!("{}: publishing to this channel is not permitted", room.name),
            );
        }
        let binding = sub.request;
        let publisher = conn.publisher;
        if p.msg_id.is_some() {
            // Answered by the owner's PUBACK; a fatal error waits for it (`fatal`).
            conn.publishes_in_flight += 1;
        }
        let msg = match p.msg_id {
            Some(msg_id) => CoreMsg::Publish {
                room: room.clone(),
                by: PublishedBy {
                    origin,
                    alias: p.alias,
                    binding,
                    msg_id,
                    publisher,
                },
                sender,
                payload: p.payload,
            },
            None => CoreMsg::Ephemeral {
                room: room.clone(),
                origin,
                sender,
                payload: p.payload,
            },
        };
        self.send_to_owner(&room, msg);
    }

    /// The worker's own record of a room's name if it has one (bindings to a room then share
    /// one record), or `room` (a record always holds a copy of the name, never a slice of
    /// the frame it arrived in, which would keep that read buffer alive).
    pub(super) fn shared_name(&self, room: RoomName) -> RoomName {
        if let Some((known, _)) = self.local.get_key_value(&room) {
            return known.clone();
        }
        if let Some((known, _)) = self.owned.get_key_value(&room) {
            return known.clone();
        }
        room
    }

    /// Bytes arrived on a connection at `now`.
    pub fn on_bytes(&mut self, now: Instant, token: Token, data: &[u8]) {
        self.advance_to(now);
        inc(&self.stats.bytes_in, data.len() as u64);
        let now = self.now;
        let draining = self.shutdown.draining;
        let stamp = self.clock.stamp(now);
        let Some(conn) = self.conn(token) else { return };
        conn.last_rx = stamp;
        if conn.take_ping_sent().is_some() {
            // The heartbeat was answered: the next ping is due an interval from now, which
            // may be sooner than the deadline armed for the answer.
            let at = now + Duration::from_millis(conn.heartbeat_ms.into());
            self.arm(token, at);
        }
        let Some(conn) = self.conn(token) else { return };
        if !matches!(conn.phase(), Phase::Handshake | Phase::Open) || draining {
            return;
        }
        // Whole frames are decoded out of the worker's one read buffer; a connection keeps
        // bytes of its own only for a partial frame, so an idle connection holds none. A
        // read that may hold a payload history keeps without copying (one of at least
        // `COMPACT_BELOW` bytes) gets a buffer of its own size instead: that payload keeps
        // its whole buffer alive, which must not be the worker's, grown by earlier reads.
        let own = conn.rbuf.is_some();
        let shared = !own && data.len() < COMPACT_BELOW;
        let mut buf = if own {
            conn.rbuf.take().map_or_else(BytesMut::new, |b| *b)
        } else if shared {
            std::mem::take(&mut self.read_scratch)
        } else {
            BytesMut::new()
        };
        buf.extend_from_slice(data);
        loop {
            let Core { conns, decoder, .. } = &mut *self;
            if conn_in(conns, token)
                .filter(|c| matches!(c.phase(), Phase::Handshake | Phase::Open))
                .is_none()
            {
                buf.clear();
                break;
            }
            match decoder.decode_client(&mut buf) {
                Ok(Some(frame)) => self.on_frame(token, frame),
                Ok(None) => break,
                Err(e) => {
                    buf.clear();
                    self.decode_failed(token, e);
                    break;
                }
            }
        }
        let partial = !buf.is_empty();
        if let Some(conn) = self.conn(token)
            && partial
        {
            if own {
                conn.rbuf = Some(Box::new(buf));
                return;
            }
            // The leftover moves to a buffer of its own size.
            conn.rbuf = Some(Box::new(BytesMut::from(&buf[..])));
        }
        if shared {
            buf.clear();
            self.read_scratch = buf;
        }
        // Otherwise a buffer of the connection's own, emptied: freed.
    }

    pub(super) fn decode_failed(&mut self, token: Token, e: DecodeError) {
        self.fatal(token, e.code(), e.to_string());
    }
}

/// The connection's user as the directory's handle (an empty name before HELLO): what the
/// messages between workers carry (a `Text` cloned out of the handle would make its buffer
/// shared, a 24-byte header for as long as the user is connected).
pub(super) fn user_handle(conn: &crate::conn::Conn) -> UserName {
    conn.user.clone().unwrap_or_else(|| UserName::from(""))
}
