//! Delivery: writing a room's messages to this worker's connections. Live fan-out, the
//! answers to subscriptions and page requests (catch-up from history, GAPs), queue caps and
//! the lagging state, ephemeral events and their backlog, binding and unbinding aliases as
//! membership changes.
//!
//! Owns: per-connection stream positions and output queues. Must not touch: owned rooms
//! (history is read only through the pages owners send), sockets.

use bytes::Bytes;
use pabal_codec::{DeliverContext, Left, LeftReason, PubAck, Room, ServerFrame, Text};

use super::*;
use crate::conn::{Phase, StartKind, Sub, SubMode, deliver_bound};
use crate::directory::JoinPoint;
use crate::ids::{Origin, RoomName, Stored, StoredRef, UserName};
use crate::io::Token;
use crate::mesh::{CoreMsg, Page, PublishedBy, StartFrom};
use crate::stats::{dec, inc};

/// Advances an alias past `msg`: the header to write, or `None` when the message is the
/// connection's own (its position moves past it, its client cursor does not: the client
/// accounted for it at PUBACK, which always precedes the delivery; a client keeps its own
/// sequences per room across LEFT and ROOM, PROTOCOL.md §9). The one rule for live and
/// replayed deliveries alike.
pub(super) fn advance(
    ctx: &mut DeliverContext<SenderName>,
    sub: &mut Sub,
    alias: u32,
    msg: &Stored,
    me: Origin,
    sender_aliases: usize,
) -> Option<pabal_codec::DeliverHeader<SenderName>> {
    sub.set_position(msg.seq);
    if msg.origin == Some(me) {
        return None;
    }
    let header = ctx.header(
        alias,
        Some(msg.seq),
        sub.cursor,
        &msg.sender,
        msg.ts_ms,
        sender_aliases,
    );
    sub.cursor = msg.seq;
    Some(header)
}

/// The ROOM frame of a binding. Its name is a copy of the room's (made and freed with the
/// frame, at binding time only): a clone of the shared record's `Text` would make the
/// name's buffer shared, a 24-byte header kept for as long as the room lives (one per 1:1
/// room, 12 bytes per idle phone).
pub(super) fn room_frame(alias: u32, sub: &Sub, head: u64) -> ServerFrame {
    ServerFrame::Room(Room {
        alias,
        channel: sub.room.channel,
        room_id: sub.room.id,
        epoch: sub.epoch,
        cursor: sub.cursor,
        head: head.max(sub.cursor),
        name: Text::from(sub.room.name.as_str()),
    })
}

impl Core {
    pub(super) fn on_accepted(&mut self, by: PublishedBy, seq: u64) {
        let (token, msg_id) = (by.origin.token, by.msg_id);
        let Some(conn) = self.conn(token) else { return };
        conn.publishes_in_flight = conn.publishes_in_flight.saturating_sub(1);
        let failing = conn.phase() == Phase::Failing;
        if let Some(Some(sub)) = conn.subs.get_mut(by.alias as usize)
            && sub.request == by.binding
        {
            if sub.is_pending() {
                // A resumed alias whose owner has not answered yet (on a cluster, a repeat's
                // PUBACK can come first): the client's rule moves its cursor from the one it
                // resumed with all the same. The position, unused while pending, keeps where
                // it moved; `on_subscribed` starts past it.
                if matches!(sub.start_from(), Some(StartFrom::Resume { .. }))
                    && sub.cursor.max(sub.position()).checked_add(1) == Some(seq)
                {
                    sub.set_position(seq);
                }
            } else {
                // The same rule as the client's: a contiguous own message advances the
                // cursor, if the alias is still bound by the subscription it was published
                // on (so to the same room).
                if sub.cursor + 1 == seq {
                    sub.cursor = seq;
                }
                if sub.position() + 1 == seq {
                    sub.set_position(seq);
                }
            }
        }
        self.write(token, &ServerFrame::PubAck(PubAck { msg_id, seq }));
        if failing && self.conn(token).is_some_and(|c| c.publishes_in_flight == 0) {
            self.finish_failing(token);
        }
    }

    /// The owner's log refused a publish: the publisher gets a non-fatal ERROR naming the
    /// message (`Overloaded` with `storage_full`: retry later) instead of a PUBACK.
    pub(super) fn on_not_accepted(&mut self, by: PublishedBy, code: ErrorCode, message: String) {
        let token = by.origin.token;
        let Some(conn) = self.conn(token) else { return };
        conn.publishes_in_flight = conn.publishes_in_flight.saturating_sub(1);
        let failing = conn.phase() == Phase::Failing;
        self.refuse(token, code, by.msg_id, message);
        if failing && self.conn(token).is_some_and(|c| c.publishes_in_flight == 0) {
            self.finish_failing(token);
        }
    }

