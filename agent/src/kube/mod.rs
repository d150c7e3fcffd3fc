//! The Kubernetes backend: every request becomes an `NnfDataMovement` that a
//! Rabbit runs, and its status flows back into the control files
//! (`shared/spec/kubernetes.md`).
//!
//! Threads: the agent core and the filesystem are synchronous. This backend
//! owns one tokio runtime (two worker threads) for every API call. A request
//! is prepared and created on a thread of its own (see `Backend::blocking`),
//! which waits for the runtime at most `timeout` and answers EAGAIN after
//! that; cancel and rmdir hand their API call to the runtime and return at
//! once. Status comes from one watcher + reflector per namespace the agent
//! creates in, so reads never touch the API server.

mod mapping;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use fuse_ctl::Errno;
use futures::StreamExt;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde_json::{json, Value};

use crate::agent::{Agent, Backend, Notify, Rejection, Requester};
use crate::op::{Operation, Status};
use crate::request::Request;
use crate::timefmt::rfc3339;

use mapping::*;
pub use mapping::{DM_NAMESPACE, INITIATOR_LABEL, OPERATION_ANNOTATION};

/// What `main` gathers from the flags.
pub struct KubeSettings {
    pub connection: kube_connect::Connection,
    /// This compute node (`--node-name`).
    pub node: String,
    /// `--nnf-node-name`, else looked up in the SystemConfiguration.
    pub rabbit: Option<String>,
    /// `--sys-config`.
    pub sys_config: String,
    /// How long a request may wait for the API server before EAGAIN.
    pub timeout: Duration,
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn dm_resource() -> ApiResource {
    resource(DM_GROUP, DM_VERSION, "NnfDataMovement", "nnfdatamovements")
}

const DWS: &str = "dataworkflowservices.github.io";
const DWS_VERSION: &str = "v1alpha7";

/// The shared, cloneable context of API calls.
struct Ctx {
    client: kube::Client,
    node: String,
    rabbit: String,
}

impl Ctx {
    fn api(&self, ar: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        }
    }

    fn dms(&self, namespace: &str) -> Api<DynamicObject> {
        self.api(&dm_resource(), Some(namespace))
    }
}

/// An API failure as a rejection: unreachable or overloaded is EAGAIN,
/// anything else EIO.
fn api_rejection(what: &str, e: &kube::Error) -> Rejection {
    match e {
        kube::Error::Api(status) => {
            let errno = match status.code {
                429 | 500 | 502 | 503 | 504 => Errno::EAGAIN,
                _ => Errno::EIO,
            };
            let hint = match status.code {
                401 => " (the service token was refused: check --service-token-file)",
                403 => " (the nnf-dm-daemon ClusterRole does not allow it)",
                _ => "",
            };
            Rejection::new(
                errno,
                format!("{what}: {} {}{hint}", status.code, status.message),
            )
        }
        kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) => {
            Rejection::new(Errno::EIO, format!("{what}: {e}"))
        }
        _ => Rejection::new(
            Errno::EAGAIN,
            format!("{what}: Kubernetes API server unreachable: {e}"),
        ),
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Worth retrying (cancel, delete): conflicts, overload, transport errors.
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 409 | 429 | 500 | 502 | 503 | 504),
        kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) => false,
        _ => true,
    }
}

/// A request checked by `prepare`, created by `accept`.
struct Pending {
    namespace: String,
    body: Value,
}

/// One operation this agent knows a resource for.
struct Tracked {
    op: Arc<Operation>,
    namespace: String,
    resource: String,
    /// `status.message` of the resource as last seen.
    message: String,
    /// Finished, or cancelled before it started: may be deleted.
    deletable: bool,
}

#[derive(Default)]
struct Tracking {
    /// By control-filesystem name.
    ops: HashMap<String, Tracked>,
    /// (namespace, resource name) → control-filesystem name.
    keys: HashMap<(String, String), String>,
    /// Resources being deleted by us: their events are ignored.
    deleting: HashSet<(String, String)>,
    /// Namespace → since when its watch fails, and why.
    stale: HashMap<String, (SystemTime, String)>,
}

impl Tracking {
    fn insert(&mut self, t: Tracked) {
        self.keys
            .insert((t.namespace.clone(), t.resource.clone()), t.op.name.clone());
        self.ops.insert(t.op.name.clone(), t);
    }

