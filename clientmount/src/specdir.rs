//! The embedded `--spec-dir DIR` driver: ClientMount, NnfStorageProfile and
//! Servers objects are JSON files in DIR; each ClientMount's status is
//! written next to it as `<name>.status.json`.
//!
//! The status file also carries the implicit finalizer: the ClientMount and
//! pinned profile it was last reconciled with, under `"finalizer"`. When
//! `<name>.json` is removed that record says what to unmount; the status
//! file is removed only once everything is unmounted.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use daemon_common::signals;
use nnf_api::{
    labels, ClientMount, ClientMountState, ClientMountStatus, NnfStorageProfile, Servers,
    CLIENTMOUNT_FINALIZER, CLIENTMOUNT_KIND, SERVERS_KIND, STORAGE_PROFILE_KIND,
};
use serde::{Deserialize, Serialize};
use tracing::{error, info, info_span, warn};

use crate::inotify::{Change, Watch};
use crate::mount::Config;
use crate::plan::user_error;
use crate::reconcile::{self, Ctx, Next};

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// First retry of an error retrying alone cannot fix (a bad spec, an
/// unpinned profile): something else may fix it without touching the
/// ClientMount, so it is retried, slowly.
const SLOW_BACKOFF_START: Duration = Duration::from_secs(10);
/// Retry after an NVMe rescan found every namespace (upstream: 1 s).
pub(crate) const QUICK_RETRY: Duration = Duration::from_secs(1);

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

fn read_json(path: &Path) -> Option<Result<serde_json::Value, String>> {
    match fs::read(path) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(e.to_string())),
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

/// The Servers object of the ClientMount's directive: the only one whose
/// workflow and directive-index labels agree with the ClientMount's (a
/// label the ClientMount lacks is not compared).
pub(crate) fn pick_servers<'a>(cm: &ClientMount, all: &'a [Servers]) -> Option<&'a Servers> {
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

/// Mount paths held by running reconciles: two ClientMounts never work on
/// the same path at once. All of a ClientMount's paths are taken together,
/// so there is no lock-order deadlock.
#[derive(Default)]
pub(crate) struct PathLocks {
    held: Mutex<HashSet<PathBuf>>,
    freed: Condvar,
}

pub(crate) struct PathGuard<'a> {
    locks: &'a PathLocks,
    paths: Vec<PathBuf>,
}

impl PathLocks {
    pub(crate) fn lock(&self, cm: &ClientMount) -> PathGuard<'_> {
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

struct Shared {
    dir: PathBuf,
    cfg: Arc<Config>,
    node: String,
    locks: PathLocks,
}

impl Shared {
    fn persist(&self, name: &str, file: &StatusFile) {
        if let Err(e) = write_status(&self.dir, name, file) {
            error!(error = %e, "could not write status file");
        }
    }