    #[allow(clippy::too_many_arguments)] // reason: the fields of one message, unpacked
    pub(super) fn on_subscribed(
        &mut self,
        room: RoomName,
        token: Token,
        alias: u32,
        epoch: u64,
        head: u64,
        start: u64,
        page: Page,
        request: u64,
    ) {
        let core = self.id;
        let Some(conn) = self.conn(token) else {
            return self.send_to_owner(&room.clone(), CoreMsg::Unsubscribed { room, core });
        };
        let Some(sub) = conn
            .sub_for(alias, &room)
            .filter(|s| s.is_pending() && s.request == request)
        else {
            return self.send_to_owner(&room.clone(), CoreMsg::Unsubscribed { room, core });
        };
        let clean_resume = matches!(sub.start_from(),
            Some(StartFrom::Resume { epoch: e, last_seq }) if e == epoch && last_seq == start);
        // Where the client's cursor moved past `start` by PUBACKs of its own messages while
        // the binding was pending (`on_accepted`); they are not sent back.
        let own_past = sub.position().max(start);
        sub.epoch = epoch;
        sub.cursor = start;
        sub.set_position(start);
        if clean_resume {
            sub.cursor = own_past;
            sub.set_position(own_past);
        }
        sub.mode = SubMode::CatchingUp { fetching: false };
        let frame = (!clean_resume).then(|| {
            let mut frame = room_frame(alias, sub, head);
            if let ServerFrame::Room(r) = &mut frame {
                r.cursor = start;
            }
            frame
        });
        if let Some(frame) = frame {
            self.write(token, &frame);
        }
        self.local
            .entry(room.clone())
            .or_default()
            .push(Subscriber::new(token, alias));
        // A phone resuming hundreds of rooms gets one first page per room; past its queue
        // cap the rest wait and are fetched page by page as the socket drains, like any
        // lagging connection, so a resume never grows memory past the cap.
        let cap = self.config.connection.max_queued_bytes;
        let page = if self.conn(token).is_some_and(|c| c.queued() >= cap) && !page.complete {
            Page::default()
        } else {
            page
        };
        self.apply_page(token, alias, page);
    }

    pub(super) fn on_paged(
        &mut self,
        room: &RoomName,
        token: Token,
        alias: u32,
        page: Page,
        request: u64,
    ) {
        let Some(conn) = self.conn(token) else { return };
        conn.fetches = conn.fetches.saturating_sub(1);
        let Some(sub) = conn.sub_for(alias, room).filter(|s| s.request == request) else {
            return;
        };
        if sub.mode != (SubMode::CatchingUp { fetching: true }) {
            return;
        }
        sub.mode = SubMode::CatchingUp { fetching: false };
        self.apply_page(token, alias, page);
    }

    /// Writes a page of history to a catching-up alias; goes live when the page completes.
    pub(super) fn apply_page(&mut self, token: Token, alias: u32, page: Page) {
        let me = self.origin(token);
        let low_water = self.low_water();
        let window = self.config.connection.max_queued_bytes;
        let sender_aliases = self.config.connection.sender_aliases;
        let Core {
            conns,
            dirty,
            stats,
            ..
        } = self;
        let Some(conn) = conn_in(conns, token).filter(|c| c.is_open()) else {
            return;
        };
        if let Some((_, to)) = page.gap {
            let Some(Some(sub)) = conn.subs.get_mut(alias as usize) else {
                return;
            };
            if to > sub.position() {
                // The client's cursor may trail `position` by its own skipped messages; the
                // gap covers those too, which the client already holds as its own.
                let gap = pabal_codec::Gap {
                    alias,
                    from: sub.cursor + 1,
                    to,
                };
                sub.cursor = to;
                sub.set_position(to);
                conn.write(&ServerFrame::Gap(gap));
                inc(&stats.gaps, 1);
            }
        }
        let mut written = 0;
        // The window holds: what does not fit waits for the next page, fetched from
        // `position` once the socket drains.
        let mut cut_short = false;
        for msg in &page.msgs {
            match conn.subs.get(alias as usize) {
                Some(Some(sub)) if msg.seq <= sub.position() => continue,
                Some(Some(_)) => {}
                _ => return,
            }
            if !conn.window_allows(deliver_bound(msg.payload.len(), &msg.sender), window) {
                cut_short = true;
                break;
            }
            let header = {
                let Some(Some(sub)) = conn.subs.get_mut(alias as usize) else {
                    return;
                };
                match advance(&mut conn.ctx, sub, alias, msg, me, sender_aliases) {
                    Some(header) => header,
                    None => continue,
                }
            };
            conn.write_deliver(&header, &msg.payload);
            written += 1;
        }
        inc(&stats.deliveries, written);
        inc(&stats.replayed, written);
        let Some(Some(sub)) = conn.subs.get_mut(alias as usize) else {
            return;
        };
        sub.mode = if page.complete && !cut_short {
            SubMode::Live
        } else {
            SubMode::CatchingUp { fetching: false }
        };
        Self::mark_dirty(dirty, token, conn);
        // A page cut short waits for the socket to drain (`on_sent` asks again): asking now
        // would fetch the same message that did not fit, again and again.
        if !page.complete && !cut_short && conn.queued() <= low_water {
            self.request_pages(token);
        }
        self.update_lagging(token);
    }

