//! The simulator's cluster (see `mod.rs`): nodes of one to three workers on the model of
//! Redis and the engines in `redis.rs`, the scheduler's steps for Redis, the engines'
//! connections and their faults (with `lose_writes`, a failover losing writes, `lossy.rs`),
//! and the cluster's seeded tests: the contract kept, with and without lost writes, and the
//! fault injections each checker must catch.
//!
//! Owns: test scaffolding only. Must not touch: anything outside tests.

use super::*;

impl Sim {
    /// `shape.cores` relay nodes of one to three workers each (drawn from the seed) on one
    /// Redis ([`redis`]), every phone a member of every room from its first message.
    /// Retention, stream length and stream pages are drawn from the seed, small, so that
    /// phones resume from the stream, read it in pages and meet its exact gaps.
    pub(super) fn clustered(seed: u64, shape: Shape) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0xc105);
        let workers = 1 + (rng.next_u64() % 3) as usize;
        let retained = 2 + (rng.next_u64() % 30) as usize;
        let stream_max_len = 4 + rng.next_u64() % 60;
        let fill_batch = 1 + (rng.next_u64() % 8) as usize;
        let shape = Shape {
            cores: shape.cores * workers,
            ..shape
        };
        Self::build(seed, shape, workers, true, |c| {
            c.retention.max_messages = retained;
            c.cluster = Some(crate::cluster::ClusterConfig {
                stream_max_len,
                fill_batch,
                ..Default::default()
            });
        })
    }

    pub(super) fn pick(&mut self, of: &[usize]) -> Option<usize> {
        (!of.is_empty()).then(|| of[self.random(of.len())])
    }

    pub(super) fn engine_step(&mut self, roll: usize) -> Result<(), Violation> {
        use redis::Fault;
        let engine = self.engine.as_ref().unwrap();
        let (runnable, subscribing) = (engine.runnable(), engine.subscribing());
        let (answering, pushing, down) = (engine.answering(), engine.pushing(), engine.down());
        let any = self.random(self.n());
        match roll {
            0..=10 => {
                if let Some(node) = self.pick(&runnable) {
                    self.run_command(node)?;
                }
            }
            11..=15 => {
                if let Some(node) = self.pick(&subscribing)
                    && let Some(what) = self.engine.as_mut().unwrap().run_subscription(node)
                {
                    self.note(format!("Redis runs {node}'s {what}"));
                }
            }
            16..=24 => {
                if let Some(node) = self.pick(&answering) {
                    self.answer(node)?;
                }
            }
            25..=31 => {
                if let Some(node) = self.pick(&pushing) {
                    self.push(node)?;
                }
            }
            32 => self.queue_control(),
            33 => {
                self.deliver_control()?;
            }
            34 => {
                // Drawn only where Redis may lose writes: other runs draw as before.
                if self.engine.as_ref().unwrap().lose_writes && self.chance(20) {
                    return self.lose_writes();
                }
                let fault = match self.random(7) {
                    0 => Fault::LoseCommands,
                    1 => Fault::LosePubSub,
                    2 => Fault::DropPush,
                    3 => Fault::CopiesLate,
                    4 | 5 => {
                        let r = self.random(self.rooms.len());
                        let n = self.engine.as_mut().unwrap().trim(r);
                        self.note(format!("the stream of room{r} is trimmed by {n}"));
                        return Ok(());
                    }
                    _ => return self.restart(any),
                };
                if self.engine.as_mut().unwrap().fault(any, fault) {
                    self.note(format!("engine {any}: {fault:?}"));
                    self.hand_over_immediate()?;
                }
            }
            _ => {
                if let Some(node) = self.pick(&down) {
                    self.note(format!("engine {node} reconnects"));
                    self.engine.as_mut().unwrap().reconnect(node);
                    self.hand_over_immediate()?;
                }
            }
        }
        Ok(())
    }

    /// Redis runs the node's next command; the model follows the memberships it changed,
    /// and judges a lost write's sequence given again (`lossy.rs`).
    pub(super) fn run_command(&mut self, node: usize) -> Result<bool, Violation> {
        let engine = self.engine.as_mut().unwrap();
        let Some(what) = engine.run_command(node) else {
            return Ok(false);
        };
        let changes = std::mem::take(&mut engine.changes);
        self.note(format!("Redis runs {node}'s {what}"));
        for (user, room, change) in changes {
            let intervals = self.model.intervals.entry((user, room)).or_default();
            match change {
                Ok(join) => intervals.push((join.seq, None)),
                Err(head) => {
                    if let Some(last) = intervals.last_mut() {
                        last.1 = Some(head);
                    }
                }
            }
        }
        self.judge_reuses()?;
        self.judge_removals_below_lost();
        Ok(true)
    }

    pub(super) fn answer(&mut self, node: usize) -> Result<(), Violation> {
        for event in self.engine.as_mut().unwrap().answer(node) {
            self.hand_over(node, event)?;
        }
        Ok(())
    }

    pub(super) fn push(&mut self, node: usize) -> Result<(), Violation> {
        for event in self.engine.as_mut().unwrap().push(node) {
            self.hand_over(node, event)?;
        }
        Ok(())
    }

    pub(super) fn hand_over_immediate(&mut self) -> Result<(), Violation> {
        let events = std::mem::take(&mut self.engine.as_mut().unwrap().immediate);
        for (node, event) in events {
            self.hand_over(node, event)?;
        }
        Ok(())
    }

    /// The node of worker `core` is killed -9 and started again: its phones' connections
    /// are gone without a word, its workers are new ones, and their engines start from
    /// nothing.
    pub(super) fn restart(&mut self, core: usize) -> Result<(), Violation> {
        let first = core / self.workers * self.workers;
        let workers = first..first + self.workers;
        self.note(format!(
            "the node of workers {workers:?} is killed and restarted"
        ));
        for phone in &mut self.phones {
            if phone
                .link
                .as_ref()
                .is_some_and(|l| workers.contains(&l.core))
            {
                phone.link = None;
            }
        }
        let since = self.now.saturating_duration_since(self.began).as_millis() as u64;
        let membership: Arc<dyn Membership> = Arc::new(Directory::new(
            self.workers,
            self.config.limits.max_rooms_per_user,
        ));
        let node = new_node(
            &self.config,
            membership,
            self.workers,
            self.now,
            redis::EPOCH + since,
        );
        for (c, (worker, stats)) in workers.clone().zip(node) {
            self.cores[c] = worker;
            self.stats[c] = stats;
            self.wires[c] = TestWire::default();
            self.engine.as_mut().unwrap().restart(c);
            for link in &mut self.links[c * self.cores.len()..(c + 1) * self.cores.len()] {
                link.clear();
            }
            let n = self.cores.len();
            for from in 0..n {
                self.links[from * n + c].clear();
            }
        }
        for c in workers {
            self.service(c)?;
        }
        Ok(())
    }

    /// Everything the engines and Redis have in flight moves once; whether anything did.
    pub(super) fn settle_engines(&mut self) -> Result<bool, Violation> {
        let Some(engine) = self.engine.as_mut() else {
            return Ok(false);
        };
        if engine.settled() {
            return Ok(false);
        }
        for node in engine.down() {
            engine.reconnect(node);
        }
        self.hand_over_immediate()?;
        let engine = self.engine.as_mut().unwrap();
        for node in engine.subscribing() {
            while engine.run_subscription(node).is_some() {}
        }
        for node in engine.runnable() {
            while self.run_command(node)? {}
        }
        for node in 0..self.n() {
            while self.engine.as_ref().unwrap().answering().contains(&node) {
                self.answer(node)?;
            }
            while self.engine.as_ref().unwrap().pushing().contains(&node) {
                self.push(node)?;
            }
        }
        Ok(true)
    }
}

