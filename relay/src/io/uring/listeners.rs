//! The io_uring backend's listeners: the multishot `ACCEPT` per listener (single-shot,
//! re-armed, where unsupported), the accept policy's pause and re-arm
//! ([`super::super::accept::AcceptBackoff`]), and admitting an accepted connection into the
//! slab.
//!
//! Owns the listener slots. Must not touch a connection once it is admitted (receives and
//! sends are [`super::recv`]'s and [`super::send`]'s), nor the ring's enter/reap loop.

use std::io;
use std::net::{self, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr;
use std::time::Instant;

use io_uring::{opcode, types};

use super::super::accept::AcceptError;
use super::super::{CloseReason, EventSink};
use super::{Conn, OP_ACCEPT, OP_MISC, UringBackend, user_data};

pub(super) struct ListenerSlot {
    pub(super) listener: Option<net::TcpListener>,
    pub(super) armed: bool,
    pub(super) closing: bool,
    /// Accepting failed and paused: re-arm when the pause is over.
    pub(super) retry: bool,
}

impl UringBackend {
    pub(super) fn arm_accept(&mut self, lidx: usize) {
        let Some(slot) = self.listeners.get_mut(lidx) else {
            return;
        };
        let Some(listener) = slot.listener.as_ref() else {
            return;
        };
        let fd = types::Fd(listener.as_raw_fd());
        let entry = if self.accept_multishot {
            opcode::AcceptMulti::new(fd)
                .flags(libc::SOCK_CLOEXEC)
                .build()
        } else {
            opcode::Accept::new(fd, ptr::null_mut(), ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build()
        };
        slot.armed = true;
        slot.retry = false;
        let entry = entry.user_data(user_data(OP_ACCEPT, lidx as u32, 0));
        // SAFETY: the accept gets no address buffers (null), so it references no memory of
        // ours; the listener's fd stays open until the accept's final completion.
        unsafe { self.push(entry) }
    }

    pub(super) fn on_accept(
        &mut self,
        lidx: usize,
        res: i32,
        more: bool,
        sink: &mut dyn EventSink,
    ) {
        let Some(slot) = self.listeners.get_mut(lidx) else {
            if res >= 0 {
                // SAFETY: a successful accept's result is a new fd that only we own.
                drop(unsafe { net::TcpStream::from_raw_fd(res) });
            }
            return;
        };
        if !more {
            slot.armed = false;
        }
        if res >= 0 {
            // SAFETY: a successful accept's result is a new fd the kernel installed for us;
            // nothing else owns it.
            let stream = unsafe { net::TcpStream::from_raw_fd(res) };
            if !slot.closing && slot.listener.is_some() {
                if self.accept.in_episode() {
                    self.accept.succeeded(Instant::now());
                }
                self.on_accepted(stream, sink);
            }
        } else {
            match -res {
                libc::ECANCELED => {}
                libc::EINVAL if self.accept_multishot => {
                    tracing::debug!("io_uring: multishot accept unsupported; single-shot accept");
                    self.accept_multishot = false;
                }
                errno => match AcceptError::of(errno) {
                    AcceptError::Transient => {}
                    AcceptError::Pause => {
                        self.accept
                            .failed(Instant::now(), &io::Error::from_raw_os_error(errno));
                    }
                },
            }
        }
        let paused = self.accept.paused();
        let Some(slot) = self.listeners.get_mut(lidx) else {
            return;
        };
        if !slot.armed {
            if slot.closing {
                slot.listener = None; // closes it
            } else if paused {
                slot.retry = true; // re-armed when the pause is over (`poll`)
            } else {
                self.arm_accept(lidx);
            }
        }
    }

    pub(super) fn on_accepted(&mut self, stream: net::TcpStream, sink: &mut dyn EventSink) {
        let peer: SocketAddr = match stream.peer_addr() {
            Ok(peer) => peer,
            Err(e) => {
                tracing::debug!(error = %e, "accepted connection is already gone");
                return;
            }
        };
        let Some(token) = sink.accepted(&stream, peer) else {
            return;
        };
        if self.by_token.refuses_reuse(token) {
            return;
        }
        let idx = match self.conns.insert(Conn::new(token, stream)) {
            Ok(key) => key.index,
            Err(e) => {
                sink.closed(token, CloseReason::Error(e));
                return;
            }
        };
        self.by_token.insert(token, idx);
        self.arm_recv(idx);
        self.arm_hup(idx);
    }

    /// The accept pause is over: re-arm the listeners it stopped. (One whose multishot
    /// accept survived the error is still armed; it re-arms when that accept ends.)
    pub(super) fn rearm_listeners(&mut self) {
        for lidx in 0..self.listeners.len() {
            let l = &mut self.listeners[lidx];
            if l.armed {
                l.retry = false;
            } else if l.retry && !l.closing && l.listener.is_some() {
                self.arm_accept(lidx);
            }
        }
    }

    /// Stops every listener: cancels its accept, or closes it now (`Transport::close_listeners`).
    pub(super) fn stop_listeners(&mut self) {
        for lidx in 0..self.listeners.len() {
            let slot = &mut self.listeners[lidx];
            if slot.listener.is_none() || slot.closing {
                continue;
            }
            slot.closing = true;
            slot.retry = false;
            if slot.armed {
                // The listener closes when the accept's final completion arrives.
                self.push_cancel(
                    user_data(OP_ACCEPT, lidx as u32, 0),
                    user_data(OP_MISC, 0, 0),
                );
            } else {
                slot.listener = None;
            }
        }
    }

    /// Takes a listener and arms its accept (`Backend::add_listener`).
    pub(super) fn push_listener(&mut self, listener: net::TcpListener) -> io::Result<()> {
        // io_uring polls internally; a blocking listener keeps older kernels from handing
        // EAGAIN back to us instead of waiting.
        listener.set_nonblocking(false)?;
        self.listeners.push(ListenerSlot {
            listener: Some(listener),
            armed: false,
            closing: false,
            retry: false,
        });
        self.arm_accept(self.listeners.len() - 1);
        Ok(())
    }
}
