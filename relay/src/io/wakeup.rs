//! [`Wakeup`]: the handle other threads use to interrupt a worker's [`Backend::poll`].
//!
//! Owns one `eventfd` per backend and the `pending` flag that keeps repeated wakes cheap.
//! Also holds the crate-private [`syscall!`] helper that the backends use for raw libc calls.
//! It must not know anything about either backend: each backend registers
//! [`Wakeup::as_raw_fd`] its own way and calls [`Wakeup::drain`] when the fd fires.
//!
//! [`Backend::poll`]: super::Backend::poll

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Turns the `-1` + `errno` convention of a libc call into [`io::Result`]:
/// `syscall!(unsafe { libc::read(fd, buf, len) })`. The `unsafe` block stays at the call
/// site, with its `// SAFETY:` comment.
macro_rules! syscall {
    ($call:expr) => {{
        let res = $call;
        if res == -1 {
            Err(::std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
pub(crate) use syscall;

/// Interrupts a worker's [`Backend::poll`](super::Backend::poll) from any thread.
///
/// Cheap to clone (an [`Arc`]). A wake that arrives while a previous one has not been seen
/// by the worker yet costs no syscall: the `pending` flag turns a burst of wakes into one
/// eventfd write. The worker learns of a wake through [`EventSink::woken`]; whatever the
/// waking thread wants the worker to see (a channel message, a flag) must be published
/// *before* calling [`Wakeup::wake`].
///
/// [`EventSink::woken`]: super::EventSink::woken
#[derive(Clone, Debug)]
pub struct Wakeup {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    fd: OwnedFd,
    /// `true` from the first `wake` until the backend has drained the eventfd.
    pending: AtomicBool,
}

impl Wakeup {
    /// Creates the eventfd (`EFD_NONBLOCK | EFD_CLOEXEC`). Backends call this; a worker gets
    /// its handle from [`Backend::wakeup`](super::Backend::wakeup).
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the flags are valid constants.
        let fd = syscall!(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: eventfd just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            inner: Arc::new(Inner {
                fd,
                pending: AtomicBool::new(false),
            }),
        })
    }

    /// A wakeup around any descriptor (tests use one whose reads fail).
    #[cfg(test)]
    pub(crate) fn from_fd(fd: OwnedFd) -> Self {
        Self {
            inner: Arc::new(Inner {
                fd,
                pending: AtomicBool::new(false),
            }),
        }
    }

    /// Wakes the worker. Costs one `write(2)` for the first wake since the worker last
    /// drained, nothing for the ones after it.
    pub fn wake(&self) {
        // AcqRel: the release half publishes what the caller wrote before waking; the
        // acquire half pairs with the backend's swap in `drain`.
        if self.inner.pending.swap(true, Ordering::AcqRel) {
            return; // a wake is already on its way to the worker
        }
        let one: u64 = 1;
        // SAFETY: the fd is an eventfd we own for the life of `inner`; `one` is 8 readable
        // bytes, the size an eventfd write requires.
        let res = syscall!(unsafe {
            libc::write(
                self.inner.fd.as_raw_fd(),
                (&raw const one).cast::<libc::c_void>(),
                8,
            )
        });
        match res {
            Ok(_) => {}
            // The counter is saturated: a wake is pending anyway.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::error!(error = %e, "eventfd write failed; wake lost"),
        }
    }

    /// The eventfd, for the backend to register (readable when a wake is pending).
    pub fn as_raw_fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }

    /// Called by the owning backend when the eventfd fired: reads the counter (resetting it)
    /// and then clears `pending`. Returns whether a wake was pending.
    ///
    /// The order matters. Clearing `pending` *before* the read would lose wakes: a waker
    /// could see `pending == false`, write, and have that write swallowed by our read,
    /// leaving `pending == true` with nothing in the eventfd, so every later `wake` would be
    /// skipped. Draining first is safe: a waker that runs between the read and the clear
    /// finds `pending == true` and skips its write, but its data was published before its
    /// swap, which our swap below acquires, and the sink's `woken()` runs after this.
    pub(crate) fn drain(&self) -> io::Result<bool> {
        let mut counter: u64 = 0;
        // SAFETY: the fd is our eventfd; `counter` is 8 writable bytes, the size an eventfd
        // read requires.
        let res = syscall!(unsafe {
            libc::read(
                self.inner.fd.as_raw_fd(),
                (&raw mut counter).cast::<libc::c_void>(),
                8,
            )
        });
        let drained = match res {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) => return Err(e),
        };
        let was_pending = self.inner.pending.swap(false, Ordering::AcqRel);
        Ok(drained || was_pending)
    }
}

impl AsFd for Wakeup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}