    fn remove_key(&mut self, key: &(String, String)) -> Option<Tracked> {
        let name = self.keys.remove(key)?;
        self.ops.remove(&name)
    }
}

pub struct KubeBackend {
    rt: tokio::runtime::Runtime,
    ctx: Arc<Ctx>,
    timeout: Duration,
    notify: Notify,
    agent: OnceLock<Weak<Agent>>,
    tracking: Mutex<Tracking>,
    pending: Mutex<HashMap<String, Pending>>,
    me: Weak<KubeBackend>,
}

impl KubeBackend {
    /// The startup checks, the client and the Rabbit's name. Any failure is
    /// a message for the operator and exit 1.
    pub fn connect(settings: KubeSettings, notify: Notify) -> Result<Arc<KubeBackend>, String> {
        settings.connection.check().map_err(|e| e.to_string())?;
        if settings.node.is_empty() {
            return Err("--node-name not given and the host name is empty".into());
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the Kubernetes runtime: {e}"))?;
        let client = rt
            .block_on(settings.connection.client())
            .map_err(|e| e.to_string())?;
        let rabbit = match settings.rabbit.filter(|r| !r.is_empty()) {
            Some(r) => r,
            None => rt.block_on(find_rabbit(
                &client,
                &settings.sys_config,
                &settings.node,
                settings.timeout,
            ))?,
        };
        tracing::info!(node = %settings.node, rabbit = %rabbit, "kubernetes backend connected");
        Ok(Arc::new_cyclic(|me| KubeBackend {
            rt,
            ctx: Arc::new(Ctx {
                client,
                node: settings.node,
                rabbit,
            }),
            timeout: settings.timeout,
            notify,
            agent: OnceLock::new(),
            tracking: Mutex::new(Tracking::default()),
            pending: Mutex::new(HashMap::new()),
            me: me.clone(),
        }))
    }

    /// Starts one watch per namespace and waits (at most the timeout) until
    /// both listed what exists, so that a restarted agent shows every
    /// operation it created before it mounts. Returns whether both synced.
    pub fn start(self: &Arc<Self>, agent: &Arc<Agent>) -> bool {
        let _ = self.agent.set(Arc::downgrade(agent));
        let mut namespaces = vec![DM_NAMESPACE.to_string(), self.ctx.rabbit.clone()];
        namespaces.dedup();
        let (tx, rx) = std::sync::mpsc::channel();
        for ns in &namespaces {
            let me = self.clone();
            let ns = ns.clone();
            let tx = tx.clone();
            self.rt.spawn(async move { me.watch(ns, tx).await });
        }
        let deadline = Instant::now() + self.timeout;
        let mut synced = 0;
        while synced < namespaces.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(()) => synced += 1,
                Err(_) => break,
            }
        }
        if synced < namespaces.len() {
            tracing::warn!(
                "the Kubernetes API server did not answer within {:?}: serving anyway; \
                 operations are listed once the watch connects, requests fail with EAGAIN until then",
                self.timeout
            );
        }
        synced == namespaces.len()
    }

    fn agent(&self) -> Option<Arc<Agent>> {
        self.agent.get().and_then(Weak::upgrade)
    }

    /// Runs `fut` on the runtime and waits at most the timeout (EAGAIN).
    fn run<T: Send + 'static>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, Rejection>> + Send + 'static,
    ) -> Result<T, Rejection> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let task = self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        match rx.recv_timeout(self.timeout) {
            Ok(result) => result,
            Err(_) => {
                task.abort();
                Err(self.timed_out(what))
            }
        }
    }

    fn timed_out(&self, what: &str) -> Rejection {
        Rejection::new(
            Errno::EAGAIN,
            format!(
                "{what}: no answer from the Kubernetes API server within {}s (unreachable or rate limited): try again",
                self.timeout.as_secs_f64()
            ),
        )
    }

    // ---- status from the watch ----

    async fn watch(self: Arc<Self>, ns: String, synced: std::sync::mpsc::Sender<()>) {
        let api = self.ctx.dms(&ns);
        let config =
            watcher::Config::default().labels(&format!("{INITIATOR_LABEL}={}", self.ctx.node));
        let writer = reflector::store::Writer::<DynamicObject>::new(dm_resource());
        let reader = writer.as_reader();
        let stream = reflector::reflector(writer, watcher::watcher(api, config).default_backoff());
        let mut stream = std::pin::pin!(stream);
        let mut first = Some(synced);
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    self.set_stale(&ns, None);
                    match event {
                        Event::Apply(obj) | Event::InitApply(obj) => self.observe(&ns, &obj),
                        Event::Delete(obj) => self.deleted(&ns, &obj),
                        Event::Init => {}
                        Event::InitDone => {
                            self.resync(&ns, &reader);
                            if let Some(tx) = first.take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                }
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    tracing::info!(namespace = %ns, "watch expired (410 Gone): listing again");
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, "watch of NnfDataMovements failed: {e}");
                    self.set_stale(&ns, Some(e.to_string()));
                }
            }
        }
    }

    /// Marks a namespace's data stale (`Some(why)`) or fresh, and rewrites
    /// the messages of its operations when that changed.
    fn set_stale(&self, ns: &str, why: Option<String>) {
        let mut tracking = self.tracking.lock().unwrap();
        let changed = match why {
            Some(why) => {
                if tracking.stale.contains_key(ns) {
                    false
                } else {
                    tracking
                        .stale
                        .insert(ns.to_string(), (SystemTime::now(), why));
                    true
                }
            }
            None => tracking.stale.remove(ns).is_some(),
        };
        if !changed {
            return;
        }
        let stale = tracking.stale.get(ns).cloned();
        let mut touched = Vec::new();
        for t in tracking.ops.values().filter(|t| t.namespace == ns) {
            let message = compose_message(&t.message, stale.as_ref());
            if t.op.update(|s| s.message = message) {
                touched.push(t.op.clone());
            }
        }
        drop(tracking);
        for op in touched {
            self.notify.changed(&op);
        }
    }

    /// An object of ours was added or changed.
    fn observe(&self, ns: &str, obj: &DynamicObject) {
        let Some(res) = obj.metadata.name.clone() else {
            return;
        };
        let key = (ns.to_string(), res.clone());
        if obj.metadata.deletion_timestamp.is_some() {
            // Rule 1: being deleted is gone.
            return self.deleted(ns, obj);
        }
        let view = DmView::of(&obj.data);
        let mut tracking = self.tracking.lock().unwrap();
        if tracking.deleting.contains(&key) {
            return;
        }
        if !tracking.keys.contains_key(&key) {
            drop(tracking);
            if !self.adopt(ns, obj) {
                return;
            }
            tracking = self.tracking.lock().unwrap();
        }
        let stale = tracking.stale.get(ns).cloned();
        let Some(name) = tracking.keys.get(&key).cloned() else {
            return;
        };
        let Some(t) = tracking.ops.get_mut(&name) else {
            return;
        };
        let mut message = String::new();
        let changed = t.op.update(|s| {
            message = view.apply(s);
            s.message = compose_message(&message, stale.as_ref());
        });
        t.message = message;
        t.deletable = view.finished_or_never_started();
        let op = t.op.clone();
        drop(tracking);
        if changed {
            self.notify.changed(&op);
        }
    }

    /// A resource of ours we do not track yet: one being created right now
    /// (its creation's answer not yet seen), or one created before a restart.
    /// Returns whether it is tracked now.
    fn adopt(&self, ns: &str, obj: &DynamicObject) -> bool {
        let Some(agent) = self.agent() else {
            return false;
        };
        let res = obj.metadata.name.clone().unwrap_or_default();
        let note = note_of(obj);
        let existing = agent.lookup(0, &note.name);
        let op = match existing {
            Some(op) if op.uid == note.uid => {
                // Ours, in creation: `accept` will find it tracked.
                op
            }
            Some(_) => {
                tracing::warn!(resource = %format!("{ns}/{res}"), op = %note.name, "an operation of another user has this name: not listed");
                return false;
            }
            None => {
                let op = Arc::new(Operation::new(
                    note.name.clone(),
                    note.uid,
                    note.gid,
                    note.request.clone(),
                    PathBuf::from(&note.request.destination),
                    Status::default(),
                ));
                if let Err(rejection) = agent.register(op.clone()) {
                    tracing::warn!(resource = %format!("{ns}/{res}"), op = %note.name, "cannot list the operation again: {}", rejection.reason);
                    return false;
                }
                tracing::info!(resource = %format!("{ns}/{res}"), op = %note.name, user = note.uid, "operation listed again");
                op
            }
        };
        let mut tracking = self.tracking.lock().unwrap();
        if !tracking.ops.contains_key(&op.name) {
            tracking.insert(Tracked {
                op,
                namespace: ns.to_string(),
                resource: res,
                message: String::new(),
                deletable: false,
            });
        }
        true
    }

    /// A resource of ours was deleted, or is being deleted: its operation
    /// disappears.
    fn deleted(&self, ns: &str, obj: &DynamicObject) {
        let Some(res) = obj.metadata.name.clone() else {
            return;
        };
        let key = (ns.to_string(), res);
        let mut tracking = self.tracking.lock().unwrap();
        if obj.metadata.deletion_timestamp.is_none() {
            tracking.deleting.remove(&key);
        }
        let gone = tracking.remove_key(&key);
        drop(tracking);
        if let Some(t) = gone {
            tracing::info!(op = %t.op.name, resource = %format!("{}/{}", key.0, key.1), "resource deleted: the operation is gone");
            if let Some(agent) = self.agent() {
                agent.forget(&t.op);
            }
        }
    }

    /// After a (re-)list: an operation whose resource is not in the list was
    /// deleted while we did not watch. Confirmed with a GET before it goes
    /// (it may have been created after the list).
    fn resync(&self, ns: &str, store: &Store<DynamicObject>) {
        let listed: HashSet<String> = store
            .state()
            .iter()
            .filter_map(|o| o.metadata.name.clone())
            .collect();
        let missing: Vec<String> = self
            .tracking
            .lock()
            .unwrap()
            .ops
            .values()
            .filter(|t| t.namespace == ns && !listed.contains(&t.resource))
            .map(|t| t.resource.clone())
            .collect();
        for res in missing {
            let Some(me) = self.me.upgrade() else { return };
            let ns = ns.to_string();
            self.rt.spawn(async move {
                if let Err(e) = me.ctx.dms(&ns).get(&res).await {
                    if not_found(&e) {
                        let mut gone = DynamicObject::new(&res, &dm_resource());
                        gone.metadata.namespace = Some(ns.clone());
                        me.deleted(&ns, &gone);
                    }
                }
            });
        }
    }

    // ---- cancel and delete, off the filesystem's threads ----

    fn spawn_cancel(&self, ns: String, res: String, op: Arc<Operation>) {
        let ctx = self.ctx.clone();
        self.rt.spawn(async move {
            let patch = json!({"spec": {"cancel": true}});
            let mut delay = Duration::from_millis(50);
            let give_up = Instant::now() + Duration::from_secs(300);
            loop {
                match ctx
                    .dms(&ns)
                    .patch(&res, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(op = %op.name, resource = %format!("{ns}/{res}"), "spec.cancel set");
                        return;
                    }
                    Err(e) if not_found(&e) => return,
                    Err(e)
                        if transient(&e)
                            && Instant::now() < give_up
                            && !op.removed.load(Ordering::Acquire) =>
                    {
                        tracing::debug!(op = %op.name, "cancel: {e}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        tracing::warn!(op = %op.name, "cannot set spec.cancel: {e}");
                        return;
                    }
                }
            }
        });
    }

    fn spawn_delete(&self, ns: String, res: String) {
        let Some(me) = self.me.upgrade() else { return };
        self.rt.spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match me.ctx.dms(&ns).delete(&res, &DeleteParams::default()).await {
                    Ok(_) => return,
                    Err(e) if not_found(&e) => {
                        me.tracking
                            .lock()
                            .unwrap()
                            .deleting
                            .remove(&(ns.clone(), res.clone()));
                        return;
                    }
                    Err(e) if transient(&e) => {
                        tracing::debug!(resource = %format!("{ns}/{res}"), "delete: {e}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => {
                        tracing::warn!(resource = %format!("{ns}/{res}"), "cannot delete: {e}");
                        return;
                    }
                }
            }
        });
    }
}