/// A cluster of 2 to 4 nodes.
fn cluster_shape_of(seed: u64) -> Shape {
    Shape::drawn(seed, 0xc1a5, [(2, 3), (2, 6), (1, 3)])
}

/// Runs one seed of a cluster to its end; `tweak` may break the model's engine on purpose.
fn run_cluster_seed(seed: u64, tweak: impl FnOnce(&mut redis::Engine)) -> Result<(), Violation> {
    let shape = cluster_shape_of(seed);
    let mut sim = Sim::clustered(seed, shape);
    tweak(sim.engine.as_mut().unwrap());
    for _ in 0..shape.steps {
        sim.step()?;
    }
    sim.finish()
}

#[test]
fn seeded_cluster_simulations_keep_the_delivery_contract() {
    for seed in seeds_to_run(1000) {
        if let Err(Violation(what)) = run_cluster_seed(seed, |_| {}) {
            panic!(
                "cluster simulation seed {seed} ({:?}) failed; replay with PABAL_SIM_SEED={seed}\n{what}",
                cluster_shape_of(seed)
            );
        }
    }
}

/// Runs one seed of a cluster whose Redis loses writes (`lossy.rs`) to its end; `tweak`
/// may break the model's engine on purpose. `Ok(Some(what))`: the run ended at the
/// documented residual race, inconclusive. A panic (a relay's assertion) is a violation
/// too, so that a sweep goes on past it.
fn run_lossy_seed(
    seed: u64,
    tweak: impl FnOnce(&mut redis::Engine),
) -> (Result<Option<String>, Violation>, lossy::Tally) {
    let shape = cluster_shape_of(seed);
    let mut sim = Sim::clustered(seed, shape);
    let engine = sim.engine.as_mut().unwrap();
    engine.lose_writes = true;
    tweak(engine);
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        (0..shape.steps)
            .try_for_each(|_| sim.step())
            .and_then(|()| sim.finish())
    }));
    let run = run.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(sim.fail(format!("panicked: {what}")))
    });
    let tally = std::mem::take(&mut sim.lossy);
    let ended = match (&tally.residual, run) {
        (Some(what), _) => Ok(Some(what.clone())),
        (None, run) => run.map(|()| None),
    };
    (ended, tally)
}