    pub(super) fn low_water(&self) -> usize {
        self.config.connection.max_queued_bytes / 4
    }

    /// Asks owners for the next page of every catching-up alias of a connection, within a
    /// budget of pages in flight that keeps the queue near its cap.
    pub(super) fn request_pages(&mut self, token: Token) {
        // Pages are asked for only below the low-water mark, so the pages in flight fill at
        // most the rest of the cap.
        let cap = self.config.connection.max_queued_bytes;
        let budget = ((cap - cap / 4) / self.config.connection.replay_page_bytes)
            .clamp(1, usize::from(u16::MAX));
        let origin = self.origin(token);
        let mut requests = Vec::new();
        {
            let Some(conn) = self.conn(token) else { return };
            if conn.phase() != Phase::Open {
                return;
            }
            let mut fetches = usize::from(conn.fetches);
            for (alias, sub) in conn.subs.iter_mut().enumerate() {
                if fetches >= budget {
                    break;
                }
                if let Some(sub) = sub
                    && sub.mode == (SubMode::CatchingUp { fetching: false })
                {
                    sub.mode = SubMode::CatchingUp { fetching: true };
                    fetches += 1;
                    requests.push((sub.room.clone(), alias as u32, sub.position(), sub.request));
                }
            }
            conn.fetches = u16::try_from(fetches).unwrap_or(u16::MAX);
        }
        let user = self
            .conn(token)
            .map_or_else(|| UserName::from(""), |c| super::client::user_handle(c));
        for (room, alias, after, request) in requests {
            self.send_to_owner(
                &room.clone(),
                CoreMsg::Fetch {
                    room,
                    origin,
                    alias,
                    user: user.clone(),
                    after,
                    request,
                },
            );
        }
    }

    /// Keeps the lagging flag and gauge in step with the connection's aliases.
    pub(super) fn update_lagging(&mut self, token: Token) {
        let Core { conns, stats, .. } = self;
        let Some(conn) = conn_in(conns, token) else {
            return;
        };
        let lagging = conn
            .subs
            .iter()
            .flatten()
            .any(|s| matches!(s.mode, SubMode::CatchingUp { .. }));
        match (conn.lagging(), lagging) {
            (false, true) => {
                inc(&stats.lagging, 1);
                inc(&stats.lag_events, 1);
            }
            (true, false) => dec(&stats.lagging, 1),
            _ => {}
        }
        conn.set_lagging(lagging);
    }

