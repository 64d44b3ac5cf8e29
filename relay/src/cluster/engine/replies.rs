//! The engine's read side: decoding what each shard's connections answer,
//! turning replies to commands (publishes, opens, fills, membership steps) and pub/sub
//! pushes (room messages, subscription confirmations, sharded subscriptions dropped by a
//! slot move) into [`EngineEvent`]s, following `MOVED`/`ASK` redirects, and handing the
//! events to the worker.
//!
//! Owns: reply parsing and the events built from it. Must not touch: what is sent or how
//! connections are made (the rest of the engine), rooms or connections (the worker).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::super::resp::Value;
use super::super::script;
use super::super::shard::{BACKOFF_MIN, Pending, READ_ROUND};
use super::super::{EngineErrorKind, EngineEvent, EngineMessage, FillPage, RedisAddr, malformed};
use super::{Channel, Engine, MAX_HOPS, SubState, channel_key, tryagain};

/// A command answered `MOVED` or `ASK`: where to send it again.
pub(super) enum Redirect {
    /// The slot lives on `addr` now: the map is corrected (and refreshed soon) and the
    /// command goes there.
    Moved { slot: u16, addr: RedisAddr },
    /// The slot is migrating to `addr`: `ASKING`, then the command, there (once).
    Ask { addr: RedisAddr },
}

/// Parses `MOVED <slot> <host>:<port>` or `ASK <slot> <host>:<port>`, answered by the
/// shard at `from`. An empty host (or `?`: Redis 7's `cluster-preferred-endpoint-type
/// unknown-endpoint`) is the host the command was sent to, as the cluster's slot map
/// reads it (`slots.rs`).
fn redirect(error: &[u8], from: Option<&RedisAddr>) -> Option<Redirect> {
    let text = std::str::from_utf8(error).ok()?;
    let mut parts = text.split(' ');
    let (kind, slot, addr) = (parts.next()?, parts.next()?, parts.next()?);
    let slot: u16 = slot.parse().ok()?;
    let (host, port) = addr.rsplit_once(':')?;
    let host = match host.trim_start_matches('[').trim_end_matches(']') {
        "" | "?" => from?.host.clone(),
        host => host.to_owned(),
    };
    let addr = RedisAddr {
        host,
        port: port.parse().ok()?,
    };
    match kind {
        "MOVED" => Some(Redirect::Moved { slot, addr }),
        "ASK" => Some(Redirect::Ask { addr }),
        _ => None,
    }
}

/// Whether `push` answers a `PING` on a pub/sub connection: `+PONG` before any
/// subscription, `["pong", ""]` once subscribed.
fn is_pong(push: &Value) -> bool {
    match push {
        Value::Simple(s) => &s[..] == b"PONG",
        Value::Array(Some(a)) => {
            a.len() == 2
                && a.first()
                    .and_then(Value::bytes)
                    .is_some_and(|k| &k[..] == b"pong")
        }
        _ => false,
    }
}

/// Channel `ch`, if it is (to be) subscribed on shard `i` (a push from another shard is
/// about a subscription it left).
fn channel_on<'a>(
    channels: &'a mut HashMap<Bytes, Channel>,
    ch: &[u8],
    i: usize,
) -> Option<&'a mut Channel> {
    channels.get_mut(ch).filter(|c| c.shard == Some(i))
}

impl Engine {
    /// Reads up to [`READ_ROUND`] of what shard `i`'s connection has and decodes every
    /// complete reply into `self.replies`: whether more may wait (read it once those are
    /// handled); the read's or the decoder's error comes after what decoded. A reply not
    /// whole with more than `reply_max` bytes of it read, or more replies on the command
    /// connection than commands in flight there, is an error too: Redis cannot have the
    /// node buffer without bound.
    fn read_replies(&mut self, i: usize, pubsub: bool) -> io::Result<bool> {
        let Some(shard) = self.shards.get_mut(i) else {
            return Ok(false);
        };
        let (conn, asked) = if pubsub {
            (shard.sub.as_mut(), usize::MAX)
        } else {
            (shard.cmd.as_mut(), shard.inflight.len())
        };
        let Some(conn) = conn else {
            return Ok(false);
        };
        let had = conn.rbuf.len();
        let read = conn.fill(READ_ROUND);
        let first_answer = conn.rbuf.len() != had && !conn.answered;
        if conn.rbuf.len() != had {
            // Redis is there: a PING is answered (pub/sub: nothing else is awaited
            // there), commands in flight wait afresh from now.
            conn.heard = self.woke;
            conn.awaiting = if pubsub {
                None
            } else {
                conn.awaiting.map(|_| self.woke)
            };
            conn.answered = true;
        }
        let decoded = loop {
            if self.replies.len() > asked {
                break Err(malformed("a reply nobody asked for"));
            }
            match conn.decode() {
                Ok(Some(v)) => self.replies.push(v),
                Ok(None) => break Ok(conn.rbuf.len()),
                Err(e) => break Err(malformed(e.to_string())),
            }
        };
        if first_answer {
            self.note_health();
        }
        let max = self.reply_max;
        match decoded? {
            unfinished if unfinished > max => Err(malformed(format!(
                "a reply longer than {max} bytes ({unfinished} read and not whole)"
            ))),
            _ => read,
        }
    }

