//! The parallel copy itself.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::pool::{self, Pool};
use crate::sys;
use crate::{Error, Options, Progress, Report};

/// Files per task: big enough to amortise the queue lock, small enough that
/// a directory of a few hundred files still spreads over every worker.
const BATCH: usize = 32;
/// Bytes per copy_file_range call: bounds how stale the byte counter gets
/// and how long a cancel request waits on a big file.
const CHUNK: usize = 16 << 20;
const BUF_SIZE: usize = 1 << 20;
const MAX_FAILURES: usize = 10;
const MAX_NOTES: usize = 100;

const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;

struct Shared<'a> {
    progress: &'a Progress,
    cancel: &'a AtomicBool,
    umask: u32,
    /// Set once the kernel says copy_file_range does not exist at all, so
    /// later files go straight to read/write.
    no_cfr: AtomicBool,
    failure_count: AtomicU64,
    failures: Mutex<Vec<String>>,
    notes: Mutex<Vec<String>>,
    skipped_notes: AtomicU64,
}

impl Shared<'_> {
    fn fail(&self, path: &Path, err: &io::Error) {
        self.failure_count.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < MAX_FAILURES {
            f.push(format!("{}: {}", path.display(), err));
        }
    }

    fn note(&self, text: String) {
        let mut n = self.notes.lock().unwrap();
        if n.len() < MAX_NOTES {
            n.push(text);
        } else {
            self.skipped_notes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A directory being copied. Its target gets its final mode and times only
/// once `pending` drops to zero, i.e. after everything inside is written
/// (writing inside would change the mtime, and a read-only mode would stop
/// the writes).
struct DirNode {
    src: OwnedFd,
    tgt: OwnedFd,
    src_path: PathBuf,
    tgt_path: PathBuf,
    mode: u32,
    times: [libc::timespec; 2],
    /// One for the listing itself plus one per child task.
    pending: AtomicUsize,
    parent: Option<Arc<DirNode>>,
}

enum Task {
    /// Read a directory already entered (the root).
    List(Arc<DirNode>),
    Dir {
        parent: Arc<DirNode>,
        name: CString,
    },
    /// NUL-separated names with their d_type: one allocation per batch
    /// instead of one per file.
    Entries {
        dir: Arc<DirNode>,
        names: Vec<u8>,
        types: Vec<u8>,
    },
}

struct Scratch {
    buf: Vec<u8>,
    dents: Vec<u64>,
}

/// Which side of the copy an error happened on, so the report names the
/// path the failing call acted on (like cp does).
enum Side {
    Src(io::Error),
    Tgt(io::Error),
}

pub(crate) fn copy(
    source: &Path,
    target: &Path,
    opts: &Options,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Report, Error> {
    let src_err = |e| Error::Source {
        path: source.to_path_buf(),
        error: e,
    };
    let tgt_err = |e| Error::Target {
        path: target.to_path_buf(),
        error: e,
    };
    let meta = std::fs::symlink_metadata(source).map_err(src_err)?;
    let shared = Shared {
        progress,
        cancel,
        umask: sys::current_umask(),
        no_cfr: AtomicBool::new(false),
        failure_count: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        notes: Mutex::new(Vec::new()),
        skipped_notes: AtomicU64::new(0),
    };
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::Target {
            path: parent.to_path_buf(),
            error: e,
        })?;
    }
    let csrc = sys::cstring(source).map_err(src_err)?;
    let ctgt = sys::cstring(target).map_err(tgt_err)?;
    let ft = meta.file_type();
    if ft.is_dir() {
        check_not_into_itself(source, target)?;
        let src = sys::openat(libc::AT_FDCWD, &csrc, DIR_FLAGS, 0).map_err(src_err)?;
        let st = sys::fstat(&src).map_err(src_err)?;
        let tgt = open_target_dir(libc::AT_FDCWD, &ctgt).map_err(tgt_err)?;
        progress.add_dir();
        let root = Arc::new(DirNode {
            src,
            tgt,
            src_path: source.to_path_buf(),
            tgt_path: target.to_path_buf(),
            mode: st.st_mode & 0o7777,
            times: sys::times_of(&st),
            pending: AtomicUsize::new(1),
            parent: None,
        });
        let workers = if opts.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.workers
        };
        let initial = vec![Task::List(root)];
        pool::run(
            workers,
            initial,
            cancel,
            || Scratch {
                buf: Vec::new(),
                dents: vec![0u64; 4096],
            },
            |task, scratch, pool| run_task(&shared, task, scratch, pool),
        );
    } else if ft.is_symlink() {
        copy_symlink(&shared, libc::AT_FDCWD, &csrc, libc::AT_FDCWD, &ctgt).map_err(
            |e| match e {
                Side::Src(e) => src_err(e),
                Side::Tgt(e) => tgt_err(e),
            },
        )?;
        progress.add_link();
    } else if ft.is_file() {
        let mut buf = Vec::new();
        copy_file(
            &shared,
            &mut buf,
            libc::AT_FDCWD,
            &csrc,
            libc::AT_FDCWD,
            &ctgt,
        )
        .map_err(|e| match e {
            Side::Src(e) => src_err(e),
            Side::Tgt(e) => tgt_err(e),
        })?;
        progress.add_file();
    } else {
        shared.note(format!("skipped special file: {}", source.display()));
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let mut notes = shared.notes.into_inner().unwrap();
    let extra = shared.skipped_notes.load(Ordering::Relaxed);
    if extra > 0 {
        notes.push(format!("{extra} more notes not shown"));
    }
    Ok(Report {
        counts: progress.snapshot(),
        failure_count: shared.failure_count.load(Ordering::Relaxed),
        failures: shared.failures.into_inner().unwrap(),
        notes,
    })
}

/// cp refuses to copy a directory into itself; without this check the walk
/// would find the growing copy inside the source and recurse until paths
/// get too long.
fn check_not_into_itself(source: &Path, target: &Path) -> Result<(), Error> {
    let Ok(src) = source.canonicalize() else {
        return Ok(());
    };
    // The target may not exist yet: canonicalise its deepest existing
    // ancestor and append the rest.
    let mut existing = target.to_path_buf();
    let mut rest = Vec::new();
    let base = loop {
        if let Ok(c) = existing.canonicalize() {
            break c;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return Ok(()),
        }
    };
    let full = rest.iter().rev().fold(base, |p, n| p.join(n));
    if full.starts_with(&src) {
        return Err(Error::IntoItself {
            source_path: source.to_path_buf(),
            target: target.to_path_buf(),
        });
    }
    Ok(())
}

/// Creates (or, on a re-run, reuses) a target directory and opens it.
fn open_target_dir(parent: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    // 0700 until the directory is finished: the final mode may forbid the
    // writes still to come.
    match sys::mkdirat(parent, name, 0o700) {
        Ok(()) => sys::openat(parent, name, DIR_FLAGS, 0),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            let fd = sys::openat(parent, name, DIR_FLAGS, 0)?;
            // A previous run may have finished it read-only.
            let st = sys::fstat(&fd)?;
            if st.st_mode & 0o700 != 0o700 {
                sys::fchmod(&fd, (st.st_mode & 0o7777) | 0o700)?;
            }
            Ok(fd)
        }
        Err(e) => Err(e),
    }
}

