//! Pages older than this node's memory, read from the room's stream in the engine
//! (`[cluster]`): a phone that resumes, or a binding that lags, from a sequence before the
//! owner's in-memory history is fed from the room's Redis stream, one page at a time
//! (`XRANGE <seq>-0`, at most `cluster.fill_batch` messages), each page answering the
//! reader's subscription or page request exactly as a page from memory would. The reader
//! asks for the next page once it has written this one (the delivery side's page budget),
//! so a lagging binding never holds more than one page of the backlog; once its position
//! reaches the owner's memory, pages come from memory again.
//!
//! A server-API history read (`GET /v1/{rooms|channels}/{name}/messages`) that reaches
//! before this node's memory is read the same way, page after page until it has its
//! `limit` (or reaches memory, which gives the rest), and answered in one piece as on one
//! relay.
//!
//! Only what the stream no longer holds becomes a GAP: the sequences before the first
//! entry the stream returns (its retention, `cluster.stream_max_len`, trimmed them), or
//! entries older than the room's `retention.max_age` (the stream keeps no age, the room's
//! contract does).
//!
//! Owns: the readers waiting for a stream page (history reads included). Must not touch: the owner's history (read
//! only), the engine's connections (only [`EngineCmd::Read`] out, its answer in),
//! connections (answered through [`CoreMsg::Subscribed`] and [`CoreMsg::Paged`]).

use crate::cluster::{EngineCmd, EngineMessage};
use crate::ids::{Origin, RoomName, StoredRef};
use crate::mesh::{ControlReply, CoreMsg, Page};

use super::cluster::stored;
use super::{Core, ReplyTo};

/// Who asked an owner for a page of history, and how the page answers it.
#[derive(Debug)]
pub(super) enum PageReader {
    /// A connection binding the room, from `start`.
    Subscribe {
        origin: Origin,
        alias: u32,
        request: u64,
        start: u64,
    },
    /// A catching-up binding's next page.
    Fetch {
        origin: Origin,
        alias: u32,
        request: u64,
    },
    /// A server-API history read.
    History(HistoryRead),
}

/// A server-API history read being gathered from the stream.
#[derive(Debug)]
pub(super) struct HistoryRead {
    reply: ReplyTo,
    /// The most messages answered.
    limit: usize,
    /// The last sequence read so far (the request's `after` at first).
    reached: u64,
    /// What the stream no longer held after the request's `after`.
    gap: Option<(u64, u64)>,
    msgs: Vec<StoredRef>,
}

impl Core {
    /// Answers `reader` with the page of `room` after `after`: cut from memory, or read
    /// from the engine's stream when this node's memory no longer reaches back that far.
    pub(super) fn answer_page(&mut self, room: &RoomName, after: u64, reader: PageReader) {
        if self.needs_stream(room, after) {
            return self.read_stream(room, after, reader);
        }
        if let Some((page, epoch, head)) = self.cut_page(room, after) {
            self.send_page(room.clone(), reader, page, epoch, head);
        }
    }

    /// Sends `reader` its page: a subscription's answer, or a catching-up binding's next
    /// page.
    fn send_page(&mut self, room: RoomName, reader: PageReader, page: Page, epoch: u64, head: u64) {
        match reader {
            PageReader::Subscribe {
                origin,
                alias,
                request,
                start,
            } => self.send_to(
                origin.core,
                CoreMsg::Subscribed {
                    room,
                    origin,
                    alias,
                    epoch,
                    head,
                    start,
                    page,
                    request,
                },
            ),
            PageReader::Fetch {
                origin,
                alias,
                request,
            } => self.send_to(
                origin.core,
                CoreMsg::Paged {
                    room,
                    origin,
                    alias,
                    page,
                    request,
                },
            ),
            PageReader::History(read) => self.reply(
                read.reply,
                ControlReply::History {
                    msgs: page.msgs,
                    gap: page.gap,
                    head,
                    epoch,
                },
            ),
        }
    }

    /// Whether a page after `after` must come from the engine's stream: a cluster node
    /// whose memory of the room starts later than `after + 1`, below its head.
    pub(super) fn needs_stream(&mut self, room: &RoomName, after: u64) -> bool {
        if self.cluster.is_none() {
            return false;
        }
        let now_ms = self.now_ms();
        let Some(owned) = self.owned.get_mut(room) else {
            return false;
        };
        owned.evict_expired(now_ms);
        let mem_first = owned.history().first_seq().unwrap_or(owned.head + 1);
        after < owned.head && after + 1 < mem_first
    }

    /// Asks the engine for the page of `room`'s stream after `after` for `reader`.
    fn read_stream(&mut self, room: &RoomName, after: u64, reader: PageReader) {
        let Some(side) = self.cluster.as_deref_mut() else {
            return;
        };
        let id = side.next_reader;
        side.next_reader += 1;
        side.readers.insert(id, reader);
        side.out.push(EngineCmd::Read {
            room: room.clone(),
            after,
            reader: id,
        });
    }

