//! The Kubernetes backend: every request becomes an `NnfDataMovement` that a
//! Rabbit runs, and its status flows back into the control files
//! (README.md, "The Kubernetes backend").
//!
//! Threads: the agent core and the filesystem are synchronous. This backend
//! owns one tokio runtime (two worker threads) for every API call. A request
//! is prepared and created on the agent core's blocking pool (never on a
//! door's thread), which waits for the runtime at most `timeout` and answers
//! EAGAIN after that; cancel and rmdir hand their API call to the runtime and return at
//! once. Status comes from one watcher + reflector per namespace the agent
//! creates in, so reads never touch the API server.

mod api;
mod cache;
mod create;
mod mapping;
mod restart;
mod retry;
mod submit;
mod sysconfig;
mod track;

use std::any::Any;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fuse_ctl::Errno;

use crate::agent::{Backend, Notify, Prepared, Rejection, Requester, Step};
use crate::op::{Operation, Status};
use crate::request::Request;

use api::*;
use create::build;
use kube::runtime::watcher;
use mapping::{DM_NAMESPACE, PROFILE_NAMESPACE};
use submit::Created;
use track::{Tracked, Tracking};

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

/// Why the Kubernetes backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Connection(#[from] kube_connect::ConnectError),
    #[error("--node-name not given and the host name is empty")]
    NoNodeName,
    #[error("cannot start the Kubernetes runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Rabbit(#[from] sysconfig::LookupError),
}

pub struct KubeBackend {
    rt: tokio::runtime::Runtime,
    ctx: Arc<Ctx>,
    timeout: Duration,
    /// How this backend reports to the core: status changes, operations
    /// found in its watch, resources gone.
    notify: Notify,
    tracking: Mutex<Tracking>,
    /// The SystemConfiguration's later answers, until `start` follows them.
    lookups: Mutex<Option<tokio::sync::watch::Receiver<sysconfig::Lookup>>>,
    me: Weak<KubeBackend>,
}

impl KubeBackend {
    /// The startup checks, the client and the Rabbit's name. Any failure is
    /// a message for the operator and exit 1.
    pub fn connect(
        settings: KubeSettings,
        notify: Notify,
    ) -> Result<Arc<KubeBackend>, ConnectError> {
        settings.connection.check()?;
        if settings.node.is_empty() {
            return Err(ConnectError::NoNodeName);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube")
            .enable_all()
            .build()
            .map_err(ConnectError::Runtime)?;
        let client = rt.block_on(
            settings
                .connection
                .client_observed(crate::metrics::kube_observer()),
        )?;
        let (rabbit, lookups) = match settings.rabbit.filter(|r| !r.is_empty()) {
            Some(r) => (r, None),
            None => {
                let (r, lookups) = sysconfig::follow(
                    &rt,
                    &client,
                    &settings.sys_config,
                    &settings.node,
                    settings.timeout,
                )?;
                (r, Some(lookups))
            }
        };
        tracing::info!(node = %settings.node, rabbit = %rabbit, "kubernetes backend connected");
        let ctx = Arc::new(Ctx {
            lustre: mirror(
                &rt,
                &client,
                None,
                watcher::Config::default(),
                "LustreFileSystems",
                None,
            ),
            profiles: mirror(
                &rt,
                &client,
                Some(PROFILE_NAMESPACE),
                watcher::Config::default(),
                "NnfDataMovementProfiles",
                None,
            ),
            workflows: cache::Flight::new(WORKFLOW_TTL),
            mounts: cache::Flight::new(MOUNTS_TTL),
            client,
            node: settings.node,
            rabbit: std::sync::RwLock::new(rabbit),
        });
        Ok(Arc::new_cyclic(|me| KubeBackend {
            rt,
            ctx,
            timeout: settings.timeout,
            notify,
            tracking: Mutex::new(Tracking::default()),
            lookups: Mutex::new(lookups),
            me: me.clone(),
        }))
    }

    /// Starts one watch per namespace and waits (at most the timeout) until
    /// both listed what exists, so that a restarted agent shows every
    /// operation it created before it mounts. Returns whether both synced.
    pub fn start(self: &Arc<Self>) -> bool {
        let mut namespaces = vec![DM_NAMESPACE.to_string(), self.ctx.rabbit()];
        namespaces.dedup();
        if let Some(lookups) = self.lookups.lock().unwrap().take() {
            let watched = namespaces.iter().cloned().collect();
            self.rt.spawn(self.clone().follow_rabbit(lookups, watched));
        }
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
}

impl Backend for KubeBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn deadline(&self, request_timeout: Duration) -> Duration {
        // The API server's own timeouts (the checks, then the create) answer
        // first (EAGAIN, their words).
        request_timeout.max(2 * self.timeout + Duration::from_secs(1))
    }

    /// The checks, then the create: both before the core commits, so that a
    /// writer interrupted while the create is in flight gets EINTR at once
    /// (its write not yet claimed); `discard` then deletes the resource.
    fn prepare(
        &self,
        who: &Requester,
        name: String,
        request: Request,
        step: &Step,
    ) -> Result<Prepared, Rejection> {
        let ctx = self.ctx.clone();
        step.set("asking the Kubernetes API server");
        let (request, pending) = self.run(
            "checking the request",
            build(ctx, *who, name.clone(), request),
        )?;
        let target = PathBuf::from(&request.destination);
        let op = Arc::new(Operation::new(
            name,
            who.uid,
            who.gid,
            request,
            target,
            Status::default(),
        ));
        if step.is_gone() {
            // Interrupted during the checks: no create to undo.
            return Err(crate::agent::abandoned());
        }
        step.set("creating the NnfDataMovement");
        let created = self.create(&op, pending)?;
        Ok(Prepared {
            op,
            plan: Box::new(created),
        })
    }

    fn discard(&self, op: &Operation, plan: Box<dyn Any + Send>) {
        let Ok(created) = plan.downcast::<Created>() else {
            return;
        };
        let key = (created.namespace, created.resource);
        let mut tracking = self.tracking.lock().unwrap();
        tracking.not_creating(op);
        tracking.remove_key(&key);
        // Its events from now on are ignored: the watch must not list it.
        tracking.deleting.insert(key.clone());
        drop(tracking);
        tracing::info!(op = %op.name, user = op.uid, resource = %format!("{}/{}", key.0, key.1), "request abandoned after its NnfDataMovement was created: deleting it");
        self.spawn_delete(key.0, key.1);
    }

    fn accept(&self, op: Arc<Operation>, plan: Box<dyn Any + Send>) -> Result<(), Rejection> {
        let Ok(created) = plan.downcast::<Created>() else {
            return Err(Rejection::new(
                Errno::EIO,
                "the request was not prepared here",
            ));
        };
        let mut tracking = self.tracking.lock().unwrap();
        tracking.not_creating(&op);
        if !tracking.ops.contains_key(&op.name) {
            // Unless the watch saw it first.
            tracking.insert(Tracked {
                op: op.clone(),
                namespace: created.namespace.clone(),
                resource: created.resource.clone(),
                message: String::new(),
                deletable: false,
            });
        }
        drop(tracking);
        tracing::info!(op = %op.name, user = op.uid, namespace = %created.namespace, resource = %created.resource, "NnfDataMovement created");
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
