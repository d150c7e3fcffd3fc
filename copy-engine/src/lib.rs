//! Copy engine: the native engine of the agent's built-in `default` profile.
//!
//! `cp -a` semantics: data (holes kept), owner (as far as the caller may
//! give it), xattrs of every namespace the caller can read and write, POSIX
//! ACLs, modes and times, symlinks as symlinks, hard-link groups inside the
//! tree as one inode, FIFOs and sockets recreated, device nodes where the
//! caller may create them (else skipped with a note). What the destination
//! cannot hold (ENOTSUP) is a note, not a failure; one failing file does
//! not stop the others. The caller runs it with the requesting user's
//! credentials already in place, so the kernel is the one enforcing
//! permissions.
//!
//! The agent runs [`run_worker`] in a child process and reads
//! [`WorkerEvent`]s, one JSON object a line, from its stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use journal::Journal;

mod attrs;
mod engine;
mod journal;
mod pool;
mod scan;
mod sys;

/// Why a copy could not be done at all. Per-file problems are not errors:
/// they are counted in [`Report`].
///
/// Display carries the whole story (path and OS error text), because the
/// worker sends it as one line to the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read source {}: {error}", path.display())]
    Source {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot create target {}: {error}", path.display())]
    Target {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot copy directory {} into itself ({})", source_path.display(), target.display())]
    IntoItself {
        source_path: PathBuf,
        target: PathBuf,
    },
    #[error("cancelled")]
    Cancelled,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Worker threads; 0 means one per CPU.
    pub workers: usize,
}

/// Counters as sent to the agent.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub items: u64,
    pub directories: u64,
    pub files: u64,
    pub links: u64,
    pub bytes: u64,
    /// Files (and their bytes) an earlier run of the same operation had
    /// completed, found intact and not copied again; not part of the counts
    /// above, so `bytes` is what this run wrote.
    #[serde(default)]
    pub resumed_files: u64,
    #[serde(default)]
    pub resumed_bytes: u64,
}

/// Live counters, updated by the workers while they copy. `items` is
/// directories + files + links copied; `bytes` counts file bytes done,
/// holes included, so it ends at the pre-scan's `total_bytes`.
#[derive(Debug, Default)]
pub struct Progress {
    pub items: AtomicU64,
    pub directories: AtomicU64,
    pub files: AtomicU64,
    pub links: AtomicU64,
    pub bytes: AtomicU64,
    pub resumed_files: AtomicU64,
    pub resumed_bytes: AtomicU64,
}

impl Progress {
    pub fn snapshot(&self) -> Counts {
        Counts {
            items: self.items.load(Ordering::Relaxed),
            directories: self.directories.load(Ordering::Relaxed),
            files: self.files.load(Ordering::Relaxed),
            links: self.links.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            resumed_files: self.resumed_files.load(Ordering::Relaxed),
            resumed_bytes: self.resumed_bytes.load(Ordering::Relaxed),
        }
    }
}

/// What the pre-scan found: what a complete copy will count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanTotals {
    pub total_bytes: u64,
    /// Directories, regular files (each name of a hard link) and symlinks;
    /// FIFOs, sockets and device nodes are copied but not counted.
    pub total_items: u64,
}

/// The outcome of a copy that ran to its end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub counts: Counts,
    pub failure_count: u64,
    /// The first 10 failures, as `"<path>: <error text>"`.
    pub failures: Vec<String>,
    /// Informational lines, such as `skipped device node (...): <path>` or
    /// `not kept (the destination does not support them): ACLs of 3
    /// entries, first <path>`.
    pub notes: Vec<String>,
}

/// One line of the worker's stdout.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    Scan {
        total_bytes: u64,
        total_items: u64,
    },
    Progress(Counts),
    Done {
        counts: Counts,
        failure_count: u64,
        failures: Vec<String>,
        notes: Vec<String>,
    },
    Fatal {
        message: String,
    },
}

/// The `cp -r` rule: into an existing directory (symlinks followed) the copy
/// lands at `destination/<basename of source>`, otherwise at `destination`.
pub fn resolve_destination(source: &Path, destination: &Path) -> PathBuf {
    if !destination.is_dir() {
        return destination.to_path_buf();
    }
    // `file_name` is None for `..` or `/`; the real name is what cp uses.
    let name = source.file_name().map(|n| n.to_os_string()).or_else(|| {
        source
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_os_string()))
    });
    match name {
        Some(n) => destination.join(n),
        None => destination.to_path_buf(),
    }
}

/// Counts what a copy of `source` will handle. A missing or unreadable
/// source is an error.
pub fn prescan(source: &Path, opts: &Options, cancel: &AtomicBool) -> Result<ScanTotals, Error> {
    scan::prescan(source, worker_count(opts), cancel)
}

