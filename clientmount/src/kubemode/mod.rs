//! The Kubernetes driver: ClientMounts come from the API server, one
//! `kube::runtime::Controller` per namespace (`<node>` and `default`: the
//! role allows watching in any namespace, and a cluster-wide watch would
//! carry every node's ClientMounts), all running the shared reconcile and
//! error policy with one context, so that the path locks span both.
//!
//! A pass is upstream's `Reconcile` (nnf-sos
//! `internal/controller/nnf_clientmount_controller.go`): the finalizer goes
//! on first, then `kube::runtime::finalizer()` runs the mounts (apply) or,
//! once the object is being deleted, the unmounts (cleanup) and removes the
//! finalizer after them. Each pass's commands run on a blocking-pool thread
//! (the mount layer runs them synchronously) and make their API calls
//! through the runtime's handle. An idle daemon is parked in the watches'
//! reads: no timer is armed unless a retry is due.

mod api;

use std::collections::HashSet;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::StreamExt;
use kube::api::DynamicObject;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as FinalizerEvent};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use nnf_api::{ClientMount, ClientMountState, ClientMountStatus, CLIENTMOUNT_FINALIZER};
use tracing::{debug, info, warn, Span};

use self::api::{parse, Kube};
use crate::controller::{self, clientmount_resource, converge, verdict, Error, Shared};
use crate::daemon::{self, Stop};
use crate::mount::Config;
use crate::plan::user_error;
use crate::reconcile::Next;

fn key_of(obj: &DynamicObject) -> String {
    format!(
        "{}/{}",
        obj.metadata.namespace.as_deref().unwrap_or_default(),
        obj.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Runs `f` on the blocking pool, in the reconcile's span.
async fn blocking(
    span: Span,
    f: impl FnOnce() -> Result<(), Error> + Send + 'static,
) -> Result<(), Error> {
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .unwrap_or_else(|e| Err(Error::Transient(format!("reconcile task failed: {e}"))))
}

impl controller::Driver for Kube {
    fn key(&self, obj: &DynamicObject) -> String {
        key_of(obj)
    }

    fn reconcile(
        self: Arc<Self>,
        obj: Arc<DynamicObject>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async move {
            let span = Span::current();
            if self
                .finalized
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .has(&obj)
            {
                debug!("already finalized: not reconciled again");
                return Ok(());
            }
            let (me, sp) = (self.clone(), span.clone());
            let prepared = tokio::task::spawn_blocking(move || sp.in_scope(|| me.prepare(obj)))
                .await
                .unwrap_or_else(|e| Err(Error::Transient(format!("reconcile task failed: {e}"))))?;
            let Some(obj) = prepared else {
                return Ok(());
            };
            // Only then does `finalizer()` run the cleanup and remove ours.
            let deleting = obj.metadata.deletion_timestamp.is_some()
                && obj
                    .metadata
                    .finalizers
                    .iter()
                    .flatten()
                    .any(|f| f == CLIENTMOUNT_FINALIZER);
            let uid = obj.metadata.uid.clone();
            let api = self.cm_api(obj.metadata.namespace.as_deref().unwrap_or_default());
            let me = self.clone();
            // `finalizer()` wants the reconcile's `Action`; ours is always
            // "await a change", the error policy sets the retries.
            let result =
                finalizer::finalizer(&api, CLIENTMOUNT_FINALIZER, obj, move |event| async move {
                    blocking(span, move || match event {
                        FinalizerEvent::Apply(o) => me.apply(&o, false),
                        FinalizerEvent::Cleanup(o) => me.apply(&o, true),
                    })
                    .await
                    .map(|()| Action::await_change())
                })
                .await;
            let finalized = match result {
                Ok(_) => deleting,
                Err(finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e)) => {
                    return Err(e)
                }
                // Gone already: nothing is left to finalize.
                Err(finalizer::Error::RemoveFinalizer(kube::Error::Api(s))) if s.code == 404 => {
                    true
                }
                Err(e) => {
                    warn!(error = %e, "could not change the finalizer");
                    return Err(Error::Transient(e.to_string()));
                }
            };
            if finalized {
                info!("unmounted; finalizer removed");
                if let Some(uid) = uid {
                    self.forget_written(&uid);
                    self.finalized
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .add(uid);
                }
            }
            Ok(())
        })
    }
}