    /// One reconcile of `<name>.json` (or of its deletion).
    fn work(&self, name: &str) -> Next {
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
            return Next::Done;
        }
        let mut cm: ClientMount = match serde_json::from_value(value) {
            Ok(cm) => cm,
            Err(e) => return self.invalid(name, prior, format!("invalid ClientMount: {e}")),
        };
        if let Some(ns) = cm.metadata.namespace.as_deref() {
            if ns != self.node && ns != "default" {
                info!(namespace = ns, node = %self.node, "ClientMount is for another node: ignored");
                return Next::Done;
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
        // Status initialisation and the finalizer are recorded before any
        // command runs, so a crash part way leaves a file that says what may
        // be mounted.
        let _guard = self.locks.lock(&cm);
        if let Some(init) = reconcile::initial_status(&cm) {
            let file = StatusFile {
                status: init.clone(),
                finalizer: Some(record(&cm)),
            };
            self.persist(name, &file);
            cm.status = Some(init);
        } else if prior.finalizer.as_ref() != Some(&record(&cm)) {
            self.persist(
                name,
                &StatusFile {
                    status: prior.status.clone(),
                    finalizer: Some(record(&cm)),
                },
            );
        }
        let ctx = Ctx {
            cfg: &self.cfg,
            profiles: &profiles,
            servers: pick_servers(&cm, &servers),
        };
        let out = reconcile::reconcile(&cm, &ctx);
        if Some(&out.status) != cm.status.as_ref() {
            self.persist(
                name,
                &StatusFile {
                    status: out.status.clone(),
                    finalizer: Some(record(&cm)),
                },
            );
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
        out.next
    }

    /// A ClientMount file that cannot be used: report it in the status,
    /// keep the finalizer record, and wait for the file to change.
    fn invalid(&self, name: &str, prior: Option<StatusFile>, msg: String) -> Next {
        warn!(error = %msg, "invalid ClientMount file");
        let mut file = prior.unwrap_or_default();
        file.status.all_ready = false;
        file.status.error = Some(user_error(msg));
        self.persist(name, &file);
        Next::Wait
    }

    /// `<name>.json` is gone: unmount what the finalizer record describes,
    /// then remove the status file.
    fn finalize(&self, name: &str, prior: Option<StatusFile>) -> Next {
        let Some(mut file) = prior else {
            return Next::Done;
        };
        let Some(record) = file.finalizer.clone() else {
            info!("ClientMount deleted; nothing was mounted");
            return match remove_status(&self.dir, name) {
                Ok(()) => Next::Done,
                Err(e) => {
                    error!(error = %e, "could not remove status file");
                    Next::Retry
                }
            };
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
        let _guard = self.locks.lock(&cm);
        let ctx = Ctx {
            cfg: &self.cfg,
            profiles: &profiles,
            servers: pick_servers(&cm, &servers),
        };
        let out = reconcile::reconcile(&cm, &ctx);
        if out.next == Next::Done {
            reconcile::after_deletion(&cm, &self.cfg);
            return match remove_status(&self.dir, name) {
                Ok(()) => {
                    info!("unmounted; finalizer done, status file removed");
                    Next::Done
                }
                Err(e) => {
                    error!(error = %e, "could not remove status file");
                    Next::Retry
                }
            };
        }
        file.status = out.status;
        self.persist(name, &file);
        if let Some(e) = &file.status.error {
            warn!(error = %e.debug_message, "unmount for deletion failed");
        }
        match out.next {
            // A bad recorded spec would otherwise be stuck forever; keep
            // retrying with backoff, an administrator can remove the file.
            Next::Wait => Next::Retry,
            n => n,
        }
    }
}

enum Event {
    Fs(Change),
    Done(String, Next),
    Shutdown,
}

/// Block the termination signals in the calling thread (call before any
/// other thread exists, so every thread inherits the mask); they are then
/// taken synchronously by [`run`]'s signal thread.
pub fn block_signals() {
    signals::block(&TERMINATION);
}

const TERMINATION: [signals::Signal; 2] = [signals::Signal::SIGTERM, signals::Signal::SIGINT];

fn spawn_signal_thread(tx: Sender<Event>) {
    spawn_sigwait_thread(move || tx.send(Event::Shutdown).is_ok());
}

/// A thread taking SIGTERM/SIGINT (blocked by [`block_signals`]) with
/// `sigwait`; `on_signal` returns false to end the thread. Shared with the
/// Kubernetes driver.
pub(crate) fn spawn_sigwait_thread(mut on_signal: impl FnMut() -> bool + Send + 'static) {
    signals::block(&TERMINATION).spawn_waiter(move |sig| {
        info!(
            signal = sig as i32,
            "termination signal: finishing commands in flight"
        );
        on_signal()
    });
}

#[derive(Default)]
struct Sched {
    known: HashSet<String>,
    running: HashSet<String>,
    dirty: HashSet<String>,
    failures: HashMap<String, u32>,
    slow_failures: HashMap<String, u32>,
    retry_at: HashMap<String, Instant>,
}

/// The slow backoff: 10 s, doubling, capped at 5 min.
pub(crate) fn slow_backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(20);
    (SLOW_BACKOFF_START * (1u32 << shift)).min(BACKOFF_CAP)
}

pub(crate) fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(20);
    (BACKOFF_START * (1u32 << shift)).min(BACKOFF_CAP)
}

/// Run the spec-dir daemon until SIGTERM/SIGINT.
pub fn run(dir: PathBuf, cfg: Arc<Config>, node: String) -> Result<(), String> {
    let dir = fs::canonicalize(&dir).map_err(|e| format!("--spec-dir {}: {e}", dir.display()))?;
    if !dir.is_dir() {
        return Err(format!("--spec-dir {}: not a directory", dir.display()));
    }
    // Watch first, then scan: nothing written in between is missed.
    let watch = Watch::new(&dir).map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    let (tx, rx) = mpsc::channel::<Event>();
    spawn_signal_thread(tx.clone());
    {
        let tx = tx.clone();
        thread::spawn(move || loop {
            match watch.read() {
                Ok(changes) => {
                    for c in changes {
                        let gone = matches!(c, Change::Gone);
                        if tx.send(Event::Fs(c)).is_err() || gone {
                            return;
                        }
                    }
                }
                Err(e) => {
                    error!(error = %e, "inotify read failed");
                    let _ = tx.send(Event::Fs(Change::Gone));
                    return;
                }
            }
        });
    }
    let shared = Arc::new(Shared {
        dir: dir.clone(),
        cfg: cfg.clone(),
        node,
        locks: PathLocks::default(),
    });
    info!(dir = %dir.display(), "watching spec directory");

    let mut s = Sched::default();
    let kick = |s: &mut Sched, name: &str| {
        s.retry_at.remove(name);
        if s.running.contains(name) {
            s.dirty.insert(name.to_string());
            return;
        }
        s.running.insert(name.to_string());
        let (shared, tx, name) = (shared.clone(), tx.clone(), name.to_string());
        thread::spawn(move || {
            let span = info_span!("clientmount", name = %name);
            let next = span.in_scope(|| shared.work(&name));
            let _ = tx.send(Event::Done(name, next));
        });
    };
    // Which ClientMounts exist or still have a status file (deletion
    // pending): everything gets one reconcile at start.
    let scan = |s: &mut Sched| {
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let fname = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = fname.strip_suffix(".status.json") {
                if !stem.starts_with('.') {
                    s.known.insert(stem.to_string());
                }
            } else if is_object_file(&fname) {
                if let Some(Ok(v)) = read_json(&entry.path()) {
                    if kind_of(&v) == CLIENTMOUNT_KIND {
                        s.known.insert(fname.trim_end_matches(".json").to_string());
                    }
                }
            }
        }
    };
    scan(&mut s);
    for name in s.known.clone() {
        kick(&mut s, &name);
    }

