//! One worker's state machine driven without sockets, for integration tests that must run
//! alone in their process (a test that counts heap blocks with a global profiler cannot
//! share its binary with the crate's unit tests). Compiled in only with the `test-hooks`
//! feature; never in a release build.
//!
//! Owns: a single-worker [`Core`], the tests' shared transport (`core/test_wire.rs`: it
//! keeps what was written per connection in buffers it reuses, so driving the core
//! allocates nothing of its own once warm), and the clock. Must not touch: anything of the core's but its public entry points.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use pabal_codec::{ClientFrame, Decoder, Limits, ServerFrame};

use crate::config::Config;
use crate::core::test_wire::TestWire;
use crate::core::{Clock, Core, Shared};
use crate::directory::{Directory, Membership};
use crate::io::Token;
use crate::stats::CoreStats;

/// One worker (the owner of every room) and its connections, driven by frames.
pub struct OneWorker {
    core: Core,
    kept: TestWire,
    /// Sends completed in one round (reused).
    done: Vec<(Token, usize)>,
    frame: BytesMut,
    now: Instant,
}

impl std::fmt::Debug for OneWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneWorker").finish_non_exhaustive()
    }
}

impl OneWorker {
    /// A worker under `config` (validated here: a bad one panics, this is a test hook).
    pub fn new(config: Config) -> Self {
        #[allow(clippy::expect_used)] // reason: a test hook; a bad config is the test's bug
        config.validate().expect("a valid config");
        let directory: Arc<dyn Membership> = Arc::new(Directory::new(1, 100));
        let now = Instant::now();
        OneWorker {
            core: Core::new(
                0,
                1,
                Arc::new(config),
                directory,
                42,
                Arc::new(CoreStats::default()),
                Arc::new(Shared::default()),
                Clock::new(now, 1_767_225_600_000),
                now,
            ),
            kept: TestWire::default(),
            done: Vec::new(),
            frame: BytesMut::with_capacity(4096),
            now,
        }
    }

    /// A new connection; `None` if the worker has no slot left.
    pub fn connect(&mut self) -> Option<Token> {
        let token = self.core.admit(self.now, "127.0.0.1:1".parse().ok()?)?;
        self.kept.reserve(token, 1 << 16);
        Some(token)
    }

    /// `frame` arrives on `token`'s connection; everything the core writes in answer is
    /// sent (each batch completes at once) and kept until [`OneWorker::received`].
    pub fn send(&mut self, token: Token, frame: &ClientFrame) {
        self.send_all(token, std::slice::from_ref(frame));
    }

    /// `frames` arrive on `token`'s connection in one read (one tick of the worker), then
    /// as [`OneWorker::send`]. The bytes are encoded into a buffer this hook reuses.
    pub fn send_all(&mut self, token: Token, frames: &[ClientFrame]) {
        self.frame.clear();
        for frame in frames {
            frame.encode(&mut self.frame);
        }
        self.core.on_bytes(self.now, token, &self.frame);
        for _ in 0..1000 {
            self.core.flush(&mut self.kept);
            if !self.kept.any_sending() {
                break;
            }
            self.done.clear();
            self.kept.complete_all(|_| false, &mut self.done);
            for &(sent, n) in &self.done {
                self.core.on_sent(self.now, sent, n);
            }
        }
    }

    /// The frames written to `token` since the last call (decoded here: this allocates).
    pub fn received(&mut self, token: Token) -> Vec<ServerFrame> {
        let decoder = Decoder::new(Limits::default());
        let mut frames = Vec::new();
        if let Some(written) = self.kept.written_mut(token) {
            while let Ok(Some(frame)) = decoder.decode_server(written) {
                frames.push(frame);
            }
            // Undecodable bytes stay; the next call's caller sees none of them.
            written.clear();
        }
        frames
    }
}

/// Cluster mode: members' marker updates from the workers, as the room's owner gets them
/// in one tick (made ahead, so that handing them over allocates nothing of the caller's).
#[derive(Debug)]
pub struct MarkerUpdates(Vec<crate::mesh::CoreMsg>);

impl MarkerUpdates {
    /// `members`' markers (delivered, read) of `room` (a room, not a channel) at `epoch`.
    pub fn new(room: &str, epoch: u64, members: &[(crate::ids::UserName, u64, u64)]) -> Self {
        let room = crate::ids::RoomName::new(false, room);
        let updates = members
            .iter()
            .map(|(user, delivered, read)| crate::mesh::MarkerUpdate {
                room: room.clone(),
                user: user.clone(),
                epoch,
                marker: crate::core::Marker {
                    delivered: *delivered,
                    read: *read,
                },
            })
            .collect();
        MarkerUpdates(vec![crate::mesh::CoreMsg::Markers(updates)])
    }
}

impl OneWorker {
    /// A worker of a cluster node (`config.cluster` must be set): its engine is the
    /// caller, through [`OneWorker::drain_engine`].
    pub fn cluster(config: Config) -> Self {
        let mut worker = OneWorker::new(config);
        worker
            .core
            .attach_cluster(Arc::new(crate::cluster::ClusterStats::default()));
        worker
    }

    /// The owner takes a tick's marker updates from the workers.
    pub fn handle_markers(&mut self, updates: MarkerUpdates) {
        self.core.handle(self.now, updates.0);
    }

    /// What the worker asks of its engine now (the tick's marker batches among it),
    /// appended to `out`.
    pub fn drain_engine(&mut self, out: &mut Vec<crate::cluster::EngineCmd>) {
        self.core.drain_engine(|cmd| out.push(cmd));
    }
}
