//! What both drivers share on top of the reconcile core: the one reconcile
//! entry point and the one error policy that `kube::runtime::Controller`
//! runs (the Kubernetes driver over its watches, the spec-dir driver over
//! the events of its directory), the mount-path locks, and the converge
//! step of a pass (lock, initial status, commands, status).
//!
//! Scheduling (one reconcile per object at a time, a change while one runs
//! queues one more, requeues) is `Controller`'s; the drivers only say where
//! objects and statuses live.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::{watcher, Controller};
use nnf_api::{labels, ClientMount, ClientMountStatus, NnfStorageProfile, Servers};
use tracing::{debug, info, warn, Instrument};

use crate::daemon::Stop;
use crate::metrics::Metrics;
use crate::mount::Config;
use crate::reconcile::{self, Ctx, Next, Outcome};

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// First retry of an error retrying alone cannot fix (a bad spec, an
/// unpinned profile): something else may fix it without touching the
/// ClientMount, so it is retried, slowly.
const SLOW_BACKOFF_START: Duration = Duration::from_secs(10);
/// Retry after an NVMe rescan found every namespace (upstream
/// `quickRetryDelay`: 1 s).
pub const QUICK_RETRY: Duration = Duration::from_secs(1);

/// Why a reconcile did not reach the desired state; the error policy picks
/// the retry from the variant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Retrying may fix it: the backoff (1 s doubling, capped at 5 min).
    #[error("{0}")]
    Transient(String),
    /// An activation failed, and after an NVMe rescan every namespace of
    /// the mount is there: retry in about a second (upstream
    /// `quickRetryError`).
    #[error("{0}")]
    Quick(String),
    /// Retrying alone cannot fix it (bad spec, unpinned profile): the slow
    /// backoff (10 s doubling, capped at 5 min), or at once on a change.
    #[error("{0}")]
    Fatal(String),
    /// Stopped by daemon shutdown; the status says what was done.
    #[error("interrupted by daemon shutdown")]
    Interrupted,
}

/// The ClientMount resource, for both drivers' stores.
pub fn clientmount_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("dataworkflowservices.github.io", "v1alpha7", "ClientMount"),
        "clientmounts",
    )
}

/// Where a driver's objects and statuses live.
pub trait Driver: Send + Sync + 'static {
    /// How log lines and the error policy name the object.
    fn key(&self, obj: &DynamicObject) -> String;
    /// One pass over the object as last seen.
    fn reconcile(self: Arc<Self>, obj: Arc<DynamicObject>)
        -> BoxFuture<'static, Result<(), Error>>;
}

/// What `Controller` hands every reconcile.
pub struct Shared<D> {
    pub driver: Arc<D>,
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
}

/// The one reconcile both drivers run.
pub async fn reconcile<D: Driver>(
    obj: Arc<DynamicObject>,
    ctx: Arc<Shared<D>>,
) -> Result<Action, Error> {
    ctx.metrics.reconcile_started();
    let key = ctx.driver.key(&obj);
    let span = tracing::info_span!("clientmount", name = %key);
    let result = ctx.driver.clone().reconcile(obj).instrument(span).await;
    match &result {
        Ok(()) => ctx.policy.succeeded(&key),
        Err(Error::Interrupted) => {}
        Err(_) => ctx.metrics.reconcile_failed(),
    }
    result.map(|()| Action::await_change())
}

/// The one error policy.
pub fn error_policy<D: Driver>(
    obj: Arc<DynamicObject>,
    error: &Error,
    ctx: Arc<Shared<D>>,
) -> Action {
    ctx.policy.failed(&ctx.driver.key(&obj), error)
}

/// Failures in a row per object, for the backoffs.
#[derive(Default)]
pub struct Policy {
    failures: Mutex<HashMap<String, (u32, u32)>>,
}

