//! The Kubernetes driver's API calls: the finalizer's addition, the status
//! writes, the pinned profile and the Servers object.
//!
//! Writes: the finalizer is added with an update carrying the
//! resourceVersion read (a concurrent writer gives 409: re-read, retry);
//! the status goes through the status subresource the same way. The Servers
//! object is best effort (the ClusterRole grants no access to it).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::Api;
use nnf_api::{
    labels, ClientMount, ClientMountStatus, ClientMountType, NnfStorageProfile, Servers,
    CLIENTMOUNT_FINALIZER,
};
use tracing::{debug, warn};

use crate::controller::{clientmount_resource, pick_servers, Error, PathLocks};
use crate::mount::Config;

/// Bound on every API call of a reconcile: kube has no read timeout by
/// default, and a reconcile must not hang forever on a dead connection.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Re-reads after a 409 before giving up to the backoff.
const CONFLICT_RETRIES: usize = 20;

fn profile_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("nnf.cray.hpe.com", "v1alpha11", "NnfStorageProfile"),
        "nnfstorageprofiles",
    )
}

fn servers_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("dataworkflowservices.github.io", "v1alpha7", "Servers"),
        "servers",
    )
}

/// `(namespace, name)`
pub(super) type Key = (String, String);

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CallError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("no answer within {CALL_TIMEOUT:?}")]
    Timeout,
    #[error("still conflicting after {CONFLICT_RETRIES} re-reads")]
    Conflicts,
}

impl CallError {
    fn code(&self) -> Option<u16> {
        match self {
            CallError::Kube(kube::Error::Api(s)) => Some(s.code),
            _ => None,
        }
    }
}

pub(super) struct Kube {
    pub(super) client: kube::Client,
    pub(super) handle: tokio::runtime::Handle,
    pub(super) cfg: Arc<Config>,
    pub(super) locks: PathLocks,
    /// UIDs of objects whose finalizer we removed: a stale copy still in
    /// the store (or a trigger that raced the deletion) must not start
    /// their deactivation again.
    pub(super) finalized: Mutex<Tombstones>,
    /// Last copy of each pinned profile read: a ClientMount being deleted
    /// can still be unmounted when its profile went first.
    profiles: Mutex<HashMap<Key, NnfStorageProfile>>,
    /// The 403 on Servers is logged once, not on every reconcile.
    servers_denied_logged: AtomicBool,
    /// By UID, the resourceVersion of our last status write: a cached copy
    /// older than it (the store has not caught up with our own write yet)
    /// holds an outdated status and must not drive commands.
    written: Mutex<HashMap<String, u64>>,
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(
    obj: &DynamicObject,
) -> Result<T, serde_json::Error> {
    serde_json::to_value(obj).and_then(serde_json::from_value)
}

impl Kube {
    pub(super) fn new(client: kube::Client, cfg: Arc<Config>) -> Kube {
        Kube {
            client,
            handle: tokio::runtime::Handle::current(),
            cfg,
            locks: PathLocks::default(),
            finalized: Mutex::new(Tombstones::default()),
            profiles: Mutex::new(HashMap::new()),
            servers_denied_logged: AtomicBool::new(false),
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `obj` predates our last status write to it. Resource
    /// versions are opaque to clients in principle; every API server backed
    /// by etcd (and the test server) hands out increasing integers, and one
    /// that does not is never called stale.
    pub(super) fn is_stale(&self, obj: &DynamicObject) -> bool {
        let (Some(uid), Some(seen)) = (
            obj.metadata.uid.as_ref(),
            obj.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok()),
        ) else {
            return false;
        };
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.get(uid).is_some_and(|&ours| seen < ours)
    }

    fn wrote(&self, obj: &DynamicObject) {
        if let (Some(uid), Some(version)) = (
            obj.metadata.uid.clone(),
            obj.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok()),
        ) {
            let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
            written.insert(uid, version);
        }
    }

    /// Forgets a deleted object's last write.
    pub(super) fn forget_written(&self, uid: &str) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.remove(uid);
    }

