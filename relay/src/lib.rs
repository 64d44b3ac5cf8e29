//! pabal's relay (skeleton; filled by the relay issue).
pub mod io;
