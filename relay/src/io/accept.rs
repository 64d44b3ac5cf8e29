//! [`AcceptBackoff`]: the one policy both backends follow when `accept` fails for lack of
//! resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) or with an error that is not about one
//! connection.
//!
//! Owns the pause, its backoff, the episode's log lines and the counters. A sans-IO state
//! machine: time is an argument, and it never touches a socket; each backend asks it whether
//! to accept now and when to retry, and does the retrying its own way (epoll re-drains the
//! listener, io_uring re-arms its accept). It must not know which backend uses it.
//!
//! An *episode* begins with the first failure after accepting worked, and ends once
//! accepting has worked for [`QUIET`] without a failure (so that a listener that accepts a
//! few connections per retry while descriptors trickle back stays one episode). It is logged
//! twice, never per attempt: one warning when it begins, one line with the count when it
//! ends. Failures and episodes are counted for `/metrics` ([`AcceptStats`]).

use std::io;
use std::time::{Duration, Instant};

/// The first pause after a failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(10);
/// The pause doubles per failed retry up to this.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// An episode ends when accepting has worked this long since its last failure.
pub const QUIET: Duration = Duration::from_secs(5);

/// What an accept error means for the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// About the one connection (aborted before we took it, a firewall rule, a signal):
    /// accept the next one at once.
    Transient,
    /// Out of descriptors or memory, or the listener itself failed: pause and retry.
    Pause,
}

impl AcceptError {
    /// Classifies an `accept` errno.
    pub fn of(errno: i32) -> Self {
        match errno {
            libc::EINTR
            | libc::EAGAIN
            | libc::ECONNABORTED
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH => AcceptError::Transient,
            _ => AcceptError::Pause,
        }
    }
}

/// Accept failures since the backend started (summed into the worker's counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcceptStats {
    /// Accept attempts that failed and paused accepting.
    pub failures: u64,
    /// Episodes: times accepting paused after it had worked.
    pub pauses: u64,
}

#[derive(Debug)]
struct Episode {
    started: Instant,
    last_failure: Instant,
    failures: u64,
}

/// The pause-and-retry state of one backend's listeners.
#[derive(Debug)]
pub struct AcceptBackoff {
    /// Set while paused: when to retry.
    retry_at: Option<Instant>,
    /// The next pause.
    delay: Duration,
    episode: Option<Episode>,
    stats: AcceptStats,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self {
            retry_at: None,
            delay: FIRST_DELAY,
            episode: None,
            stats: AcceptStats::default(),
        }
    }
}

impl AcceptBackoff {
    /// Whether accepting is paused (the backend must not accept until [`Self::due`]).
    pub fn paused(&self) -> bool {
        self.retry_at.is_some()
    }

    /// Whether an episode is in progress (successes matter to [`Self::succeeded`] only then).
    pub fn in_episode(&self) -> bool {
        self.episode.is_some()
    }

    /// An accept failed with `err`, which [`AcceptError::of`] classified as
    /// [`AcceptError::Pause`]: pause, and schedule the retry.
    pub fn failed(&mut self, now: Instant, err: &io::Error) {
        let stale = self
            .episode
            .as_ref()
            .map(|ep| ep.last_failure)
            .filter(|&last| now.saturating_duration_since(last) >= QUIET);
        if let Some(last) = stale {
            self.end_episode(last);
        }
        self.stats.failures += 1;
        match &mut self.episode {
            Some(ep) => {
                ep.failures += 1;
                ep.last_failure = now;
            }
            None => {
                self.stats.pauses += 1;
                self.delay = FIRST_DELAY;
                tracing::warn!(
                    error = %err,
                    "accept failed; pausing accepts and retrying the backlog from {FIRST_DELAY:?}, \
                     backing off to {MAX_DELAY:?} (logged once per episode)"
                );
                self.episode = Some(Episode {
                    started: now,
                    last_failure: now,
                    failures: 1,
                });
            }
        }
        self.retry_at = Some(now + self.delay);
        self.delay = (self.delay * 2).min(MAX_DELAY);
    }

    /// An accept worked (a connection, or a retry that drained the backlog without a
    /// failure). Ends the episode once accepting has worked for [`QUIET`] since its last
    /// failure. Cheap outside an episode; a backend may call it only when
    /// [`Self::in_episode`].
    pub fn succeeded(&mut self, now: Instant) {
        let quiet = self
            .episode
            .as_ref()
            .is_some_and(|ep| now.saturating_duration_since(ep.last_failure) >= QUIET);
        if quiet {
            self.end_episode(now);
        }
    }