    /// Runs an API call to completion from a blocking-pool thread.
    pub(super) fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, CallError> {
        self.handle
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, fut).await })
            .map_err(|_| CallError::Timeout)?
            .map_err(CallError::Kube)
    }

    pub(super) fn cm_api(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &clientmount_resource())
    }

    pub(super) fn stopping(&self) -> bool {
        self.cfg.shutdown.load(Ordering::SeqCst)
    }

    /// Adds our finalizer as upstream does (`Reconcile`: `AddFinalizer`,
    /// then `r.Update`): an update pinned to the object's resourceVersion;
    /// on 409 re-reads and tries again. `Ok(None)` when the object is gone.
    /// Its removal is `kube::runtime::finalizer()`'s.
    pub(super) fn add_finalizer(
        &self,
        api: &Api<DynamicObject>,
        mut obj: DynamicObject,
    ) -> Result<Option<DynamicObject>, CallError> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        for _ in 0..CONFLICT_RETRIES {
            let fins = obj.metadata.finalizers.get_or_insert_with(Vec::new);
            if fins.iter().any(|f| f == CLIENTMOUNT_FINALIZER) {
                return Ok(Some(obj));
            }
            fins.push(CLIENTMOUNT_FINALIZER.to_string());
            match self.call(api.replace(&name, &PostParams::default(), &obj)) {
                Ok(o) => {
                    self.wrote(&o);
                    return Ok(Some(o));
                }
                Err(e) if e.code() == Some(404) => return Ok(None),
                Err(e) if e.code() == Some(409) && !self.stopping() => {
                    debug!("conflict on finalizer update: re-reading");
                    match self.call(api.get_opt(&name))? {
                        Some(o) => obj = o,
                        None => return Ok(None),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(CallError::Conflicts)
    }

    /// Writes `status` through the status subresource, pinned to the
    /// object's resourceVersion; on 409 re-reads and writes again (the status
    /// is ours alone, so the newer object only brings a newer version).
    /// `Ok(None)` when the object is gone.
    pub(super) fn write_status(
        &self,
        api: &Api<DynamicObject>,
        mut obj: DynamicObject,
        status: &ClientMountStatus,
    ) -> Result<Option<DynamicObject>, CallError> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let value = serde_json::to_value(status).expect("status serializes");
        // During shutdown one attempt only: the daemon must exit promptly.
        let attempts = if self.stopping() { 1 } else { CONFLICT_RETRIES };
        for _ in 0..attempts {
            obj.data["status"] = value.clone();
            match self.call(api.replace_status(&name, &PostParams::default(), &obj)) {
                Ok(o) => {
                    self.wrote(&o);
                    return Ok(Some(o));
                }
                Err(e) if e.code() == Some(404) => return Ok(None),
                Err(e) if e.code() == Some(409) => {
                    debug!("conflict on status update: re-reading");
                    match self.call(api.get_opt(&name))? {
                        Some(o) => obj = o,
                        None => return Ok(None),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(CallError::Conflicts)
    }

    /// The pinned profile named by the labels (in a one-element list for
    /// the reconcile core, which reports a missing or unpinned one).
    pub(super) fn profiles(
        &self,
        cm: &ClientMount,
        deleting: bool,
    ) -> Result<Vec<NnfStorageProfile>, Error> {
        let Some(name) = cm.metadata.label(labels::PINNED_PROFILE_NAME) else {
            return Ok(Vec::new());
        };
        let ns = cm
            .metadata
            .label(labels::PINNED_PROFILE_NAMESPACE)
            .or(cm.metadata.namespace.as_deref())
            .unwrap_or("default");
        let key = (ns.to_string(), name.to_string());
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &profile_resource());
        let cached = || {
            self.profiles
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned()
        };
        match self.call(api.get(name)) {
            Ok(obj) => match parse::<NnfStorageProfile>(&obj) {
                Ok(p) => {
                    self.profiles
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, p.clone());
                    Ok(vec![p])
                }
                Err(e) => {
                    warn!(profile = %format!("{ns}/{name}"), error = %e, "invalid NnfStorageProfile");
                    Ok(Vec::new())
                }
            },
            // Gone: only a deletion may still use the copy it mounted with.
            Err(e) if e.code() == Some(404) => {
                Ok(cached().filter(|_| deleting).into_iter().collect())
            }
            Err(e) => match cached() {
                Some(p) => {
                    warn!(error = %e, "cannot read the pinned profile: using the last copy read");
                    Ok(vec![p])
                }
                None => {
                    warn!(error = %e, "cannot read the pinned profile: will retry");
                    Err(Error::Transient(format!(
                        "cannot read the pinned profile: {e}"
                    )))
                }
            },
        }
    }

    /// The Servers object for `.nnf-servers.json`, only when a Lustre entry
    /// sets permissions. Best effort: the clientmount ClusterRole has no
    /// access to Servers, so a 403 is logged once and the file is skipped.
    pub(super) fn servers(&self, cm: &ClientMount) -> Option<Servers> {
        let needed = cm
            .spec
            .mounts
            .iter()
            .any(|m| m.mount_type == ClientMountType::Lustre && m.set_permissions);
        if !needed {
            return None;
        }
        let ns = cm
            .metadata
            .label(labels::WORKFLOW_NAMESPACE)
            .or(cm.metadata.namespace.as_deref())
            .unwrap_or("default");
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &servers_resource());
        let mut lp = ListParams::default();
        if let Some(wf) = cm.metadata.label(labels::WORKFLOW_NAME) {
            lp = lp.labels(&format!("{}={wf}", labels::WORKFLOW_NAME));
        }
        match self.call(api.list(&lp)) {
            Ok(list) => {
                let all: Vec<Servers> = list.items.iter().filter_map(|o| parse(o).ok()).collect();
                pick_servers(cm, &all).cloned()
            }
            Err(e) if e.code() == Some(403) => {
                if !self.servers_denied_logged.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "no access to Servers objects: .nnf-servers.json is not written");
                }
                None
            }
            Err(e) => {
                warn!(error = %e, "cannot list Servers objects: .nnf-servers.json is not written");
                None
            }
        }
    }
}

/// UIDs of objects whose finalizer we removed, newest last: events still
/// queued for them (a stale copy in our store, a watch event that raced the
/// deletion) must not start their deactivation again.
#[derive(Default)]
pub(super) struct Tombstones {
    order: std::collections::VecDeque<String>,
    set: HashSet<String>,
}

impl Tombstones {
    const CAP: usize = 4096;

    pub(super) fn add(&mut self, uid: String) {
        if self.set.insert(uid.clone()) {
            self.order.push_back(uid);
            if self.order.len() > Self::CAP {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    pub(super) fn has(&self, obj: &DynamicObject) -> bool {
        obj.metadata
            .uid
            .as_ref()
            .is_some_and(|u| self.set.contains(u))
    }
}