/// The resource's `status.message`, with a note when the watch is failing.
fn compose_message(message: &str, stale: Option<&(SystemTime, String)>) -> String {
    match stale {
        None => message.to_string(),
        Some((since, why)) => {
            let note = format!(
                "Kubernetes API server unreachable since {}: status may be stale ({why})",
                rfc3339(*since)
            );
            if message.is_empty() {
                note
            } else {
                format!("{message}\n{note}")
            }
        }
    }
}

/// The operation a resource stands for: its annotation, or (a resource made
/// by an older daemon) its own name and `spec.userId/groupId`.
fn note_of(obj: &DynamicObject) -> OperationNote {
    if let Some(note) = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(OPERATION_ANNOTATION))
        .and_then(|text| serde_json::from_str::<OperationNote>(text).ok())
    {
        return note;
    }
    let spec = &obj.data["spec"];
    let id = |key: &str| spec[key].as_u64().unwrap_or(0) as u32;
    let name = obj.metadata.name.clone().unwrap_or_default();
    OperationNote {
        name: name.clone(),
        uid: id("userId"),
        gid: id("groupId"),
        request: Request {
            name: Some(name),
            source: spec["source"]["path"].as_str().unwrap_or("").into(),
            destination: spec["destination"]["path"].as_str().unwrap_or("").into(),
            slots: -1,
            max_slots: -1,
            ..Default::default()
        },
    }
}

