//! Choosing a backend: [`BackendOptions`], the io_uring probe behind `io_backend = "auto"`,
//! and the [`new_backend`] factory.
//!
//! Owns the decision and its one log line; it must not hold any per-connection state and
//! never keeps the probe ring it builds. Both backends read their sizes from
//! [`BackendOptions`], which is defined here so that neither backend depends on the other.
//!
//! Why io_uring can be missing on a machine that runs Linux 6.x, and what the probe reports:
//! - `kernel.io_uring_disabled` is 2 (disabled for everyone) or 1 (only for members of
//!   `kernel.io_uring_group`);
//! - a seccomp filter denies `io_uring_setup` with EPERM (Docker's default profile, a
//!   systemd unit with `SystemCallFilter=` lacking `@aio`/`io_uring_*` and
//!   `SystemCallErrorNumber=EPERM`) or an LSM refuses it;
//! - ENOSYS: a kernel before 5.1, one built without `CONFIG_IO_URING`, or a sandbox such as
//!   gVisor;
//! - ENOMEM: before 5.12 ring memory counts against `RLIMIT_MEMLOCK` (raise
//!   `LimitMEMLOCK=`);
//! - the kernel lacks an opcode or feature the backend needs (EXT_ARG timeouts: 5.11).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{IoUring, Probe, opcode};

use super::epoll::EpollBackend;
use super::uring::UringBackend;
use super::{Backend, BackendKind};

/// Sizes and switches for both backends. `Default` gives the production values.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// io_uring submission queue entries (power of two). Default 4096.
    pub ring_entries: u32,
    /// io_uring completion queue entries; at least `ring_entries`, power of two.
    /// Default 16384 (4 × SQ: multishot receives post many completions per submission).
    pub cq_entries: u32,
    /// Buffers in the provided-buffer ring for multishot receive (power of two, at most
    /// 32768). Default 1024.
    pub buf_ring_count: u16,
    /// Size of each provided buffer, and of the per-connection buffer of the single-shot
    /// receive fallback. Default 16 KiB.
    pub buf_size: u32,
    /// Use multishot accept/receive/poll and the buffer ring where the kernel has them.
    /// `false` forces the single-shot paths (what kernels before 6.0 get). Default true.
    pub uring_multishot: bool,
    /// Run multishot receives as bundles (`IORING_RECVSEND_BUNDLE`, Linux 6.10) where the
    /// kernel has them: one completion carries every buffer's worth the socket has ready.
    /// `false` forces the plain multishot receive (one completion per buffer). Default true.
    pub uring_recv_bundle: bool,
    /// Try `IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN` (falling back to
    /// plain setup if the kernel refuses). Default true.
    pub uring_defer_taskrun: bool,
    /// io_uring: completions one [`super::Backend::poll`] may report before it returns and
    /// leaves the rest for the next tick (the counterpart of `epoll_events`). Sends'
    /// completions do not count (epoll's writes are not among its events either). Default
    /// 1024.
    pub uring_tick_completions: usize,
    /// epoll: events fetched per `epoll_wait`. Default 1024.
    pub epoll_events: usize,
    /// epoll: size of the reusable read buffer. Default 64 KiB.
    pub read_chunk: usize,
    /// epoll: bytes one connection may read (and, separately, write) per tick before the
    /// others get their turn. Default 1 MiB.
    pub io_budget: usize,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            ring_entries: 4096,
            cq_entries: 4 * 4096,
            buf_ring_count: 1024,
            buf_size: 16 * 1024,
            uring_multishot: true,
            uring_recv_bundle: true,
            uring_defer_taskrun: true,
            uring_tick_completions: 1024,
            epoll_events: 1024,
            read_chunk: 64 * 1024,
            io_budget: 1024 * 1024,
        }
    }
}

