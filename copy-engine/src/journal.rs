//! The resume journal: which files this operation has completely written,
//! so that a re-run after a crash skips them instead of starting over.
//!
//! A file is trusted on a re-run only when all of these hold:
//! - the journal lists its target path (so a file that merely existed in
//!   the destination before, even an identical one, is copied again);
//! - the source still has the size, modification time and change time
//!   recorded (a source changed meanwhile, even with its mtime reset by
//!   `touch -d`, is copied again: nobody can set the ctime);
//! - the target is still the very inode written (same inode number and,
//!   unless it has several names, the change time it had when complete)
//!   and has the source's size and mtime (a target replaced or rewritten
//!   meanwhile is copied again).
//!
//! Crash consistency: a file is appended to the in-memory batch only after
//! its data, owner, mode, xattrs and times are all in place (times come
//! last, as in `cp -a`). A batch reaches the journal file only after a
//! `syncfs` of the destination's file system, so every record on disk
//! describes data that is durable too: a node reboot loses at most the
//! records of the last batch, and those files are simply copied again.
//! Records are fixed-size with a checksum, so a torn last write is
//! recognised and cut off.
//!
//! Records are keyed by a 64-bit FNV-1a hash of the target path, which
//! keeps the table small for trees of millions of files; a collision could
//! only make an unlisted file look listed, and it would still have to pass
//! the size, mtime and inode checks above.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sys;

