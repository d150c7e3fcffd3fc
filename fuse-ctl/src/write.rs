//! A write answered later, and its race with the kernel's interrupt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::handles::Handle;
use crate::pending::Pending;
use crate::reply::WriteReply;
use crate::{Caller, Errno};

/// Where a write's answer stands. The reply moves out when it is sent.
enum WriteState {
    /// Nobody answered or claimed it: an interrupt answers it with EINTR.
    Open(Box<dyn WriteReply>),
    /// The handler commits its effect: only `finish` (or drop) answers it.
    Claimed(Box<dyn WriteReply>),
    /// The kernel interrupted it and the writer got EINTR.
    Interrupted,
    /// `finish` or drop answered it.
    Answered,
}

/// A write's reply, shared by its [`WriteDone`] and the pending table the
/// interrupt looks it up in. Its lock is never held across a handler call
/// or a reply.
pub(crate) struct WriteSlot {
    pub caller: Caller,
    state: Mutex<WriteState>,
    interrupted: AtomicBool,
}

impl WriteSlot {
    pub fn new(caller: Caller, reply: Box<dyn WriteReply>) -> Arc<Self> {
        Arc::new(WriteSlot {
            caller,
            state: Mutex::new(WriteState::Open(reply)),
            interrupted: AtomicBool::new(false),
        })
    }

    /// Marks an open write interrupted and hands out its reply, for EINTR.
    /// `None` when the write is claimed or answered.
    pub fn interrupt(&self) -> Option<Box<dyn WriteReply>> {
        let mut state = self.state.lock().unwrap();
        match std::mem::replace(&mut *state, WriteState::Interrupted) {
            WriteState::Open(reply) => {
                self.interrupted.store(true, Ordering::SeqCst);
                Some(reply)
            }
            other => {
                *state = other;
                None
            }
        }
    }

    fn claim(&self) -> bool {
        let mut state = self.state.lock().unwrap();
        match std::mem::replace(&mut *state, WriteState::Answered) {
            WriteState::Open(reply) | WriteState::Claimed(reply) => {
                *state = WriteState::Claimed(reply);
                true
            }
            other => {
                *state = other;
                false
            }
        }
    }

    /// The reply for answering, unless interrupted or answered already.
    fn take(&self) -> Option<Box<dyn WriteReply>> {
        let mut state = self.state.lock().unwrap();
        match std::mem::replace(&mut *state, WriteState::Answered) {
            WriteState::Open(reply) | WriteState::Claimed(reply) => Some(reply),
            other => {
                *state = other;
                None
            }
        }
    }
}

/// Answers one write. Dropping it unanswered fails the write with EIO.
///
/// The kernel may interrupt the write at any time until it is claimed or
/// finished (the writer got a signal): the writer then gets EINTR at once and
/// the handler must not commit the write's effect. A handler that commits
/// something calls [`claim`](Self::claim) first and abandons the work when it
/// returns `false`.
pub struct WriteDone {
    pending: Arc<Pending>,
    unique: u64,
    handle: Arc<Handle>,
    offset: u64,
    len: u32,
    slot: Arc<WriteSlot>,
}

impl WriteDone {
    /// `slot` must be registered in `pending` under `unique`.
    pub(crate) fn new(
        pending: Arc<Pending>,
        unique: u64,
        handle: Arc<Handle>,
        offset: u64,
        len: u32,
        slot: Arc<WriteSlot>,
    ) -> Self {
        WriteDone {
            pending,
            unique,
            handle,
            offset,
            len,
            slot,
        }
    }

    /// Claims the reply for committing the write's effect. `false` when the
    /// kernel interrupted the write first (the writer already got EINTR):
    /// the caller must then abandon the work. After `true`, an interrupt no
    /// longer answers the write; `finish` does.
    pub fn claim(&self) -> bool {
        self.slot.claim()
    }

    /// Whether the write was interrupted (cheap; for long work to give up early).
    pub fn is_interrupted(&self) -> bool {
        self.slot.interrupted.load(Ordering::SeqCst)
    }

    /// Who wrote.
    pub fn caller(&self) -> Caller {
        self.slot.caller
    }

    /// Completes the write: `result` becomes the `write(2)` outcome and
    /// `reply_text` what reads after the written bytes return. Claims the
    /// write first if the handler did not; after an interrupt it records and
    /// answers nothing (the writer already got EINTR).
    pub fn finish(self, result: Result<(), Errno>, reply_text: Vec<u8>) {
        let Some(reply) = self.slot.take() else {
            return;
        };
        self.pending.forget_write(self.unique);
        // A failed write leaves the file offset where the write started, so
        // that is where its reply begins.
        let reply_at = match result {
            Ok(()) => self.offset + u64::from(self.len),
            Err(_) => self.offset,
        };
        self.handle.state().write_reply = Some((reply_at, reply_text));
        match result {
            Ok(()) => reply.written(self.len),
            Err(errno) => reply.error(errno),
        }
    }
}

impl Drop for WriteDone {
    fn drop(&mut self) {
        self.pending.forget_write(self.unique);
        if let Some(reply) = self.slot.take() {
            reply.error(Errno::EIO);
        }
    }
}

impl std::fmt::Debug for WriteDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteDone")
            .field("caller", &self.slot.caller)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("interrupted", &self.is_interrupted())
            .finish_non_exhaustive()
    }
}