impl BackendOptions {
    /// Checks the sizes; the error names the offending field.
    pub fn validate(&self) -> io::Result<()> {
        fn bad(msg: String) -> io::Result<()> {
            Err(io::Error::new(io::ErrorKind::InvalidInput, msg))
        }
        if !self.ring_entries.is_power_of_two() || self.ring_entries > 32768 {
            return bad(format!(
                "ring_entries = {}: must be a power of two, at most 32768",
                self.ring_entries
            ));
        }
        if !self.cq_entries.is_power_of_two() || self.cq_entries < self.ring_entries {
            return bad(format!(
                "cq_entries = {}: must be a power of two and at least ring_entries ({})",
                self.cq_entries, self.ring_entries
            ));
        }
        if !self.buf_ring_count.is_power_of_two() || self.buf_ring_count > 32768 {
            return bad(format!(
                "buf_ring_count = {}: must be a power of two, at most 32768",
                self.buf_ring_count
            ));
        }
        if self.buf_size == 0 || self.buf_size > (1 << 30) {
            return bad(format!(
                "buf_size = {}: must be between 1 and 2^30",
                self.buf_size
            ));
        }
        if self.uring_tick_completions == 0 {
            return bad("uring_tick_completions = 0: must be at least 1".to_owned());
        }
        if self.epoll_events == 0 {
            return bad("epoll_events = 0: must be at least 1".to_owned());
        }
        if self.read_chunk == 0 {
            return bad("read_chunk = 0: must be at least 1".to_owned());
        }
        if self.io_budget == 0 {
            return bad("io_budget = 0: must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// The backend [`choose`] settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedKind {
    /// [`UringBackend`].
    IoUring,
    /// [`EpollBackend`].
    Epoll,
}

impl ResolvedKind {
    /// `"io_uring"` or `"epoll"`, as [`Backend::name`] says it.
    pub fn name(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::Epoll => "epoll",
        }
    }
}

/// Why io_uring cannot be used here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// The `kernel.io_uring_disabled` sysctl forbids it.
    #[error(
        "kernel.io_uring_disabled = {value}{}",
        if *value == 1 { " and this process is not in kernel.io_uring_group" } else { "" }
    )]
    Sysctl {
        /// The sysctl's value (1 or 2).
        value: u8,
    },
    /// EPERM: a seccomp filter or an LSM denies the io_uring syscalls.
    #[error(
        "io_uring_setup denied (EPERM): a seccomp filter (container default profile, or \
         systemd SystemCallFilter= without @aio and SystemCallErrorNumber=EPERM) or an LSM \
         forbids io_uring"
    )]
    Denied,
    /// ENOSYS: the kernel (or sandbox) has no io_uring.
    #[error(
        "io_uring_setup not implemented (ENOSYS): kernel older than 5.1, built without \
             CONFIG_IO_URING, or a sandbox that lacks it"
    )]
    NotImplemented,
    /// ENOMEM while creating the ring: usually the locked-memory limit on kernels < 5.12.
    #[error(
        "io_uring_setup failed with ENOMEM: raise the locked-memory limit \
             (LimitMEMLOCK=, ulimit -l) or lower ring_entries"
    )]
    MemoryLimit,
    /// The kernel lacks opcodes the backend needs.
    #[error("the kernel lacks io_uring opcodes {0:?}")]
    MissingOpcodes(Vec<&'static str>),
    /// The kernel lacks a ring feature the backend needs.
    #[error("the kernel lacks io_uring feature {0}")]
    MissingFeature(&'static str),
    /// Anything else the setup returned.
    #[error("io_uring_setup failed: {0}")]
    Other(io::Error),
}

/// [`choose`] could not honour the configured backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// `io_backend = "io_uring"` was asked for and the kernel cannot provide it.
    #[error("io_backend = \"io_uring\", but io_uring is unavailable: {0}")]
    UringUnavailable(#[source] Unavailable),
}

/// Opcodes the io_uring backend submits, by name for the log.
const REQUIRED_OPS: &[(u8, &str)] = &[
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::SendMsg::CODE, "SENDMSG"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::Close::CODE, "CLOSE"),
];

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// Maps the error of `io_uring_setup` to a reason, given the sysctl's value if readable.
pub(crate) fn classify(err: io::Error, sysctl: Option<u8>) -> Unavailable {
    match err.raw_os_error() {
        Some(libc::EPERM) => match sysctl {
            Some(value @ (1 | 2)) => Unavailable::Sysctl { value },
            _ => Unavailable::Denied,
        },
        Some(libc::ENOSYS) => Unavailable::NotImplemented,
        Some(libc::ENOMEM) => Unavailable::MemoryLimit,
        _ => Unavailable::Other(err),
    }
}

