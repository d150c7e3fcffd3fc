//! How the core answers requests it holds, and how it reaches the kernel.
//!
//! The core never sees fuser's reply types: a held read, write or poll owns
//! one of these instead, so the core runs (and is tested) without a mount.
//! The adapter implements them on fuser's types; the tests on fakes.

use crate::{Errno, NodeId};

/// The answer to one read.
pub(crate) trait ReadReply: Send + 'static {
    fn data(self: Box<Self>, data: &[u8]);
    fn error(self: Box<Self>, errno: Errno);
}

/// The answer to one write.
pub(crate) trait WriteReply: Send + 'static {
    fn written(self: Box<Self>, len: u32);
    fn error(self: Box<Self>, errno: Errno);
}

/// Wakes one poller, once.
pub(crate) trait PollWaker: Send + 'static {
    fn wake(self: Box<Self>);
}

/// Has the kernel forget a cached directory entry.
pub(crate) trait EntryInvalidator: Send + Sync + 'static {
    fn inval_entry(&self, parent: NodeId, name: &str);
}

/// What `poll` reports ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Events {
    pub readable: bool,
    /// A snapshot changed: `POLLPRI`, as sysfs reports a changed attribute.
    pub changed: bool,
    pub writable: bool,
}

impl Events {
    pub const NONE: Events = Events {
        readable: false,
        changed: false,
        writable: false,
    };
}
