//! A phone's byte path, both directions: frames the phone made offered to the uplink as it
//! accepts them, what the uplink released written to the socket, the socket read only while
//! the downlink can take more (so TCP backpressure reaches the relay), what the downlink
//! released decoded into frames. The diagram is in [`super`]'s module docs.
//!
//! Owns the phone's buffers on that path (`up_pending`, `wbuf`, `rbuf`, the decoder) and the
//! notes of when bytes entered and left the link. Must not touch what a frame means (that
//! is [`super::inbound`]) nor the connection's life cycle ([`super`]).

use std::io::{ErrorKind, Read, Write};

use bytes::Buf;

use crate::link::{Direction, LinkEvent};
use crate::verify::{Kind, Violation};

use super::{Ctx, DownOffer, Phone, State, Why};

impl Phone {
    pub(super) fn pump(&mut self, ctx: &mut Ctx<'_>) {
        for _ in 0..64 {
            let mut progress = self.offer_up(ctx);
            progress |= self.release_up(ctx);
            if !self.write(ctx) {
                return;
            }
            progress |= self.read(ctx);
            progress |= self.release_down(ctx);
            if !matches!(self.state, State::Handshake | State::Open) {
                return;
            }
            if !progress {
                break;
            }
        }
        let now = ctx.now;
        let event = self.link.as_mut().and_then(|l| l.poll_event(now));
        match event {
            Some(LinkEvent::Dropped { .. }) => {
                ctx.metrics.counters.link_drops += 1;
                return self.close(ctx, Why::Dropped);
            }
            Some(LinkEvent::Blackholed { .. }) => ctx.metrics.counters.blackholes += 1,
            _ => {}
        }
        if self.eof
            && self
                .link
                .as_ref()
                .is_none_or(|l| l.pending_bytes(Direction::Down) == 0)
        {
            ctx.metrics.counters.closed_by_relay += 1;
            self.close(ctx, Why::Dropped);
        }
    }

    pub(super) fn offer_up(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let now = ctx.now;
        let Some(link) = &mut self.link else {
            return false;
        };
        if self.up_pending.is_empty() {
            return false;
        }
        let n = link
            .can_accept(Direction::Up, now)
            .min(self.up_pending.len());
        if n == 0 {
            return false;
        }
        let chunk = self.up_pending.split_to(n).freeze();
        link.offer_bytes(Direction::Up, now, chunk);
        self.last_activity = now;
        self.up_offered += n as u64;
        for p in &mut self.pubs_in_up {
            if p.end > self.up_offered {
                break;
            }
            p.offered.get_or_insert(now);
        }
        true
    }

    pub(super) fn release_up(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let now = ctx.now;
        let Some(link) = &mut self.link else {
            return false;
        };
        let mut got = false;
        while let Some(chunk) = link.poll_deliver(Direction::Up, now) {
            self.up_released += chunk.len() as u64;
            self.wbuf.extend_from_slice(&chunk);
            got = true;
        }
        while let Some(p) = self.pubs_in_up.front() {
            if p.end > self.up_released {
                break;
            }
            if let Some(at) = p.offered {
                let ns = now.saturating_duration_since(at).as_nanos() as u64;
                ctx.shared.uplink.store(self.idx, p.counter, ns);
            }
            self.pubs_in_up.pop_front();
        }
        got
    }

    /// Writes what the uplink released; false if the connection ended.
    pub(super) fn write(&mut self, ctx: &mut Ctx<'_>) -> bool {
        while !self.wbuf.is_empty() && self.writable {
            let Some(sock) = &mut self.sock else {
                return false;
            };
            match sock.write(&self.wbuf) {
                Ok(0) => {
                    self.close(ctx, Why::Dropped);
                    return false;
                }
                Ok(n) => {
                    self.wbuf.advance(n);
                    ctx.metrics.counters.bytes_up += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    if self.state == State::Open {
                        ctx.metrics.counters.closed_by_relay += 1;
                    }
                    self.close(ctx, Why::Dropped);
                    return false;
                }
            }
        }
        true
    }

    pub(super) fn read(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let now = ctx.now;
        let mut progress = false;
        while self.readable {
            let (Some(link), Some(sock)) = (&mut self.link, &mut self.sock) else {
                break;
            };
            let cap = link.can_accept(Direction::Down, now).min(ctx.scratch.len());
            if cap == 0 {
                break;
            }
            match sock.read(&mut ctx.scratch[..cap]) {
                Ok(0) => {
                    self.eof = true;
                    self.readable = false;
                }
                Ok(n) => {
                    let idle = now.saturating_duration_since(self.last_activity)
                        >= ctx.shared.settings.idle_threshold;
                    link.offer(Direction::Down, now, &ctx.scratch[..n]);
                    self.last_activity = now;
                    self.down_offered += n as u64;
                    self.down_offers.push_back(DownOffer {
                        end: self.down_offered,
                        at: now,
                        idle,
                    });
                    ctx.metrics.counters.bytes_down += n as u64;
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    // A reset: like an end of stream, after what the link still carries.
                    self.eof = true;
                    self.readable = false;
                }
            }
        }
        progress
    }

    pub(super) fn release_down(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let now = ctx.now;
        let Some(link) = &mut self.link else {
            return false;
        };
        let mut got = false;
        while let Some(chunk) = link.poll_deliver(Direction::Down, now) {
            self.down_released += chunk.len() as u64;
            self.rbuf.extend_from_slice(&chunk);
            got = true;
        }
        if got {
            self.decode(ctx);
        }
        got
    }

    pub(super) fn decode(&mut self, ctx: &mut Ctx<'_>) {
        loop {
            let before = self.rbuf.len();
            match self.decoder.decode_server(&mut self.rbuf) {
                Ok(Some(frame)) => {
                    let len = before - self.rbuf.len();
                    let end = self.down_released - self.rbuf.len() as u64;
                    self.on_frame(frame, end, len, ctx);
                    if !matches!(self.state, State::Handshake | State::Open) {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    ctx.violations.add(
                        Violation {
                            kind: Kind::Malformed,
                            phone: Some(self.label(ctx.shared)),
                            room: None,
                            detail: e.to_string(),
                        },
                        0,
                    );
                    return self.close(ctx, Why::Error);
                }
            }
        }
    }

    /// When the last byte of the frame ending at stream offset `end` entered the downlink,
    /// and whether the link had been idle before it.
    pub(super) fn offer_of(&mut self, end: u64) -> Option<DownOffer> {
        while self.down_offers.front().is_some_and(|o| o.end < end) {
            self.down_offers.pop_front();
        }
        self.down_offers.front().copied()
    }
}
