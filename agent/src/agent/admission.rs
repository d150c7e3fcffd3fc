//! Admission: the per-user caps on requests being checked, the reply a
//! door hands in with a request, and one request's life between admission
//! and its answer (deadline, commit, abandonment).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuse_ctl::Errno;

use crate::request::Request;
use crate::timefmt::rfc3339;

use super::{errno_name, Agent, Rejection, Requester, Step, ERRORS_KEPT};

/// Requests of one user whose deadline passed while their checks still
/// wait on a file system: past this many, the user's next request fails
/// with EAGAIN at once instead of tying up one more worker.
pub const MAX_STUCK_PER_USER: usize = 4;
/// Requests of one user being checked at once; more fail with EAGAIN.
pub const MAX_CHECKING_PER_USER: usize = 64;

/// Requests of one user in the core's hands.
#[derive(Default, Clone, Copy)]
pub(super) struct Checking {
    /// Admitted and not yet returned from the backend.
    running: usize,
    /// Of those, past their deadline.
    stuck: usize,
}

/// What a door gives the core with a request: how to answer it.
pub trait Reply: Send + 'static {
    /// Asked once, just before the operation is committed: `false` means
    /// the requester is gone (its write was interrupted), so nothing may be
    /// created.
    fn claim(&self) -> bool {
        true
    }

    /// Whether the requester already went away (cheap, may be asked often).
    fn is_gone(&self) -> bool {
        false
    }

    /// The answer, given exactly once (or never, after a `claim` of false).
    fn finish(self: Box<Self>, result: Result<String, Rejection>);
}

/// A request as a door received it.
pub enum Input {
    /// The bytes of one write to `request`.
    Text(Vec<u8>),
    /// Already parsed (the gRPC door).
    Parsed(Request),
}

/// One request between its admission and its answer, shared by the task
/// that keeps its deadline and the worker that checks it.
pub(super) struct Attempt {
    pub(super) agent: Arc<Agent>,
    pub(super) who: Requester,
    pub(super) step: Step,
    pub(super) state: Mutex<AttemptState>,
}

pub(super) struct AttemptState {
    pub(super) reply: Option<Box<dyn Reply>>,
    pub(super) committed: bool,
    pub(super) stuck: bool,
}

impl Attempt {
    /// The deadline passed: the writer gets ETIMEDOUT unless the operation
    /// is already committed (then the worker answers).
    pub(super) fn expire(&self, after: Duration) {
        let mut state = self.state.lock().unwrap();
        if state.committed {
            return;
        }
        let Some(reply) = state.reply.take() else {
            return;
        };
        state.stuck = true;
        drop(state);
        self.agent
            .checking
            .lock()
            .unwrap()
            .entry(self.who.uid)
            .or_default()
            .stuck += 1;
        let doing = self.step.get();
        let rejection = Rejection::new(
            Errno::ETIMEDOUT,
            format!(
                "no answer within {}s while {}: its file system does not answer",
                after.as_secs_f64(),
                if doing.is_empty() {
                    "checking the request".to_string()
                } else {
                    doing
                }
            ),
        );
        self.agent.reject(&self.who, &rejection);
        reply.finish(Err(rejection));
    }

    /// The last moment to give up: whether the operation may be created.
    pub(super) fn commit(&self) -> bool {
        let mut state = self.state.lock().unwrap();
        let Some(reply) = state.reply.as_ref() else {
            return false;
        };
        if !reply.claim() {
            // The writer already got EINTR: no answer is owed.
            state.reply = None;
            return false;
        }
        state.committed = true;
        true
    }

    /// Whether nobody waits for this request any more.
    pub(super) fn is_gone(&self) -> bool {
        self.state
            .lock()
            .unwrap()
            .reply
            .as_ref()
            .is_none_or(|reply| reply.is_gone())
    }

    /// Answers the requester, if it still waits.
    pub(super) fn answer(&self, result: Result<String, Rejection>) {
        let reply = self.state.lock().unwrap().reply.take();
        if let Some(reply) = reply {
            if let Err(rejection) = &result {
                // An abandoned request was nobody's mistake: no `errors` line.
                if rejection.errno != Errno::EINTR {
                    self.agent.reject(&self.who, rejection);
                }
            }
            reply.finish(result);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let stuck = self.state.get_mut().unwrap().stuck;
        let mut checking = self.agent.checking.lock().unwrap();
        if let Some(c) = checking.get_mut(&self.who.uid) {
            c.running = c.running.saturating_sub(1);
            if stuck {
                c.stuck = c.stuck.saturating_sub(1);
            }
            if c.running == 0 {
                checking.remove(&self.who.uid);
            }
        }
    }
}

/// A request given up on before its operation was committed.
pub fn abandoned() -> Rejection {
    Rejection::new(Errno::EINTR, "the request was abandoned")
}

impl Agent {
    /// Counts a request of `uid` in, or refuses it when too many of theirs
    /// are still being checked.
    pub(super) fn admit(&self, uid: u32) -> Result<(), Rejection> {
        let mut checking = self.checking.lock().unwrap();
        let c = checking.entry(uid).or_default();
        if c.stuck >= MAX_STUCK_PER_USER {
            return Err(Rejection::new(
                Errno::EAGAIN,
                format!(
                    "{} earlier requests of uid {uid} still wait on file systems that do not answer: try again later",
                    c.stuck
                ),
            ));
        }
        if c.running >= MAX_CHECKING_PER_USER {
            return Err(Rejection::new(
                Errno::EAGAIN,
                format!(
                    "{} requests of uid {uid} are being checked: try again",
                    c.running
                ),
            ));
        }
        c.running += 1;
        Ok(())
    }

    /// Records a rejection for the `errors` file and the log.
    pub(super) fn reject(&self, who: &Requester, rejection: &Rejection) {
        crate::metrics::rejected(who.uid, rejection.errno);
        let line = format!(
            "{} {} {}",
            rfc3339(SystemTime::now()),
            errno_name(rejection.errno),
            rejection.reason
        );
        tracing::warn!(
            user = who.uid,
            errno = errno_name(rejection.errno),
            "request rejected: {}",
            rejection.reason
        );
        let mut errors = self.errors.lock().unwrap();
        let list = errors.entry(who.uid).or_default();
        if list.len() == ERRORS_KEPT {
            list.pop_front();
        }
        list.push_back(line);
    }
}