    /// Reads and handles what shard `i`'s command connection has.
    pub(super) fn read_cmd(&mut self, i: usize) {
        loop {
            let result = self.read_replies(i, false);
            let mut replies = std::mem::take(&mut self.replies);
            for reply in replies.drain(..) {
                let Some((pending, hops)) =
                    self.shards.get_mut(i).and_then(|s| s.inflight.pop_front())
                else {
                    self.fail_cmd(i, &malformed("a reply nobody asked for"));
                    break;
                };
                if matches!(pending, Pending::Asking | Pending::Ping) {
                    continue;
                }
                self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
                self.stats.pipeline_depth.fetch_sub(1, Ordering::Relaxed);
                if let Value::Error(e) = &reply {
                    self.stats.count_retry(e);
                }
                if let Err(e) = self.on_reply(i, pending, hops, reply) {
                    self.fail_cmd(i, &e);
                    break;
                }
            }
            replies.clear();
            self.replies = replies;
            if self.shards.get(i).is_none_or(|s| s.cmd.is_none()) {
                return; // failed while its replies were handled
            }
            match result {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => return self.fail_cmd(i, &e),
            }
        }
    }

    fn on_reply(&mut self, i: usize, pending: Pending, hops: u8, reply: Value) -> io::Result<()> {
        let pending = match pending {
            // Behind an earlier publish of its room waiting for a retry: it waits too, in
            // order (`tryagain.rs`).
            Pending::Publish(req, _)
                if tryagain::not_run(&reply) && self.held.behind(&req.room, req.ticket) =>
            {
                self.hold_behind(req);
                return Ok(());
            }
            Pending::Publish(req, _) if tryagain::is_tryagain(&reply) && self.may_retry(&req) => {
                // The slot is mid-migration with the room's keys on both sides for a
                // moment: sent again shortly, the migration having moved on.
                self.retry_publish_later(req);
                return Ok(());
            }
            // An open or a stream read Redis did not run for now (a slot mid-migration
            // with the room's keys split, Redis loading its data, a busy script): sent
            // again shortly on its own, the connection and what else is in flight on it
            // untouched.
            p @ (Pending::Open { .. } | Pending::Fill { .. }) if matches!(&reply, Value::Error(e) if super::receipts::transient(e)) =>
            {
                if hops < MAX_HOPS {
                    self.retry_later(p, hops + 1);
                } else {
                    self.refuse(p);
                }
                return Ok(());
            }
            // Not run, and sent again now (where Redis said, or as `EVAL`) behind what is
            // in flight: its room's later publishes are held behind it.
            Pending::Publish(req, sent)
                if tryagain::not_run(&reply) && !tryagain::is_tryagain(&reply) =>
            {
                self.lead_room(&req);
                Pending::Publish(req, sent)
            }
            other => other,
        };
        if let Value::Error(e) = &reply
            && let Some(r) = redirect(e, self.shards.get(i).map(|s| &s.addr))
        {
            if hops >= MAX_HOPS {
                self.stats.count_error(EngineErrorKind::ErrorReply);
                tracing::warn!(worker = self.worker, error = %String::from_utf8_lossy(e), "a command was redirected too often");
                self.refresh_due = true;
                self.refuse(pending);
            } else {
                self.redirects.push((pending, hops + 1, r));
            }
            return Ok(());
        }
        let noscript = matches!(&reply, Value::Error(e) if e.starts_with(b"NOSCRIPT"));
        match pending {
            Pending::Asking | Pending::Ping => {}
            Pending::Wait => self.on_wait_reply(i, &reply),
            Pending::Members(step) => self.on_member_reply(step, reply, hops),
            Pending::Receipts(step) => self.on_receipts_reply(i, step, hops, reply),
            Pending::Publish(req, sent) => {
                let took = self.woke.saturating_duration_since(sent).as_micros() as u64;
                self.stats.publish_reply_us.record(took, 1);
                if noscript {
                    self.send_publish(req, true, Some(i), hops);
                    return Ok(());
                }
                match script::parse_published(&reply) {
                    Some((epoch, seq, repeated)) if epoch > 0 && seq > 0 => {
                        if !repeated && let Some(shard) = self.shards.get_mut(i) {
                            // The script published it: its copy on the channel is due.
                            shard.copies.answered(req.ticket);
                        }
                        self.publish_answered(&req.room, req.ticket);
                        let ev = EngineEvent::Published {
                            ticket: req.ticket,
                            epoch,
                            seq,
                            repeated,
                            ordered: true,
                        };
                        match self.shards.get_mut(i) {
                            // Held for the WAIT written after it (`cluster.wait_replicas`).
                            Some(shard) if self.config.wait_replicas > 0 => shard.held.push(ev),
                            // Handed over once its copy is read (`copies.rs`).
                            Some(shard) => {
                                shard.copies.ready(req.ticket, ev, self.woke, &mut self.out);
                            }
                            None => self.out.push(ev),
                        }
                    }
                    _ => {
                        self.stats.count_error(if matches!(reply, Value::Error(_)) {
                            EngineErrorKind::ErrorReply
                        } else {
                            EngineErrorKind::Protocol
                        });
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        if tryagain::is_tryagain(&reply) {
                            // Its tries are spent.
                            self.stats.retries_given_up.fetch_add(1, Ordering::Relaxed);
                        }
                        if matches!(&reply, Value::Error(e) if e.starts_with(b"READONLY")) {
                            // A replica now (a failover): ask where the master went.
                            self.lost_shard();
                        }
                        tracing::warn!(worker = self.worker, reply = ?reply, "engine refused a publish");
                        self.publish_answered(&req.room, req.ticket);
                        self.out
                            .push(EngineEvent::PublishFailed { ticket: req.ticket });
                    }
                }
            }
            Pending::Open { room, hint, tail } => {
                if noscript {
                    self.send_open(room, hint, tail, true, Some(i), hops);
                    return Ok(());
                }
                let parsed = reply.array().and_then(|a| {
                    let epoch = a.first()?.int()?;
                    let seq = a.get(1)?.int()?;
                    let mut span = script::parse_entries(a.get(2)?, &self.prefix)?;
                    // The room's last removals, this epoch's, with those of the tail.
                    for heard in a.get(3)?.array()? {
                        let (e, mark) = script::parse_channel_removal(heard.bytes()?)?;
                        if e as i64 == epoch {
                            span.marks.push(mark);
                        }
                    }
                    span.marks.sort_by_key(super::super::RemovalMark::place);
                    span.marks.dedup_by_key(|m| m.place());
                    Some((epoch, seq, span))
                });
                let Some((epoch, seq, span)) = parsed.filter(|(e, s, _)| *e > 0 && *s >= 0) else {
                    if let Some(c) = self.channels.get_mut(&channel_key(&room)) {
                        c.opens.push((hint, tail));
                    }
                    return Err(malformed(format!("bad answer to a room's open: {reply:?}")));
                };
                self.out.push(EngineEvent::Opened {
                    room,
                    epoch: epoch as u64,
                    seq: seq as u64,
                    tail: span.msgs,
                    marks: span.marks,
                });
            }
            Pending::Fill {
                room,
                after,
                reader: None,
            } if noscript => self.send_fill(room, after, None, Some(i), hops, true),
            Pending::Fill {
                room,
                after,
                reader,
            } if matches!(reply, Value::Error(_)) => {
                // Redis refused the read (a room's key of the wrong type, say): an error
                // reply, not a broken connection; read again later (a room that stays
                // broken is read every 1.6 s, not in a loop).
                self.stats.count_error(EngineErrorKind::ErrorReply);
                tracing::warn!(worker = self.worker, room = %room.name, ?reply, "a stream read was refused");
                let p = Pending::Fill {
                    room,
                    after,
                    reader,
                };
                self.retry_later(p, MAX_HOPS);
            }
            Pending::Fill {
                room,
                after,
                reader,
            } => {
                let parsed = match reader {
                    None => script::parse_fill(&reply, &self.prefix, after),
                    Some(_) => script::parse_entries(&reply, &self.prefix).map(|s| (0, 0, s)),
                };
                let Some((epoch, room_seq, span)) = parsed else {
                    self.fills_waiting.push((room, after, reader));
                    return Err(malformed(format!("bad answer to a stream read: {reply:?}")));
                };
                let full = span.entries >= self.config.fill_batch;
                self.out.push(match reader {
                    None => EngineEvent::Filled {
                        room,
                        page: FillPage {
                            epoch,
                            room_seq,
                            after: after.0,
                            msgs: span.msgs,
                            marks: span.marks,
                            full,
                        },
                    },
                    // A reader pages messages: the removals are the owner's.
                    Some(reader) => EngineEvent::Read {
                        room,
                        after: after.0,
                        reader,
                        last: span.last.max(after.0),
                        msgs: span.msgs,
                        full,
                    },
                });
            }
        }
        Ok(())
    }

