//! What a backend is given and implements: the request's author, the
//! checked request, the words of a refusal, and the trait itself.

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_ctl::Errno;

use crate::op::Operation;
use crate::request::Request;

/// A refused request: the errno of `write(2)` and the words for `errors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: Errno,
    pub reason: String,
}

impl Rejection {
    pub fn new(errno: Errno, reason: impl Into<String>) -> Self {
        Rejection {
            errno,
            reason: reason.into(),
        }
    }
}

/// Who wrote a request.
#[derive(Debug, Clone, Copy)]
pub struct Requester {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// What a backend's `prepare` is doing right now, for the message of a
/// request that ran past its deadline ("stat of source '/lus/x' as uid 1000").
/// Also tells whether anyone still waits for the request, so that a backend
/// can skip work nobody wants (a create whose writer already left).
#[derive(Default)]
pub struct Step {
    doing: Mutex<String>,
    gone: Option<Box<dyn Fn() -> bool + Send + Sync>>,
}

impl Step {
    pub(super) fn watching(gone: impl Fn() -> bool + Send + Sync + 'static) -> Step {
        Step {
            doing: Mutex::default(),
            gone: Some(Box::new(gone)),
        }
    }

    pub fn set(&self, doing: impl Into<String>) {
        *self.doing.lock().unwrap() = doing.into();
    }

    pub(super) fn get(&self) -> String {
        self.doing.lock().unwrap().clone()
    }

    /// The writer went away or the deadline passed: nothing will be created.
    pub fn is_gone(&self) -> bool {
        self.gone.as_ref().is_some_and(|gone| gone())
    }
}

/// A checked request: the operation to make visible and what the backend
/// needs to run it. The plan travels with the request, never by name, so
/// that two writers of one name cannot swap what they prepared.
pub struct Prepared {
    /// Shared already: a backend may hand it to its own trackers before
    /// the core makes it visible.
    pub op: Arc<Operation>,
    pub plan: Box<dyn Any + Send>,
}

/// What executes operations. The core owns names, limits and visibility;
/// a backend validates what only it can, runs copies and keeps records.
///
/// The core never calls `prepare` or `accept` on a door's thread (a FUSE
/// dispatch thread, a gRPC handler): they run on the core's blocking pool,
/// and may wait on file systems or the network. A backend never calls the
/// core: it reports status changes and operations found or gone through
/// the `Notify` it was made with (`Events::notify`).
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Checks the request as `who` and builds the operation. Whatever it
    /// leaves behind (a record) `discard` undoes. `step` says what it is
    /// doing, for the message should it not finish in time.
    fn prepare(
        &self,
        who: &Requester,
        name: String,
        request: Request,
        step: &Step,
    ) -> Result<Prepared, Rejection>;
    /// The writer went away or the deadline passed after `prepare`: leave
    /// nothing of the request behind.
    fn discard(&self, _op: &Operation, _plan: Box<dyn Any + Send>) {}
    /// The operation is registered and visible: run it.
    fn accept(&self, op: Arc<Operation>, plan: Box<dyn Any + Send>) -> Result<(), Rejection>;
    /// Ask for cancellation; a no-op once completed.
    fn cancel(&self, op: &Arc<Operation>);
    /// Forget a completed operation's record.
    fn remove(&self, op: &Operation) -> Result<(), Rejection>;
    /// How long `prepare` may take before the request fails with ETIMEDOUT.
    /// A backend with its own, longer timeout (the API server's) may extend
    /// it, so that its own words (EAGAIN) reach the writer.
    fn deadline(&self, request_timeout: Duration) -> Duration {
        request_timeout
    }
}

/// The errno's symbolic name, as the `errors` file shows it.
pub fn errno_name(errno: Errno) -> &'static str {
    match errno.code() {
        libc::EINVAL => "EINVAL",
        libc::EEXIST => "EEXIST",
        libc::ENOENT => "ENOENT",
        libc::EPERM => "EPERM",
        libc::ENOSPC => "ENOSPC",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EINTR => "EINTR",
        _ => "EIO",
    }
}