const RECORD: usize = 80;
/// Flush a batch after this many files...
const FLUSH_FILES: usize = 8192;
/// ...or this many bytes of completed files (what a crash may make us redo)...
const FLUSH_BYTES: u64 = 64 << 20;
/// ...or when the oldest record of the batch has waited this long.
const FLUSH_AGE: Duration = Duration::from_secs(1);
const MAGIC: u64 = 0x6e6e_662d_646d_7231; // "nnf-dmr1"

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over `bytes`, continuing from `state` (start with [`key_of`]).
pub(crate) fn extend_key(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// The key of a target path.
pub(crate) fn key_of(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    extend_key(FNV_OFFSET, path.as_os_str().as_bytes())
}

/// The key of `name` inside the directory whose key is `dir`.
pub(crate) fn child_key(dir: u64, name: &[u8]) -> u64 {
    extend_key(extend_key(dir, b"/"), name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    /// The target's inode and change time once complete.
    ino: u64,
    tgt_ctime: (i64, i64),
}

impl Rec {
    fn of(st: &libc::stat, tgt: (u64, (i64, i64))) -> Rec {
        Rec {
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
            ino: tgt.0,
            tgt_ctime: tgt.1,
        }
    }

    fn encode(&self, key: u64, out: &mut Vec<u8>) {
        let words = [
            key,
            self.size,
            self.mtime.0 as u64,
            self.mtime.1 as u64,
            self.ctime.0 as u64,
            self.ctime.1 as u64,
            self.ino,
            self.tgt_ctime.0 as u64,
            self.tgt_ctime.1 as u64,
        ];
        let start = out.len();
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let check = extend_key(FNV_OFFSET ^ MAGIC, &out[start..]);
        out.extend_from_slice(&check.to_le_bytes());
    }

    fn decode(chunk: &[u8]) -> Option<(u64, Rec)> {
        let word = |i: usize| u64::from_le_bytes(chunk[i * 8..i * 8 + 8].try_into().unwrap());
        if extend_key(FNV_OFFSET ^ MAGIC, &chunk[..72]) != word(9) {
            return None;
        }
        Some((
            word(0),
            Rec {
                size: word(1),
                mtime: (word(2) as i64, word(3) as i64),
                ctime: (word(4) as i64, word(5) as i64),
                ino: word(6),
                tgt_ctime: (word(7) as i64, word(8) as i64),
            },
        ))
    }
}

struct Batch {
    buf: Vec<u8>,
    files: usize,
    bytes: u64,
    oldest: Option<Instant>,
}

/// An operation's journal, open for a run of the copy.
pub struct Journal {
    file: File,
    /// Where to call `syncfs`: the destination's file system.
    target: PathBuf,
    /// What earlier runs recorded.
    known: HashMap<u64, Rec>,
    batch: Mutex<Batch>,
    /// Serialises writers, so that a failed write cannot interleave.
    writing: Mutex<Option<io::Error>>,
}

impl Journal {
    /// Reads what earlier runs recorded in `file` (empty for the first run)
    /// and cuts off a torn last record. `file` must be open for reading and
    /// appending. `target` is the copy's exact target.
    pub fn open(file: File, target: &Path) -> io::Result<Journal> {
        let len = file.metadata()?.len();
        let mut known = HashMap::with_capacity((len / RECORD as u64) as usize);
        // In pieces: the journal of a tree of millions of files is large.
        let mut piece = vec![0u8; RECORD * 16384];
        let mut valid = 0u64;
        'read: while valid + RECORD as u64 <= len {
            let want = ((len - valid) as usize / RECORD * RECORD).min(piece.len());
            file.read_exact_at(&mut piece[..want], valid)?;
            for chunk in piece[..want].chunks_exact(RECORD) {
                let Some((key, rec)) = Rec::decode(chunk) else {
                    break 'read;
                };
                // A later run's record of the same file wins.
                known.insert(key, rec);
                valid += RECORD as u64;
            }
        }
        if valid != len {
            file.set_len(valid)?;
        }
        Ok(Journal {
            file,
            target: target.to_path_buf(),
            known,
            batch: Mutex::new(Batch {
                buf: Vec::new(),
                files: 0,
                bytes: 0,
                oldest: None,
            }),
            writing: Mutex::new(None),
        })
    }

    /// How many files earlier runs recorded.
    pub fn known_files(&self) -> usize {
        self.known.len()
    }

    /// Whether an earlier run recorded the file at `key`.
    pub(crate) fn lists(&self, key: u64) -> bool {
        self.known.contains_key(&key)
    }

    /// Whether the file at `key`, whose source stats as `src`, is complete
    /// at the target from an earlier run; `target` stats the target only
    /// when the journal lists it.
    pub(crate) fn is_complete(
        &self,
        key: u64,
        src: &libc::stat,
        target: impl FnOnce() -> io::Result<libc::stat>,
    ) -> bool {
        let Some(rec) = self.known.get(&key) else {
            return false;
        };
        if *rec != Rec::of(src, (rec.ino, rec.tgt_ctime)) {
            return false;
        }
        let Ok(t) = target() else {
            return false;
        };
        t.st_mode & libc::S_IFMT == libc::S_IFREG
            && t.st_ino == rec.ino
            // Rewritten since (its inode number may well be reused): the
            // change time says so. Linking more names to it changes it too,
            // so a target with several names goes by its inode alone.
            && (t.st_nlink > 1 || (t.st_ctime, t.st_ctime_nsec) == rec.tgt_ctime)
            && t.st_size == src.st_size
            && (t.st_mtime, t.st_mtime_nsec) == (src.st_mtime, src.st_mtime_nsec)
    }

    /// Records that the file at `key` is completely written (target inode
    /// as `tgt`, source as `src`); flushes the batch when it is due.
    pub(crate) fn record(&self, key: u64, src: &libc::stat, tgt: &libc::stat) {
        let due = {
            let mut b = self.batch.lock().unwrap();
            Rec::of(src, (tgt.st_ino, (tgt.st_ctime, tgt.st_ctime_nsec))).encode(key, &mut b.buf);
            b.files += 1;
            b.bytes += src.st_size.max(0) as u64;
            b.oldest.get_or_insert_with(Instant::now);
            b.files >= FLUSH_FILES || b.bytes >= FLUSH_BYTES
        };
        if due {
            self.flush();
        }
    }

    /// Flushes the batch if its oldest record has waited long enough.
    pub fn flush_if_due(&self) {
        let due = self
            .batch
            .lock()
            .unwrap()
            .oldest
            .is_some_and(|t| t.elapsed() >= FLUSH_AGE);
        if due {
            self.flush();
        }
    }

    /// Makes the batch's files durable, then appends their records. A
    /// journal that cannot be written costs only the resume, never the copy:
    /// the first error is kept for [`Journal::error`].
    pub fn flush(&self) {
        let mut writing = self.writing.lock().unwrap();
        let buf = {
            let mut b = self.batch.lock().unwrap();
            b.files = 0;
            b.bytes = 0;
            b.oldest = None;
            std::mem::take(&mut b.buf)
        };
        if buf.is_empty() || writing.is_some() {
            return;
        }
        let res = self.sync_target().and_then(|()| {
            use std::io::Write;
            (&self.file).write_all(&buf)
        });
        if let Err(e) = res {
            *writing = Some(e);
        }
    }

    /// The first error writing the journal, if any.
    pub fn error(&self) -> Option<String> {
        self.writing.lock().unwrap().as_ref().map(|e| e.to_string())
    }

    fn sync_target(&self) -> io::Result<()> {
        // The target itself when it is a directory (it may be a mount of
        // its own), else its parent; a file target may not be readable.
        let dir = sys::cstring(&self.target)?;
        let fd = match sys::openat(libc::AT_FDCWD, &dir, crate::engine::DIR_FLAGS, 0) {
            Ok(fd) => fd,
            Err(_) => {
                let parent = self
                    .target
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let p = sys::cstring(parent)?;
                sys::openat(libc::AT_FDCWD, &p, crate::engine::DIR_FLAGS, 0)?
            }
        };
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(fd.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