impl Policy {
    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Upstream answers every error with controller-runtime's rate limiter
    /// and the quick retry with `RequeueAfter: quickRetryDelay`; a spec
    /// error goes on a slower backoff of its own here, so a broken
    /// ClientMount does not retry every few seconds forever.
    fn failed(&self, key: &str, error: &Error) -> Action {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let (fast, slow) = failures.entry(key.to_string()).or_default();
        match error {
            Error::Interrupted => Action::await_change(),
            Error::Quick(_) => {
                *fast = 0;
                info!(clientmount = %key, retry_in = ?QUICK_RETRY, "will retry soon");
                Action::requeue(QUICK_RETRY)
            }
            Error::Fatal(_) => {
                *fast = 0;
                *slow += 1;
                let delay = slow_backoff(*slow);
                info!(clientmount = %key, retry_in = ?delay, "will retry on the slow backoff");
                Action::requeue(delay)
            }
            Error::Transient(_) => {
                *fast += 1;
                let delay = backoff(*fast);
                info!(clientmount = %key, retry_in = ?delay, "will retry");
                Action::requeue(delay)
            }
        }
    }
}

/// The slow backoff: 10 s, doubling, capped at 5 min.
pub fn slow_backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(20);
    (SLOW_BACKOFF_START * (1u32 << shift)).min(BACKOFF_CAP)
}

pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(20);
    (BACKOFF_START * (1u32 << shift)).min(BACKOFF_CAP)
}

/// The driver-independent part of a pass, from the ClientMount (its status
/// as last persisted) to the outcome. `persist_initial` is called under
/// the path locks before any command runs, with the reset status when one
/// is needed: what it persists survives a crash part way. It answers false
/// when the object is gone: then nothing runs and there is no outcome.
pub fn converge(
    cfg: &Config,
    locks: &PathLocks,
    cm: &mut ClientMount,
    deleting: bool,
    profiles: &[NnfStorageProfile],
    servers: Option<&Servers>,
    persist_initial: impl FnOnce(Option<&ClientMountStatus>) -> Result<bool, Error>,
) -> Result<Option<Outcome>, Error> {
    let _guard = locks.lock(cm);
    if cfg.shutdown.load(Ordering::SeqCst) {
        return Err(Error::Interrupted);
    }
    let initial = reconcile::initial_status(cm);
    if !persist_initial(initial.as_ref())? {
        return Ok(None);
    }
    if let Some(init) = initial {
        cm.status = Some(init);
    }
    let ctx = Ctx {
        cfg,
        profiles,
        servers,
    };
    let out = reconcile::reconcile(cm, &ctx);
    if deleting && out.next == Next::Done {
        reconcile::after_deletion(cm, cfg);
    }
    Ok(Some(out))
}

/// The outcome as the error policy reads it, logged once.
pub fn verdict(cm: &ClientMount, out: &Outcome, deleting: bool) -> Result<(), Error> {
    let message = || {
        out.status
            .error
            .as_ref()
            .map(|e| e.debug_message.clone())
            .unwrap_or_default()
    };
    if out.next != Next::Done && out.next != Next::Interrupted {
        warn!(error = %message(), "reconcile failed");
    }
    match out.next {
        Next::Done => {
            if !deleting {
                info!(
                    state = cm.spec.desired_state.as_str(),
                    all_ready = out.status.all_ready,
                    "reconciled"
                );
            }
            Ok(())
        }
        Next::Retry => Err(Error::Transient(message())),
        Next::RetrySoon => Err(Error::Quick(message())),
        // A deletion must not get stuck on a bad spec: keep retrying with
        // backoff (an administrator can remove the finalizer).
        Next::Wait if deleting => Err(Error::Transient(message())),
        Next::Wait => Err(Error::Fatal(message())),
        Next::Interrupted => Err(Error::Interrupted),
    }
}