#[test]
fn seeded_lossy_failovers_keep_the_delivery_contract() {
    // Every promise of ARCHITECTURE.md's "Writes Redis lost" with Redis losing a room's
    // last writes now and then; a run that meets the documented residual race ends there,
    // counted, not passed. Every seed runs (a sweep goes on past a failure); the test
    // fails on the first that broke the contract.
    //
    // Its first sweep (seeds 1..=100,000) found three relay bugs, each fixed with a test
    // of its own in `core/tests/` (5,657 seeds broke the contract before):
    // - an open whose tail ends below the room's sequence (Redis lost the last writes and
    //   a raise moved the sequence past them) kept a history ending below the head: pages
    //   stopped at its end and the next message broke `History::push`'s order (seeds 64,
    //   118, 163, 9861);
    // - a reader's stream page with a hole in its middle (lost sequences a raise passed)
    //   sent a phone 7 right after 5 (seeds 284, 418);
    // - an owner waited forever for sequences Redis no longer had (a read reaching the
    //   stream's end below the room's sequence; a reopening whose target Redis lost): the
    //   room stalled on that node (seeds 532, 3523, 8046, 13071).
    // And a fourth case of the residual race, now counted as one: a removal Redis placed
    // below another node's head (seeds 36380, 60579).
    let (mut seeds, mut failovers, mut lost, mut given_again) = (0, 0, 0, 0);
    let (mut residual, mut broken) = (Vec::new(), Vec::new());
    for seed in seeds_to_run(1000) {
        let (ended, tally) = run_lossy_seed(seed, |_| {});
        match ended {
            Err(Violation(what)) => broken.push((seed, what)),
            Ok(Some(what)) => residual.push((seed, what)),
            Ok(None) => {}
        }
        seeds += 1;
        failovers += tally.failovers;
        lost += tally.lost;
        given_again += tally.given_again;
    }
    for (seed, what) in &residual {
        eprintln!("PABAL_SIM_SEED={seed} ends at the documented residual race: {what}");
    }
    for (seed, what) in &broken {
        let first = what.lines().next().unwrap_or_default();
        eprintln!("PABAL_SIM_SEED={seed} breaks the contract: {first}");
    }
    // Who had the lost sequence Redis gave again: a node's owner (the race as documented),
    // only a phone (every node that had it restarted or closed the room), or a phone that
    // got the lost body after the sequence went to another (it was on its way); or a
    // removal Redis placed below an owner's head, passed there.
    let count = |what: &str| residual.iter().filter(|(_, w)| w.contains(what)).count();
    eprintln!(
        "lossy failovers: {seeds} seeds, {failovers} failovers losing {lost} writes, {given_again} \
         lost sequences given again with nobody holding them; {} seeds ended at the documented \
         residual race (inconclusive: {} a node's owner held it, {} only a phone had it, {} \
         found late, {} a removal placed below an owner's head), {} broke the contract",
        residual.len(),
        count("owner holds"),
        count(" got it (PUBACK"),
        count("got the lost"),
        count("past its removal"),
        broken.len()
    );
    if let Some((seed, what)) = broken.first() {
        panic!(
            "{} of {seeds} lossy cluster seeds failed; the first, seed {seed} ({:?}): replay with PABAL_SIM_SEED={seed}\n{what}",
            broken.len(),
            cluster_shape_of(*seed)
        );
    }
    assert!(
        lost > 0 || seeds < 10,
        "no write was lost: nothing was checked"
    );
}

#[test]
fn the_same_cluster_seed_replays_the_same_run() {
    let run = |seed| {
        let shape = cluster_shape_of(seed);
        let mut sim = Sim::clustered(seed, shape);
        for _ in 0..shape.steps {
            sim.step().unwrap();
        }
        sim.trace.iter().cloned().collect::<Vec<_>>()
    };
    assert_eq!(run(11), run(11));
}