/// Step 1 of the mapping: the Rabbit that serves `node`.
async fn find_rabbit(
    client: &kube::Client,
    sys_config: &str,
    node: &str,
    timeout: Duration,
) -> Result<String, String> {
    let ar = resource(
        DWS,
        DWS_VERSION,
        "SystemConfiguration",
        "systemconfigurations",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let what = format!(
        "looking up this node's Rabbit in SystemConfiguration default/{sys_config} (give --nnf-node-name to skip)"
    );
    let obj = match tokio::time::timeout(timeout, api.get(sys_config)).await {
        Err(_) => {
            return Err(format!(
                "{what}: no answer from the Kubernetes API server within {timeout:?}"
            ))
        }
        Ok(Err(e)) if not_found(&e) => {
            return Err(format!(
                "{what}: SystemConfiguration not found (--sys-config)"
            ))
        }
        Ok(Err(e)) => return Err(format!("{what}: {e}")),
        Ok(Ok(obj)) => obj,
    };
    let nodes = obj.data["spec"]["storageNodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for storage in nodes {
        let serves = storage["computesAccess"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["name"] == node));
        if serves {
            let kind = storage["type"].as_str().unwrap_or("");
            if kind != "Rabbit" {
                return Err(format!(
                    "{what}: the storage node serving {node} is of type '{kind}', not 'Rabbit'"
                ));
            }
            return storage["name"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{what}: storage node without a name"));
        }
    }
    Err(format!(
        "{what}: no storage node lists {node} in computesAccess (--node-name)"
    ))
}

/// Steps 2–9 of the mapping: the checks and lookups, and the resource body.
async fn build(
    ctx: Arc<Ctx>,
    who: Requester,
    name: String,
    mut request: Request,
) -> Result<(Request, Pending), Rejection> {
    let (Some(workflow), Some(wf_ns)) = (request.workflow.clone(), request.namespace.clone())
    else {
        return Err(Rejection::new(
            Errno::EINVAL,
            "no workflow: give workflow= and namespace= (or run with DW_WORKFLOW_NAME and DW_WORKFLOW_NAMESPACE set)",
        ));
    };
    request.name = Some(name.clone());
    // Before any API call: the Rabbit's worker pastes these into bash as root.
    crate::shellword::for_rabbit(&mut request).map_err(|e| Rejection::new(Errno::EINVAL, e))?;

    // 2. The workflow, in a state that allows copies.
    let workflows = ctx.api(
        &resource(DWS, DWS_VERSION, "Workflow", "workflows"),
        Some(&wf_ns),
    );
    let wf = match workflows.get(&workflow).await {
        Ok(wf) => wf,
        Err(e) if not_found(&e) => {
            return Err(Rejection::new(
                Errno::ENOENT,
                format!("workflow {wf_ns}/{workflow} not found"),
            ))
        }
        Err(e) => {
            return Err(api_rejection(
                &format!("reading workflow {wf_ns}/{workflow}"),
                &e,
            ))
        }
    };
    let state = wf.data["status"]["state"].as_str().unwrap_or("");
    let status = wf.data["status"]["status"].as_str().unwrap_or("");
    if state != "PreRun" || status != "Completed" {
        return Err(Rejection::new(
            Errno::EPERM,
            format!(
                "workflow {wf_ns}/{workflow} is in state {}/{}: copies are allowed only in PreRun/Completed",
                if state.is_empty() { "-" } else { state },
                if status.is_empty() { "-" } else { status }
            ),
        ));
    }
    let wf_uid = wf.metadata.uid.clone().unwrap_or_default();

    // 3. The compute mount holding the source.
    let cm_resource = resource(DWS, DWS_VERSION, "ClientMount", "clientmounts");
    let selector = format!("{WORKFLOW_NAME_LABEL}={workflow},{WORKFLOW_NAMESPACE_LABEL}={wf_ns}");
    let list_mounts = |ns: String| {
        let api = ctx.api(&cm_resource, Some(&ns));
        let lp = ListParams::default().labels(&selector);
        async move {
            let list = api.list(&lp).await.map_err(|e| {
                api_rejection(&format!("listing the ClientMounts in namespace {ns}"), &e)
            })?;
            let mut mounts = Vec::new();
            for item in list.items {
                let value = serde_json::to_value(&item).unwrap_or(Value::Null);
                match serde_json::from_value::<nnf_api::ClientMount>(value) {
                    Ok(cm) => mounts.push(cm),
                    Err(e) => tracing::warn!(
                        "ignoring ClientMount {ns}/{}: {e}",
                        item.metadata.name.unwrap_or_default()
                    ),
                }
            }
            Ok::<_, Rejection>(mounts)
        }
    };
    let compute_mounts = list_mounts(ctx.node.clone()).await?;
    let Some((compute_cm, compute, rest)) = compute_mount(&compute_mounts, &request.source) else {
        return Err(Rejection::new(
            Errno::ENOENT,
            format!(
                "no mount of workflow {wf_ns}/{workflow} on node {} holds {}",
                ctx.node, request.source
            ),
        ));
    };
    let mount_type = compute.mount_type;
    let lustre = match mount_type {
        nnf_api::ClientMountType::Lustre => true,
        nnf_api::ClientMountType::Gfs2 => false,
        other => {
            return Err(Rejection::new(
                Errno::EINVAL,
                format!(
                    "filesystem not supported: '{}' ({} is on {})",
                    other.as_str(),
                    request.source,
                    compute.mount_path
                ),
            ))
        }
    };
    let device_ref = compute.device.device_reference.clone();
    if device_ref.is_none() && !lustre {
        return Err(Rejection::new(
            Errno::EIO,
            format!(
                "ClientMount {}: the mount {} has no device.deviceReference",
                compute_cm.metadata.key(),
                compute.mount_path
            ),
        ));
    }
    let directive_index = compute_cm
        .metadata
        .label(DIRECTIVE_INDEX_LABEL)
        .map(str::to_string);
    let compute_key = compute_cm.metadata.key();
    let rest = rest.to_string();

    // 4. The same storage as the Rabbit mounts it.
    let rabbit_source = match &device_ref {
        Some(reference) => {
            let rabbit_mounts = list_mounts(ctx.rabbit.clone()).await?;
            let found = rabbit_mounts
                .iter()
                .flat_map(|cm| cm.spec.mounts.iter())
                .find(|m| m.device.device_reference.as_ref() == Some(reference));
            match found {
                Some(m) => rabbit_path(&m.mount_path, &rest),
                None => {
                    return Err(Rejection::new(
                        Errno::ENOENT,
                        format!(
                            "no mount of workflow {wf_ns}/{workflow} on Rabbit {} matches the device of {}",
                            ctx.rabbit, compute.mount_path
                        ),
                    ))
                }
            }
        }
        // A Lustre mount without a reference: the same global namespace.
        None => request.source.clone(),
    };
    let mut source = json!({"path": rabbit_source});
    if let Some(reference) = &device_ref {
        source["storageReference"] =
            serde_json::to_value(&reference.object_reference).unwrap_or(Value::Null);
    }

    // 5. By mount type.
    let mut labels = serde_json::Map::new();
    labels.insert(INITIATOR_LABEL.into(), json!(ctx.node));
    let mut destination = json!({"path": request.destination});
    let (namespace, generate_name) = if lustre {
        let Some(index) = directive_index else {
            return Err(Rejection::new(
                Errno::EIO,
                format!("ClientMount {compute_key} has no label {DIRECTIVE_INDEX_LABEL}"),
            ));
        };
        labels.insert(DIRECTIVE_INDEX_LABEL.into(), json!(index));
        let filesystems = ctx.api(
            &resource(
                "lus.cray.hpe.com",
                "v1beta1",
                "LustreFileSystem",
                "lustrefilesystems",
            ),
            None,
        );
        let list = filesystems
            .list(&ListParams::default())
            .await
            .map_err(|e| api_rejection("listing the LustreFileSystems", &e))?;
        let fs = list.items.iter().find(|fs| {
            fs.data["spec"]["mountRoot"]
                .as_str()
                .is_some_and(|root| below(root, &request.destination).is_some())
        });
        let Some(fs) = fs else {
            return Err(Rejection::new(
                Errno::ENOENT,
                format!(
                    "no LustreFileSystem's mountRoot holds the destination {}",
                    request.destination
                ),
            ));
        };
        destination["storageReference"] = json!({
            "kind": "LustreFileSystem",
            "namespace": fs.metadata.namespace.clone().unwrap_or_default(),
            "name": fs.metadata.name.clone().unwrap_or_default(),
        });
        (DM_NAMESPACE.to_string(), "nnf-dm-")
    } else {
        (ctx.rabbit.clone(), "nnf-dm-node-")
    };

    // 6. The profile.
    let profiles = ctx.api(
        &resource(
            DM_GROUP,
            DM_VERSION,
            "NnfDataMovementProfile",
            "nnfdatamovementprofiles",
        ),
        Some(PROFILE_NAMESPACE),
    );
    let profile = match &request.profile {
        Some(wanted) => match profiles.get(wanted).await {
            Ok(p) => p.metadata.name.unwrap_or_else(|| wanted.clone()),
            Err(e) if not_found(&e) => {
                return Err(Rejection::new(
                    Errno::ENOENT,
                    format!("data-movement profile '{wanted}' not found in {PROFILE_NAMESPACE}"),
                ))
            }
            Err(e) => return Err(api_rejection("reading the data-movement profile", &e)),
        },
        None => {
            let list = profiles
                .list(&ListParams::default())
                .await
                .map_err(|e| api_rejection("listing the data-movement profiles", &e))?;
            let defaults: Vec<String> = list
                .items
                .iter()
                .filter(|p| p.data["data"]["default"] == true)
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            match defaults.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(Rejection::new(
                        Errno::EIO,
                        format!("no default NnfDataMovementProfile in {PROFILE_NAMESPACE}: name one with profile="),
                    ))
                }
                several => {
                    return Err(Rejection::new(
                        Errno::EIO,
                        format!(
                            "several default NnfDataMovementProfiles in {PROFILE_NAMESPACE} ({}): name one with profile=",
                            several.join(", ")
                        ),
                    ))
                }
            }
        }
    };
    request.profile = Some(profile.clone());

    // 8. Labels for teardown.
    for (key, value) in [
        (WORKFLOW_NAME_LABEL, workflow.as_str()),
        (WORKFLOW_NAMESPACE_LABEL, wf_ns.as_str()),
        (WORKFLOW_UID_LABEL, wf_uid.as_str()),
        (OWNER_KIND_LABEL, "Workflow"),
        (OWNER_NAME_LABEL, workflow.as_str()),
        (OWNER_NAMESPACE_LABEL, wf_ns.as_str()),
        (OWNER_UID_LABEL, wf_uid.as_str()),
        (TEARDOWN_LABEL, "PostRun"),
    ] {
        labels.insert(key.into(), json!(value));
    }
    let note = OperationNote {
        name,
        uid: who.uid,
        gid: who.gid,
        request: request.clone(),
    };
    let body = json!({
        "apiVersion": format!("{DM_GROUP}/{DM_VERSION}"),
        "kind": "NnfDataMovement",
        "metadata": {
            "generateName": generate_name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                OPERATION_ANNOTATION: serde_json::to_string(&note).unwrap_or_default(),
            },
        },
        "spec": {
            "source": source,
            "destination": destination,
            // 7. Identity.
            "userId": who.uid,
            "groupId": who.gid,
            "profileReference": {
                "kind": "NnfDataMovementProfile",
                "name": profile,
                "namespace": PROFILE_NAMESPACE,
            },
            // 9. User options.
            "userConfig": user_config(&request),
        },
    });
    Ok((request, Pending { namespace, body }))
}

