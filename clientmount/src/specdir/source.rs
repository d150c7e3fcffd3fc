//! The spec-dir driver's source of events: an inotify watch of the
//! directory turned into what a Kubernetes watch gives `Controller`, a
//! store of the ClientMounts (by file name) and a stream of the ones that
//! changed.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use futures::channel::mpsc;
use futures::Stream;
use kube::api::DynamicObject;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::{self, Event};
use tracing::error;

use super::{is_object_file, kind_of, read_json, status_path};
use crate::controller::clientmount_resource;
use crate::inotify::{Change, Watch};
use nnf_api::{CLIENTMOUNT_KIND, SERVERS_KIND, STORAGE_PROFILE_KIND};

type Trigger = Result<DynamicObject, watcher::Error>;

/// What stands for `<name>.json` in the store: the name is all a pass
/// needs, it reads the files itself.
pub(super) fn object(name: &str) -> DynamicObject {
    DynamicObject::new(name, &clientmount_resource())
}

struct Source {
    dir: PathBuf,
    store: Arc<Mutex<Writer<DynamicObject>>>,
    tx: mpsc::UnboundedSender<Trigger>,
}

impl Source {
    /// The names to reconcile at start: every ClientMount, and every status
    /// file left by one (a deletion pending).
    fn scan(&self) -> Vec<String> {
        let mut names = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return names;
        };
        for entry in entries.flatten() {
            let fname = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = fname.strip_suffix(".status.json") {
                if !stem.starts_with('.') {
                    names.push(stem.to_string());
                }
            } else if is_object_file(&fname) {
                if let Some(Ok(v)) = read_json(&entry.path()) {
                    if kind_of(&v) == CLIENTMOUNT_KIND {
                        names.push(fname.trim_end_matches(".json").to_string());
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer<DynamicObject>> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn known(&self, name: &str) -> bool {
        self.lock()
            .as_reader()
            .state()
            .iter()
            .any(|o| o.metadata.name.as_deref() == Some(name))
    }

    /// Into the store, then to `Controller`: the store has it by the time
    /// the reconcile is scheduled.
    fn kick(&self, name: &str) -> bool {
        let obj = object(name);
        self.lock().apply_watcher_event(&Event::Apply(obj.clone()));
        self.tx.unbounded_send(Ok(obj)).is_ok()
    }

    fn kick_all(&self) -> bool {
        let names: Vec<String> = self
            .lock()
            .as_reader()
            .state()
            .iter()
            .filter_map(|o| o.metadata.name.clone())
            .collect();
        names.iter().all(|n| self.kick(n))
    }

    /// One directory entry changed.
    fn changed(&self, fname: &str) -> bool {
        if !is_object_file(fname) {
            return true;
        }
        let stem = fname.trim_end_matches(".json");
        match read_json(&self.dir.join(fname)) {
            Some(Ok(v)) if kind_of(&v) == CLIENTMOUNT_KIND => self.kick(stem),
            // A profile or Servers object arrived or changed: whatever
            // waits for it can go on now.
            Some(Ok(v)) if kind_of(&v) == STORAGE_PROFILE_KIND || kind_of(&v) == SERVERS_KIND => {
                self.kick_all()
            }
            Some(Ok(_)) => true,
            // Unparsable (maybe half written; the close-write event
            // follows) or removed: let the reconcile decide.
            _ => {
                if self.known(stem) || status_path(&self.dir, stem).exists() {
                    self.kick(stem)
                } else {
                    true
                }
            }
        }
    }
}

/// Watches `dir` (first, then scans it: nothing written in between is
/// missed) from a thread of its own. `on_gone` is called when the directory
/// goes away or the watch fails.
pub(super) fn start(
    dir: &Path,
    store: Arc<Mutex<Writer<DynamicObject>>>,
    on_gone: impl FnOnce() + Send + 'static,
) -> Result<impl Stream<Item = Trigger> + Send + 'static, crate::daemon::Error> {
    let watch = Watch::new(dir).map_err(|source| crate::daemon::Error::Watch {
        path: dir.to_path_buf(),
        source,
    })?;
    let (tx, rx) = mpsc::unbounded();
    let source = Source {
        dir: dir.to_path_buf(),
        store,
        tx,
    };
    let names = source.scan();
    {
        let mut store = source.lock();
        store.apply_watcher_event(&Event::Init);
        for name in &names {
            store.apply_watcher_event(&Event::InitApply(object(name)));
        }
        store.apply_watcher_event(&Event::InitDone);
    }
    for name in &names {
        source.tx.unbounded_send(Ok(object(name))).ok();
    }
    thread::spawn(move || {
        'watch: loop {
            let changes = match watch.read() {
                Ok(changes) => changes,
                Err(e) => {
                    error!(error = %e, "inotify read failed");
                    break 'watch;
                }
            };
            for change in changes {
                // A failed send: the controller has stopped.
                let more = match change {
                    Change::Gone => {
                        error!(dir = %source.dir.display(), "spec directory removed: stopping");
                        break 'watch;
                    }
                    Change::Overflow => source.scan().iter().all(|n| source.kick(n)),
                    Change::Name(fname) => source.changed(&fname),
                };
                if !more {
                    return;
                }
            }
        }
        on_gone();
    });
    Ok(rx)
}