    /// `WAIT`'s answer: the replicas that hold every publish written before it. Enough
    /// hands over the acknowledgements held for it; fewer (or an error) refuses them.
    fn on_wait_reply(&mut self, i: usize, reply: &Value) {
        let Some(shard) = self.shards.get_mut(i) else {
            return;
        };
        let held = std::mem::take(&mut shard.held);
        let replicas = reply.int().unwrap_or(-1);
        if replicas >= i64::from(self.config.wait_replicas) {
            // Each then waits for its copy, if that is not read yet (`copies.rs`).
            for ev in held {
                let ticket = match &ev {
                    EngineEvent::Published { ticket, .. } => *ticket,
                    _ => u64::MAX,
                };
                shard.copies.ready(ticket, ev, self.woke, &mut self.out);
            }
            return;
        }
        self.stats.count_error(EngineErrorKind::Replicas);
        tracing::warn!(worker = self.worker, reply = ?reply, want = self.config.wait_replicas, "too few replicas acknowledged; publishes refused (cluster.wait_replicas)");
        self.fail_held(held);
    }

    /// Reads and handles what shard `i`'s pub/sub connection has.
    pub(super) fn read_sub(&mut self, i: usize) {
        loop {
            let result = self.read_replies(i, true);
            let mut pushes = std::mem::take(&mut self.replies);
            for push in pushes.drain(..) {
                self.on_push(i, &push);
            }
            self.replies = pushes;
            match result {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => return self.fail_sub(i, &e),
            }
        }
    }

