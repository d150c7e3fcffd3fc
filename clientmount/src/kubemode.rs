//! The Kubernetes driver: ClientMounts come from the API server, one watch
//! per namespace (`<node>` and `default`), and run through the same
//! reconcile core as the spec-dir driver.
//!
//! Structure: one current-thread tokio runtime owns the watches and the
//! scheduler; each reconcile runs on a blocking-pool thread (the mount layer
//! runs external commands synchronously) and makes its API calls through
//! the runtime's handle. An idle daemon is parked in the watches' reads: no
//! timer is armed unless a retry is due.
//!
//! Writes: the finalizer is added with an update carrying the
//! resourceVersion read (a concurrent writer gives 409: re-read, retry);
//! the status goes through the status subresource the same way. The Servers
//! object is best effort (the ClusterRole grants no access to it).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use nnf_api::{
    labels, ClientMount, ClientMountState, ClientMountStatus, ClientMountType, NnfStorageProfile,
    Servers, CLIENTMOUNT_FINALIZER,
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, info_span, warn};

use crate::mount::Config;
use crate::plan::user_error;
use crate::reconcile::{self, Ctx, Next};
use crate::specdir::{backoff, pick_servers, slow_backoff, PathLocks, QUICK_RETRY};

/// Bound on every API call of a reconcile: kube has no read timeout by
/// default, and a reconcile must not hang forever on a dead connection.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Re-reads after a 409 before giving up to the backoff.
const CONFLICT_RETRIES: usize = 20;

fn clientmount_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("dataworkflowservices.github.io", "v1alpha7", "ClientMount"),
        "clientmounts",
    )
}

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
type Key = (String, String);

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
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

struct Shared {
    client: kube::Client,
    handle: tokio::runtime::Handle,
    cfg: Arc<Config>,
    locks: PathLocks,
    /// Last copy of each pinned profile read: a ClientMount being deleted
    /// can still be unmounted when its profile went first.
    profiles: Mutex<HashMap<Key, NnfStorageProfile>>,
    /// The 403 on Servers is logged once, not on every reconcile.
    servers_denied_logged: AtomicBool,
}

fn parse<T: serde::de::DeserializeOwned>(obj: &DynamicObject) -> Result<T, String> {
    serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(|e| e.to_string())
}

