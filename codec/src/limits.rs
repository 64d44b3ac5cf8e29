//! [`Limits`]: every bound the decoder enforces, with safe defaults.
//!
//! Owns: the numbers. The relay's config sets them; the decoder checks them before it
//! buffers or allocates anything a peer asked for.

/// Bounds on what a peer may send. Each is checked before the bytes it governs are
/// buffered or sliced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame body (type byte onwards). Default 64 KiB: chat messages are small, and
    /// media travels through a CDN with only its link in the message.
    pub max_frame_len: usize,
    /// Longest room, channel or user name, in bytes. Default 255.
    pub max_name_len: usize,
    /// Longest token in HELLO, in bytes. Default 8 KiB.
    pub max_token_len: usize,
    /// Most entries in HELLO's resume list. Default 4,096.
    pub max_resume_entries: usize,
    /// Most (alias, sequence) pairs in one ACK. Default 512.
    pub max_ack_entries: usize,
    /// Longest human-readable text (ERROR, GOAWAY), in bytes. Default 1 KiB.
    pub max_text_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_len: 64 * 1024,
            max_name_len: 255,
            max_token_len: 8 * 1024,
            max_resume_entries: 4096,
            max_ack_entries: 512,
            max_text_len: 1024,
        }
    }
}