    /// Writes a new message to every live connection of this worker subscribed to the room.
    pub(super) fn fan_out(&mut self, room: &RoomName, msg: &StoredRef) {
        let core = self.id;
        let cap = self.config.connection.max_queued_bytes;
        let sender_aliases = self.config.connection.sender_aliases;
        let mut fell_behind: Vec<Token> = Vec::new();
        let Core {
            local,
            conns,
            dirty,
            stats,
            ..
        } = self;
        let Some(subs) = local.get(room) else { return };
        let mut written = 0;
        for (token, alias) in subs.iter().map(|s| s.parts()) {
            let Some(conn) = conn_in(conns, token).filter(|c| c.is_open()) else {
                continue;
            };
            let over_cap = !conn.window_allows(deliver_bound(msg.payload.len(), &msg.sender), cap);
            let header = {
                let Some(Some(sub)) = conn.subs.get_mut(alias as usize) else {
                    continue;
                };
                if sub.mode != SubMode::Live || msg.seq <= sub.position() {
                    continue;
                }
                if msg.seq != sub.position() + 1 || over_cap {
                    // Behind (queue full) or a hole: catch up from history instead.
                    sub.mode = SubMode::CatchingUp { fetching: false };
                    fell_behind.push(token);
                    continue;
                }
                match advance(
                    &mut conn.ctx,
                    sub,
                    alias,
                    msg,
                    Origin { core, token },
                    sender_aliases,
                ) {
                    Some(header) => header,
                    None => continue,
                }
            };
            conn.write_deliver(&header, &msg.payload);
            Self::mark_dirty(dirty, token, conn);
            written += 1;
        }
        inc(&stats.deliveries, written);
        if written > 0 {
            let waited = self.now.saturating_duration_since(msg.accepted_at);
            self.stats
                .publish_to_send
                .record(waited.as_micros() as u64, written);
            self.stats.fanout_batch.record(written, 1);
        }
        for token in fell_behind {
            self.update_lagging(token);
            if self.conn(token).is_some_and(|c| c.queued() <= cap / 4) {
                self.request_pages(token);
            }
        }
    }

    pub(super) fn fan_out_ephemeral(
        &mut self,
        room: &RoomName,
        origin: Option<Origin>,
        sender: &SenderName,
        ts_ms: u64,
        payload: &Bytes,
    ) {
        let core = self.id;
        let cap = self.config.connection.max_queued_bytes;
        let sender_aliases = self.config.connection.sender_aliases;
        let Core {
            local,
            conns,
            dirty,
            ..
        } = self;
        let Some(subs) = local.get(room) else { return };
        for (token, alias) in subs.iter().map(|s| s.parts()) {
            if origin == Some(Origin { core, token }) {
                continue;
            }
            let Some(conn) = conn_in(conns, token).filter(|c| c.is_open()) else {
                continue;
            };
            let cursor = match conn.subs.get(alias as usize) {
                Some(Some(sub)) if !sub.is_pending() => sub.cursor,
                _ => continue,
            };
            if conn.lagging() || !conn.window_allows(deliver_bound(payload.len(), sender), cap) {
                // Collapse: keep only the latest event per (alias, sender).
                let backlog = &mut conn.rare_mut().ephemeral_backlog;
                backlog.retain(|(a, s, _, _)| !(*a == alias && s == sender));
                if backlog.len() >= EPHEMERAL_BACKLOG {
                    backlog.remove(0);
                }
                backlog.push((alias, sender.clone(), ts_ms, payload.clone()));
                continue;
            }
            let header = conn
                .ctx
                .header(alias, None, cursor, sender, ts_ms, sender_aliases);
            conn.write_deliver(&header, payload);
            Self::mark_dirty(dirty, token, conn);
        }
    }

    pub(super) fn flush_ephemeral_backlog(&mut self, token: Token) {
        let window = self.config.connection.max_queued_bytes;
        let sender_aliases = self.config.connection.sender_aliases;
        let Core { conns, dirty, .. } = self;
        let Some(conn) = conn_in(conns, token).filter(|c| c.is_open()) else {
            return;
        };
        let Some(rare) = conn
            .rare
            .as_mut()
            .filter(|r| !r.ephemeral_backlog.is_empty())
        else {
            return;
        };
        let mut backlog = std::mem::take(&mut rare.ephemeral_backlog).into_iter();
        for (alias, sender, ts_ms, payload) in backlog.by_ref() {
            if !conn.window_allows(deliver_bound(payload.len(), &sender), window) {
                // The rest waits, in order, for the next drain.
                conn.rare_mut()
                    .ephemeral_backlog
                    .push((alias, sender, ts_ms, payload));
                break;
            }
            let cursor = match conn.subs.get(alias as usize) {
                Some(Some(sub)) => sub.cursor,
                _ => continue,
            };
            let header = conn
                .ctx
                .header(alias, None, cursor, &sender, ts_ms, sender_aliases);
            conn.write_deliver(&header, &payload);
        }
        conn.rare_mut().ephemeral_backlog.extend(backlog);
        conn.trim_rare();
        Self::mark_dirty(dirty, token, conn);
    }

