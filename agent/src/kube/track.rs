//! Tracking: which resource stands for which operation, and the watch that
//! keeps their status current.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use nnf_api::NnfDataMovement;

use crate::op::Operation;
use crate::timefmt::rfc3339;

use super::mapping::*;
use super::KubeBackend;

/// One operation this agent knows a resource for.
pub(super) struct Tracked {
    pub(super) op: Arc<Operation>,
    pub(super) namespace: String,
    pub(super) resource: String,
    /// `status.message` of the resource as last seen.
    pub(super) message: String,
    /// Finished, or cancelled before it started: may be deleted.
    pub(super) deletable: bool,
}

#[derive(Default)]
pub(super) struct Tracking {
    /// By control-filesystem name.
    pub(super) ops: HashMap<String, Tracked>,
    /// (namespace, resource name) → control-filesystem name.
    pub(super) keys: HashMap<(String, String), String>,
    /// Operations whose resource is being created, by name: the watch may
    /// see the resource before the create answers.
    pub(super) creating: HashMap<String, Arc<Operation>>,
    /// Resources being deleted by us: their events are ignored.
    pub(super) deleting: HashSet<(String, String)>,
    /// Namespace → since when its watch fails, and why.
    pub(super) stale: HashMap<String, (SystemTime, String)>,
}

impl Tracking {
    pub(super) fn insert(&mut self, t: Tracked) {
        self.keys
            .insert((t.namespace.clone(), t.resource.clone()), t.op.name.clone());
        self.ops.insert(t.op.name.clone(), t);
    }

    /// `op` is no longer being created (only this very one: its name may
    /// have passed to another request).
    pub(super) fn not_creating(&mut self, op: &Operation) {
        if self
            .creating
            .get(&op.name)
            .is_some_and(|o| std::ptr::eq(&**o, op))
        {
            self.creating.remove(&op.name);
        }
    }

    pub(super) fn remove_key(&mut self, key: &(String, String)) -> Option<Tracked> {
        let name = self.keys.remove(key)?;
        self.ops.remove(&name)
    }
}

impl KubeBackend {
    pub(super) async fn watch(self: Arc<Self>, ns: String, synced: std::sync::mpsc::Sender<()>) {
        let api = self.ctx.dms(&ns);
        let config =
            watcher::Config::default().labels(&format!("{INITIATOR_LABEL}={}", self.ctx.node));
        let writer = reflector::store::Writer::<NnfDataMovement>::default();
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
    pub(super) fn set_stale(&self, ns: &str, why: Option<String>) {
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
    pub(super) fn observe(&self, ns: &str, obj: &NnfDataMovement) {
        let Some(res) = obj.metadata.name.clone() else {
            return;
        };
        let key = (ns.to_string(), res.clone());
        if obj.metadata.deletion_timestamp.is_some() {
            // Rule 1: being deleted is gone.
            return self.deleted(ns, obj);
        }
        let view = DmView::of(obj);
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
    /// A resource of ours was deleted, or is being deleted: its operation
    /// disappears.
    pub(super) fn deleted(&self, ns: &str, obj: &NnfDataMovement) {
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
            tracing::info!(op = %t.op.name, user = t.op.uid, resource = %format!("{}/{}", key.0, key.1), "resource deleted: the operation is gone");
            t.op.removed
                .store(true, std::sync::atomic::Ordering::Release);
            self.notify.gone(t.op);
        }
    }
}

/// The resource's `status.message`, with a note when the watch is failing.
pub(super) fn compose_message(message: &str, stale: Option<&(SystemTime, String)>) -> String {
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