fn join(base: &Path, name: &CStr) -> PathBuf {
    base.join(OsStr::from_bytes(name.to_bytes()))
}

fn run_task(shared: &Shared, task: Task, scratch: &mut Scratch, pool: &Pool<Task>) {
    match task {
        Task::Dir { parent, name } => {
            if !shared.cancel.load(Ordering::Relaxed) {
                if let Some(node) = enter_dir(shared, &parent, &name) {
                    list_dir(shared, node, scratch, pool);
                }
            }
            finish(shared, parent);
        }
        Task::List(node) => list_dir(shared, node, scratch, pool),
        Task::Entries { dir, names, types } => {
            let mut rest = &names[..];
            for &d_type in &types {
                let Ok(name) = CStr::from_bytes_until_nul(rest) else {
                    break;
                };
                rest = &rest[name.to_bytes().len() + 1..];
                if shared.cancel.load(Ordering::Relaxed) {
                    break;
                }
                copy_entry(shared, &dir, name, d_type, &mut scratch.buf);
            }
            finish(shared, dir);
        }
    }
}

fn enter_dir(shared: &Shared, parent: &Arc<DirNode>, name: &CStr) -> Option<Arc<DirNode>> {
    let src = match sys::openat(parent.src.as_raw_fd(), name, DIR_FLAGS, 0)
        .and_then(|fd| sys::fstat(&fd).map(|st| (fd, st)))
    {
        Ok(v) => v,
        Err(e) => {
            shared.fail(&join(&parent.src_path, name), &e);
            return None;
        }
    };
    let tgt = match open_target_dir(parent.tgt.as_raw_fd(), name) {
        Ok(fd) => fd,
        Err(e) => {
            shared.fail(&join(&parent.tgt_path, name), &e);
            return None;
        }
    };
    shared.progress.add_dir();
    parent.pending.fetch_add(1, Ordering::Relaxed);
    Some(Arc::new(DirNode {
        src: src.0,
        tgt,
        src_path: join(&parent.src_path, name),
        tgt_path: join(&parent.tgt_path, name),
        mode: src.1.st_mode & 0o7777,
        times: sys::times_of(&src.1),
        pending: AtomicUsize::new(1),
        parent: Some(parent.clone()),
    }))
}