impl Shared {
    /// Runs an API call to completion from a blocking-pool thread.
    fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, CallError> {
        self.handle
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, fut).await })
            .map_err(|_| CallError::Timeout)?
            .map_err(CallError::Kube)
    }

    fn cm_api(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &clientmount_resource())
    }

    fn stopping(&self) -> bool {
        self.cfg.shutdown.load(Ordering::SeqCst)
    }

    /// Adds (`add`) or removes our finalizer with an update pinned to the
    /// object's resourceVersion; on 409 re-reads and tries again. `Ok(None)`
    /// when the object is gone.
    fn set_finalizer(
        &self,
        api: &Api<DynamicObject>,
        mut obj: DynamicObject,
        add: bool,
    ) -> Result<Option<DynamicObject>, CallError> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        for _ in 0..CONFLICT_RETRIES {
            let fins = obj.metadata.finalizers.get_or_insert_with(Vec::new);
            let present = fins.iter().any(|f| f == CLIENTMOUNT_FINALIZER);
            if present == add {
                return Ok(Some(obj));
            }
            if add {
                fins.push(CLIENTMOUNT_FINALIZER.to_string());
            } else {
                fins.retain(|f| f != CLIENTMOUNT_FINALIZER);
            }
            match self.call(api.replace(&name, &PostParams::default(), &obj)) {
                Ok(o) => return Ok(Some(o)),
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
    fn write_status(
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
                Ok(o) => return Ok(Some(o)),
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
    fn profiles(&self, cm: &ClientMount, deleting: bool) -> Result<Vec<NnfStorageProfile>, Next> {
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
                    Err(Next::Retry)
                }
            },
        }
    }

    /// The Servers object for `.nnf-servers.json`, only when a Lustre entry
    /// sets permissions. Best effort: the clientmount ClusterRole has no
    /// access to Servers, so a 403 is logged once and the file is skipped.
    fn servers(&self, cm: &ClientMount) -> Option<Servers> {
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

    /// One reconcile of the ClientMount as last seen by the watch (`None`:
    /// deleted).
    fn work(&self, key: &Key, obj: Option<DynamicObject>) -> Next {
        let Some(obj) = obj else {
            return Next::Done;
        };
        let api = self.cm_api(&key.0);
        let mut cm: ClientMount = match parse(&obj) {
            Ok(cm) => cm,
            Err(e) => {
                // The schema makes this rare (a field the types require
                // that the schema does not): report it, wait for a change.
                let msg = format!("invalid ClientMount: {e}");
                warn!(error = %msg, "cannot use the ClientMount");
                let mut status: ClientMountStatus = obj
                    .data
                    .get("status")
                    .and_then(|s| serde_json::from_value(s.clone()).ok())
                    .unwrap_or_default();
                status.all_ready = false;
                status.error = Some(user_error(msg));
                if let Err(e) = self.write_status(&api, obj, &status) {
                    warn!(error = %e, "could not write status");
                    return Next::Retry;
                }
                return Next::Wait;
            }
        };
        let deleting = cm.metadata.deletion_timestamp.is_some();
        let ours = cm
            .metadata
            .finalizers
            .iter()
            .any(|f| f == CLIENTMOUNT_FINALIZER);
        if deleting && !ours {
            // Never mounted by us (the finalizer comes before any mount).
            return Next::Done;
        }
        let mut obj = obj;
        if !deleting && !ours {
            // Before the first mount: the Rabbit side reads a missing
            // finalizer as a dead daemon.
            match self.set_finalizer(&api, obj, true) {
                Ok(Some(o)) => {
                    info!("finalizer added");
                    obj = o;
                }
                Ok(None) => return Next::Done,
                Err(e) => {
                    warn!(error = %e, "could not add the finalizer");
                    return Next::Retry;
                }
            }
            match parse(&obj) {
                Ok(c) => cm = c,
                Err(_) => return Next::Retry,
            }
        }
        if deleting {
            cm.spec.desired_state = ClientMountState::Unmounted;
        }
        let profiles = match self.profiles(&cm, deleting) {
            Ok(p) => p,
            Err(next) => return next,
        };
        let servers = self.servers(&cm);

        let _guard = self.locks.lock(&cm);
        if self.stopping() {
            return Next::Interrupted;
        }
        if let Some(init) = reconcile::initial_status(&cm) {
            match self.write_status(&api, obj, &init) {
                Ok(Some(o)) => obj = o,
                Ok(None) => return Next::Done,
                Err(e) => {
                    warn!(error = %e, "could not write the initial status");
                    return Next::Retry;
                }
            }
            cm.status = Some(init);
        }
        let ctx = Ctx {
            cfg: &self.cfg,
            profiles: &profiles,
            servers: servers.as_ref(),
        };
        let out = reconcile::reconcile(&cm, &ctx);

        if deleting && out.next == Next::Done {
            reconcile::after_deletion(&cm, &self.cfg);
            return match self.set_finalizer(&api, obj, false) {
                Ok(_) => {
                    info!("unmounted; finalizer removed");
                    Next::Finalized
                }
                Err(e) => {
                    warn!(error = %e, "could not remove the finalizer");
                    Next::Retry
                }
            };
        }
        if Some(&out.status) != cm.status.as_ref() {
            match self.write_status(&api, obj, &out.status) {
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "could not write status");
                    if out.next != Next::Interrupted {
                        return Next::Retry;
                    }
                }
            }
        }
        match (&out.next, &out.status.error) {
            (Next::Done, _) => info!(
                state = cm.spec.desired_state.as_str(),
                all_ready = out.status.all_ready,
                "reconciled"
            ),
            (_, Some(e)) => warn!(error = %e.debug_message, "reconcile failed"),
            _ => {}
        }
        match out.next {
            // A deletion must not get stuck on a bad spec: keep retrying
            // with backoff (an administrator can remove the finalizer).
            Next::Wait if deleting => Next::Retry,
            n => n,
        }
    }
}

enum Ev {
    /// From a watch: the object's latest state, `None` when deleted.
    Seen(Key, Option<Box<DynamicObject>>),
    /// A watch (re)listed namespace `.0`: these names exist now; others
    /// there are gone.
    Listed(String, HashSet<String>),
    /// A reconcile ended; the UID of the object it worked on.
    Done(Key, Next, Option<String>),
    Shutdown,
}

