//! The parallel copy itself: the walk over directories here, regular files
//! in `file`, symlinks and special files in `entry`.

mod entry;
mod file;

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::attrs::{self, Identity, Links, Names, NotKept, Step, Tgt, XErr};
use crate::journal::{self, Journal};
use crate::pool::{self, Pool};
use crate::sys::{self, Node};
use crate::{Error, Options, Progress, Report};

use entry::{copy_entry, copy_special, copy_symlink};
use file::copy_file;

/// Files per task: big enough to amortise the queue lock, small enough that
/// a directory of a few hundred files still spreads over every worker.
const BATCH: usize = 32;
/// Bytes per copy_file_range call: bounds how stale the byte counter gets
/// and how long a cancel request waits on a big file.
const CHUNK: usize = 16 << 20;
const BUF_SIZE: usize = 1 << 20;
const MAX_FAILURES: usize = 10;
const MAX_NOTES: usize = 100;

pub(crate) const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;

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
    id: Identity,
    links: Links,
    not_kept: NotKept,
    /// What earlier runs of this operation completed, and where this run
    /// records what it completes; `None` copies everything.
    journal: Option<&'a Journal>,
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

/// A directory being copied. Its target gets its final owner, xattrs,
/// mode, ACLs and times only once `pending` drops to zero, i.e. after
/// everything inside is written (writing inside would change the mtime, a
/// read-only mode would stop the writes, and a default ACL would reach the
/// new entries instead of their own).
struct DirNode {
    src: OwnedFd,
    tgt: OwnedFd,
    src_path: PathBuf,
    tgt_path: PathBuf,
    /// The source's stat: mode, owner, times.
    st: libc::stat,
    /// The target's owner as created (or found).
    tgt_owner: (u32, u32),
    /// The owner the kernel gives new entries inside the target.
    fresh: (u32, u32),
    /// New entries in the target inherit ACLs (it has a default ACL).
    gives_acls: bool,
    /// One for the listing itself plus one per child task.
    pending: AtomicUsize,
    parent: Option<Arc<DirNode>>,
    /// The journal key of `tgt_path`, which its entries' keys extend.
    key: u64,
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

impl From<XErr> for Side {
    fn from(e: XErr) -> Side {
        match e {
            XErr::Src(e) => Side::Src(e),
            XErr::Tgt(e) => Side::Tgt(e),
        }
    }
}

/// Where one non-directory entry is copied from and to: directory fds and
/// names for the calls, full paths (built only when needed) for reports.
struct Entry<'a> {
    src_dir: RawFd,
    tgt_dir: RawFd,
    name: &'a CStr,
    tgt_name: &'a CStr,
    src_path: &'a dyn Fn() -> PathBuf,
    tgt_path: &'a dyn Fn() -> PathBuf,
    /// The owner a new entry gets in the target directory.
    fresh: (u32, u32),
    /// A new entry inherits ACLs from the target directory.
    gives_acls: bool,
    /// Inside a tree (hard links are grouped there only).
    in_tree: bool,
    /// The journal key of the target path.
    key: u64,
}