/// Reads a directory and queues its children. Subdirectories are queued
/// before the file batches so that, LIFO, this directory's files are copied
/// first and it can be finished (and its descriptors closed) early.
fn list_dir(shared: &Shared, node: Arc<DirNode>, scratch: &mut Scratch, pool: &Pool<Task>) {
    let mut dirs = Vec::new();
    let mut batches = Vec::new();
    let mut names = Vec::new();
    let mut types = Vec::new();
    loop {
        let n = match sys::getdents(&node.src, &mut scratch.dents) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                shared.fail(&node.src_path, &e);
                break;
            }
        };
        for ent in sys::parse_dirents(&scratch.dents, n) {
            let mut d_type = ent.d_type;
            if d_type == libc::DT_UNKNOWN {
                d_type =
                    match sys::fstatat(node.src.as_raw_fd(), ent.name, libc::AT_SYMLINK_NOFOLLOW) {
                        Ok(st) => mode_to_dtype(st.st_mode),
                        Err(e) => {
                            shared.fail(&join(&node.src_path, ent.name), &e);
                            continue;
                        }
                    };
            }
            if d_type == libc::DT_DIR {
                dirs.push(ent.name.to_owned());
                continue;
            }
            names.extend_from_slice(ent.name.to_bytes_with_nul());
            types.push(d_type);
            if types.len() == BATCH {
                batches.push((std::mem::take(&mut names), std::mem::take(&mut types)));
            }
        }
    }
    if !types.is_empty() {
        batches.push((names, types));
    }
    node.pending
        .fetch_add(dirs.len() + batches.len(), Ordering::Relaxed);
    let subdirs = dirs.into_iter().map(|name| Task::Dir {
        parent: node.clone(),
        name,
    });
    let files = batches.into_iter().map(|(names, types)| Task::Entries {
        dir: node.clone(),
        names,
        types,
    });
    pool.push_all(subdirs.chain(files));
    finish(shared, node);
}

fn mode_to_dtype(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFREG => libc::DT_REG,
        libc::S_IFLNK => libc::DT_LNK,
        _ => libc::DT_UNKNOWN,
    }
}

