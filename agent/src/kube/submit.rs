//! The create of a checked request's NnfDataMovement, before the core
//! commits the request.
//!
//! A writer interrupted while the create is in flight is answered EINTR at
//! once by the control filesystem (its write is not claimed yet); the
//! create still runs to its end on the runtime, and `discard` deletes what
//! it made. A create that outlives `--kubernetes-timeout` is answered
//! EAGAIN, and the resource it makes after that is deleted as soon as its
//! answer comes. Either way nothing of an abandoned request remains.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::agent::Rejection;
use crate::op::Operation;

use super::api::*;
use super::create::Pending;
use super::{retry, KubeBackend};

/// The resource made for a request, until the core commits or discards it.
pub(super) struct Created {
    pub(super) namespace: String,
    pub(super) resource: String,
}

/// Between the create on the runtime and the worker that waits for it.
#[derive(Default)]
struct Handoff {
    state: Mutex<HandoffState>,
    ready: Condvar,
}

#[derive(Default)]
struct HandoffState {
    result: Option<Result<String, Rejection>>,
    /// The worker stopped waiting (EAGAIN): a late resource is deleted.
    abandoned: bool,
}

impl KubeBackend {
    /// Creates `pending` for `op`, waiting at most the timeout.
    pub(super) fn create(
        &self,
        op: &Arc<Operation>,
        pending: Pending,
    ) -> Result<Created, Rejection> {
        let Some(me) = self.me.upgrade() else {
            return Err(Rejection::new(
                fuse_ctl::Errno::EIO,
                "the backend is shutting down",
            ));
        };
        // Its resource may show in the watch before the create answers.
        self.tracking
            .lock()
            .unwrap()
            .creating
            .insert(op.name.clone(), op.clone());
        let Pending { namespace, body } = pending;
        let handoff = Arc::new(Handoff::default());
        let theirs = handoff.clone();
        let ns = namespace.clone();
        let task_op = op.clone();
        self.rt.spawn(async move {
            let api = me.ctx.dms(&ns);
            let result = retry::create_with_fresh_name(&api, &body)
                .await
                .map(|created| created.metadata.name.unwrap_or_default())
                .map_err(|e| api_rejection("creating the NnfDataMovement", &e));
            let mut state = theirs.state.lock().unwrap();
            if state.abandoned {
                drop(state);
                if let Ok(res) = result {
                    // The writer was told EAGAIN: nothing of it may remain.
                    me.forget_created(&ns, &res);
                }
                me.tracking.lock().unwrap().not_creating(&task_op);
                return;
            }
            state.result = Some(result);
            theirs.ready.notify_all();
        });
        let deadline = Instant::now() + self.timeout;
        let mut state = handoff.state.lock().unwrap();
        while state.result.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = handoff.ready.wait_timeout(state, left).unwrap().0;
        }
        let result = match state.result.take() {
            Some(result) => result,
            None => {
                state.abandoned = true;
                Err(self.timed_out("creating the NnfDataMovement"))
            }
        };
        drop(state);
        match result {
            Ok(resource) => Ok(Created {
                namespace,
                resource,
            }),
            Err(rejection) => {
                // Still creating when abandoned: the create's task forgets it.
                if !handoff.state.lock().unwrap().abandoned {
                    self.tracking.lock().unwrap().not_creating(op);
                }
                Err(rejection)
            }
        }
    }

    /// Deletes a resource nobody will own, and keeps the watch from listing it.
    fn forget_created(&self, ns: &str, res: &str) {
        let key = (ns.to_string(), res.to_string());
        let mut tracking = self.tracking.lock().unwrap();
        let tracked = tracking.remove_key(&key);
        tracking.deleting.insert(key);
        drop(tracking);
        if let Some(t) = tracked {
            // Listed by the watch meanwhile (it may have looked like one from
            // before a restart): it goes again.
            self.notify.gone(t.op);
        }
        tracing::info!(resource = %format!("{ns}/{res}"), "created after its request was answered EAGAIN: deleting it");
        self.spawn_delete(ns.to_string(), res.to_string());
    }
}
