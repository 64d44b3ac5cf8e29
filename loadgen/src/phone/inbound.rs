//! What a phone does with the frames it receives: the session's events turned into
//! measurements (latency, link time, gaps) and ledger entries, subscriptions and cursors
//! kept, cumulative ACKs scheduled, and each delivery checked against the ledger (order,
//! duplicates, content).
//!
//! Must not touch the byte path ([`super::wire`]) nor the connection's life cycle
//! ([`super`]); it reports a contradiction as a violation, it never ends the run.

use std::time::{Duration, Instant};

use pabal_codec::{ClientFrame, Event, GoAwayReason, Pong, ServerFrame, Subscribe, Text};
use rand::Rng;

use crate::gaps::GapSeen;
use crate::ledger::{Claim, Msg};
use crate::metrics::{DeliveryRecord, record_ns};
use crate::payload::{FLAG_SENDER_IDLE, Header, PayloadError};
use crate::schedule::Schedule;
use crate::verify::{Kind, Violation};

use super::{Ctx, Phone, Shared, State, Why, ms_u32, report_conflict};

impl Phone {
    pub(super) fn on_frame(&mut self, frame: ServerFrame, end: u64, len: usize, ctx: &mut Ctx<'_>) {
        self.last_rx = ctx.now;
        self.probe_sent = None;
        let alias = match &frame {
            ServerFrame::Deliver(d) => Some(d.header.alias),
            ServerFrame::Gap(g) => Some(g.alias),
            ServerFrame::Room(r) => Some(r.alias),
            ServerFrame::Left(l) => Some(l.alias),
            _ => None,
        };
        match self.session.apply(frame) {
            Ok(event) => self.on_event(event, end, len, ctx),
            Err(e) => {
                let room = alias.and_then(|a| self.slot_of_alias(a)).map(|s| {
                    ctx.shared.plan.rooms[self.rooms[s].room as usize]
                        .name
                        .clone()
                });
                ctx.violations.add(
                    Violation {
                        kind: Kind::Session,
                        phone: Some(self.label(ctx.shared)),
                        room,
                        detail: e.to_string(),
                    },
                    1,
                );
                self.close(ctx, Why::Error);
            }
        }
    }

    /// Handles `frame` as if it had just arrived from the relay (tests: fabricated streams).
    pub fn feed_frame(&mut self, frame: ServerFrame, ctx: &mut Ctx<'_>) {
        let len = frame.encoded_len();
        self.on_frame(frame, 0, len, ctx);
    }

    pub(super) fn sync_cursor(&mut self, alias: u32) -> Option<usize> {
        let slot = self.slot_of_alias(alias)?;
        // What the phone holds: its cursor, passed by its own acknowledged sequences after
        // it (a PUBACK can come before the DELIVERs below it; the next HELLO resumes there).
        if let (Some(rs), Some(held)) = (self.session.room(alias), self.session.held(alias)) {
            self.rooms[slot].known = Some((rs.epoch, held));
        }
        Some(slot)
    }

    pub(super) fn want_ack(&mut self, now: Instant, interval: Option<Duration>) {
        if let Some(i) = interval
            && self.next_ack.is_none()
        {
            self.next_ack = Some(now + i);
        }
    }