/// Drops one pending unit of `node`; the last one finishes the directory
/// and walks up to finish parents that were only waiting for it.
fn finish(shared: &Shared, node: Arc<DirNode>) {
    let mut cur = Some(node);
    while let Some(n) = cur.take() {
        if n.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        // A cancelled copy is left as it is: nothing to polish.
        if !shared.cancel.load(Ordering::Relaxed) {
            if let Err(e) = set_mode(&n.tgt, n.mode).and_then(|()| sys::futimens(&n.tgt, &n.times))
            {
                shared.fail(&n.tgt_path, &e);
            }
        }
        cur = n.parent.clone();
    }
}

/// Setuid/setgid/sticky may be refused (EPERM) where the plain bits are not.
fn set_mode(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    match sys::fchmod(fd, mode) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && mode & 0o7000 != 0 => {
            sys::fchmod(fd, mode & 0o777)
        }
        other => other,
    }
}

fn copy_entry(shared: &Shared, dir: &DirNode, name: &CStr, d_type: u8, buf: &mut Vec<u8>) {
    let (src, tgt) = (dir.src.as_raw_fd(), dir.tgt.as_raw_fd());
    let res = match d_type {
        libc::DT_REG => {
            copy_file(shared, buf, src, name, tgt, name).map(|()| shared.progress.add_file())
        }
        libc::DT_LNK => {
            copy_symlink(shared, src, name, tgt, name).map(|()| shared.progress.add_link())
        }
        _ => {
            shared.note(format!(
                "skipped special file: {}",
                join(&dir.src_path, name).display()
            ));
            Ok(())
        }
    };
    match res {
        Ok(()) => {}
        Err(Side::Src(e)) => shared.fail(&join(&dir.src_path, name), &e),
        Err(Side::Tgt(e)) => shared.fail(&join(&dir.tgt_path, name), &e),
    }
}

fn copy_symlink(
    _shared: &Shared,
    src_dir: RawFd,
    src_name: &CStr,
    tgt_dir: RawFd,
    tgt_name: &CStr,
) -> Result<(), Side> {
    let st = sys::fstatat(src_dir, src_name, libc::AT_SYMLINK_NOFOLLOW).map_err(Side::Src)?;
    let link = sys::readlinkat(src_dir, src_name).map_err(Side::Src)?;
    match sys::symlinkat(&link, tgt_dir, tgt_name) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            // A re-run replaces what the previous run left.
            sys::unlinkat(tgt_dir, tgt_name, 0).map_err(Side::Tgt)?;
            sys::symlinkat(&link, tgt_dir, tgt_name).map_err(Side::Tgt)?;
        }
        other => other.map_err(Side::Tgt)?,
    }
    sys::utimensat_nofollow(tgt_dir, tgt_name, &sys::times_of(&st)).map_err(Side::Tgt)
}

fn copy_file(
    shared: &Shared,
    buf: &mut Vec<u8>,
    src_dir: RawFd,
    src_name: &CStr,
    tgt_dir: RawFd,
    tgt_name: &CStr,
) -> Result<(), Side> {
    let src =
        sys::openat(src_dir, src_name, libc::O_RDONLY | libc::O_NOFOLLOW, 0).map_err(Side::Src)?;
    let st = sys::fstat(&src).map_err(Side::Src)?;
    let mode = st.st_mode & 0o7777;
    let wr = libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW;
    // O_EXCL first: a fresh file gets its final mode from open itself and
    // needs no fchmod; only a re-run pays for the second open.
    let (tgt, existed) = match sys::openat(tgt_dir, tgt_name, wr | libc::O_EXCL, mode) {
        Ok(fd) => (fd, false),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            match sys::openat(tgt_dir, tgt_name, wr | libc::O_TRUNC, mode) {
                Ok(fd) => (fd, true),
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    // A symlink left where a file now is: replace it rather
                    // than write through it.
                    sys::unlinkat(tgt_dir, tgt_name, 0).map_err(Side::Tgt)?;
                    (
                        sys::openat(tgt_dir, tgt_name, wr | libc::O_EXCL, mode)
                            .map_err(Side::Tgt)?,
                        false,
                    )
                }
                Err(e) => return Err(Side::Tgt(e)),
            }
        }
        Err(e) => return Err(Side::Tgt(e)),
    };
    copy_data(shared, buf, &src, &tgt, &st)?;
    // Writing clears setuid/setgid for unprivileged writers, so those bits
    // are set after the data; the umask may also have stripped bits.
    if existed || mode & 0o7000 != 0 || mode & shared.umask != 0 {
        set_mode(&tgt, mode).map_err(Side::Tgt)?;
    }
    sys::futimens(&tgt, &sys::times_of(&st)).map_err(Side::Tgt)
}

