//! Typed errors of the codec and the wire error codes they map to.
//!
//! Owns: [`DecodeError`] (what is wrong with bytes a peer sent), [`SessionError`] (a
//! well-formed frame that breaks the per-connection protocol state), and [`ErrorCode`] /
//! [`GoAwayReason`] / [`LeftReason`], the numeric codes carried on the wire. Touches no I/O.

use thiserror::Error;

/// The peer sent bytes that are not a valid frame. Every variant is the peer's fault; the
/// connection should be answered with [`ErrorCode::Malformed`] (or the code
/// [`DecodeError::code`] gives) and closed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A frame declared a body longer than the limit. Reported as soon as the length prefix
    /// is read, before any of the body is buffered.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u64, max: usize },
    /// A frame with a zero-length body (every frame has at least a type byte).
    #[error("empty frame")]
    EmptyFrame,
    /// A varint used more bytes than its value needs.
    #[error("non-canonical varint")]
    NonCanonicalVarint,
    /// A varint longer than 10 bytes or past `u64::MAX`.
    #[error("varint overflows 64 bits")]
    VarintOverflow,
    /// A field's value does not fit the type it stands for (e.g. an alias past `u32::MAX`).
    #[error("{field} value {value} out of range")]
    OutOfRange { field: &'static str, value: u64 },
    /// The body ended before a field was complete.
    #[error("frame truncated inside {field}")]
    Truncated { field: &'static str },
    /// Bytes left over after the last field of a frame that has no open-ended tail.
    #[error("{extra} trailing bytes after {frame}")]
    TrailingBytes { frame: &'static str, extra: usize },
    /// The type byte names no frame this direction knows.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// Flag bits that this frame type does not define are set.
    #[error("undefined flags {flags:#05b} on {frame}")]
    UndefinedFlags { frame: &'static str, flags: u8 },
    /// A string field is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    /// A length-limited field exceeds its limit.
    #[error("{field} of {len} exceeds the limit of {max}")]
    TooLong {
        field: &'static str,
        len: u64,
        max: usize,
    },
    /// HELLO asked for a protocol version this side does not speak. The peer is
    /// incompatible rather than broken: answer [`ErrorCode::UnsupportedVersion`].
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion { version: u8 },
    /// A field holds a value the protocol forbids (e.g. an empty name, a gap whose end is
    /// before its start).
    #[error("invalid {field}: {why}")]
    Invalid {
        field: &'static str,
        why: &'static str,
    },
}

impl DecodeError {
    /// The wire code to report this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnknownFrameType(_) => ErrorCode::UnknownFrameType,
            DecodeError::TooLong { .. } => ErrorCode::LimitExceeded,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::Malformed,
        }
    }
}

/// A well-formed frame that is not valid in the connection's current protocol state, as
/// tracked by [`crate::session::ClientSession`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A frame referred to an alias that is not bound.
    #[error("alias {0} is not bound")]
    UnknownAlias(u32),
    /// A frame referred to a sender alias that was never defined.
    #[error("sender alias {0} is not defined")]
    UnknownSender(u32),
    /// A delivery or gap does not continue the room's sequence where the session expects.
    #[error("alias {alias}: expected sequence after {cursor}, got {got}")]
    SequenceBreak { alias: u32, cursor: u64, got: u64 },
    /// A frame came before the WELCOME that opens the session.
    #[error("{0} before WELCOME")]
    BeforeWelcome(&'static str),
    /// A PUBACK for a message id that is not in flight.
    #[error("PUBACK for unknown message id {0}")]
    UnknownMessageId(u64),
}

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:expr,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A code this version does not know; kept so that newer peers' codes pass through.
            Other(u64),
        }

        impl $name {
            /// The code as carried on the wire.
            pub const fn to_wire(self) -> u64 {
                match self {
                    $($name::$variant => $value,)*
                    $name::Other(v) => v,
                }
            }

            /// The code for a wire value; unknown values become [`Self::Other`].
            pub const fn from_wire(v: u64) -> Self {
                match v {
                    $($value => $name::$variant,)*
                    other => $name::Other(other),
                }
            }
        }
    };
}

wire_enum! {
    /// Codes carried by ERROR frames. 1-15: the peer sent garbage; 16-31: the request was
    /// refused; 32-47: the relay failed.
    ErrorCode {
        /// The bytes are not a valid frame.
        Malformed = 1,
        /// A frame exceeded the maximum frame length.
        FrameTooLarge = 2,
        /// The HELLO asked for a protocol version the relay does not speak.
        UnsupportedVersion = 3,
        /// The type byte names no known frame.
        UnknownFrameType = 4,
        /// A valid frame at the wrong time (PUBLISH before HELLO, a second HELLO, ...).
        ProtocolViolation = 5,
        /// The token is missing, malformed, or its signature does not verify.
        AuthFailed = 16,
        /// The token has expired (or is not valid yet).
        TokenExpired = 17,
        /// The user may not do this (subscribe to that channel, publish there, ...).
        NotPermitted = 18,
        /// The frame named an alias that is not bound on this connection.
        UnknownAlias = 19,
        /// Too many publishes per second; the frame was dropped.
        RateLimited = 20,
        /// A configured limit (rooms per user, subscriptions, connections, ...) was hit.
        LimitExceeded = 21,
        /// The payload is larger than the relay accepts.
        PayloadTooLarge = 22,
        /// No such room or channel.
        NotFound = 23,
        /// The relay failed; not the client's fault.
        Internal = 32,
        /// The relay is overloaded; try again later.
        Overloaded = 33,
    }
}

wire_enum! {
    /// Why the relay is closing a connection, in GOAWAY.
    GoAwayReason {
        /// The relay is shutting down or restarting.
        Shutdown = 1,
        /// The relay sheds load; reconnect after the hint (possibly elsewhere).
        Overload = 2,
        /// The app server disconnected this user.
        Kicked = 3,
        /// The peer stopped answering heartbeats.
        Timeout = 4,
        /// The token expired during the connection; reconnect with a fresh one.
        TokenExpired = 5,
        /// The peer did not complete the handshake in time.
        HandshakeTimeout = 6,
    }
}

wire_enum! {
    /// Why an alias was unbound, in LEFT.
    LeftReason {
        /// The client unsubscribed (or left the room itself).
        Unsubscribed = 0,
        /// The app server removed the user from the room or channel.
        Removed = 1,
        /// The client blocked the channel; the app server cannot re-subscribe it.
        Blocked = 2,
        /// A resume entry named a room the relay does not know for this user.
        UnknownRoom = 3,
        /// A resume entry from before the relay restarted (with in-memory state) named a
        /// room the relay does not know for this user yet: keep it and resume it later.
        Restarted = 4,
    }
}