impl Kube {
    /// Before `finalizer()` sees the object: an unusable one is reported in
    /// its status; ours gets the finalizer with an update (upstream's verb,
    /// optimistic on the resourceVersion) before anything is mounted, as
    /// the Rabbit side reads a missing finalizer as a dead daemon. `None`:
    /// the object is gone.
    fn prepare(&self, obj: Arc<DynamicObject>) -> Result<Option<Arc<DynamicObject>>, Error> {
        let api = self.cm_api(obj.metadata.namespace.as_deref().unwrap_or_default());
        let cm: ClientMount = match parse(&obj) {
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
                status.error = Some(user_error(msg.clone()));
                if let Err(e) = self.write_status(&api, (*obj).clone(), &status) {
                    warn!(error = %e, "could not write status");
                    return Err(Error::Transient(format!("could not write status: {e}")));
                }
                return Err(Error::Fatal(msg));
            }
        };
        let ours = cm
            .metadata
            .finalizers
            .iter()
            .any(|f| f == CLIENTMOUNT_FINALIZER);
        if ours || cm.metadata.deletion_timestamp.is_some() {
            return Ok(Some(obj));
        }
        match self.add_finalizer(&api, (*obj).clone()) {
            Ok(Some(o)) => {
                info!("finalizer added");
                Ok(Some(Arc::new(o)))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                warn!(error = %e, "could not add the finalizer");
                Err(Error::Transient(format!(
                    "could not add the finalizer: {e}"
                )))
            }
        }
    }

    /// One pass over the mounts: `deleting` unmounts everything.
    fn apply(&self, obj: &DynamicObject, deleting: bool) -> Result<(), Error> {
        // Not when deleting: `Ok` there would let `finalizer()` remove the
        // finalizer, and a teardown unmounts whatever the status says.
        if !deleting && self.is_stale(obj) {
            // Our own newer write is on its way through the watch and
            // triggers the next pass.
            debug!("cached copy older than our last status write: waiting for it");
            return Ok(());
        }
        let key = key_of(obj);
        let api = self.cm_api(obj.metadata.namespace.as_deref().unwrap_or_default());
        let mut cm: ClientMount =
            parse(obj).map_err(|e| Error::Transient(format!("invalid ClientMount: {e}")))?;
        if deleting {
            cm.spec.desired_state = ClientMountState::Unmounted;
        }
        let profiles = self.profiles(&cm, deleting)?;
        let servers = self.servers(&cm);
        let mut obj = obj.clone();
        let out = converge(
            &self.cfg,
            &self.locks,
            &mut cm,
            deleting,
            &profiles,
            servers.as_ref(),
            |init| {
                let Some(init) = init else { return Ok(true) };
                match self.write_status(&api, obj.clone(), init) {
                    Ok(Some(o)) => {
                        obj = o;
                        Ok(true)
                    }
                    Ok(None) => Ok(false),
                    Err(e) => {
                        warn!(error = %e, "could not write the initial status");
                        Err(Error::Transient(format!(
                            "could not write the initial status: {e}"
                        )))
                    }
                }
            },
        )?;
        let Some(out) = out else {
            return Ok(());
        };
        if deleting && out.next == Next::Done {
            self.cfg.metrics.status(&key, None);
            return Ok(());
        }
        if Some(&out.status) != cm.status.as_ref() {
            if let Err(e) = self.write_status(&api, obj, &out.status) {
                warn!(error = %e, "could not write status");
                if out.next != Next::Interrupted {
                    return Err(Error::Transient(format!("could not write status: {e}")));
                }
            }
        }
        self.cfg.metrics.status(&key, Some(&out.status));
        verdict(&cm, &out, deleting)
    }
}

/// One namespace: its watch (restarting with kube's default backoff after
/// errors: the API server down at start, a dropped connection, 410 Gone),
/// its store, its `Controller`.
async fn watch_namespace(shared: Arc<Shared<Kube>>, ns: String, stop: &Stop) {
    let ar = clientmount_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(shared.driver.client.clone(), &ns, &ar);
    let writer = Writer::new(ar.clone());
    let reader = writer.as_reader();
    let metrics = shared.metrics.clone();
    let mut failing = false;
    let mut listing: HashSet<String> = HashSet::new();
    let log_ns = ns.clone();
    let trigger = watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |item| {
            let ns = &log_ns;
            match &item {
                Ok(Event::Init) => listing.clear(),
                Ok(Event::InitApply(o)) => {
                    listing.insert(key_of(o));
                }
                Ok(Event::InitDone) => {
                    if failing {
                        info!(namespace = %ns, "watch resumed");
                        failing = false;
                    } else {
                        info!(namespace = %ns, "watching ClientMounts");
                    }
                    // Deleted while the watch was down: not counted any more.
                    let prefix = format!("{ns}/");
                    let listed = std::mem::take(&mut listing);
                    metrics.retain_statuses(|k| !k.starts_with(&prefix) || listed.contains(k));
                }
                Ok(Event::Delete(o)) => metrics.status(&key_of(o), None),
                Ok(Event::Apply(_)) => {}
                Err(e) => {
                    // Every failure is logged; the backoff bounds the rate.
                    warn!(namespace = %ns, error = %e, "watch failed: retrying with backoff");
                    failing = true;
                }
            }
            std::future::ready(item.ok().map(Ok::<_, watcher::Error>))
        })
        .reflect(writer)
        .applied_objects();
    controller::run(trigger, reader, stop, shared).await;
}

/// Run the Kubernetes driver until SIGTERM/SIGINT. The connection settings
/// were checked by the caller.
pub fn run(
    conn: kube_connect::Connection,
    cfg: Arc<Config>,
    node: String,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<(), daemon::Error> {
    daemon::run(&cfg.clone(), metrics_addr, |stop| async move {
        let client = conn.client().await?;
        let shared = Arc::new(Shared {
            driver: Arc::new(Kube::new(client, cfg.clone())),
            policy: Default::default(),
            metrics: cfg.metrics.clone(),
        });
        let mut namespaces = vec![node.clone()];
        if node != "default" {
            namespaces.push("default".to_string());
        }
        futures::future::join_all(
            namespaces
                .into_iter()
                .map(|ns| watch_namespace(shared.clone(), ns, &stop)),
        )
        .await;
        Ok(())
    })
}