fn copy_data(
    shared: &Shared,
    buf: &mut Vec<u8>,
    src: &OwnedFd,
    tgt: &OwnedFd,
    st: &libc::stat,
) -> Result<(), Side> {
    let size = st.st_size;
    if size <= 0 {
        return Ok(());
    }
    let sparse = (st.st_blocks as i128) * 512 < size as i128;
    if !sparse {
        // No SEEK_DATA probing for the common dense file: copy up to the
        // size seen by fstat (one call for a small file; a file growing
        // while being copied has no consistent content to preserve anyway).
        return copy_range(shared, buf, src, tgt, 0, size);
    }
    let mut off = 0i64;
    while off < size {
        let data = match sys::lseek(src, off, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            // No SEEK_DATA support: treat the rest as data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => off,
            Err(e) => return Err(Side::Src(e)),
        };
        if data >= size {
            break;
        }
        let hole = match sys::lseek(src, data, libc::SEEK_HOLE) {
            Ok(Some(h)) => h.min(size),
            Ok(None) => size,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => size,
            Err(e) => return Err(Side::Src(e)),
        };
        shared.progress.add_bytes((data - off) as u64);
        copy_range(shared, buf, src, tgt, data, hole)?;
        off = hole;
        if shared.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
    if off < size {
        shared.progress.add_bytes((size - off) as u64);
    }
    // Extends the file over a trailing hole.
    sys::ftruncate(tgt, size).map_err(Side::Tgt)
}

/// Copies bytes [start, end) at the same offsets; stops early at EOF.
fn copy_range(
    shared: &Shared,
    buf: &mut Vec<u8>,
    src: &OwnedFd,
    tgt: &OwnedFd,
    start: i64,
    end: i64,
) -> Result<(), Side> {
    let mut off = start;
    if !shared.no_cfr.load(Ordering::Relaxed) {
        while off < end {
            let (mut oi, mut oo) = (off, off);
            let len = ((end - off) as usize).min(CHUNK);
            match sys::copy_file_range(src, Some(&mut oi), tgt, Some(&mut oo), len) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    off += n as i64;
                    shared.progress.add_bytes(n as u64);
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::ENOSYS) => {
                        shared.no_cfr.store(true, Ordering::Relaxed);
                        break;
                    }
                    Some(libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL) => break,
                    // Which side failed is not knowable from the error:
                    // out-of-space and quota are the likely ones, both target.
                    _ => return Err(Side::Tgt(e)),
                },
            }
            if shared.cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
        if off >= end {
            return Ok(());
        }
    }
    if buf.is_empty() {
        buf.resize(BUF_SIZE, 0);
    }
    while off < end {
        let len = ((end - off) as usize).min(buf.len());
        let n = sys::pread(src, &mut buf[..len], off).map_err(Side::Src)?;
        if n == 0 {
            return Ok(());
        }
        sys::pwrite_all(tgt, &buf[..n], off).map_err(Side::Tgt)?;
        off += n as i64;
        shared.progress.add_bytes(n as u64);
        if shared.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
    Ok(())
}

impl Progress {
    fn add_dir(&self) {
        self.directories.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(1, Ordering::Relaxed);
    }
    fn add_file(&self) {
        self.files.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(1, Ordering::Relaxed);
    }
    fn add_link(&self) {
        self.links.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(1, Ordering::Relaxed);
    }
    fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
}
