//! The embedded `--spec-dir DIR` driver: ClientMount, NnfStorageProfile and
//! Servers objects are JSON files in DIR; each ClientMount's status is
//! written next to it as `<name>.status.json`.
//!
//! The status file also carries the implicit finalizer: the ClientMount and
//! pinned profile it was last reconciled with, under `"finalizer"`. When
//! `<name>.json` is removed that record says what to unmount; the status
//! file is removed only once everything is unmounted.
//!
//! The directory's changes reach the shared reconcile through
//! `kube::runtime::Controller` like the Kubernetes watches do (see
//! [`source`]); a pass reads the files afresh.

mod source;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use kube::api::DynamicObject;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use nnf_api::{
    ClientMount, ClientMountState, ClientMountStatus, NnfStorageProfile, Servers,
    CLIENTMOUNT_FINALIZER, CLIENTMOUNT_KIND, SERVERS_KIND, STORAGE_PROFILE_KIND,
};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::controller::{self, converge, pick_servers, verdict, Error, PathLocks, Shared};
use crate::daemon;
use crate::metrics::Metrics;
use crate::mount::Config;
use crate::plan::user_error;
use crate::reconcile::Next;

/// `<name>.status.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusFile {
    pub status: ClientMountStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalizer: Option<FinalizerRecord>,
}

/// What the implicit finalizer needs to undo the mounts after the
/// ClientMount file is gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FinalizerRecord {
    pub name: String,
    pub client_mount: ClientMount,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<NnfStorageProfile>,
}

/// Whether a directory entry is an object file.
fn is_object_file(name: &str) -> bool {
    name.ends_with(".json") && !name.ends_with(".status.json") && !name.starts_with('.')
}

fn status_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.status.json"))
}

fn kind_of(value: &serde_json::Value) -> &str {
    value.get("kind").and_then(|k| k.as_str()).unwrap_or("")
}

/// Why an object or status file could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// A file's JSON; `None` when there is no such file.
fn read_json(path: &Path) -> Option<Result<serde_json::Value, ReadError>> {
    match fs::read(path) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(ReadError::from)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(e.into())),
    }
}

/// Every NnfStorageProfile and Servers object in the directory.
fn load_others(dir: &Path) -> (Vec<NnfStorageProfile>, Vec<Servers>) {
    let mut profiles = Vec::new();
    let mut servers = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return (profiles, servers);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_object_file(&name) {
            continue;
        }
        let Some(Ok(value)) = read_json(&entry.path()) else {
            continue;
        };
        match kind_of(&value) {
            STORAGE_PROFILE_KIND => match serde_json::from_value(value) {
                Ok(p) => profiles.push(p),
                Err(e) => warn!(file = name, error = %e, "invalid NnfStorageProfile"),
            },
            SERVERS_KIND => match serde_json::from_value(value) {
                Ok(s) => servers.push(s),
                Err(e) => warn!(file = name, error = %e, "invalid Servers"),
            },
            _ => {}
        }
    }
    (profiles, servers)
}

fn read_status(dir: &Path, name: &str) -> Option<StatusFile> {
    match read_json(&status_path(dir, name))? {
        Ok(v) => match serde_json::from_value(v) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "unreadable status file: starting from an empty status");
                None
            }
        },
        Err(e) => {
            warn!(error = %e, "unreadable status file: starting from an empty status");
            None
        }
    }
}

/// Write `<name>.status.json` atomically: temporary file (ignored by the
/// watcher: leading `.`), fsync, rename, fsync of the directory.
pub fn write_status(dir: &Path, name: &str, file: &StatusFile) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.status.json.tmp"));
    let mut text = serde_json::to_vec_pretty(file)?;
    text.push(b'\n');
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, status_path(dir, name))?;
    fs::File::open(dir)?.sync_all()
}

