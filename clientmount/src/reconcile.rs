//! The reconcile core shared by the spec-dir driver and (later) the
//! Kubernetes driver: from a ClientMount, its pinned profile and the
//! Servers object to the new status. The driver persists the status.

use nnf_api::{
    ClientMount, ClientMountInfoStatus, ClientMountState, ClientMountStatus, NnfStorageProfile,
    ResourceError, ResourceErrorSeverity, Servers,
};
use tracing::{info, warn};

use crate::mount::{Config, Runner, StepError};
use crate::plan::{self, internal_error, user_error};

/// What the driver should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Desired state reached.
    Done,
    /// Failed; retry with backoff.
    Retry,
    /// Failed in a way retrying cannot fix (bad spec); wait for a change.
    Wait,
    /// Stopped early by shutdown; the status says what was done.
    Interrupted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: ClientMountStatus,
    pub next: Next,
}

/// The inputs besides the ClientMount.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    /// Every NnfStorageProfile the driver knows; the pinned one is picked
    /// by the ClientMount's labels.
    pub profiles: &'a [NnfStorageProfile],
    /// The Servers object of the ClientMount's directive, when known.
    pub servers: Option<&'a Servers>,
}

/// The status after initialisation: when `status.mounts[0].state` differs
/// from `spec.desiredState` (or the lengths differ), every entry becomes
/// `{state: desired, ready: false}` and `allReady` false. `None` when no
/// reset is needed. The driver persists this before running any command.
pub fn initial_status(cm: &ClientMount) -> Option<ClientMountStatus> {
    let desired = cm.spec.desired_state;
    let current = cm.status.clone().unwrap_or_default();
    let needs = current.mounts.len() != cm.spec.mounts.len()
        || current.mounts.first().map(|m| m.state) != Some(desired);
    if !needs {
        return None;
    }
    Some(ClientMountStatus {
        mounts: vec![
            ClientMountInfoStatus {
                state: desired,
                ready: false,
            };
            cm.spec.mounts.len()
        ],
        all_ready: false,
        error: current.error,
    })
}

fn fatal(error: &ResourceError) -> bool {
    error.severity == ResourceErrorSeverity::Fatal
}

/// Bring every `spec.mounts[]` entry to `spec.desiredState`.
pub fn reconcile(cm: &ClientMount, ctx: &Ctx) -> Outcome {
    let desired = cm.spec.desired_state;
    let mut status = initial_status(cm).unwrap_or_else(|| cm.status.clone().unwrap_or_default());
    // What was already achieved before this pass (a reset clears it).
    let prior: Vec<bool> = status.mounts.iter().map(|m| m.ready).collect();
    status.all_ready = false;
    status.error = None;

    if cm.spec.mounts.is_empty() {
        status.error = Some(user_error("spec.mounts is empty"));
        return Outcome {
            status,
            next: Next::Wait,
        };
    }

    let profile = match plan::find_profile(cm, ctx.profiles) {
        Ok(p) => p,
        Err(e) => {
            let next = if fatal(&e) { Next::Wait } else { Next::Retry };
            warn!(error = %e.debug_message, "no usable storage profile");
            status.error = Some(e);
            return Outcome { status, next };
        }
    };

    let runner = Runner { cfg: ctx.cfg };
    let mut first: Option<ResourceError> = None;
    let mut retry = false;
    let mut interrupted = false;
    for (i, entry) in status.mounts.iter_mut().enumerate() {
        let was_ready = prior.get(i).copied().unwrap_or(false);
        let result = plan::build(cm, i, profile, &ctx.cfg.device_dir).and_then(|plan| {
            let r = match desired {
                ClientMountState::Mounted => runner.mount(&plan, was_ready, ctx.servers),
                ClientMountState::Unmounted => runner.unmount(&plan, was_ready),
            };
            r.map_err(|e| match e {
                StepError::Interrupted => {
                    interrupted = true;
                    internal_error("interrupted", "interrupted by daemon shutdown")
                }
                StepError::Failed { user, debug } => {
                    let verb = match desired {
                        ClientMountState::Mounted => "mount",
                        ClientMountState::Unmounted => "unmount",
                    };
                    internal_error(
                        user,
                        format!("{verb} of {} failed: {debug}", plan.mount_path.display()),
                    )
                }
            })
        });
        match result {
            Ok(()) => {
                if !was_ready {
                    info!(index = i, state = desired.as_str(), "entry ready");
                }
                entry.ready = true;
            }
            Err(e) => {
                entry.ready = false;
                if interrupted {
                    break;
                }
                warn!(index = i, error = %e.debug_message, "entry failed");
                retry |= !fatal(&e);
                first.get_or_insert(e);
            }
        }
    }
    status.all_ready = status.mounts.iter().all(|m| m.ready);
    let next = if interrupted {
        Next::Interrupted
    } else if first.is_none() {
        Next::Done
    } else if retry {
        Next::Retry
    } else {
        Next::Wait
    };
    status.error = first;
    Outcome { status, next }
}