    pub(super) fn on_member_joined(&mut self, room: RoomName, user: UserName, join: JoinPoint) {
        let tokens = self.tokens_of(&user);
        let max_rooms = self.config.connection.max_rooms;
        for token in tokens {
            let origin = self.origin(token);
            let Some(conn) = self.conn(token) else {
                continue;
            };
            if conn.phase() != Phase::Open || conn.alias_of(&room).is_some() {
                continue;
            }
            if conn.bound() >= max_rooms {
                self.refuse_room_limit(token, None, &room);
                continue;
            }
            let alias = conn.free_alias();
            let from = StartFrom::Join {
                epoch: join.epoch,
                seq: join.seq,
            };
            let request = self.new_request();
            if let Some(conn) = self.conn(token) {
                conn.subs[alias as usize] =
                    Some(Sub::pending(room.clone(), from, request, join.serial));
            }
            self.send_to_owner(
                &room.clone(),
                CoreMsg::Subscribe {
                    room: room.clone(),
                    origin,
                    alias,
                    user: user.clone(),
                    from,
                    request,
                },
            );
        }
    }

    /// The room's stream restarted in `epoch` (see [`CoreMsg::Restarted`]): every alias
    /// bound to it here is bound again from the owner, resuming from where it was in the
    /// old epoch. Since the epochs differ, the owner's answer is a ROOM with the new epoch
    /// (the client forgets the old one's cursor), then the new stream from its start (or
    /// the user's join point in it). Without this, the new epoch's sequences at or below
    /// an alias's old cursor were skipped without a word.
    pub(super) fn on_restarted(&mut self, room: &RoomName, epoch: u64) {
        let Some(subs) = self.local.remove(room) else {
            return;
        };
        let core = self.id;
        for (token, alias) in subs.iter().map(|s| s.parts()) {
            let origin = self.origin(token);
            let request = self.new_request();
            let Some(conn) = self.conn(token) else {
                continue;
            };
            let user = client::user_handle(conn);
            let Some(sub) = conn.sub_for(alias, room).filter(|s| s.epoch != epoch) else {
                // Bound in the new epoch already: it stays.
                self.local
                    .entry(room.clone())
                    .or_default()
                    .push(Subscriber::new(token, alias));
                continue;
            };
            let from = StartFrom::Resume {
                epoch: sub.epoch,
                last_seq: sub.cursor,
            };
            *sub = Sub::pending(room.clone(), from, request, sub.membership);
            // The new binding is counted before the old one is let go, so the owner never
            // sees the room unused meanwhile.
            self.send_to_owner(
                room,
                CoreMsg::Subscribe {
                    room: room.clone(),
                    origin,
                    alias,
                    user,
                    from,
                    request,
                },
            );
            let room = room.clone();
            self.send_to_owner(&room.clone(), CoreMsg::Unsubscribed { room, core });
            self.update_lagging(token);
        }
    }

    pub(super) fn on_member_left(
        &mut self,
        room: RoomName,
        user: UserName,
        reason: LeftReason,
        serial: u64,
    ) {
        let tokens = self.tokens_of(&user);
        for token in tokens {
            let Some(conn) = self.conn(token) else {
                continue;
            };
            let Some(alias) = conn.alias_of(&room) else {
                continue;
            };
            // A binding made for a later membership (a HELLO reads the directory, which is
            // ahead of the owner's messages still in flight) outlives this removal.
            if conn.subs[alias as usize]
                .as_ref()
                .is_some_and(|s| s.membership != serial)
            {
                continue;
            }
            self.unbind(token, alias, reason);
        }
    }

    /// Unbinds an alias: leaves the room's local fan-out (if it got that far) and tells the
    /// client with LEFT, unless the client never saw the binding (a join whose ROOM had
    /// not been sent yet; resume entries are bound from the HELLO on).
    pub(super) fn unbind(&mut self, token: Token, alias: u32, reason: LeftReason) {
        let Some(sub) = self
            .conn(token)
            .and_then(|c| c.subs.get_mut(alias as usize)?.take())
        else {
            return;
        };
        if !sub.is_pending() {
            self.unsubscribe_local(&sub.room, token);
        }
        // Pending bindings were announced only when made from a resume entry.
        let announced = !matches!(
            sub.mode,
            SubMode::Pending {
                from: StartKind::Live | StartKind::Join
            }
        );
        if announced {
            self.write(token, &ServerFrame::Left(Left { alias, reason }));
            if let Some(conn) = self.conn(token) {
                conn.retire(alias);
            }
        }
        self.update_lagging(token);
    }
}