fn remove_status(dir: &Path, name: &str) -> std::io::Result<()> {
    match fs::remove_file(status_path(dir, name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => fs::File::open(dir)?.sync_all(),
    }
}

/// The spec-dir driver.
struct SpecDir {
    dir: PathBuf,
    cfg: Arc<Config>,
    node: String,
    locks: PathLocks,
    /// The store `Controller` reads, shared with the event source: a name
    /// leaves it once its finalization is done.
    store: Arc<Mutex<Writer<DynamicObject>>>,
    metrics: Arc<Metrics>,
}

impl controller::Driver for SpecDir {
    fn key(&self, obj: &DynamicObject) -> String {
        obj.metadata.name.clone().unwrap_or_default()
    }

    fn reconcile(
        self: Arc<Self>,
        obj: Arc<DynamicObject>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let name = self.key(&obj);
        Box::pin(async move {
            // Inside the future: the reconcile's span is entered when it runs.
            let span = tracing::Span::current();
            tokio::task::spawn_blocking(move || span.in_scope(|| self.work(&name)))
                .await
                .unwrap_or_else(|e| Err(Error::Transient(format!("reconcile task failed: {e}"))))
        })
    }
}

impl SpecDir {
    fn persist(&self, name: &str, file: &StatusFile) {
        if let Err(e) = write_status(&self.dir, name, file) {
            error!(error = %e, "could not write status file");
        }
        self.metrics.status(name, Some(&file.status));
    }

    /// One reconcile of `<name>.json` (or of its deletion).
    fn work(&self, name: &str) -> Result<(), Error> {
        let path = self.dir.join(format!("{name}.json"));
        let prior = read_status(&self.dir, name);
        let value = match read_json(&path) {
            None => return self.finalize(name, prior),
            Some(Err(e)) => {
                return self.invalid(name, prior, format!("cannot read {}: {e}", path.display()))
            }
            Some(Ok(v)) => v,
        };
        if kind_of(&value) != CLIENTMOUNT_KIND {
            return Ok(());
        }
        let mut cm: ClientMount = match serde_json::from_value(value) {
            Ok(cm) => cm,
            Err(e) => return self.invalid(name, prior, format!("invalid ClientMount: {e}")),
        };
        if let Some(ns) = cm.metadata.namespace.as_deref() {
            if ns != self.node && ns != "default" {
                info!(namespace = ns, node = %self.node, "ClientMount is for another node: ignored");
                return Ok(());
            }
        }
        let (profiles, servers) = load_others(&self.dir);
        let prior = prior.unwrap_or_default();
        cm.status = Some(prior.status.clone());
        let profile = crate::plan::find_profile(&cm, &profiles).ok().cloned();
        let record = |cm: &ClientMount| FinalizerRecord {
            name: CLIENTMOUNT_FINALIZER.to_string(),
            client_mount: ClientMount {
                status: None,
                ..cm.clone()
            },
            profile: profile.clone(),
        };
        let servers = pick_servers(&cm, &servers);
        // Status initialisation and the finalizer are recorded before any
        // command runs, so a crash part way leaves a file that says what may
        // be mounted.
        let rec = record(&cm);
        let out = converge(
            &self.cfg,
            &self.locks,
            &mut cm,
            false,
            &profiles,
            servers,
            |init| {
                if init.is_some() || prior.finalizer.as_ref() != Some(&rec) {
                    let status = init.cloned().unwrap_or_else(|| prior.status.clone());
                    self.persist(
                        name,
                        &StatusFile {
                            status,
                            finalizer: Some(rec),
                        },
                    );
                }
                Ok(true)
            },
        )?
        .expect("a spec-dir object is never gone mid-pass");
        if Some(&out.status) != cm.status.as_ref() {
            self.persist(
                name,
                &StatusFile {
                    status: out.status.clone(),
                    finalizer: Some(record(&cm)),
                },
            );
        }
        self.metrics.status(name, Some(&out.status));
        verdict(&cm, &out, false)
    }

    /// A ClientMount file that cannot be used: report it in the status,
    /// keep the finalizer record, and wait for the file to change.
    fn invalid(&self, name: &str, prior: Option<StatusFile>, msg: String) -> Result<(), Error> {
        warn!(error = %msg, "invalid ClientMount file");
        let mut file = prior.unwrap_or_default();
        file.status.all_ready = false;
        file.status.error = Some(user_error(msg.clone()));
        self.persist(name, &file);
        Err(Error::Fatal(msg))
    }

    /// `<name>.json` is gone: unmount what the finalizer record describes,
    /// then remove the status file.
    fn finalize(&self, name: &str, prior: Option<StatusFile>) -> Result<(), Error> {
        let Some(mut file) = prior else {
            self.forget(name);
            return Ok(());
        };
        let Some(record) = file.finalizer.clone() else {
            info!("ClientMount deleted; nothing was mounted");
            return self.remove_status(name);
        };
        info!("ClientMount deleted: unmounting everything");
        let mut cm = record.client_mount.clone();
        cm.spec.desired_state = ClientMountState::Unmounted;
        cm.status = Some(file.status.clone());
        let (mut profiles, servers) = load_others(&self.dir);
        if crate::plan::find_profile(&cm, &profiles).is_err() {
            // The pinned profile may be gone by now; use the copy recorded
            // when the mounts were made.
            profiles.extend(record.profile.clone());
        }
        let servers = pick_servers(&cm, &servers);
        let out = converge(
            &self.cfg,
            &self.locks,
            &mut cm,
            true,
            &profiles,
            servers,
            |_| Ok(true),
        )?
        .expect("a spec-dir object is never gone mid-pass");
        if out.next == Next::Done {
            self.remove_status(name)?;
            info!("unmounted; finalizer done, status file removed");
            return Ok(());
        }
        file.status = out.status.clone();
        self.persist(name, &file);
        verdict(&cm, &out, true)
    }

    fn remove_status(&self, name: &str) -> Result<(), Error> {
        remove_status(&self.dir, name).map_err(|e| {
            error!(error = %e, "could not remove status file");
            Error::Transient(format!("could not remove the status file of {name}: {e}"))
        })?;
        self.forget(name);
        Ok(())
    }

    /// Done with `name` until its file comes back. Under the store's lock
    /// the file is looked for once more: one written meanwhile was (or
    /// will be, its event follows) put back by the source.
    fn forget(&self, name: &str) {
        self.metrics.status(name, None);
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if !self.dir.join(format!("{name}.json")).exists() {
            store.apply_watcher_event(&watcher::Event::Delete(source::object(name)));
        }
    }
}

/// Run the spec-dir daemon until SIGTERM/SIGINT.
pub fn run(
    dir: PathBuf,
    cfg: Arc<Config>,
    node: String,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<(), daemon::Error> {
    let dir = fs::canonicalize(&dir).map_err(|source| daemon::Error::SpecDir {
        path: dir.clone(),
        source,
    })?;
    if !dir.is_dir() {
        return Err(daemon::Error::NotADirectory(dir));
    }
    daemon::run(&cfg.clone(), metrics_addr, |stop| async move {
        let ar = controller::clientmount_resource();
        let store = Arc::new(Mutex::new(Writer::<DynamicObject>::new(ar)));
        let reader = store.lock().unwrap_or_else(|e| e.into_inner()).as_reader();
        let dir_gone = Arc::new(AtomicBool::new(false));
        let on_gone = {
            let (stop, cfg, gone) = (stop.clone(), cfg.clone(), dir_gone.clone());
            move || {
                gone.store(true, Ordering::SeqCst);
                stop.stop(&cfg);
            }
        };
        let trigger = source::start(&dir, store.clone(), on_gone)?;
        info!(dir = %dir.display(), "watching spec directory");
        let metrics = cfg.metrics.clone();
        let driver = Arc::new(SpecDir {
            dir: dir.clone(),
            cfg: cfg.clone(),
            node,
            locks: PathLocks::default(),
            store,
            metrics: metrics.clone(),
        });
        let shared = Arc::new(Shared {
            driver,
            policy: Default::default(),
            metrics,
        });
        controller::run(trigger, reader, &stop, shared).await;
        if dir_gone.load(Ordering::SeqCst) {
            Err(daemon::Error::SpecDirRemoved(dir))
        } else {
            Ok(())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_filter() {
        assert!(is_object_file("a.json"));
        assert!(!is_object_file("a.status.json"));
        assert!(!is_object_file(".a.json"));
        assert!(!is_object_file("a.json.tmp"));
        assert!(!is_object_file("a.tmp"));
    }
}