    fn on_push(&mut self, i: usize, push: &Value) {
        if is_pong(push) {
            return; // a PING's answer (`cluster.reply_timeout`): heard, nothing more
        }
        if let Value::Error(e) = push {
            self.stats.count_retry(e);
            // A sharded subscription sent to a shard that no longer serves its slot.
            match redirect(e, self.shards.get(i).map(|s| &s.addr)) {
                Some(Redirect::Moved { slot, addr }) => {
                    let shard = self.shard_at(&addr);
                    if let Some(map) = self.map.as_mut() {
                        map.set(slot, shard);
                    }
                    self.refresh_due = true;
                    for c in self.channels.values_mut().filter(|c| c.shard == Some(i)) {
                        if c.state == SubState::Subscribing {
                            c.state = SubState::Idle;
                        }
                    }
                    self.route_channels();
                }
                // Redis busy for a while (a script past `busy-reply-threshold`, loading its
                // data): an answer, not an error, and no sign the slot map moved. It may
                // answer a `PING` (the connection is fine) or a subscription: what was
                // being subscribed goes again after a backoff.
                _ if super::receipts::transient(e) => {
                    tracing::debug!(worker = self.worker, error = %String::from_utf8_lossy(e), "the pub/sub connection answered busy");
                    self.subscriptions_refused(i);
                }
                // Anything else (a permission, say): an error reply; subscribed again
                // after a backoff.
                _ => {
                    self.stats.count_error(EngineErrorKind::ErrorReply);
                    self.lost_shard();
                    tracing::warn!(worker = self.worker, error = %String::from_utf8_lossy(e), "the pub/sub connection refused a subscription");
                    self.subscriptions_refused(i);
                }
            }
            return;
        }
        let Some([kind, ch, body]) = push.array() else {
            self.stats.count_error(EngineErrorKind::Protocol);
            tracing::warn!(worker = self.worker, push = ?push, "unexpected reply on the pub/sub connection");
            return;
        };
        let (Some(kind), Some(ch)) = (kind.bytes(), ch.bytes()) else {
            return;
        };
        if matches!(&kind[..], b"subscribe" | b"ssubscribe")
            && let Some(shard) = self.shards.get_mut(i)
        {
            // Subscriptions are taken again: a later refusal backs off from the start.
            shard.sub_retry.delay = BACKOFF_MIN;
        }
        if self.on_user_push(kind, ch, body) {
            return;
        }
        match &kind[..] {
            b"message" | b"smessage" => {
                let Some(c) = self.channels.get(&ch[..]) else {
                    return; // unsubscribed meanwhile
                };
                if let Some((epoch, markers)) = body
                    .bytes()
                    .and_then(|b| super::super::receipts::parse_markers_message(b))
                {
                    return self.out.push(EngineEvent::Markers {
                        room: c.room.clone(),
                        epoch,
                        markers,
                    });
                }
                if let Some((epoch, mark)) = body.bytes().and_then(script::parse_channel_removal) {
                    return self.out.push(EngineEvent::Removal {
                        room: c.room.clone(),
                        epoch,
                        mark,
                    });
                }
                match body
                    .bytes()
                    .and_then(|b| script::parse_channel_message(b, &self.prefix))
                {
                    // This worker's own publish whose answer came first: the answer,
                    // released by this copy (`copies.rs`), carries it.
                    Some((
                        _,
                        EngineMessage {
                            ticket: Some(t), ..
                        },
                    )) if self
                        .shards
                        .get_mut(i)
                        .is_some_and(|s| s.copies.copy_read(t, &mut self.out))
                        // Its acknowledgement waits for WAIT: the copy must not resolve
                        // it first (the answer comes on the command connection, or the
                        // publish fails with it and the hole is read from the stream).
                        || self.config.wait_replicas > 0 => {}
                    Some((epoch, msg)) => self.out.push(EngineEvent::Message {
                        room: c.room.clone(),
                        epoch,
                        msg,
                    }),
                    None => {
                        self.stats.count_error(EngineErrorKind::Protocol);
                        tracing::warn!(
                            worker = self.worker,
                            "a malformed message on a room's channel was dropped"
                        );
                        // The owner sees the hole at the next message and reads it back.
                    }
                }
            }
            b"subscribe" | b"ssubscribe" => {
                let Some(c) = channel_on(&mut self.channels, ch, i) else {
                    return;
                };
                if c.state != SubState::Subscribed {
                    c.state = SubState::Subscribed;
                    self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
                }
                if c.opened && c.opens.is_empty() {
                    self.out.push(EngineEvent::Resubscribed {
                        room: c.room.clone(),
                    });
                }
                let ch = ch.clone();
                self.send_opens(&ch);
            }
            b"sunsubscribe" => {
                // Redis dropped a sharded subscription we still hold (its slot moved): it
                // is subscribed again where the slot now lives, and the owner catches up
                // from the stream once that is confirmed.
                let Some(c) = channel_on(&mut self.channels, ch, i) else {
                    return;
                };
                if c.state == SubState::Subscribed {
                    self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
                }
                c.state = SubState::Idle;
                self.refresh_due = true;
                self.route_channels();
            }
            _ => {}
        }
    }