    pub(super) fn on_event(&mut self, event: Event, end: u64, len: usize, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        let shared = ctx.shared;
        match event {
            Event::Welcome(w) => {
                self.state = State::Open;
                *ctx.connected += 1;
                self.attempts = 0;
                let took = now
                    .saturating_duration_since(self.connect_started)
                    .as_nanos() as u64;
                let c = &mut ctx.metrics.counters;
                c.welcomes += 1;
                if self.ever_welcomed {
                    c.reconnects += 1;
                    record_ns(&mut ctx.metrics.reconnect, took);
                } else {
                    record_ns(&mut ctx.metrics.connect, took);
                }
                self.ever_welcomed = true;
                self.welcomed_at = Some(now);
                self.granted_hb = (w.heartbeat_secs > 0)
                    .then(|| Duration::from_secs(u64::from(w.heartbeat_secs)));
                if shared.tokens.self_join() {
                    for i in 0..self.rooms.len() {
                        if self.rooms[i].alias.is_none() {
                            self.subscribe(i, shared);
                        }
                    }
                }
                if self.sched.is_none()
                    && let Some(plan) = &shared.plan.phones[self.idx as usize].send
                {
                    let at = now.max(shared.steady_start);
                    self.sched = Some(Schedule::new(plan, at, shared.publish_end, &mut self.rng));
                }
            }
            Event::Bound {
                alias,
                room,
                previous_epoch,
                ..
            } => {
                let Some(slot) = self.slot_of_id(shared, room.room_id) else {
                    ctx.violations.add(
                        Violation {
                            kind: Kind::Misrouted,
                            phone: Some(self.label(shared)),
                            room: room.name.as_ref().map(|n| n.to_string()),
                            detail: format!("bound to alias {alias}, not one of the phone's rooms"),
                        },
                        0,
                    );
                    return;
                };
                for r in &mut self.rooms {
                    if r.alias == Some(alias) {
                        r.alias = None;
                    }
                }
                let label = self.label(shared);
                // Own sequences above the ROOM's cursor stay the phone's on a new binding.
                let held = self.session.held(alias).unwrap_or(room.cursor);
                let r = &mut self.rooms[slot];
                r.alias = Some(alias);
                shared.ledger.note_epoch(r.room, room.epoch);
                if r.known != Some((room.epoch, held)) {
                    // A new stream (a join, another epoch, a moved cursor): what came before
                    // may legitimately come again.
                    r.forget_recent();
                }
                if previous_epoch.is_some() {
                    ctx.metrics.counters.epoch_resets += 1;
                } else if !std::mem::take(&mut r.resync)
                    && let Some((epoch, cursor)) = r.known
                    && epoch == room.epoch
                    && cursor != held
                {
                    let (what, n) = if held > cursor {
                        ("skipped", held - cursor)
                    } else {
                        ("rewound", cursor - held)
                    };
                    ctx.violations.add(
                        Violation {
                            kind: Kind::CursorJump,
                            phone: Some(label),
                            room: Some(shared.plan.rooms[r.room as usize].name.clone()),
                            detail: format!(
                                "ROOM {what} the cursor from {cursor} to {held} in epoch {epoch}"
                            ),
                        },
                        n,
                    );
                }
                r.known = Some((room.epoch, held));
                r.acked = r.acked.min(room.cursor);
            }
            Event::Left { alias, .. } => {
                ctx.metrics.counters.lefts += 1;
                if let Some(slot) = self.rooms.iter().position(|r| r.alias == Some(alias)) {
                    // Announced: the room is gone from this connection; a later binding starts
                    // from its new join point.
                    let r = &mut self.rooms[slot];
                    r.alias = None;
                    r.known = None;
                    r.acked = 0;
                    r.forget_recent();
                    if shared.tokens.self_join() {
                        self.subscribe(slot, shared);
                    }
                }
            }
            Event::Message {
                alias,
                seq: Some(seq),
                payload,
                ..
            } => {
                self.last_deliver = Some(now);
                ctx.metrics.counters.delivered += 1;
                let slot = self.sync_cursor(alias);
                self.want_ack(now, shared.settings.ack_interval);
                let Some(slot) = slot else { return };
                let Some(h) = self.check_delivery(slot, seq, &payload, ctx) else {
                    return;
                };
                let room = self.rooms[slot].room;
                let at_ns = shared.since_start(now);
                let e2e = at_ns.saturating_sub(h.intended_ns);
                let bucket = shared.plan.rooms[room as usize].bucket;
                let offer = self.offer_of(end);
                let m = &mut *ctx.metrics;
                // Live: the receiver was connected when the message was meant to be sent.
                // Otherwise its latency is mostly the receiver's absence: kept apart.
                let live = self
                    .welcomed_at
                    .is_some_and(|w| h.intended_ns >= shared.since_start(w));
                let mut link = None;
                if live {
                    m.e2e.record(self.profile, bucket, e2e);
                    record_ns(ctx.second, e2e);
                    let down = offer.map(|o| now.saturating_duration_since(o.at).as_nanos() as u64);
                    let up = shared.uplink.load(h.sender, h.counter);
                    link = up.zip(down).map(|(u, d)| u + d);
                    match link {
                        Some(l) => {
                            m.link.record(self.profile, bucket, l);
                            m.relay.record(self.profile, bucket, e2e.saturating_sub(l));
                            record_ns(ctx.second_relay, e2e.saturating_sub(l));
                        }
                        None => m.counters.link_unknown += 1,
                    }
                    if h.flags & FLAG_SENDER_IDLE != 0 || offer.is_some_and(|o| o.idle) {
                        record_ns(&mut m.after_idle, e2e);
                    }
                } else {
                    m.counters.delivered_resumed += 1;
                    record_ns(&mut m.resumed, e2e);
                }
                if let Some(trace) = &mut m.trace {
                    trace.push(DeliveryRecord {
                        phone: self.idx,
                        room,
                        seq,
                        sender: h.sender,
                        at_ns,
                        e2e_ns: e2e,
                        link_ns: link,
                        frame_len: len as u32,
                    });
                }
            }
            Event::Message { seq: None, .. } => {}
            Event::Gap {
                alias, from, to, ..
            } => {
                let c = &mut ctx.metrics.counters;
                c.gaps += 1;
                c.gap_messages += to - from + 1;
                self.last_deliver = Some(now);
                if let Some(slot) = self.sync_cursor(alias)
                    && let Some((epoch, _)) = self.rooms[slot].known
                {
                    ctx.gaps.push(GapSeen {
                        phone: self.idx,
                        room: self.rooms[slot].room,
                        epoch,
                        from,
                        to,
                        at_ms: shared.since_start(now) / 1_000_000,
                    });
                }
            }
            Event::PubAck { alias, msg_id, seq } => {
                ctx.metrics.counters.acked += 1;
                if let Some(i) = self.inflight.iter().position(|f| f.msg_id == msg_id) {
                    let f = self.inflight.swap_remove(i);
                    let msg = Msg {
                        sender: self.idx,
                        counter: f.counter,
                    };
                    let mut conflicts = Vec::new();
                    shared
                        .ledger
                        .ack(f.room, seq, msg, f.intended_ms, &mut conflicts);
                    conflicts.into_iter().for_each(|c| report_conflict(&c, ctx));
                }
                self.sync_cursor(alias);
            }
            Event::Ping(_) => {
                ctx.metrics.counters.pongs += 1;
                self.send_frame(&ClientFrame::Pong(Pong::default()));
            }
            Event::Pong(_) => {}
            // Protocol v3 markers: the virtual phones render nothing; the bytes are counted
            // with everything else received.
            Event::Receipt { .. } => {}
            Event::Error(e) => {
                if let Some(i) = self
                    .inflight
                    .iter()
                    .position(|f| f.msg_id == e.reference && e.reference != 0)
                {
                    self.inflight.swap_remove(i);
                    ctx.metrics.counters.refused += 1;
                }
                let key = format!("{:?}{}", e.code, if e.fatal { " (fatal)" } else { "" });
                *ctx.metrics.counters.errors.entry(key).or_default() += 1;
                if e.fatal {
                    self.close(ctx, Why::Error);
                }
            }
            Event::GoAway(g) => {
                let reason = match g.reason {
                    GoAwayReason::Overload => "overload".to_string(),
                    other => format!("{other:?}").to_lowercase(),
                };
                *ctx.metrics.counters.goaways.entry(reason).or_default() += 1;
                // Honour the hint, plus a little jitter of our own (PROTOCOL.md §14).
                let jitter = self
                    .rng
                    .random_range(0..=(g.retry_after_ms / 10).clamp(50, 1000));
                let wait = Duration::from_millis(g.retry_after_ms.saturating_add(jitter));
                self.close(ctx, Why::GoAway(wait));
            }
        }
        if self.state == State::Open
            && let Some(targets) = &self.resume
            && targets
                .iter()
                .all(|&(slot, target)| self.rooms[slot].known.is_some_and(|(_, c)| c >= target))
        {
            let took = now
                .saturating_duration_since(self.connect_started)
                .as_nanos() as u64;
            record_ns(&mut ctx.metrics.resume, took);
            self.resume = None;
        }
    }

