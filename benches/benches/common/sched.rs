//! Where a paced phase's threads waited for a CPU, counted by the kernel: each thread's
//! `/proc/<pid>/task/<tid>/schedstat` (time run, time waited on a run queue, times run),
//! summed per role (the relay nodes' workers and engine threads in this process, and
//! `redis-server`'s threads), so that a stage measured from outside ("Redis' answer":
//! written until its reply was read) can be split into what ran and what waited for a
//! core. Also Redis' own time per script call (`INFO commandstats`) and the engine's
//! pipeline depth, sampled.
//!
//! Owns: reading those counters. Must not touch: the relay or Redis (it only reads).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use pabal_relay::cluster::ClusterStats;
use pabal_testkit::redis::RedisServer;

use super::redis_capacity::redis_cpu;

/// One thread's counters: (ns run, ns waited on a run queue, times it ran).
pub type Counts = (u64, u64, u64);

/// The threads of interest by role, at one instant.
#[derive(Default)]
pub struct Snapshot {
    threads: HashMap<(u32, u32), (Role, Counts)>,
    /// Redis' script calls and their µs so far.
    script: (f64, f64),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Role {
    Worker,
    Engine,
    Redis,
}

/// Thread `tid` of process `pid`'s counters.
pub fn schedstat(pid: u32, tid: u32) -> Option<Counts> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((f.next()??, f.next()??, f.next()??))
}

/// Thread `tid` of process `pid`'s name.
pub fn comm(pid: u32, tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The threads of process `pid`.
pub fn tasks(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Snapshot {
    /// This process's workers and engine threads, and every thread of `redis_pid`.
    pub fn now(redis: &RedisServer, redis_pid: u32) -> Snapshot {
        let mut threads = HashMap::new();
        let me = std::process::id();
        for tid in tasks(me) {
            let name = comm(me, tid);
            let role = if name.starts_with("pabal-worker") {
                Role::Worker
            } else if name.starts_with("pabal-engine") {
                Role::Engine
            } else {
                continue;
            };
            if let Some(c) = schedstat(me, tid) {
                threads.insert((me, tid), (role, c));
            }
        }
        for tid in tasks(redis_pid) {
            if let Some(c) = schedstat(redis_pid, tid) {
                threads.insert((redis_pid, tid), (Role::Redis, c));
            }
        }
        let (_, calls, usec) = redis_cpu(redis);
        Snapshot {
            threads,
            script: (calls, usec),
        }
    }

    /// What happened between `before` and this snapshot, per message of `messages`, as
    /// one line: per role, µs run and µs waited for a core per message, and the mean
    /// wait each time it was woken; Redis' script µs per call.
    pub fn since(&self, before: &Snapshot, messages: u64) -> String {
        let mut per_role: HashMap<Role, Counts> = HashMap::new();
        for (key, (role, (run, wait, slices))) in &self.threads {
            let Some((_, (run0, wait0, slices0))) = before.threads.get(key) else {
                continue;
            };
            let e = per_role.entry(*role).or_default();
            e.0 += run - run0;
            e.1 += wait - wait0;
            e.2 += slices - slices0;
        }
        let n = messages.max(1) as f64;
        let role = |r: Role| {
            let (run, wait, slices) = per_role.get(&r).copied().unwrap_or_default();
            format!(
                "run {:.1} / waited {:.1} µs per msg, {:.1} µs per wake-up",
                run as f64 / 1e3 / n,
                wait as f64 / 1e3 / n,
                wait as f64 / 1e3 / slices.max(1) as f64
            )
        };
        let calls = self.script.0 - before.script.0;
        let usec = self.script.1 - before.script.1;
        format!(
            "run queues: worker {} · engine {} · redis {} · Redis' script {:.1} µs per call",
            role(Role::Worker),
            role(Role::Engine),
            role(Role::Redis),
            if calls > 0.0 { usec / calls } else { 0.0 },
        )
    }
}

/// Samples the engine's pipeline depth (`ClusterStats::pipeline_depth`, every node
/// together) every 250 µs until stopped.
pub struct DepthSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, i64, i64)>>,
}

impl DepthSampler {
    pub fn start(stats: Vec<Arc<ClusterStats>>) -> DepthSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut samples, mut sum, mut max) = (0u64, 0i64, 0i64);
            while !flag.load(Ordering::Relaxed) {
                let d: i64 = stats
                    .iter()
                    .map(|s| s.pipeline_depth.load(Ordering::Relaxed))
                    .sum();
                samples += 1;
                sum += d;
                max = max.max(d);
                std::thread::sleep(Duration::from_micros(250));
            }
            (samples, sum, max)
        });
        DepthSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// `pipeline depth mean M (max X)`.
    pub fn finish(mut self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        let (samples, sum, max) = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        format!(
            "pipeline depth mean {:.2} (max {max}, {samples} samples)",
            sum as f64 / samples.max(1) as f64
        )
    }
}