/// The first of seeds `1..=seeds` whose cluster, its engine broken by `fault`, breaks the
/// contract, and what it said; fails when none does.
fn cluster_fault_found(seeds: u64, fault: fn(&mut redis::Engine), name: &str) -> String {
    let found =
        (1..=seeds).find_map(|seed| run_cluster_seed(seed, fault).err().map(|v| (seed, v.0)));
    let (seed, what) = found.unwrap_or_else(|| panic!("no seed found {name}"));
    eprintln!("PABAL_SIM_SEED={seed} finds {name}: {what}");
    what
}

#[test]
fn the_cluster_simulator_finds_what_a_lost_subscription_loses_without_resubscribed() {
    // Fault injection: an engine that re-subscribes a channel without telling the owner
    // to read the stream leaves a hole nobody fills, and some seed must say so.
    let what = cluster_fault_found(500, |e| e.forget_resubscribed = true, "the loss");
    assert!(what.contains("never received"), "{what}");
}

#[test]
fn the_cluster_simulator_finds_a_users_read_that_undoes_a_later_notice() {
    // Fault injection: an engine that hands a notice over before the answer of a read of
    // the user's rooms that ran before the change lets the read undo it (the user loses a
    // room they were added to), and some seed must say so.
    let fault = |e: &mut redis::Engine| e.notices_before_loads = true;
    let what = cluster_fault_found(3_000, fault, "the undone notice");
    assert!(
        what.contains("never received") || what.contains("before the head"),
        "a member went without its room's messages: {what}"
    );
}

#[test]
fn the_cluster_simulator_finds_a_removal_left_to_its_notice() {
    // Fault injection: removals applied as the users' notices arrive, not in their rooms'
    // order (`cluster.ordered_removals = false`, as versions before it): a message
    // another node sequences while the notice is on its way reaches the removed user's
    // phones, and some seed must say so.
    let fault = |e: &mut redis::Engine| e.ordered_removals = false;
    let what = cluster_fault_found(3_000, fault, "a removal's leak");
    assert!(what.contains("outside its membership"), "{what}");
}

#[test]
fn the_cluster_simulator_finds_an_answer_handed_over_before_its_copy() {
    // Fault injection: an engine that hands a publish's answer over before its copy is
    // read lets the message enter the room's order before a removal the channel carried
    // ahead of it, and the removed user's phone on the publishing node gets it.
    let fault = |e: &mut redis::Engine| e.answers_before_copies = true;
    let what = cluster_fault_found(20_000, fault, "an answer passing a removal");
    assert!(what.contains("outside its membership"), "{what}");
}

#[test]
fn the_cluster_seeds_that_found_bugs_keep_the_contract() {
    // Each found one of the bugs fixed with the cluster simulation (past the seeds the
    // default run takes); their runs change with the code, so this keeps them as examples:
    // the named tests in `tests/cluster.rs`, `tests/cluster_reopen.rs`, `tests/removals.rs`, `directory.rs`,
    // `cluster/copies.rs` and the codec's session pin the fixes, and the fault injections
    // above the engine's held notices and answers. The last three came with removals in
    // the room's order: a full page of removals read again and again (7767), a removal
    // just before an open's tail (16391), a repeat's answer passing the first publish's
    // while that waited for its copy (92607). Then a join notice heard late by a second
    // worker of the node watching the user, which undid the later membership the first
    // had applied to their common directory (447065); a removal retention dropped from the
    // stream before a node whose channel lagged read it (451676).
    for seed in [
        2145, 4291, 5430, 5928, 21080, 34110, 7767, 16391, 92607, 447065, 451676,
    ] {
        if let Err(Violation(what)) = run_cluster_seed(seed, |_| {}) {
            panic!("cluster simulation seed {seed} failed\n{what}");
        }
    }
}

#[test]
fn the_lossy_cluster_simulator_finds_a_raise_that_does_nothing() {
    // Fault injection: a Redis whose `RAISE` does nothing and whose publish ignores the
    // owner's head gives a lost write's sequence again to a publish through the very node
    // that delivered it: a phone gets another body at a sequence it had, or nobody gets the
    // new message, and some seed must say so (not end at the residual race).
    let found = (1..=2_000).find_map(|seed| {
        let (ended, _) = run_lossy_seed(seed, |e| e.raise_ignored = true);
        ended.err().map(|v| (seed, v.0))
    });
    let (seed, what) = found.expect("no seed found a sequence given twice");
    eprintln!("PABAL_SIM_SEED={seed} finds a raise that does nothing: {what}");
    assert!(
        what.contains("the owner holds") || what.contains("never received"),
        "{what}"
    );
}