impl Backend for KubeBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn blocking(&self) -> bool {
        true
    }

    fn prepare(
        &self,
        who: &Requester,
        name: String,
        request: Request,
    ) -> Result<Operation, Rejection> {
        let ctx = self.ctx.clone();
        let (request, pending) = self.run(
            "checking the request",
            build(ctx, *who, name.clone(), request),
        )?;
        self.pending.lock().unwrap().insert(name.clone(), pending);
        let target = PathBuf::from(&request.destination);
        Ok(Operation::new(
            name,
            who.uid,
            who.gid,
            request,
            target,
            Status::default(),
        ))
    }

    fn accept(&self, op: Arc<Operation>) -> Result<(), Rejection> {
        let Some(pending) = self.pending.lock().unwrap().remove(&op.name) else {
            return Err(Rejection::new(Errno::EIO, "the request was not prepared"));
        };
        let Some(me) = self.me.upgrade() else {
            return Err(Rejection::new(Errno::EIO, "the backend is shutting down"));
        };
        let abandoned = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let task_op = op.clone();
        let task_abandoned = abandoned.clone();
        let ns = pending.namespace.clone();
        self.rt.spawn(async move {
            let api = me.ctx.dms(&ns);
            let result = match serde_json::from_value::<DynamicObject>(pending.body) {
                Ok(obj) => api
                    .create(&PostParams::default(), &obj)
                    .await
                    .map_err(|e| api_rejection("creating the NnfDataMovement", &e)),
                Err(e) => Err(Rejection::new(
                    Errno::EIO,
                    format!("building the resource: {e}"),
                )),
            };
            let result = result.map(|created| {
                let res = created.metadata.name.clone().unwrap_or_default();
                let mut tracking = me.tracking.lock().unwrap();
                if task_abandoned.load(Ordering::Acquire) {
                    // The writer was told EAGAIN: nothing of it may remain.
                    drop(tracking);
                    me.spawn_delete(ns.clone(), res.clone());
                    return res;
                }
                if !tracking.ops.contains_key(&task_op.name) {
                    tracking.insert(Tracked {
                        op: task_op.clone(),
                        namespace: ns.clone(),
                        resource: res.clone(),
                        message: String::new(),
                        deletable: false,
                    });
                }
                res
            });
            let _ = tx.send(result);
        });
        let outcome = match rx.recv_timeout(self.timeout) {
            Ok(result) => result,
            Err(_) => {
                let tracking = self.tracking.lock().unwrap();
                if tracking.ops.contains_key(&op.name) {
                    // Created just now after all.
                    Ok(String::new())
                } else {
                    abandoned.store(true, Ordering::Release);
                    Err(self.timed_out("creating the NnfDataMovement"))
                }
            }
        };
        let res = outcome?;
        tracing::info!(op = %op.name, namespace = %pending.namespace, resource = %res, "NnfDataMovement created");
        if op.cancel_requested.load(Ordering::Acquire) {
            self.cancel(&op);
        }
        Ok(())
    }

    fn cancel(&self, op: &Arc<Operation>) {
        op.cancel_requested.store(true, Ordering::Release);
        if op.is_completed() {
            return;
        }
        let target = {
            let tracking = self.tracking.lock().unwrap();
            tracking
                .ops
                .get(&op.name)
                .map(|t| (t.namespace.clone(), t.resource.clone()))
        };
        // Not created yet: `accept` cancels once it is.
        if let Some((ns, res)) = target {
            self.spawn_cancel(ns, res, op.clone());
        }
    }

    fn remove(&self, op: &Operation) -> Result<(), Rejection> {
        let mut tracking = self.tracking.lock().unwrap();
        let Some(t) = tracking.ops.get(&op.name) else {
            return Ok(());
        };
        if !t.deletable {
            return Err(Rejection::new(
                Errno::EBUSY,
                "the Rabbit has not finished this copy yet",
            ));
        }
        let key = (t.namespace.clone(), t.resource.clone());
        tracking.remove_key(&key);
        tracking.deleting.insert(key.clone());
        drop(tracking);
        op.removed.store(true, Ordering::Release);
        // Deleted in the background (retried while the API server is
        // unreachable); its directory goes at once.
        self.spawn_delete(key.0, key.1);
        Ok(())
    }
}