    /// Hands the events to the worker and wakes it.
    pub(super) fn deliver_events(&mut self) {
        if self.out.is_empty() {
            return;
        }
        for ev in self.out.drain(..) {
            let mut ev = (self.woke, ev);
            loop {
                match self.events.send_timeout(ev, Duration::from_millis(100)) {
                    Ok(()) => break,
                    Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                        if self.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        (self.wake_worker)();
                        ev = back;
                    }
                    Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return,
                }
            }
        }
        (self.wake_worker)();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;

    /// An empty or unknown host in a redirect is the host the command went to (Redis 7,
    /// `cluster-preferred-endpoint-type unknown-endpoint`); before, it was dialed as
    /// host "", and every redirected command for the slot failed. Found by review.
    #[test]
    fn a_redirect_without_a_host_goes_to_the_host_that_answered() {
        let from = RedisAddr {
            host: "10.0.0.5".into(),
            port: 6379,
        };
        for error in [&b"MOVED 3999 :6380"[..], b"MOVED 3999 ?:6380"] {
            let Some(Redirect::Moved { slot, addr }) = redirect(error, Some(&from)) else {
                panic!("a MOVED");
            };
            assert_eq!(
                (slot, addr.host.as_str(), addr.port),
                (3999, "10.0.0.5", 6380)
            );
        }
        let Some(Redirect::Ask { addr }) = redirect(b"ASK 1 [::1]:7000", Some(&from)) else {
            panic!("an ASK");
        };
        assert_eq!((addr.host.as_str(), addr.port), ("::1", 7000));
        assert!(redirect(b"MOVED 3999 :6380", None).is_none());
    }
}