    let mut shutting_down = false;
    let mut dir_gone = false;
    loop {
        if shutting_down && s.running.is_empty() {
            break;
        }
        // Idle = blocked here: a deadline only while a retry is pending.
        let deadline = if shutting_down {
            None
        } else {
            s.retry_at.values().min().copied()
        };
        let event = match deadline {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match event {
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let due: Vec<String> = s
                    .retry_at
                    .iter()
                    .filter(|(_, t)| **t <= now)
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in due {
                    kick(&mut s, &name);
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Ok(Event::Shutdown) => {
                shutting_down = true;
                cfg.shutdown.store(true, Ordering::SeqCst);
            }
            Ok(Event::Done(name, next)) => {
                s.running.remove(&name);
                match next {
                    Next::Retry => {
                        let f = s.failures.entry(name.clone()).or_insert(0);
                        *f += 1;
                        let delay = backoff(*f);
                        info!(clientmount = %name, retry_in = ?delay, "will retry");
                        s.retry_at.insert(name.clone(), Instant::now() + delay);
                    }
                    Next::RetrySoon => {
                        s.failures.remove(&name);
                        info!(clientmount = %name, retry_in = ?QUICK_RETRY, "will retry soon");
                        s.retry_at
                            .insert(name.clone(), Instant::now() + QUICK_RETRY);
                    }
                    Next::Wait => {
                        s.failures.remove(&name);
                        let f = s.slow_failures.entry(name.clone()).or_insert(0);
                        *f += 1;
                        let delay = slow_backoff(*f);
                        info!(clientmount = %name, retry_in = ?delay, "will retry on the slow backoff");
                        s.retry_at.insert(name.clone(), Instant::now() + delay);
                    }
                    Next::Interrupted => {}
                    Next::Done | Next::Finalized => {
                        s.failures.remove(&name);
                        s.slow_failures.remove(&name);
                    }
                }
                if s.dirty.remove(&name) && !shutting_down {
                    kick(&mut s, &name);
                }
            }
            Ok(Event::Fs(change)) if !shutting_down => match change {
                Change::Gone => {
                    error!(dir = %dir.display(), "spec directory removed: stopping");
                    dir_gone = true;
                    shutting_down = true;
                    cfg.shutdown.store(true, Ordering::SeqCst);
                }
                Change::Overflow => {
                    scan(&mut s);
                    for name in s.known.clone() {
                        kick(&mut s, &name);
                    }
                }
                Change::Name(fname) => {
                    if !is_object_file(&fname) {
                        continue;
                    }
                    let stem = fname.trim_end_matches(".json").to_string();
                    match read_json(&dir.join(&fname)) {
                        Some(Ok(v)) if kind_of(&v) == CLIENTMOUNT_KIND => {
                            s.known.insert(stem.clone());
                            kick(&mut s, &stem);
                        }
                        Some(Ok(v))
                            if kind_of(&v) == STORAGE_PROFILE_KIND
                                || kind_of(&v) == SERVERS_KIND =>
                        {
                            // A profile or Servers object arrived or changed:
                            // whatever waits for it can go on now.
                            for name in s.known.clone() {
                                kick(&mut s, &name);
                            }
                        }
                        Some(Ok(_)) => {}
                        // Unparsable (maybe half written; the close-write
                        // event follows) or removed: let the worker decide.
                        _ => {
                            if s.known.contains(&stem) || status_path(&dir, &stem).exists() {
                                s.known.insert(stem.clone());
                                kick(&mut s, &stem);
                            }
                        }
                    }
                }
            },
            Ok(Event::Fs(_)) => {}
        }
    }
    info!("stopped");
    if dir_gone {
        Err(format!("spec directory {} was removed", dir.display()))
    } else {
        Ok(())
    }
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
}