fn read_sysctl() -> Option<u8> {
    std::fs::read_to_string(SYSCTL).ok()?.trim().parse().ok()
}

/// Checks that this process can run the io_uring backend with `opts`: builds (and drops) a
/// ring of the configured size and checks the opcodes and features the backend uses.
pub fn probe_uring(opts: &BackendOptions) -> Result<(), Unavailable> {
    let sysctl = read_sysctl();
    if sysctl == Some(2) {
        return Err(Unavailable::Sysctl { value: 2 });
    }
    let ring: IoUring = IoUring::builder()
        .setup_cqsize(opts.cq_entries)
        .build(opts.ring_entries)
        .map_err(|e| classify(e, sysctl))?;
    if !ring.params().is_feature_ext_arg() {
        return Err(Unavailable::MissingFeature("EXT_ARG (Linux 5.11)"));
    }
    if !ring.params().is_feature_nodrop() {
        return Err(Unavailable::MissingFeature("NODROP (Linux 5.5)"));
    }
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(Unavailable::Other)?;
    let missing: Vec<&'static str> = REQUIRED_OPS
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|&(_, name)| name)
        .collect();
    if !missing.is_empty() {
        return Err(Unavailable::MissingOpcodes(missing));
    }
    Ok(())
}

/// Whether `ring`'s kernel takes receive bundles (`IORING_FEAT_RECVSEND_BUNDLE`, Linux 6.10).
/// Not required: without it multishot receives take one buffer per completion. A kernel that
/// advertises it and still refuses a bundle (EINVAL) is handled where the receive completes.
pub(crate) fn recv_bundles(ring: &IoUring) -> bool {
    ring.params().is_feature_recvsend_bundle()
}

static RECEIVE_PATH_LOGGED: AtomicBool = AtomicBool::new(false);

/// Says once per process which receive path the io_uring workers run.
pub(crate) fn log_receive_path(opts: &BackendOptions, buffer_ring: bool, bundles: bool) {
    if RECEIVE_PATH_LOGGED.swap(true, Ordering::Relaxed) {
        return;
    }
    let path = match (buffer_ring, bundles) {
        (true, true) => "multishot receive bundles (one completion per socket read, many buffers)",
        (true, false) if !opts.uring_recv_bundle => {
            "plain multishot receive (bundles disabled by options)"
        }
        (true, false) => {
            "plain multishot receive (the kernel lacks IORING_FEAT_RECVSEND_BUNDLE, Linux 6.10)"
        }
        (false, _) => "single-shot receive into per-connection buffers",
    };
    tracing::info!("io_uring receive path: {path}");
}

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// Resolves the configured `io_backend`. `Auto` probes io_uring and falls back to epoll,
/// logging why once per process; `IoUring` fails if the probe fails; `Epoll` is taken as is.
pub fn choose(kind: BackendKind, opts: &BackendOptions) -> Result<ResolvedKind, ProbeError> {
    match kind {
        BackendKind::Epoll => Ok(ResolvedKind::Epoll),
        BackendKind::IoUring => match probe_uring(opts) {
            Ok(()) => Ok(ResolvedKind::IoUring),
            Err(e) => Err(ProbeError::UringUnavailable(e)),
        },
        BackendKind::Auto => match probe_uring(opts) {
            Ok(()) => Ok(ResolvedKind::IoUring),
            Err(reason) => {
                if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%reason, "io_uring unavailable; io_backend = \"auto\" falls back to epoll");
                }
                Ok(ResolvedKind::Epoll)
            }
        },
    }
}

/// Builds one worker's backend. Call it on the worker's own thread: the io_uring backend
/// may be set up as single-issuer, tying the ring to the thread that created it.
pub fn new_backend(kind: ResolvedKind, opts: &BackendOptions) -> io::Result<Box<dyn Backend>> {
    Ok(match kind {
        ResolvedKind::IoUring => Box::new(UringBackend::new(opts)?),
        ResolvedKind::Epoll => Box::new(EpollBackend::new(opts)?),
    })
}