    /// A server-API history read of `room` after `after` that reaches before this node's
    /// memory: read from the stream, answered once it has `limit` messages or reaches
    /// memory.
    pub(super) fn read_history_stream(
        &mut self,
        room: &RoomName,
        after: u64,
        limit: usize,
        reply: ReplyTo,
    ) {
        let read = HistoryRead {
            reply,
            limit: limit.max(1),
            reached: after,
            gap: None,
            msgs: Vec::new(),
        };
        self.read_stream(room, after, PageReader::History(read));
    }

    /// Adds a page of the stream to a history read: reads the next page, takes the rest
    /// from memory once memory reaches back far enough, or answers.
    fn continue_history(
        &mut self,
        room: &RoomName,
        mut read: HistoryRead,
        page: Page,
        epoch: u64,
        head: u64,
    ) {
        let answer = |core: &mut Core, read: HistoryRead| {
            core.reply(
                read.reply,
                ControlReply::History {
                    msgs: read.msgs,
                    gap: read.gap,
                    head,
                    epoch,
                },
            );
        };
        match page.gap {
            // Dropped right after the request's start (or after a whole page aged out).
            Some((from, to)) if read.msgs.is_empty() => {
                read.gap = Some((read.gap.map_or(from, |(first, _)| first), to));
            }
            // Dropped after messages already gathered (retention trimmed the stream
            // meanwhile): the answer ends before it, and the next read reports it.
            Some(_) => return answer(self, read),
            None => {}
        }
        let reached = page
            .msgs
            .last()
            .map(|m| m.seq)
            .or(page.gap.map(|(_, to)| to))
            .unwrap_or(read.reached);
        let room_left = read.limit - read.msgs.len().min(read.limit);
        read.msgs.extend(page.msgs.into_iter().take(room_left));
        let progressed = reached > read.reached;
        read.reached = reached;
        if read.msgs.len() >= read.limit || page.complete || reached >= head {
            return answer(self, read);
        }
        // (A page that read nothing new is not asked again: memory answers the rest.)
        if progressed && self.needs_stream(room, reached) {
            return self.read_stream(room, reached, PageReader::History(read));
        }
        // Memory reaches back to `reached + 1`: the rest comes from there, as on one relay.
        let want = read.limit - read.msgs.len();
        if let Some((msgs, info, _, _)) = self.read_history(room, reached, usize::MAX, want) {
            if let Some((from, to)) = info.gap.filter(|_| read.msgs.is_empty()) {
                read.gap = Some((read.gap.map_or(from, |(first, _)| first), to));
            }
            read.msgs.extend(msgs);
        }
        answer(self, read)
    }

    /// The engine's page of `room`'s stream after `after` for reader `id`: the reader
    /// gets it as a page of history (a GAP for what the stream no longer holds).
    pub(super) fn on_stream_read(
        &mut self,
        room: &RoomName,
        after: u64,
        id: u64,
        raw: Vec<EngineMessage>,
        full: bool,
        raw_last: u64,
    ) {
        let Some(reader) = self
            .cluster
            .as_deref_mut()
            .and_then(|side| side.readers.remove(&id))
        else {
            return;
        };
        let (now, now_ms) = (self.now, self.now_ms());
        let max_age = self.config.retention_for(room.name.as_str()).max_age;
        let oldest_ms = now_ms.saturating_sub(max_age.as_millis() as u64);
        let Some(owned) = self.owned.get(room) else {
            // Evicted: nobody binds it any more (a history read finds no room, as on one
            // relay).
            if let PageReader::History(read) = reader {
                self.reply(read.reply, ControlReply::Info(None));
            }
            return;
        };
        let (epoch, head) = (owned.epoch, owned.head);
        let mem_first = owned.history().first_seq().unwrap_or(head + 1);
        // What this node has not received yet waits for its live delivery (the reader
        // goes live at the owner's head).
        // Entries past the room's age are dropped from the front only (clocks of different
        // nodes may disagree, and a page must not skip a message in its middle).
        let mut msgs: Vec<StoredRef> = raw
            .into_iter()
            .filter(|m| m.seq > after && m.seq <= head)
            .skip_while(|m| m.ts_ms < oldest_ms)
            .map(|m| stored(m, now))
            .collect();
        // A page is one run: a page's only gap is before its first message. A hole in its
        // middle (what Redis lost, raised past) ends it there; the next page starts with
        // that gap.
        if let Some(hole) = msgs.windows(2).position(|w| w[0].seq + 1 != w[1].seq) {
            msgs.truncate(hole + 1);
        }
        // The first sequence the stream (or, past it, memory) still holds after `after`.
        let next = match msgs.first() {
            Some(m) => m.seq,
            // A whole page aged out: those were dropped; the next page says more.
            None if full && raw_last < head => raw_last + 1,
            // The stream holds nothing more below memory: retention dropped it all.
            None => mem_first.min(head + 1),
        };
        let gap = (next > after + 1).then(|| (after + 1, next - 1));
        let reached = msgs.last().map_or(next - 1, |m| m.seq);
        let page = Page {
            gap,
            msgs,
            complete: reached >= head,
        };
        match reader {
            PageReader::History(read) => self.continue_history(room, read, page, epoch, head),
            reader => self.send_page(room.clone(), reader, page, epoch, head),
        }
    }
}
