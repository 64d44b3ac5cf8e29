//! Where a cluster bench's processes run: `PABAL_BENCH_REDIS_CPUS` pins the private
//! `redis-server` (every thread of it) to a CPU list, `PABAL_BENCH_RELAY_CPUS` pins this
//! process (the relay nodes and the load generator: every thread it has and every thread it
//! starts later) to another, so that Redis has a core to itself, as it has a machine to
//! itself in production. `PABAL_BENCH_LOAD_CPUS` then moves the load generator's own
//! threads (per thread, for the length of a phase: [`pin_load_thread`]) to a third list,
//! so that the relay node (worker and engine thread) can have a core to itself while Redis
//! and the load share another. Lists as `taskset -c` takes them: `1`, `0,2`, `2-3`.
//! `PABAL_BENCH_LOAD_IDLE=1` runs the load generator's threads under `SCHED_IDLE` for the
//! phase: they take only the CPU time Redis and the relay leave, as phones on other machines
//! would (a machine too small to give each a core otherwise puts whichever shares a core
//! with the load in a queue behind it).
//!
//! Owns: the affinity (and, with `PABAL_BENCH_LOAD_IDLE`, the scheduling policy) of those
//! processes and of the load generator's threads, and the line that says where everything
//! runs. Must not touch: any other process (the system's
//! Redis, other benches).

use pabal_testkit::redis::RedisServer;

/// The CPUs of `PABAL_BENCH_REDIS_CPUS`.
pub const REDIS_CPUS: &str = "PABAL_BENCH_REDIS_CPUS";
/// The CPUs of `PABAL_BENCH_RELAY_CPUS`.
pub const RELAY_CPUS: &str = "PABAL_BENCH_RELAY_CPUS";
/// The CPUs of `PABAL_BENCH_LOAD_CPUS`.
pub const LOAD_CPUS: &str = "PABAL_BENCH_LOAD_CPUS";
/// `1`: the load generator's threads under `SCHED_IDLE` for each phase.
pub const LOAD_IDLE: &str = "PABAL_BENCH_LOAD_IDLE";

/// Whether `PABAL_BENCH_LOAD_IDLE=1`.
fn load_idle() -> bool {
    std::env::var(LOAD_IDLE).is_ok_and(|v| v == "1")
}

/// Parses a CPU list (`0`, `1,3`, `0-2,5`); panics naming `var` on anything else.
pub fn parse_cpus(var: &str, list: &str) -> Vec<usize> {
    let bad = || panic!("{var}={list:?}: expected a CPU list such as 1, 0,2 or 2-3");
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (Ok(lo), Ok(hi)) = (lo.trim().parse::<usize>(), hi.trim().parse::<usize>()) else {
            bad()
        };
        if lo > hi || hi >= libc::CPU_SETSIZE as usize {
            bad();
        }
        cpus.extend(lo..=hi);
    }
    if cpus.is_empty() {
        bad();
    }
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// The CPU list in `var`, if set and not empty.
fn cpus_from_env(var: &str) -> Option<Vec<usize>> {
    let list = std::env::var(var).ok()?;
    (!list.trim().is_empty()).then(|| parse_cpus(var, &list))
}

/// The thread ids of process `pid`.
fn threads_of(pid: u32) -> Vec<libc::pid_t> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Pins every thread of `pid` to `cpus`; panics naming `var` if the kernel refuses.
fn pin_process(var: &str, pid: u32, cpus: &[usize]) {
    for tid in threads_of(pid) {
        pin_thread(var, tid, cpus);
    }
}

/// The CPUs the calling thread may run on (its affinity mask).
pub fn current_thread_cpus() -> Vec<usize> {
    affinity_of(0)
}

/// Pins the calling thread to `cpus` (threads and processes it starts inherit them);
/// panics naming `var` if the kernel refuses.
pub fn pin_current_thread(var: &str, cpus: &[usize]) {
    pin_thread(var, 0, cpus);
}