/// UIDs of objects whose finalizer we removed, newest last: events still
/// queued for them (a stale copy in our store, a watch event that raced the
/// deletion) must not start their deactivation again.
#[derive(Default)]
struct Tombstones {
    order: std::collections::VecDeque<String>,
    set: HashSet<String>,
}

impl Tombstones {
    const CAP: usize = 4096;

    fn add(&mut self, uid: String) {
        if self.set.insert(uid.clone()) {
            self.order.push_back(uid);
            if self.order.len() > Self::CAP {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn has(&self, obj: &DynamicObject) -> bool {
        obj.metadata
            .uid
            .as_ref()
            .is_some_and(|u| self.set.contains(u))
    }
}

/// One watch of a namespace, restarting with kube's default backoff after
/// errors (the API server down at start, a dropped connection, 410 Gone).
async fn watch_namespace(client: kube::Client, ns: String, tx: mpsc::UnboundedSender<Ev>) {
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &clientmount_resource());
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut listing: HashSet<String> = HashSet::new();
    let mut failing = false;
    while let Some(item) = stream.next().await {
        let key = |o: &DynamicObject| (ns.clone(), o.metadata.name.clone().unwrap_or_default());
        let ev = match item {
            Ok(Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(Event::InitApply(o)) => {
                listing.insert(o.metadata.name.clone().unwrap_or_default());
                Ev::Seen(key(&o), Some(Box::new(o)))
            }
            Ok(Event::InitDone) => {
                if failing {
                    info!(namespace = %ns, "watch resumed");
                    failing = false;
                } else {
                    info!(namespace = %ns, "watching ClientMounts");
                }
                Ev::Listed(ns.clone(), std::mem::take(&mut listing))
            }
            Ok(Event::Apply(o)) => Ev::Seen(key(&o), Some(Box::new(o))),
            Ok(Event::Delete(o)) => Ev::Seen(key(&o), None),
            Err(e) => {
                // Every failure is logged; the backoff bounds the rate.
                warn!(namespace = %ns, error = %e, "watch failed: retrying with backoff");
                failing = true;
                continue;
            }
        };
        if tx.send(ev).is_err() {
            return;
        }
    }
}

#[derive(Default)]
struct Sched {
    store: HashMap<Key, DynamicObject>,
    running: HashSet<Key>,
    dirty: HashSet<Key>,
    failures: HashMap<Key, u32>,
    slow_failures: HashMap<Key, u32>,
    retry_at: HashMap<Key, Instant>,
    finalized: Tombstones,
}

/// Run the Kubernetes driver until SIGTERM/SIGINT. The connection settings
/// were checked by the caller.
pub fn run(conn: kube_connect::Connection, cfg: Arc<Config>, node: String) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(run_async(conn, cfg, node))
}

async fn run_async(
    conn: kube_connect::Connection,
    cfg: Arc<Config>,
    node: String,
) -> Result<(), String> {
    let client = conn.client().await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Ev>();
    {
        let tx = tx.clone();
        crate::specdir::spawn_sigwait_thread(move || tx.send(Ev::Shutdown).is_ok());
    }
    let shared = Arc::new(Shared {
        client: client.clone(),
        handle: tokio::runtime::Handle::current(),
        cfg: cfg.clone(),
        locks: PathLocks::default(),
        profiles: Mutex::new(HashMap::new()),
        servers_denied_logged: AtomicBool::new(false),
    });
    let mut namespaces = vec![node.clone()];
    if node != "default" {
        namespaces.push("default".to_string());
    }
    // One watch per namespace: the role allows watching in any namespace,
    // and a cluster-wide watch would carry every node's ClientMounts.
    let watches: Vec<_> = namespaces
        .iter()
        .map(|ns| tokio::spawn(watch_namespace(client.clone(), ns.clone(), tx.clone())))
        .collect();

    let mut s = Sched::default();
    let kick = |s: &mut Sched, key: &Key| {
        s.retry_at.remove(key);
        if s.running.contains(key) {
            s.dirty.insert(key.clone());
            return;
        }
        let obj = s.store.get(key).cloned();
        if obj.as_ref().is_some_and(|o| s.finalized.has(o)) {
            debug!(clientmount = %format!("{}/{}", key.0, key.1), "already finalized: not reconciled again");
            return;
        }
        s.running.insert(key.clone());
        let uid = obj.as_ref().and_then(|o| o.metadata.uid.clone());
        let (shared, tx, key) = (shared.clone(), tx.clone(), key.clone());
        tokio::task::spawn_blocking(move || {
            let span = info_span!("clientmount", name = %format!("{}/{}", key.0, key.1));
            let next = span.in_scope(|| shared.work(&key, obj));
            let _ = tx.send(Ev::Done(key, next, uid));
        });
    };

    let mut shutting_down = false;
    loop {
        if shutting_down && s.running.is_empty() {
            break;
        }
        // Idle = parked in recv: a timer only while a retry is pending.
        let deadline = if shutting_down {
            None
        } else {
            s.retry_at.values().min().copied()
        };
        let ev = match deadline {
            None => rx.recv().await,
            Some(d) => {
                tokio::select! {
                    ev = rx.recv() => ev,
                    _ = tokio::time::sleep_until(d.into()) => {
                        let now = Instant::now();
                        let due: Vec<Key> = s.retry_at.iter()
                            .filter(|(_, t)| **t <= now)
                            .map(|(k, _)| k.clone())
                            .collect();
                        for key in due {
                            kick(&mut s, &key);
                        }
                        continue;
                    }
                }
            }
        };
        let Some(ev) = ev else { break };
        match ev {
            Ev::Shutdown => {
                if !shutting_down {
                    shutting_down = true;
                    cfg.shutdown.store(true, Ordering::SeqCst);
                    for w in &watches {
                        w.abort();
                    }
                }
            }
            Ev::Done(key, next, uid) => {
                s.running.remove(&key);
                match next {
                    Next::Finalized => {
                        s.failures.remove(&key);
                        s.slow_failures.remove(&key);
                        if let Some(uid) = uid {
                            s.finalized.add(uid);
                        }
                        if s.store.get(&key).is_some_and(|o| s.finalized.has(o)) {
                            s.store.remove(&key);
                        }
                    }
                    Next::RetrySoon => {
                        s.failures.remove(&key);
                        info!(clientmount = %format!("{}/{}", key.0, key.1), retry_in = ?QUICK_RETRY, "will retry soon");
                        s.retry_at.insert(key.clone(), Instant::now() + QUICK_RETRY);
                    }
                    Next::Wait => {
                        s.failures.remove(&key);
                        let f = s.slow_failures.entry(key.clone()).or_insert(0);
                        *f += 1;
                        let delay = slow_backoff(*f);
                        info!(clientmount = %format!("{}/{}", key.0, key.1), retry_in = ?delay, "will retry on the slow backoff");
                        s.retry_at.insert(key.clone(), Instant::now() + delay);
                    }
                    Next::Retry => {
                        let f = s.failures.entry(key.clone()).or_insert(0);
                        *f += 1;
                        let delay = backoff(*f);
                        info!(clientmount = %format!("{}/{}", key.0, key.1), retry_in = ?delay, "will retry");
                        s.retry_at.insert(key.clone(), Instant::now() + delay);
                    }
                    Next::Interrupted => {}
                    Next::Done => {
                        s.failures.remove(&key);
                        s.slow_failures.remove(&key);
                    }
                }
                if s.dirty.remove(&key) && !shutting_down {
                    kick(&mut s, &key);
                }
            }
            _ if shutting_down => {}
            Ev::Seen(key, obj) => {
                match obj {
                    Some(o) if s.finalized.has(&o) => {
                        // A copy from before our finalizer removal.
                        s.store.remove(&key);
                        continue;
                    }
                    Some(o) => {
                        s.store.insert(key.clone(), *o);
                    }
                    None => {
                        s.store.remove(&key);
                        s.failures.remove(&key);
                        s.slow_failures.remove(&key);
                    }
                }
                kick(&mut s, &key);
            }
            Ev::Listed(ns, names) => {
                // Deleted while the watch was down: forget them.
                let gone: Vec<Key> = s
                    .store
                    .keys()
                    .filter(|(n, name)| *n == ns && !names.contains(name))
                    .cloned()
                    .collect();
                for key in gone {
                    s.store.remove(&key);
                    s.failures.remove(&key);
                    s.retry_at.remove(&key);
                }
            }
        }
    }
    if shutting_down {
        info!("stopped");
        Ok(())
    } else {
        error!("event channel closed");
        Err("internal error: event channel closed".into())
    }
}