pub(crate) fn copy(
    source: &Path,
    target: &Path,
    opts: &Options,
    progress: &Progress,
    cancel: &AtomicBool,
    journal: Option<&Journal>,
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
        id: Identity::current(),
        links: Links::default(),
        not_kept: NotKept::default(),
        journal,
    };
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::Target {
        path: parent.to_path_buf(),
        error: e,
    })?;
    let csrc = sys::cstring(source).map_err(src_err)?;
    let ctgt = sys::cstring(target).map_err(tgt_err)?;
    let ft = meta.file_type();
    if ft.is_dir() {
        check_not_into_itself(source, target)?;
        let src = sys::openat(libc::AT_FDCWD, &csrc, DIR_FLAGS, 0).map_err(src_err)?;
        let st = sys::fstat(&src).map_err(src_err)?;
        let (tgt, tgt_st) = open_target_dir(libc::AT_FDCWD, &ctgt).map_err(tgt_err)?;
        let gives_acls = attrs::gives_acls(Node::Fd(&tgt));
        progress.add_dir();
        let root = Arc::new(DirNode {
            src,
            tgt,
            src_path: source.to_path_buf(),
            tgt_path: target.to_path_buf(),
            st,
            tgt_owner: (tgt_st.st_uid, tgt_st.st_gid),
            fresh: shared.id.fresh_owner(&tgt_st),
            gives_acls,
            pending: AtomicUsize::new(1),
            parent: None,
            key: journal::key_of(target),
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
    } else {
        let cparent = sys::cstring(parent).map_err(tgt_err)?;
        let parent_st = sys::fstatat(libc::AT_FDCWD, &cparent, 0).map_err(|e| Error::Target {
            path: parent.to_path_buf(),
            error: e,
        })?;
        let entry = Entry {
            src_dir: libc::AT_FDCWD,
            tgt_dir: libc::AT_FDCWD,
            name: &csrc,
            tgt_name: &ctgt,
            src_path: &|| source.to_path_buf(),
            tgt_path: &|| target.to_path_buf(),
            fresh: shared.id.fresh_owner(&parent_st),
            gives_acls: attrs::gives_acls(Node::Path(&cparent)),
            in_tree: false,
            key: journal::key_of(target),
        };
        let res = if ft.is_symlink() {
            copy_symlink(&shared, &entry).map(|()| progress.add_link())
        } else if ft.is_file() {
            let mut buf = Vec::new();
            copy_file(&shared, &mut buf, &entry).map(|copied| {
                if copied {
                    progress.add_file();
                }
            })
        } else {
            copy_special(&shared, &entry).map(drop)
        };
        res.map_err(|e| match e {
            Side::Src(e) => src_err(e),
            Side::Tgt(e) => tgt_err(e),
        })?;
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    if let Some(j) = journal {
        j.flush();
    }
    let mut notes = shared.notes.into_inner().unwrap();
    let extra = shared.skipped_notes.load(Ordering::Relaxed);
    if extra > 0 {
        notes.push(format!("{extra} more notes not shown"));
    }
    notes.extend(shared.not_kept.into_notes());
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

/// Creates (or, on a re-run, reuses) a target directory and opens it; its
/// stat says what owner it and its new entries have.
fn open_target_dir(parent: RawFd, name: &CStr) -> io::Result<(OwnedFd, libc::stat)> {
    // 0700 until the directory is finished: the final mode may forbid the
    // writes still to come.
    match sys::mkdirat(parent, name, 0o700) {
        Ok(()) => {
            let fd = sys::openat(parent, name, DIR_FLAGS, 0)?;
            let st = sys::fstat(&fd)?;
            Ok((fd, st))
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            let fd = sys::openat(parent, name, DIR_FLAGS, 0)?;
            // A previous run may have finished it read-only.
            let st = sys::fstat(&fd)?;
            if st.st_mode & 0o700 != 0o700 {
                sys::fchmod(&fd, (st.st_mode & 0o7777) | 0o700)?;
            }
            Ok((fd, st))
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
    let (tgt, tgt_st) = match open_target_dir(parent.tgt.as_raw_fd(), name) {
        Ok(v) => v,
        Err(e) => {
            shared.fail(&join(&parent.tgt_path, name), &e);
            return None;
        }
    };
    let gives_acls = attrs::gives_acls(Node::Fd(&tgt));
    shared.progress.add_dir();
    parent.pending.fetch_add(1, Ordering::Relaxed);
    Some(Arc::new(DirNode {
        src: src.0,
        tgt,
        src_path: join(&parent.src_path, name),
        tgt_path: join(&parent.tgt_path, name),
        st: src.1,
        tgt_owner: (tgt_st.st_uid, tgt_st.st_gid),
        fresh: shared.id.fresh_owner(&tgt_st),
        gives_acls,
        pending: AtomicUsize::new(1),
        parent: Some(parent.clone()),
        key: journal::child_key(parent.key, name.to_bytes()),
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
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
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
            match finish_dir(shared, &n) {
                Ok(()) => {}
                Err(Side::Src(e)) => shared.fail(&n.src_path, &e),
                Err(Side::Tgt(e)) => shared.fail(&n.tgt_path, &e),
            }
        }
        cur = n.parent.clone();
    }
}

/// A directory's metadata in `cp -a`'s order: owner, xattrs, mode, ACLs
/// (access and default), times.
fn finish_dir(shared: &Shared, n: &DirNode) -> Result<(), Side> {
    let tgt = Tgt::Fd(&n.tgt);
    shared
        .id
        .set_owner(tgt, &n.st, n.tgt_owner)
        .map_err(Side::Tgt)?;
    let names = Names::of(Node::Fd(&n.src)).map_err(Side::Src)?;
    let path = || n.tgt_path.clone();
    if !names.is_empty() {
        attrs::copy_xattrs(
            &names,
            Step::Plain,
            Node::Fd(&n.src),
            tgt,
            &shared.not_kept,
            &path,
        )?;
    }
    // Created under a default ACL (which it then has too): it ends with
    // the source's ACLs only.
    if n.gives_acls {
        attrs::drop_inherited(&names, tgt, true).map_err(Side::Tgt)?;
    }
    set_mode(&n.tgt, n.st.st_mode & 0o7777).map_err(Side::Tgt)?;
    if !names.is_empty() {
        attrs::copy_xattrs(
            &names,
            Step::Acls,
            Node::Fd(&n.src),
            tgt,
            &shared.not_kept,
            &path,
        )?;
    }
    sys::futimens(&n.tgt, &sys::times_of(&n.st)).map_err(Side::Tgt)
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
    fn add_resumed(&self, bytes: u64) {
        self.resumed_files.fetch_add(1, Ordering::Relaxed);
        self.resumed_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}