    pub(super) fn subscribe(&mut self, slot: usize, shared: &Shared) {
        let room = &shared.plan.rooms[self.rooms[slot].room as usize];
        self.send_frame(&ClientFrame::Subscribe(Subscribe {
            room: !room.channel,
            name: Text::from(room.name.as_str()),
        }));
    }

    /// Checks a delivery's payload and records the phone's claim in the ledger; the header
    /// if the message is worth measuring.
    pub(super) fn check_delivery(
        &mut self,
        slot: usize,
        seq: u64,
        payload: &[u8],
        ctx: &mut Ctx<'_>,
    ) -> Option<Header> {
        let shared = ctx.shared;
        let room = self.rooms[slot].room;
        let label = self.label(shared);
        let violation = |kind, detail| Violation {
            kind,
            phone: Some(label.clone()),
            room: Some(shared.plan.rooms[room as usize].name.clone()),
            detail,
        };
        let h = match Header::parse(payload) {
            Ok(h) => h,
            Err(e) => {
                let kind = match e {
                    PayloadError::Foreign { .. } => Kind::Content,
                    PayloadError::Corrupted { .. } => Kind::Corrupted,
                };
                ctx.violations
                    .add(violation(kind, format!("seq {seq}: {e}")), 1);
                return None;
            }
        };
        let msg = Msg {
            sender: h.sender,
            counter: h.counter,
        };
        if !self.rooms[slot].remember(msg) {
            // Its sequence is wrong too, and so will be every implicit one after it on this
            // connection: start over from the cursor (the violation is recorded).
            ctx.violations.add(
                violation(
                    Kind::Duplicate,
                    format!("{msg} delivered again, as seq {seq}"),
                ),
                1,
            );
            self.rooms[slot].start_over();
            self.close(ctx, Why::Error);
            return None;
        }
        let mut conflicts = Vec::new();
        let claim = Claim {
            room,
            seq,
            phone: self.idx,
            msg,
        };
        shared
            .ledger
            .claim(claim, ms_u32(h.intended_ns), &mut conflicts);
        let mine = conflicts.iter().any(|c| c.phone() == Some(self.idx));
        conflicts.iter().for_each(|c| report_conflict(c, ctx));
        if mine {
            // Implicit sequences after a misplaced message are misplaced too: resynchronise.
            self.rooms[slot].start_over();
            self.close(ctx, Why::Error);
            return None;
        }
        Some(h)
    }
}
