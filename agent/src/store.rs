//! The local backend's state directory: one JSON record per operation,
//! replaced atomically, so every operation survives a restart.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
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
}

impl Store {
    pub fn open(state_dir: &Path) -> io::Result<Store> {
        let ops_dir = state_dir.join("ops");
        let hostfiles_dir = state_dir.join("hostfiles");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(state_dir)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&ops_dir)?;
        // Copy commands read their hostfile as the requesting user.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&hostfiles_dir)?;
        Ok(Store {
            ops_dir,
            hostfiles_dir,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.ops_dir.join(format!("{name}.json"))
    }

    /// Writes the record durably: temporary file, fsync, rename.
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
        file.sync_data()?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn delete(&self, name: &str) -> io::Result<()> {
        let _ = fs::remove_file(self.hostfile(name));
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
