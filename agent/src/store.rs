//! The local backend's state directory: one JSON record per operation,
//! replaced atomically, so every operation survives a restart.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::op::Status;
use crate::request::Request;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub request: Request,
    pub target: PathBuf,
    pub created: SystemTime,
    pub status: Status,
    /// The running copy's process group and its leader's start time, so a
    /// restarted agent can kill what a crashed one left behind.
    pub pgid: Option<i32>,
    pub leader_start: Option<u64>,
}

pub struct Store {
    ops_dir: PathBuf,
    hostfiles_dir: PathBuf,
    journals_dir: PathBuf,
    /// Records written but not yet flushed to disk, for the syncer thread.
    unsynced: Arc<(Mutex<Vec<PathBuf>>, Condvar)>,
}

/// How long a written record may wait for its fsync.
const SYNC_DELAY: Duration = Duration::from_millis(50);

impl Store {
    pub fn open(state_dir: &Path) -> io::Result<Store> {
        let ops_dir = state_dir.join("ops");
        let hostfiles_dir = state_dir.join("hostfiles");
        let journals_dir = state_dir.join("journals");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(state_dir)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&ops_dir)?;
        // Only the agent opens journals; the copy gets a descriptor.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&journals_dir)?;
        // Copy commands read their hostfile as the requesting user.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&hostfiles_dir)?;
        let unsynced: Arc<(Mutex<Vec<PathBuf>>, Condvar)> = Arc::default();
        let queue = unsynced.clone();
        let dir = ops_dir.clone();
        std::thread::Builder::new()
            .name("record-sync".into())
            .spawn(move || sync_loop(&dir, &queue))?;
        Ok(Store {
            ops_dir,
            hostfiles_dir,
            journals_dir,
            unsynced,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.ops_dir.join(format!("{name}.json"))
    }

    /// Replaces the record atomically (temporary file, rename): a crashed
    /// agent leaves the old record or the new one, never a torn one. The
    /// fsync follows within `SYNC_DELAY` from the syncer thread, batched, so
    /// that a request does not wait for the disk; only a power loss in that
    /// window can lose the newest records.
    pub fn save(&self, record: &Record) -> io::Result<()> {
        let path = self.path(&record.name);
        let tmp = self.ops_dir.join(format!(".{}.tmp", record.name));
        let data = serde_json::to_vec(record).map_err(io::Error::other)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&data)?;
        fs::rename(&tmp, &path)?;
        let (queue, wake) = &*self.unsynced;
        queue.lock().unwrap().push(path);
        wake.notify_one();
        Ok(())
    }

    pub fn delete(&self, name: &str) -> io::Result<()> {
        let _ = fs::remove_file(self.hostfile(name));
        self.delete_journal(name);
        match fs::remove_file(self.path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every record; unreadable ones are reported and skipped.
    pub fn load_all(&self) -> io::Result<Vec<Record>> {
        let mut records = Vec::new();
        for entry in fs::read_dir(&self.ops_dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|d| serde_json::from_slice::<Record>(&d).map_err(|e| e.to_string()))
            {
                Ok(record) => records.push(record),
                Err(e) => {
                    tracing::error!(path = %path.display(), "skipping unreadable operation record: {e}")
                }
            }
        }
        Ok(records)
    }

    /// The native copy's resume journal (see copy-engine's `Journal`):
    /// created on its first run, kept across re-runs after a crash, removed
    /// when the operation completes.
    pub fn journal(&self, name: &str) -> PathBuf {
        self.journals_dir.join(name)
    }

    /// Opens (creating) the journal for reading and appending. The caller
    /// passes the descriptor to the copy worker, which runs as the user and
    /// could not open this directory itself.
    pub fn open_journal(&self, name: &str) -> io::Result<fs::File> {
        OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(self.journal(name))
    }

    pub fn delete_journal(&self, name: &str) {
        match fs::remove_file(self.journal(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::error!(op = name, "cannot delete the resume journal: {e}")
            }
            _ => {}
        }
    }

    pub fn hostfile(&self, name: &str) -> PathBuf {
        self.hostfiles_dir.join(name)
    }

    pub fn write_hostfile(&self, name: &str, content: &str) -> io::Result<PathBuf> {
        let path = self.hostfile(name);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&path)?;
        file.write_all(content.as_bytes())?;
        Ok(path)
    }
}

/// Flushes written records to disk in batches: each file, then the directory
/// (which holds the renames).
fn sync_loop(dir: &Path, unsynced: &(Mutex<Vec<PathBuf>>, Condvar)) {
    let (queue, wake) = unsynced;
    loop {
        let batch = {
            let mut pending = queue.lock().unwrap();
            while pending.is_empty() {
                pending = wake.wait(pending).unwrap();
            }
            drop(pending);
            std::thread::sleep(SYNC_DELAY);
            let mut pending = queue.lock().unwrap();
            let mut batch = std::mem::take(&mut *pending);
            batch.sort();
            batch.dedup();
            batch
        };
        for path in &batch {
            // Gone already (removed or replaced again): nothing to flush.
            if let Ok(file) = fs::File::open(path) {
                if let Err(e) = file.sync_data() {
                    tracing::error!(path = %path.display(), "cannot flush operation record: {e}");
                }
            }
        }
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
