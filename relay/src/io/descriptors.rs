//! The process's descriptor budget: `RLIMIT_NOFILE`, raised to its hard limit at start, and
//! how many client connections it leaves room for.
//!
//! Owns the `getrlimit`/`setrlimit` calls and the arithmetic of the budget. Every client
//! connection holds one descriptor; the rest of the process needs some too: per worker a
//! listener, a wakeup eventfd and an epoll instance or io_uring ring
//! ([`FDS_PER_WORKER`]), plus a configured reserve for everything else (stdio, the control
//! API's connections, key and config files, logs, storage). It must not touch sockets or the
//! configuration: the runtime turns the budget into `limits.max_connections`.

use std::io;

use super::wakeup::syscall;

/// Descriptors each worker holds besides its connections: its listener, its wakeup eventfd
/// and its epoll instance or io_uring ring.
pub const FDS_PER_WORKER: usize = 3;

/// Linux's default `fs.nr_open`: the most a soft limit may be raised to when the hard limit
/// is unlimited and `/proc/sys/fs/nr_open` cannot be read.
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// `RLIMIT_NOFILE` after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit in force: the most descriptors the process may hold.
    pub soft: u64,
    /// The soft limit before it was raised (equal to `soft` when nothing changed).
    pub was: u64,
    /// The hard limit (`u64::MAX`: unlimited).
    pub hard: u64,
}

/// The budget leaves no descriptor for a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "RLIMIT_NOFILE is {nofile}: after the {reserved} descriptors reserved for the relay itself \
     (limits.reserved_fds = {reserved_fds} and {FDS_PER_WORKER} per worker for {workers} \
     workers), none are left for connections; raise LimitNOFILE= (ulimit -n) or lower \
     limits.reserved_fds"
)]
pub struct NoDescriptors {
    /// The soft limit.
    pub nofile: u64,
    /// Everything reserved.
    pub reserved: u64,
    /// The configured reserve.
    pub reserved_fds: usize,
    /// Workers.
    pub workers: usize,
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit` that getrlimit fills in.
    syscall!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) })?;
    Ok(lim)
}

fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NR_OPEN_DEFAULT)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to `fs.nr_open` where the hard limit
/// is unlimited), and returns the limits in force. If the raise is refused, the soft limit
/// stays as it was and that is what is returned: the budget is computed from what holds.
pub fn raise_nofile() -> io::Result<Nofile> {
    let lim = get_nofile()?;
    let was = lim.rlim_cur;
    let hard = lim.rlim_max;
    let target = if hard == libc::RLIM_INFINITY {
        nr_open()
    } else {
        hard
    };
    if was != libc::RLIM_INFINITY && was < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: hard,
        };
        // SAFETY: `raised` is a valid `rlimit`, only read by setrlimit.
        match syscall!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) }) {
            Ok(_) => {
                tracing::debug!(from = was, to = target, "raised the soft RLIMIT_NOFILE");
            }
            Err(e) => {
                tracing::warn!(error = %e, soft = was, hard, "could not raise the soft RLIMIT_NOFILE to the hard limit");
            }
        }
    }
    let now = get_nofile()?;
    Ok(Nofile {
        soft: now.rlim_cur,
        was,
        hard: now.rlim_max,
    })
}

/// Sets the soft `RLIMIT_NOFILE` (tests that exhaust descriptors, in a child process).
#[cfg(test)]
pub(crate) fn set_soft_nofile(soft: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: get_nofile()?.rlim_max,
    };
    // SAFETY: `lim` is a valid `rlimit`, only read by setrlimit.
    syscall!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) })?;
    Ok(())
}

/// The client connections that `nofile` descriptors leave room for, after `reserved_fds`
/// and [`FDS_PER_WORKER`] per worker.
pub fn connection_budget(
    nofile: u64,
    reserved_fds: usize,
    workers: usize,
) -> Result<usize, NoDescriptors> {
    let reserved = (reserved_fds as u64)
        .saturating_add((FDS_PER_WORKER as u64).saturating_mul(workers as u64));
    match nofile.checked_sub(reserved) {
        Some(left) if left > 0 => Ok(usize::try_from(left).unwrap_or(usize::MAX)),
        _ => Err(NoDescriptors {
            nofile,
            reserved,
            reserved_fds,
            workers,
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn budget_subtracts_the_reserve_and_the_workers() {
        assert_eq!(connection_budget(20_000, 1024, 2), Ok(20_000 - 1024 - 6));
        assert_eq!(
            connection_budget(u64::MAX, 1024, 2).unwrap() as u64,
            u64::MAX - 1030
        );
        let err = connection_budget(100, 90, 4).unwrap_err();
        assert_eq!(err.reserved, 102);
        let text = err.to_string();
        assert!(
            text.contains("RLIMIT_NOFILE is 100") && text.contains("limits.reserved_fds = 90"),
            "{text}"
        );
        assert!(connection_budget(102, 90, 4).is_err(), "nothing left");
        assert_eq!(connection_budget(103, 90, 4), Ok(1));
    }

    #[test]
    fn raising_is_idempotent_and_reaches_the_hard_limit() {
        let first = raise_nofile().unwrap();
        assert!(first.soft >= first.was);
        if first.hard != libc::RLIM_INFINITY {
            assert_eq!(
                first.soft, first.hard,
                "the soft limit is raised to the hard one"
            );
        }
        let again = raise_nofile().unwrap();
        assert_eq!((again.soft, again.was), (first.soft, first.soft));
    }
}
