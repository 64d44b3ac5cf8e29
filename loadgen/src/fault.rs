//! A relay node killed (SIGKILL) and restarted in the middle of a run (`--kill-node`).
//!
//! Owns: the fault's timeline on its own thread (kill at a moment of the steady phase,
//! restart after a delay) and the marks it leaves in the report. Must not touch: phones
//! (they find out as phones do: their connections reset, and they reconnect elsewhere, see
//! [`crate::targets`]), the verdict.
//!
//! A restarted node keeps nothing of its own: memberships, join points and every room's
//! stream live in the cluster's engine, so phones that come back to it resume there as on
//! any other node.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::phone::Shared;
use crate::run::EventMark;
use crate::spawn::SpawnedRelay;

/// One node's death and, optionally, its return.
#[derive(Debug)]
pub struct NodeFault {
    /// The node (loadgen started it).
    pub node: Arc<Mutex<SpawnedRelay>>,
    /// Its name in the report (`node 2`).
    pub label: String,
    /// When it is killed, seconds after publishing starts.
    pub kill_at_s: f64,
    /// How long it stays dead before it is started again; `None`: it stays dead.
    pub down_s: Option<f64>,
}

/// Sleeps until `at`, or returns false if the run stops first.
fn sleep_until(shared: &Shared, at: Instant) -> bool {
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        if now >= at {
            return true;
        }
        std::thread::sleep((at - now).min(Duration::from_millis(50)));
    }
}

/// Plays `fault` against the run `shared` describes; the marks of what it did.
pub(crate) fn play(fault: &NodeFault, shared: &Shared) -> anyhow::Result<Vec<EventMark>> {
    let mut marks = Vec::new();
    let mark = |label: String| EventMark {
        at_s: Instant::now()
            .saturating_duration_since(shared.start)
            .as_secs_f64(),
        label,
    };
    let kill_at = shared.steady_start + Duration::from_secs_f64(fault.kill_at_s.max(0.0));
    if !sleep_until(shared, kill_at) {
        return Ok(marks);
    }
    let lock = || fault.node.lock().unwrap_or_else(PoisonError::into_inner);
    lock()
        .kill()
        .with_context(|| format!("killing {}", fault.label))?;
    marks.push(mark(format!("kill -9 {}", fault.label)));
    let Some(down_s) = fault.down_s else {
        return Ok(marks);
    };
    if !sleep_until(
        shared,
        Instant::now() + Duration::from_secs_f64(down_s.max(0.0)),
    ) {
        return Ok(marks);
    }
    lock()
        .restart()
        .with_context(|| format!("restarting {}", fault.label))?;
    marks.push(mark(format!("restart {}", fault.label)));
    Ok(marks)
}