/// Pins thread `tid` (0: the calling thread) to `cpus`; panics naming `var` if the kernel
/// refuses.
fn pin_thread(var: &str, tid: libc::pid_t, cpus: &[usize]) {
    // SAFETY: `cpu_set_t` is a plain bit array for which all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` < CPU_SETSIZE (`parse_cpus` checks, `affinity_of` reads only
        // those), so the bit is inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid `cpu_set_t` of the size passed; the call only reads it.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &raw const set) };
    assert!(
        rc == 0,
        "{var}: sched_setaffinity({tid}, {cpus:?}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// The calling thread on `PABAL_BENCH_LOAD_CPUS` (and under `SCHED_IDLE` with
/// `PABAL_BENCH_LOAD_IDLE=1`) until dropped, then back on the CPUs and the policy it had (a
/// thread that goes on to start relay nodes must not hand them the load's CPUs or policy).
/// Does nothing while both variables are unset.
pub struct LoadThread {
    before: Option<Vec<usize>>,
    policy_before: Option<libc::c_int>,
}

/// Moves the calling thread, one of the load generator's, to `PABAL_BENCH_LOAD_CPUS`
/// (unset: it stays where it is, with the relay nodes on `PABAL_BENCH_RELAY_CPUS`), and
/// under `SCHED_IDLE` when `PABAL_BENCH_LOAD_IDLE=1`.
pub fn pin_load_thread() -> LoadThread {
    let before = cpus_from_env(LOAD_CPUS).map(|cpus| {
        let before = affinity_of(0);
        pin_thread(LOAD_CPUS, 0, &cpus);
        before
    });
    let policy_before = load_idle().then(|| {
        // SAFETY: reads the calling thread's policy; no pointer.
        let policy = unsafe { libc::sched_getscheduler(0) };
        set_policy(libc::SCHED_IDLE);
        policy
    });
    LoadThread {
        before,
        policy_before,
    }
}

/// Sets the calling thread's scheduling policy (`SCHED_IDLE` or `SCHED_OTHER`, priority 0);
/// panics naming `PABAL_BENCH_LOAD_IDLE` if the kernel refuses.
fn set_policy(policy: libc::c_int) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid `sched_param` the call only reads; 0 is the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &raw const param) };
    assert!(
        rc == 0,
        "{LOAD_IDLE}: sched_setscheduler(0, {policy}) failed: {}",
        std::io::Error::last_os_error()
    );
}

impl Drop for LoadThread {
    fn drop(&mut self) {
        if let Some(policy) = self.policy_before.take().filter(|&p| p >= 0) {
            set_policy(policy);
        }
        if let Some(before) = self.before.take().filter(|b| !b.is_empty()) {
            pin_thread(LOAD_CPUS, 0, &before);
        }
    }
}

/// The CPUs thread `tid` (0: the calling thread) may run on.
fn affinity_of(tid: libc::pid_t) -> Vec<usize> {
    // SAFETY: as in `pin_thread`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid `cpu_set_t` of the size passed; the call writes only it.
    let rc = unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &raw mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` < CPU_SETSIZE, so the bit is inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// `redis-server`'s process id, from its own `INFO server`.
pub fn redis_pid(redis: &RedisServer) -> u32 {
    redis
        .cli(&["INFO", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO server names the process_id")
}

/// Applies `PABAL_BENCH_REDIS_CPUS` to `redis` and `PABAL_BENCH_RELAY_CPUS` to this process
/// (call it before the relays and the load start their threads), checks
/// `PABAL_BENCH_LOAD_CPUS` (applied per load thread, [`pin_load_thread`]), and returns the
/// line that says where each runs, as the kernel reports it back.
pub fn apply(redis: &RedisServer) -> String {
    let pid = redis_pid(redis);
    if let Some(cpus) = cpus_from_env(REDIS_CPUS) {
        pin_process(REDIS_CPUS, pid, &cpus);
    }
    if let Some(cpus) = cpus_from_env(RELAY_CPUS) {
        pin_process(RELAY_CPUS, std::process::id(), &cpus);
    }
    let relay = affinity_of(0);
    // As the load's threads will be placed (checked here: a bad list fails before the run).
    let (load, load_policy) = {
        let pinned = pin_load_thread();
        let load = affinity_of(0);
        // SAFETY: reads the calling thread's policy; no pointer.
        let policy = unsafe { libc::sched_getscheduler(0) };
        drop(pinned);
        (load, policy)
    };
    format!(
        "placement: redis-server (pid {pid}) on CPUs {} ({REDIS_CPUS}={}); relay nodes (pid {}) \
         on CPUs {} ({RELAY_CPUS}={}); the load generator's threads on CPUs {} ({LOAD_CPUS}={}) under {} \
         ({LOAD_IDLE}={}); {} CPUs online",
        cpu_text(&affinity_of(pid as libc::pid_t)),
        std::env::var(REDIS_CPUS).unwrap_or_else(|_| "unset".into()),
        std::process::id(),
        cpu_text(&relay),
        std::env::var(RELAY_CPUS).unwrap_or_else(|_| "unset".into()),
        cpu_text(&load),
        std::env::var(LOAD_CPUS).unwrap_or_else(|_| "unset".into()),
        if load_policy == libc::SCHED_IDLE {
            "SCHED_IDLE"
        } else {
            "SCHED_OTHER"
        },
        std::env::var(LOAD_IDLE).unwrap_or_else(|_| "unset".into()),
        // SAFETY: sysconf reads a system constant.
        unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) },
    )
}

/// `0,1` for a CPU list (as `taskset -c` takes it), `?` for none.
pub fn cpu_text(cpus: &[usize]) -> String {
    if cpus.is_empty() {
        return "?".into();
    }
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