/// The Servers object of the ClientMount's directive: the only one whose
/// workflow and directive-index labels agree with the ClientMount's (a
/// label the ClientMount lacks is not compared).
pub fn pick_servers<'a>(cm: &ClientMount, all: &'a [Servers]) -> Option<&'a Servers> {
    let keys = [
        labels::WORKFLOW_NAME,
        labels::WORKFLOW_NAMESPACE,
        labels::DIRECTIVE_INDEX,
    ];
    let matching: Vec<&Servers> = all
        .iter()
        .filter(|s| {
            keys.iter().all(|k| match cm.metadata.label(k) {
                Some(v) => s.metadata.label(k) == Some(v),
                None => true,
            })
        })
        .collect();
    match matching.as_slice() {
        [one] => Some(one),
        [] => None,
        _ => {
            warn!(
                count = matching.len(),
                "several Servers objects match: not using any"
            );
            None
        }
    }
}

/// Runs one `Controller` over `trigger` (the objects to reconcile, as a
/// watch gives them) until `stop`: the one loop both drivers share.
pub async fn run<D: Driver>(
    trigger: impl Stream<Item = Result<DynamicObject, watcher::Error>> + Send + 'static,
    reader: Store<DynamicObject>,
    stop: &Stop,
    shared: Arc<Shared<D>>,
) {
    Controller::for_stream_with(trigger, reader, clientmount_resource())
        .graceful_shutdown_on(stop.signalled())
        .run(reconcile, error_policy, shared)
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "controller");
            }
        })
        .await;
}

/// Mount paths held by running reconciles: two ClientMounts never work on
/// the same path at once (`Controller` only keeps one object from running
/// twice). All of a ClientMount's paths are taken together, so there is no
/// lock-order deadlock.
#[derive(Default)]
pub struct PathLocks {
    held: Mutex<HashSet<PathBuf>>,
    freed: Condvar,
}

pub struct PathGuard<'a> {
    locks: &'a PathLocks,
    paths: Vec<PathBuf>,
}

impl PathLocks {
    pub fn lock(&self, cm: &ClientMount) -> PathGuard<'_> {
        let paths: Vec<PathBuf> = cm
            .spec
            .mounts
            .iter()
            .map(|m| PathBuf::from(m.mount_path.trim_end_matches('/')))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while paths.iter().any(|p| held.contains(p)) {
            held = self.freed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.extend(paths.iter().cloned());
        PathGuard { locks: self, paths }
    }
}

impl Drop for PathGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        for p in &self.paths {
            held.remove(p);
        }
        self.locks.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_backoff_is_slow_and_capped() {
        assert_eq!(slow_backoff(1), Duration::from_secs(10));
        assert_eq!(slow_backoff(2), Duration::from_secs(20));
        assert_eq!(slow_backoff(6), BACKOFF_CAP);
        assert_eq!(slow_backoff(100), BACKOFF_CAP);
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(9), Duration::from_secs(256));
        assert_eq!(backoff(10), BACKOFF_CAP);
        assert_eq!(backoff(1000), BACKOFF_CAP);
    }

    #[test]
    fn the_policy_picks_the_retry_from_the_error() {
        let p = Policy::default();
        let t = || Error::Transient("x".into());
        assert_eq!(p.failed("a", &t()), Action::requeue(Duration::from_secs(1)));
        assert_eq!(p.failed("a", &t()), Action::requeue(Duration::from_secs(2)));
        assert_eq!(
            p.failed("a", &Error::Quick("x".into())),
            Action::requeue(QUICK_RETRY)
        );
        // The quick retry restarts the backoff.
        assert_eq!(p.failed("a", &t()), Action::requeue(Duration::from_secs(1)));
        let f = || Error::Fatal("x".into());
        assert_eq!(
            p.failed("b", &f()),
            Action::requeue(Duration::from_secs(10))
        );
        assert_eq!(
            p.failed("b", &f()),
            Action::requeue(Duration::from_secs(20))
        );
        p.succeeded("b");
        assert_eq!(
            p.failed("b", &f()),
            Action::requeue(Duration::from_secs(10))
        );
        assert_eq!(p.failed("c", &Error::Interrupted), Action::await_change());
    }
}
