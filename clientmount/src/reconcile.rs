//! The reconcile core shared by the spec-dir and Kubernetes drivers: from a
//! ClientMount, its pinned profile and the Servers object to the new
//! status. The driver persists the status.

use daemon_common::error::Causes;
use nnf_api::{
    ClientMount, ClientMountDeviceType, ClientMountInfoStatus, ClientMountState, ClientMountStatus,
    ClientMountType, NnfStorageProfile, ResourceError, ResourceErrorSeverity, Servers,
};
use tracing::{info, warn};

use crate::mount::{anything_mounted_at, Config, Runner, StepError};
use crate::nvme;
use crate::plan::{self, internal_error, user_error};

/// What the driver should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Desired state reached.
    Done,
    /// Failed; retry with backoff.
    Retry,
    /// An activation failed, and after an NVMe rescan every namespace of
    /// the mount is there: retry in about a second, not on the backoff
    /// (upstream `quickRetryDelay`).
    RetrySoon,
    /// Failed in a way retrying alone cannot fix (bad spec, unpinned
    /// profile): retry on the slow backoff, or at once on a change.
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
        // No usable profile, so no unmount command can be built: when
        // nothing is mounted at any path the mounts are unmounted, and a
        // deletion (a Teardown) does not wait forever for a profile that
        // may never come back. Upstream (nnf_clientmount_controller.go,
        // `Reconcile`) requeues until the profile exists; we differ on
        // purpose, as for the guarded LVM steps.
        Err(e)
            if desired == ClientMountState::Unmounted
                && !cm
                    .spec
                    .mounts
                    .iter()
                    .any(|m| anything_mounted_at(&m.mount_path)) =>
        {
            warn!(error = %e.debug_message, "no usable storage profile, but nothing is mounted at any path: unmounted");
            for entry in status.mounts.iter_mut() {
                entry.ready = true;
            }
            status.all_ready = true;
            return Outcome {
                status,
                next: Next::Done,
            };
        }
        Err(e) => {
            let next = if fatal(&e) { Next::Wait } else { Next::Retry };
            warn!(error = %e.debug_message, "no usable storage profile");
            status.error = Some(e);
            return Outcome { status, next };
        }
    };

    if ctx.cfg.mock {
        // `--mock`: what upstream's flag promises, for test clusters.
        for entry in status.mounts.iter_mut() {
            entry.ready = true;
        }
        status.all_ready = true;
        info!(
            state = desired.as_str(),
            "mock: reported ready, nothing run"
        );
        return Outcome {
            status,
            next: Next::Done,
        };
    }

    let runner = Runner { cfg: ctx.cfg };
    let mut quick = false;
    let mut first: Option<ResourceError> = None;
    let mut retry = false;
    let mut interrupted = false;
    for (i, entry) in status.mounts.iter_mut().enumerate() {
        let was_ready = prior.get(i).copied().unwrap_or(false);
        let built = match plan::build(cm, i, profile, &ctx.cfg.device_dir) {
            // No command can be built for this entry (a refused value, a
            // missing name), so none ever ran for it with this spec: when
            // nothing is mounted at its path it is unmounted, and a
            // deletion need not wait for an administrator.
            Err(e)
                if desired == ClientMountState::Unmounted
                    && fatal(&e)
                    && !anything_mounted_at(&cm.spec.mounts[i].mount_path) =>
            {
                warn!(index = i, error = %e.debug_message, "no usable commands, but nothing is mounted at the path: unmounted");
                Ok(None)
            }
            other => other.map(Some),
        };
        let result = built.and_then(|plan| {
            let Some(plan) = plan else {
                return Ok(());
            };
            let r = match desired {
                ClientMountState::Mounted => runner.mount(&plan, was_ready, ctx.servers),
                ClientMountState::Unmounted => runner.unmount(&plan, was_ready),
            };
            r.map_err(|e| match e {
                StepError::Interrupted => {
                    interrupted = true;
                    internal_error("interrupted", "interrupted by daemon shutdown")
                }
                StepError::Activation { user, debug } => {
                    // Upstream `changeMount`: a failed LVM activation is
                    // answered by an NVMe rescan; when every namespace of
                    // the mount is then present, retry soon.
                    if cm.spec.mounts[i].device.device_type == ClientMountDeviceType::Lvm {
                        let expected = plan.lvm.as_ref().map(|l| l.nvme.as_slice()).unwrap_or(&[]);
                        if nvme::rescan_after_failed_activation(ctx.cfg, expected) {
                            quick = true;
                        }
                    }
                    internal_error(
                        user,
                        format!("mount of {} failed: {debug}", plan.mount_path.display()),
                    )
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
    } else if retry && quick {
        info!("NVMe namespaces present after a rescan: quick retry");
        Next::RetrySoon
    } else if retry {
        Next::Retry
    } else {
        Next::Wait
    };
    status.error = first;
    Outcome { status, next }
}

/// After every entry of a deleted ClientMount is unmounted, before its
/// finalizer goes: rescan the NVMe controllers so that namespaces the Rabbit
/// removed disappear (upstream `Reconcile`, deletion branch, for mounts that
/// are not Lustre), and log the namespaces of the mount still present.
/// Unlike upstream a failure here is only logged: it must not keep a
/// Teardown waiting for a finalizer.
pub fn after_deletion(cm: &ClientMount, cfg: &Config) {
    if cfg.mock
        || cm
            .spec
            .mounts
            .iter()
            .all(|m| m.mount_type == ClientMountType::Lustre)
    {
        return;
    }
    if let Err(e) = nvme::rescan(cfg) {
        warn!(error = %Causes(&e), "NVMe rescan after deletion failed");
        return;
    }
    for m in &cm.spec.mounts {
        if m.mount_type == ClientMountType::Lustre
            || m.device.device_type != ClientMountDeviceType::Lvm
        {
            continue;
        }
        let Some(lvm) = m.device.lvm.as_ref().filter(|l| !l.nvme_info.is_empty()) else {
            continue;
        };
        let expected: Vec<(String, String)> = lvm
            .nvme_info
            .iter()
            .map(|n| (n.device_serial.clone(), n.namespace_id.clone()))
            .collect();
        match nvme::list(cfg) {
            Ok(present) => {
                let missing = nvme::missing(&expected, &present);
                let stale: Vec<String> = expected
                    .iter()
                    .filter(|e| !missing.contains(e))
                    .map(|(nqn, nsid)| format!("{nqn}/nsid={nsid}"))
                    .collect();
                if !stale.is_empty() {
                    info!(count = stale.len(), devices = ?stale, "NVMe namespaces still present after removal");
                }
            }
            Err(e) => warn!(error = %Causes(&e), "NVMe namespace list after deletion failed"),
        }
    }
}