/// Copies `source` to exactly `target` (call [`resolve_destination`] first
/// for the `cp -r` rule). Creates missing parents of `target`; copies into
/// an existing target directory, overwriting files.
pub fn copy(
    source: &Path,
    target: &Path,
    opts: &Options,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Report, Error> {
    copy_resuming(source, target, opts, progress, cancel, None)
}

/// [`copy`] that skips what an earlier run recorded in `journal` as
/// complete and records what this run completes.
pub fn copy_resuming(
    source: &Path,
    target: &Path,
    opts: &Options,
    progress: &Progress,
    cancel: &AtomicBool,
    journal: Option<&Journal>,
) -> Result<Report, Error> {
    let opts = Options {
        workers: worker_count(opts),
    };
    engine::copy(source, target, &opts, progress, cancel, journal)
}

fn worker_count(opts: &Options) -> usize {
    if opts.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.workers
    }
}

fn emit(out: &mut impl Write, ev: &WorkerEvent) {
    // A vanished reader (EPIPE) is not ours to handle: the agent that
    // wanted these lines is gone and will kill the group.
    if let Ok(line) = serde_json::to_string(ev) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Entry point of the agent's hidden worker subcommand; returns the exit
/// code: 0 done without failures, 1 done with failures, 2 fatal.
///
/// `journal_fd`, when given, is an inherited descriptor of the operation's
/// resume journal (open for reading and appending): the worker skips what
/// earlier runs recorded there and records what it completes.
pub fn run_worker(
    source: &Path,
    target: &Path,
    workers: usize,
    interval: Duration,
    journal_fd: Option<i32>,
) -> i32 {
    let mut out = std::io::stdout().lock();
    // Without its journal the copy still runs, only from the start.
    let mut notes = Vec::new();
    let journal = match journal_fd.map(|fd| open_journal(fd, target)).transpose() {
        Ok(j) => j,
        Err(e) => {
            notes.push(format!(
                "cannot read the resume journal ({e}): copied everything"
            ));
            None
        }
    };
    run_worker_inner(
        &mut out,
        source,
        target,
        workers,
        interval,
        journal.as_ref(),
        notes,
    )
}

fn open_journal(fd: i32, target: &Path) -> std::io::Result<Journal> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only asks whether the number is an open descriptor.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an open descriptor handed to this process for it alone.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    Journal::open(file, target)
}

/// [`run_worker`] writing to any sink, for tests.
pub fn run_worker_to(
    out: &mut impl Write,
    source: &Path,
    target: &Path,
    workers: usize,
    interval: Duration,
) -> i32 {
    run_worker_with(out, source, target, workers, interval, None)
}

/// [`run_worker_to`] with a resume journal.
pub fn run_worker_with(
    out: &mut impl Write,
    source: &Path,
    target: &Path,
    workers: usize,
    interval: Duration,
    journal: Option<&Journal>,
) -> i32 {
    run_worker_inner(out, source, target, workers, interval, journal, Vec::new())
}

fn run_worker_inner(
    out: &mut impl Write,
    source: &Path,
    target: &Path,
    workers: usize,
    interval: Duration,
    journal: Option<&Journal>,
    mut notes: Vec<String>,
) -> i32 {
    let opts = Options { workers };
    // SIGTERM ends the process; nothing here ever needs to set this.
    let cancel = AtomicBool::new(false);
    let totals = match prescan(source, &opts, &cancel) {
        Ok(t) => t,
        Err(e) => {
            emit(
                out,
                &WorkerEvent::Fatal {
                    message: e.to_string(),
                },
            );
            return 2;
        }
    };
    emit(
        out,
        &WorkerEvent::Scan {
            total_bytes: totals.total_bytes,
            total_items: totals.total_items,
        },
    );
    let progress = Progress::default();
    let result = std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<()>();
        let copier = s.spawn(|| {
            let r = copy_resuming(source, target, &opts, &progress, &cancel, journal);
            drop(tx);
            r
        });
        // The channel closing is the end signal; the timeout is the tick.
        while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
            // Files finish in bursts: the last few of a burst must not
            // wait for the next burst to reach the journal.
            if let Some(j) = journal {
                j.flush_if_due();
            }
            emit(out, &WorkerEvent::Progress(progress.snapshot()));
        }
        copier.join().expect("copy thread panicked")
    });
    match result {
        Ok(r) => {
            let code = i32::from(r.failure_count > 0);
            notes.extend(r.notes);
            if let Some(e) = journal.and_then(Journal::error) {
                notes.push(format!(
                    "the resume journal could not be written ({e}): a re-run after a crash would copy everything again"
                ));
            }
            emit(
                out,
                &WorkerEvent::Done {
                    counts: r.counts,
                    failure_count: r.failure_count,
                    failures: r.failures,
                    notes,
                },
            );
            code
        }
        Err(e) => {
            emit(
                out,
                &WorkerEvent::Fatal {
                    message: e.to_string(),
                },
            );
            2
        }
    }
}