    /// Ends the episode, if any, with its one summary line.
    fn end_episode(&mut self, now: Instant) {
        self.retry_at = None;
        self.delay = FIRST_DELAY;
        if let Some(ep) = self.episode.take() {
            tracing::info!(
                failures = ep.failures,
                "accepting again after {} failed attempts over {:?}",
                ep.failures,
                now.saturating_duration_since(ep.started)
            );
        }
    }

    /// Whether the pause is over: if so, it is cleared and the backend must retry every
    /// listener it paused (re-drain or re-arm) whether or not a new connection arrived.
    pub fn due(&mut self, now: Instant) -> bool {
        match self.retry_at {
            Some(at) if at <= now => {
                self.retry_at = None;
                true
            }
            _ => false,
        }
    }

    /// Shortens a poll timeout so that the backend wakes for the retry.
    pub fn bound_timeout(&self, now: Instant, timeout: Option<Duration>) -> Option<Duration> {
        match self.retry_at {
            None => timeout,
            Some(at) => {
                let left = at.saturating_duration_since(now);
                Some(timeout.map_or(left, |t| t.min(left)))
            }
        }
    }

    /// Counters since the backend started.
    pub fn stats(&self) -> AcceptStats {
        self.stats
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[test]
    fn classifies_errnos() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EBADF,
        ] {
            assert_eq!(AcceptError::of(errno), AcceptError::Pause, "{errno}");
        }
        for errno in [libc::EINTR, libc::EAGAIN, libc::ECONNABORTED, libc::EPERM] {
            assert_eq!(AcceptError::of(errno), AcceptError::Transient, "{errno}");
        }
    }

    #[test]
    fn backs_off_doubling_to_a_second_then_recovers() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        assert!(!b.paused() && b.bound_timeout(t0, None).is_none());
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..10 {
            b.failed(now, &emfile());
            let pause = b.bound_timeout(now, None).unwrap();
            pauses.push(pause);
            assert!(!b.due(now + pause - Duration::from_millis(1)));
            now += pause;
            assert!(b.due(now), "the retry is due after the pause");
            assert!(!b.paused() && !b.due(now), "due once");
        }
        let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        assert_eq!(
            b.stats(),
            AcceptStats {
                failures: 10,
                pauses: 1
            },
            "one episode"
        );
        // Accepting works, but not yet for long: still the same episode.
        b.succeeded(now);
        assert!(b.in_episode());
        now += QUIET;
        b.succeeded(now);
        assert!(!b.in_episode(), "quiet for QUIET: the episode is over");
        b.failed(now, &emfile());
        assert_eq!(b.bound_timeout(now, None), Some(FIRST_DELAY), "reset");
        assert_eq!(b.stats().pauses, 2);
    }

    #[test]
    fn a_success_between_failures_keeps_the_episode_and_its_backoff() {
        let mut b = AcceptBackoff::default();
        let now = Instant::now();
        b.failed(now, &emfile());
        assert!(b.due(now + FIRST_DELAY));
        b.succeeded(now + FIRST_DELAY);
        b.failed(now + FIRST_DELAY, &emfile());
        assert_eq!(b.stats().pauses, 1);
        assert_eq!(
            b.bound_timeout(now + FIRST_DELAY, None),
            Some(FIRST_DELAY * 2)
        );
    }

    #[test]
    fn a_pause_bounds_the_poll_timeout() {
        let mut b = AcceptBackoff::default();
        let now = Instant::now();
        b.failed(now, &emfile());
        assert_eq!(
            b.bound_timeout(now, Some(Duration::from_secs(3))),
            Some(FIRST_DELAY)
        );
        assert_eq!(
            b.bound_timeout(now, Some(Duration::from_millis(1))),
            Some(Duration::from_millis(1))
        );
        assert_eq!(b.bound_timeout(now + MAX_DELAY, None), Some(Duration::ZERO));
    }

    #[test]
    fn a_failure_long_after_the_last_starts_a_new_episode() {
        let mut b = AcceptBackoff::default();
        let now = Instant::now();
        b.failed(now, &emfile());
        assert!(b.due(now + FIRST_DELAY));
        // Re-armed; nothing observed for a long time, then another failure.
        b.failed(now + QUIET * 2, &emfile());
        assert_eq!(b.stats().pauses, 2);
        assert_eq!(b.bound_timeout(now + QUIET * 2, None), Some(FIRST_DELAY));
    }
}
