//! A control filesystem over FUSE.
//!
//! The application builds a tree of directories and small files; each file is
//! a [`FileOps`] handler. The library does the FUSE side the way control files
//! (sysfs, configfs, Plan 9 `ctl`) behave:
//!
//! - a read at offset 0 takes a fresh snapshot from the handler; later offsets
//!   continue that snapshot, so content is never torn;
//! - a write to a [`FileKind::Command`] file is one whole request, answered by
//!   the handler (now or later, from any thread): its errno becomes the
//!   `write(2)` result, and its reply is served to reads at the offsets that
//!   follow the written bytes;
//! - a [`FileKind::Blocking`] file's read waits until the handler has content,
//!   without blocking the dispatch loop, and ends with `EINTR` as soon as the
//!   kernel interrupts it (the caller got a signal);
//! - a write answered later ends with `EINTR` as soon as the kernel
//!   interrupts it, unless its handler already [claimed](WriteDone::claim) it
//!   to commit its effect, so a writer is never stuck unkillably;
//! - `poll` reports a [`FileKind::Snapshot`] file readable once its generation
//!   changed since the descriptor's last read at offset 0, and a blocking file
//!   once its content is ready;
//! - nodes carry uid/gid/mode; a private node is visible only to its owner and
//!   root, so a directory's listing depends on the caller.
//!
//! Kernel-facing notifications (poll wake-ups, entry invalidation) are sent
//! from one notifier thread, never from a FUSE callback, because they are
//! synchronous writes into the kernel that can deadlock against a callback.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

pub use fuser::Errno;
use fuser::{
    BackgroundSession, Config, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo,
    MountOption, Notifier, OpenFlags, PollEvents, PollFlags, PollNotifier, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyPoll, ReplyWrite, Request, RequestId,
    SessionACL, TimeOrNow,
};

/// How long the kernel may cache entries and attributes. Nodes never change
/// owner or mode and every removal is invalidated explicitly (rmdir by the
/// kernel itself), so the cache can be long: it saves a lookup per path
/// component on every open.
const TTL: Duration = Duration::from_secs(60);

/// The identity of the process behind a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The calling thread's id (a pid for single-threaded callers).
    pub pid: u32,
}

impl Caller {
    fn of(req: &Request) -> Self {
        Caller {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// A node's identity: its inode number. Never reused while mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u64);

impl NodeId {
    pub const ROOT: NodeId = NodeId(1);
}

/// What a read at offset 0 produces.
#[derive(Debug)]
pub enum Content {
    Ready(Vec<u8>),
    /// Only for [`FileKind::Blocking`]: the read waits (or fails with
    /// `EAGAIN` under `O_NONBLOCK`) until [`ControlFs::changed`] is called for
    /// the node and the handler has content.
    NotReady,
}

/// How a file behaves towards reads, writes and poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Read-only snapshot; `poll` fires when the handler's generation changed
    /// since this descriptor last read at offset 0.
    Snapshot,
    /// Like a snapshot, but a read blocks until the handler has content.
    Blocking,
    /// Every write is a whole command; reads return the reply to the last
    /// write on the same descriptor, at the offsets that follow it.
    Command,
}

/// A file's handler.
pub trait FileOps: Send + Sync + 'static {
    /// The content of a fresh snapshot.
    fn read(&self, caller: &Caller) -> Result<Content, Errno> {
        let _ = caller;
        Ok(Content::Ready(Vec::new()))
    }

    /// One whole write. Answer through `done`, now or later.
    fn write(&self, caller: &Caller, data: &[u8], done: WriteDone) {
        let _ = (caller, data);
        done.finish(Err(Errno::EACCES), Vec::new());
    }

    /// Changes whenever something a poller waits for changes.
    fn generation(&self) -> u64 {
        0
    }
}

/// Called by the library for `rmdir` of a visible node. On `Ok` the library
/// removes the node.
pub type RmdirHook = dyn Fn(&Caller, NodeId, &str) -> Result<(), Errno> + Send + Sync;

/// Ownership and permission bits of a node.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub perm: u16,
    /// Listed only to `uid` and root, and looked up only for them. The kernel
    /// shares its entry cache between callers, so once `uid` or root has
    /// looked the node up, another caller may find the cached entry for up to
    /// the cache lifetime: the mode bits (checked by the kernel and again by
    /// the handlers) then refuse it with EACCES instead of ENOENT. Caching
    /// saves a lookup on every open, which is most of a status read's cost.
    pub private: bool,
}

impl Owner {
    pub fn root(perm: u16) -> Self {
        Owner {
            uid: 0,
            gid: 0,
            perm,
            private: false,
        }
    }
}

enum NodeKind {
    Dir(BTreeMap<Box<str>, NodeId>),
    File(Arc<dyn FileOps>, FileKind),
}

struct Node {
    parent: NodeId,
    name: Box<str>,
    owner: Owner,
    created: SystemTime,
    kind: NodeKind,
}

struct Handle {
    node: NodeId,
    ops: Option<(Arc<dyn FileOps>, FileKind)>,
    nonblock: bool,
    snapshot: Option<Arc<[u8]>>,
    generation_at_read: u64,
    /// End offset of the last write and the reply served after it.
    write_reply: Option<(u64, Vec<u8>)>,
    poll: Option<PollNotifier>,
}

/// One entry of a directory listing taken at `opendir`.
type DirEntry = (NodeId, FileType, Box<str>);

struct PendingRead {
    node: NodeId,
    fh: u64,
    caller: Caller,
    offset: u64,
    size: u32,
    reply: ReplyData,
}

enum Notice {
    Changed(NodeId),
    Invalidate(NodeId, Box<str>),
    Stop,
}

struct Inner {
    nodes: RwLock<HashMap<NodeId, Node>>,
    handles: Mutex<HashMap<u64, Handle>>,
    dir_listings: Mutex<HashMap<u64, Vec<DirEntry>>>,
    pending: Mutex<HashMap<u64, PendingRead>>,
    /// Writes not answered yet, by request id. Lock order: `pending`, then
    /// `pending_writes`, then `early_interrupts`.
    pending_writes: Mutex<HashMap<u64, Arc<WriteSlot>>>,
    /// Interrupts that arrived before their read or write was registered
    /// (another dispatch thread may still be handling it), by request id.
    early_interrupts: Mutex<HashMap<u64, Instant>>,
    interrupts: AtomicU64,
    next_ino: AtomicU64,
    next_fh: AtomicU64,
    rmdir_hook: OnceLock<Box<RmdirHook>>,
    notices: Mutex<mpsc::Sender<Notice>>,
    notices_rx: Mutex<Option<mpsc::Receiver<Notice>>>,
    notifier: OnceLock<Notifier>,
}

/// The control filesystem. Cheap to clone; all clones share one tree.
#[derive(Clone)]
pub struct ControlFs {
    inner: Arc<Inner>,
}

impl ControlFs {
    /// A tree holding only its root directory.
    pub fn new(root: Owner) -> Self {
        let (tx, rx) = mpsc::channel();
        let mut nodes = HashMap::new();
        nodes.insert(
            NodeId::ROOT,
            Node {
                parent: NodeId::ROOT,
                name: "".into(),
                owner: root,
                created: SystemTime::now(),
                kind: NodeKind::Dir(BTreeMap::new()),
            },
        );
        ControlFs {
            inner: Arc::new(Inner {
                nodes: RwLock::new(nodes),
                handles: Mutex::new(HashMap::new()),
                dir_listings: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
                pending_writes: Mutex::new(HashMap::new()),
                early_interrupts: Mutex::new(HashMap::new()),
                interrupts: AtomicU64::new(0),
                next_ino: AtomicU64::new(2),
                next_fh: AtomicU64::new(1),
                rmdir_hook: OnceLock::new(),
                notices: Mutex::new(tx),
                notices_rx: Mutex::new(Some(rx)),
                notifier: OnceLock::new(),
            }),
        }
    }

    /// Installs the handler for `rmdir`. Without one, `rmdir` fails with EPERM.
    pub fn set_rmdir_hook(&self, hook: Box<RmdirHook>) {
        let _ = self.inner.rmdir_hook.set(hook);
    }

    /// Adds a directory. Fails with EEXIST if the name is taken.
    pub fn add_dir(&self, parent: NodeId, name: &str, owner: Owner) -> Result<NodeId, Errno> {
        self.inner
            .add(parent, name, owner, NodeKind::Dir(BTreeMap::new()))
    }

    /// Adds a file served by `ops`.
    pub fn add_file(
        &self,
        parent: NodeId,
        name: &str,
        owner: Owner,
        kind: FileKind,
        ops: Arc<dyn FileOps>,
    ) -> Result<NodeId, Errno> {
        self.inner
            .add(parent, name, owner, NodeKind::File(ops, kind))
    }

    /// Removes a node and everything below it, and has the kernel forget its
    /// entry. Readers blocked on removed files are re-evaluated (their handler
    /// decides what they get), so none stays blocked.
    pub fn remove(&self, node: NodeId) {
        if let Some((parent, name, files)) = self.inner.detach(node) {
            for file in files {
                self.inner.notice(Notice::Changed(file));
            }
            self.inner.notice(Notice::Invalidate(parent, name));
        }
    }

    /// Like [`remove`](Self::remove), but the kernel has forgotten the entry
    /// when this returns, so no caller can see the node afterwards. The
    /// invalidation is a synchronous write into the kernel that takes the
    /// parent directory's lock: never call this from a FUSE callback.
    pub fn remove_now(&self, node: NodeId) {
        if let Some((parent, name, files)) = self.inner.detach(node) {
            for file in files {
                self.inner.notice(Notice::Changed(file));
            }
            match self.inner.notifier.get() {
                Some(notifier) => {
                    let _ = notifier.inval_entry(INodeNo(parent.0), OsStr::new(&*name));
                }
                None => self.inner.notice(Notice::Invalidate(parent, name)),
            }
        }
    }

    /// Finds a child by name, whoever may see it.
    pub fn child(&self, parent: NodeId, name: &str) -> Option<NodeId> {
        let nodes = self.inner.nodes.read().unwrap();
        match &nodes.get(&parent)?.kind {
            NodeKind::Dir(children) => children.get(name).copied(),
            NodeKind::File(..) => None,
        }
    }

    /// Tells the library that the files of `node` (a file, or every file
    /// directly in a directory) may have new content: wakes pollers whose
    /// condition now holds and completes blocked reads that can complete.
    pub fn changed(&self, node: NodeId) {
        self.inner.notice(Notice::Changed(node));
    }

    /// Number of reads currently blocked (for tests and metrics).
    pub fn blocked_reads(&self) -> usize {
        self.inner.pending.lock().unwrap().len()
    }

    /// Number of writes not answered yet (for tests and metrics).
    pub fn pending_writes(&self) -> usize {
        self.inner.pending_writes.lock().unwrap().len()
    }

    /// Number of interrupts the kernel sent, answered or moot (for tests and
    /// metrics).
    pub fn interrupts(&self) -> u64 {
        self.inner.interrupts.load(Ordering::SeqCst)
    }

    /// Mounts the tree at `mountpoint`, serving it from a background thread
    /// until [`Mounted::unmount`] or drop.
    pub fn mount(&self, mountpoint: &Path, fsname: &str) -> io::Result<Mounted> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(fsname.to_string()),
            MountOption::Subtype(fsname.to_string()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        config.acl = SessionACL::All;
        // Several dispatch threads, so that a slow handler (a request that
        // waits on the disk) never stalls every other caller.
        config.n_threads = Some(4);
        let session = fuser::Session::new(
            Adapter {
                inner: self.inner.clone(),
            },
            mountpoint,
            &config,
        )?;
        let _ = self.inner.notifier.set(session.notifier());
        let rx = self
            .inner
            .notices_rx
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| io::Error::other("the control filesystem is already mounted"))?;
        let inner = self.inner.clone();
        let notifier_thread = std::thread::Builder::new()
            .name("fuse-ctl-notify".into())
            .spawn(move || inner.notify_loop(rx))?;
        let session = session.spawn()?;
        Ok(Mounted {
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
            notifier_thread: Some(notifier_thread),
            inner: self.inner.clone(),
        })
    }
}

/// A mounted control filesystem. Dropping it unmounts.
pub struct Mounted {
    mountpoint: std::path::PathBuf,
    session: Option<BackgroundSession>,
    notifier_thread: Option<std::thread::JoinHandle<()>>,
    inner: Arc<Inner>,
}

impl Mounted {
    /// Unmounts and waits for the serving threads to end. If a caller still
    /// holds a descriptor (EBUSY), aborts the connection and detaches the
    /// mount instead; the serving threads then end on their own.
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        // Blocked readers get EINTR rather than the EIO of a dropped reply.
        let pending: Vec<PendingRead> = self
            .inner
            .pending
            .lock()
            .unwrap()
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in pending {
            p.reply.error(Errno::EINTR);
        }
        // Unclaimed writes alike; a claimed one is being committed and gets
        // its handler's answer (or the aborted connection's).
        let writes: Vec<Arc<WriteSlot>> = self
            .inner
            .pending_writes
            .lock()
            .unwrap()
            .drain()
            .map(|(_, w)| w)
            .collect();
        for w in writes {
            w.interrupt();
        }
        self.inner.notice(Notice::Stop);
        let result = match self.session.take() {
            Some(session) => match session.umount_and_join() {
                // Busy: a caller still holds a descriptor (the readers just
                // answered EINTR have not closed theirs yet, or retry). Abort
                // the connection (MNT_FORCE: every request now fails with
                // ENOTCONN, and the serving threads end) and detach it.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    umount(&self.mountpoint, libc::MNT_FORCE | libc::MNT_DETACH)
                }
                result => result,
            },
            None => Ok(()),
        };
        if let Some(thread) = self.notifier_thread.take() {
            let _ = thread.join();
        }
        result
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn umount(mountpoint: &Path, flags: libc::c_int) -> io::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `path` is a valid NUL-terminated string for the call.
    if unsafe { libc::umount2(path.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches a stale FUSE mount left by a crashed daemon: one whose server is
/// gone (ENOTCONN). Returns whether one was cleaned.
pub fn clean_stale_mount(mountpoint: &Path) -> io::Result<bool> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // statfs always asks the server; `stat` may be answered from the
    // attribute cache for a while after the server died.
    // SAFETY: `path` is NUL-terminated and `buf` is a writable statfs.
    let rc = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut buf)
    };
    if rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOTCONN) {
        return Ok(false);
    }
    umount(mountpoint, libc::MNT_DETACH)?;
    Ok(true)
}

/// Where a write's answer stands. The reply moves out when it is sent.
enum WriteState {
    /// Nobody answered or claimed it: an interrupt answers it with EINTR.
    Open(ReplyWrite),
    /// The handler commits its effect: only `finish` (or drop) answers it.
    Claimed(ReplyWrite),
    /// The kernel interrupted it and the writer got EINTR.
    Interrupted,
    /// `finish` or drop answered it.
    Answered,
}

/// A write's reply, shared by its [`WriteDone`] and the pending table the
/// interrupt handler looks it up in.
struct WriteSlot {
    state: Mutex<WriteState>,
    interrupted: AtomicBool,
}

impl WriteSlot {
    /// Answers EINTR unless claimed or answered; returns whether it did.
    fn interrupt(&self) -> bool {
        let mut state = self.state.lock().unwrap();
        if !matches!(*state, WriteState::Open(_)) {
            return false;
        }
        let WriteState::Open(reply) = std::mem::replace(&mut *state, WriteState::Interrupted)
        else {
            unreachable!("checked above")
        };
        self.interrupted.store(true, Ordering::SeqCst);
        reply.error(Errno::EINTR);
        true
    }
}

/// Answers one write. Dropping it unanswered fails the write with EIO.
///
/// The kernel may interrupt the write at any time until it is claimed or
/// finished (the writer got a signal): the writer then gets EINTR at once and
/// the handler must not commit the write's effect. A handler that commits
/// something calls [`claim`](Self::claim) first and abandons the work when it
/// returns `false`.
pub struct WriteDone {
    inner: Arc<Inner>,
    unique: u64,
    fh: u64,
    offset: u64,
    len: u32,
    caller: Caller,
    slot: Arc<WriteSlot>,
}

impl WriteDone {
    /// Claims the reply for committing the write's effect. `false` when the
    /// kernel interrupted the write first (the writer already got EINTR):
    /// the caller must then abandon the work. After `true`, an interrupt no
    /// longer answers the write; `finish` does.
    pub fn claim(&self) -> bool {
        let mut state = self.slot.state.lock().unwrap();
        match std::mem::replace(&mut *state, WriteState::Answered) {
            WriteState::Open(reply) | WriteState::Claimed(reply) => {
                *state = WriteState::Claimed(reply);
                true
            }
            other => {
                *state = other;
                false
            }
        }
    }

    /// Whether the write was interrupted (cheap; for long work to give up early).
    pub fn is_interrupted(&self) -> bool {
        self.slot.interrupted.load(Ordering::SeqCst)
    }

    /// Who wrote.
    pub fn caller(&self) -> Caller {
        self.caller
    }

    /// Completes the write: `result` becomes the `write(2)` outcome and
    /// `reply_text` what reads after the written bytes return. Claims the
    /// write first if the handler did not; after an interrupt it records and
    /// answers nothing (the writer already got EINTR).
    pub fn finish(self, result: Result<(), Errno>, reply_text: Vec<u8>) {
        let reply = {
            let mut state = self.slot.state.lock().unwrap();
            match std::mem::replace(&mut *state, WriteState::Answered) {
                WriteState::Open(reply) | WriteState::Claimed(reply) => reply,
                other => {
                    *state = other;
                    return;
                }
            }
        };
        // A failed write leaves the file offset where the write started, so
        // that is where its reply begins.
        let reply_at = match result {
            Ok(()) => self.offset + u64::from(self.len),
            Err(_) => self.offset,
        };
        if let Some(handle) = self.inner.handles.lock().unwrap().get_mut(&self.fh) {
            handle.write_reply = Some((reply_at, reply_text));
        }
        match result {
            Ok(()) => reply.written(self.len),
            Err(errno) => reply.error(errno),
        }
    }
}

impl Drop for WriteDone {
    fn drop(&mut self) {
        self.inner
            .pending_writes
            .lock()
            .unwrap()
            .remove(&self.unique);
        let mut state = self.slot.state.lock().unwrap();
        if let WriteState::Open(reply) | WriteState::Claimed(reply) =
            std::mem::replace(&mut *state, WriteState::Answered)
        {
            reply.error(Errno::EIO);
        }
    }
}

impl Inner {
    fn notice(&self, notice: Notice) {
        let _ = self.notices.lock().unwrap().send(notice);
    }

    fn add(
        &self,
        parent: NodeId,
        name: &str,
        owner: Owner,
        kind: NodeKind,
    ) -> Result<NodeId, Errno> {
        let mut nodes = self.nodes.write().unwrap();
        let id = NodeId(self.next_ino.fetch_add(1, Ordering::Relaxed));
        match nodes.get_mut(&parent).map(|n| &mut n.kind) {
            Some(NodeKind::Dir(children)) => {
                if children.contains_key(name) {
                    return Err(Errno::EEXIST);
                }
                children.insert(name.into(), id);
            }
            Some(NodeKind::File(..)) => return Err(Errno::ENOTDIR),
            None => return Err(Errno::ENOENT),
        }
        nodes.insert(
            id,
            Node {
                parent,
                name: name.into(),
                owner,
                created: SystemTime::now(),
                kind,
            },
        );
        Ok(id)
    }

    /// Unlinks `node` and drops its subtree; returns its parent, name and the
    /// file nodes that went away.
    fn detach(&self, node: NodeId) -> Option<(NodeId, Box<str>, Vec<NodeId>)> {
        if node == NodeId::ROOT {
            return None;
        }
        let mut nodes = self.nodes.write().unwrap();
        let removed = nodes.remove(&node)?;
        if let Some(NodeKind::Dir(children)) = nodes.get_mut(&removed.parent).map(|n| &mut n.kind) {
            children.remove(&removed.name);
        }
        let mut files = Vec::new();
        let mut stack = vec![(node, removed.kind)];
        while let Some((id, kind)) = stack.pop() {
            match kind {
                NodeKind::Dir(children) => {
                    for child in children.values() {
                        if let Some(n) = nodes.remove(child) {
                            stack.push((*child, n.kind));
                        }
                    }
                }
                NodeKind::File(..) => files.push(id),
            }
        }
        Some((removed.parent, removed.name, files))
    }

    fn attr(&self, id: NodeId, node: &Node) -> FileAttr {
        let (kind, nlink, perm) = match node.kind {
            NodeKind::Dir(_) => (FileType::Directory, 2, node.owner.perm),
            NodeKind::File(..) => (FileType::RegularFile, 1, node.owner.perm),
        };
        FileAttr {
            ino: INodeNo(id.0),
            size: 0,
            blocks: 0,
            atime: node.created,
            mtime: node.created,
            ctime: node.created,
            crtime: node.created,
            kind,
            perm,
            nlink,
            uid: node.owner.uid,
            gid: node.owner.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn visible(node: &Node, caller: &Caller) -> bool {
        !node.owner.private || caller.is_root() || caller.uid == node.owner.uid
    }

    fn notify_loop(&self, rx: mpsc::Receiver<Notice>) {
        while let Ok(notice) = rx.recv() {
            match notice {
                Notice::Changed(node) => self.on_changed(node),
                Notice::Invalidate(parent, name) => {
                    if let Some(notifier) = self.notifier.get() {
                        // ENOENT only means the kernel had nothing cached.
                        let _ = notifier.inval_entry(INodeNo(parent.0), OsStr::new(&*name));
                    }
                }
                Notice::Stop => break,
            }
        }
    }

    /// The file nodes a change notice for `node` concerns.
    fn files_of(&self, node: NodeId) -> Vec<NodeId> {
        let nodes = self.nodes.read().unwrap();
        match nodes.get(&node).map(|n| &n.kind) {
            Some(NodeKind::Dir(children)) => children.values().copied().collect(),
            _ => vec![node],
        }
    }

    fn on_changed(&self, node: NodeId) {
        let files = self.files_of(node);
        self.complete_blocked_reads(&files);
        let ready: Vec<PollNotifier> = {
            let mut handles = self.handles.lock().unwrap();
            handles
                .values_mut()
                .filter(|h| h.poll.is_some() && files.contains(&h.node))
                .filter(|h| poll_ready(h))
                .filter_map(|h| h.poll.take())
                .collect()
        };
        for poller in ready {
            let _ = poller.notify();
        }
    }

    fn complete_blocked_reads(&self, files: &[NodeId]) {
        // Held throughout so an interrupt cannot slip between taking a read
        // out and putting it back.
        let mut pending = self.pending.lock().unwrap();
        let candidates: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| files.contains(&p.node))
            .map(|(unique, _)| *unique)
            .collect();
        for unique in candidates {
            let Some(p) = pending.get(&unique) else {
                continue;
            };
            let ops = self
                .handles
                .lock()
                .unwrap()
                .get(&p.fh)
                .and_then(|h| h.ops.clone());
            let Some((ops, _)) = ops else {
                let p = pending.remove(&unique).unwrap();
                p.reply.error(Errno::EBADF);
                continue;
            };
            match ops.read(&p.caller) {
                Ok(Content::NotReady) => {}
                Ok(Content::Ready(data)) => {
                    let p = pending.remove(&unique).unwrap();
                    let snapshot: Arc<[u8]> = data.into();
                    if let Some(h) = self.handles.lock().unwrap().get_mut(&p.fh) {
                        h.snapshot = Some(snapshot.clone());
                        h.generation_at_read = ops.generation();
                    }
                    p.reply.data(slice(&snapshot, p.offset, p.size));
                }
                Err(errno) => {
                    let p = pending.remove(&unique).unwrap();
                    p.reply.error(errno);
                }
            }
        }
    }
}

fn slice(data: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = (offset as usize).min(data.len());
    let end = start.saturating_add(size as usize).min(data.len());
    &data[start..end]
}

fn poll_ready(handle: &Handle) -> bool {
    match &handle.ops {
        Some((ops, FileKind::Snapshot)) => ops.generation() != handle.generation_at_read,
        Some((ops, FileKind::Blocking)) => {
            // A blocking file is readable once a read would not block. The
            // caller identity does not matter for readiness.
            let probe = Caller {
                uid: 0,
                gid: 0,
                pid: 0,
            };
            !matches!(ops.read(&probe), Ok(Content::NotReady))
        }
        Some((_, FileKind::Command)) | None => true,
    }
}

/// The `fuser::Filesystem` face of the tree: converts and delegates only.
struct Adapter {
    inner: Arc<Inner>,
}

impl Adapter {
    fn lookup_child(
        &self,
        caller: &Caller,
        parent: INodeNo,
        name: &OsStr,
    ) -> Result<(FileAttr, Duration), Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let nodes = self.inner.nodes.read().unwrap();
        let parent = nodes.get(&NodeId(parent.0)).ok_or(Errno::ENOENT)?;
        let NodeKind::Dir(children) = &parent.kind else {
            return Err(Errno::ENOTDIR);
        };
        let id = *children.get(name).ok_or(Errno::ENOENT)?;
        let node = nodes.get(&id).ok_or(Errno::ENOENT)?;
        if !Inner::visible(node, caller) {
            return Err(Errno::ENOENT);
        }
        Ok((self.inner.attr(id, node), TTL))
    }
}

impl Filesystem for Adapter {
    fn interrupt(&self, _req: &Request, unique: RequestId) -> bool {
        self.inner.interrupts.fetch_add(1, Ordering::SeqCst);
        let mut pending = self.inner.pending.lock().unwrap();
        let mut writes = self.inner.pending_writes.lock().unwrap();
        if let Some(p) = pending.remove(&unique.0) {
            p.reply.error(Errno::EINTR);
        } else if let Some(w) = writes.get(&unique.0) {
            // A claimed write stays: its handler's `finish` answers it.
            if w.interrupt() {
                writes.remove(&unique.0);
            }
        } else {
            // Either the request was answered already (then this is moot) or
            // it is still being dispatched on another thread: remember it for
            // a while so it is interrupted as soon as it registers.
            let mut early = self.inner.early_interrupts.lock().unwrap();
            early.retain(|_, at| at.elapsed() < Duration::from_secs(10));
            early.insert(unique.0, Instant::now());
        }
        true
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_child(&Caller::of(req), parent, name) {
            Ok((attr, entry_ttl)) => {
                reply.entry_with_ttls(&TTL, &entry_ttl, &attr, fuser::Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let nodes = self.inner.nodes.read().unwrap();
        match nodes.get(&NodeId(ino.0)) {
            Some(node) => reply.attr(&TTL, &self.inner.attr(NodeId(ino.0), node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let nodes = self.inner.nodes.read().unwrap();
        let Some(node) = nodes.get(&NodeId(ino.0)) else {
            return reply.error(Errno::ENOENT);
        };
        // `echo x > file` truncates before it writes: accept exactly that on
        // command files, and refuse every other change.
        let is_command = matches!(node.kind, NodeKind::File(_, FileKind::Command));
        let only_truncate = mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && atime.is_none()
            && mtime.is_none()
            && size == Some(0);
        if is_command && only_truncate {
            reply.attr(&TTL, &self.inner.attr(NodeId(ino.0), node));
        } else {
            reply.error(Errno::EPERM);
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let caller = Caller::of(req);
        let nodes = self.inner.nodes.read().unwrap();
        let Some(node) = nodes.get(&NodeId(ino.0)) else {
            return reply.error(Errno::ENOENT);
        };
        if !Inner::visible(node, &caller) {
            return reply.error(Errno::EACCES);
        }
        let NodeKind::File(ops, kind) = &node.kind else {
            return reply.error(Errno::EISDIR);
        };
        let handle = Handle {
            node: NodeId(ino.0),
            ops: Some((ops.clone(), *kind)),
            nonblock: flags.0 & libc::O_NONBLOCK != 0,
            snapshot: None,
            generation_at_read: ops.generation(),
            write_reply: None,
            poll: None,
        };
        drop(nodes);
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inner.handles.lock().unwrap().insert(fh, handle);
        // Direct I/O: reads must reach us whatever the (zero) file size says,
        // and never be served from a stale page cache. No flush on close:
        // every outcome is reported by write(2) itself.
        reply.opened(
            FileHandle(fh),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NOFLUSH,
        );
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let caller = Caller::of(req);
        let mut handles = self.inner.handles.lock().unwrap();
        let Some(handle) = handles.get_mut(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let Some((ops, kind)) = handle.ops.clone() else {
            return reply.error(Errno::EBADF);
        };
        if kind == FileKind::Command {
            let data = match &handle.write_reply {
                Some((end, text)) if offset >= *end => slice(text, offset - end, size),
                _ => &[],
            };
            return reply.data(data);
        }
        if offset > 0 {
            if let Some(snapshot) = &handle.snapshot {
                return reply.data(slice(snapshot, offset, size));
            }
        }
        let generation = ops.generation();
        match ops.read(&caller) {
            Ok(Content::Ready(data)) => {
                let snapshot: Arc<[u8]> = data.into();
                handle.snapshot = Some(snapshot.clone());
                handle.generation_at_read = generation;
                drop(handles);
                reply.data(slice(&snapshot, offset, size));
            }
            Ok(Content::NotReady) => {
                let nonblock = handle.nonblock || flags.0 & libc::O_NONBLOCK != 0;
                let node = handle.node;
                drop(handles);
                if nonblock {
                    return reply.error(Errno::EAGAIN);
                }
                let mut pending = self.inner.pending.lock().unwrap();
                if self
                    .inner
                    .early_interrupts
                    .lock()
                    .unwrap()
                    .remove(&req.unique().0)
                    .is_some()
                {
                    return reply.error(Errno::EINTR);
                }
                pending.insert(
                    req.unique().0,
                    PendingRead {
                        node,
                        fh: fh.0,
                        caller,
                        offset,
                        size,
                        reply,
                    },
                );
                drop(pending);
                // Content may have become ready between the check and the
                // registration: re-evaluate once so no wake-up is lost.
                self.inner.notice(Notice::Changed(node));
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let ops = {
            let handles = self.inner.handles.lock().unwrap();
            match handles.get(&fh.0).and_then(|h| h.ops.clone()) {
                Some((ops, FileKind::Command)) => ops,
                Some(_) => return reply.error(Errno::EACCES),
                None => return reply.error(Errno::EBADF),
            }
        };
        let unique = req.unique().0;
        let slot = {
            let mut writes = self.inner.pending_writes.lock().unwrap();
            if self
                .inner
                .early_interrupts
                .lock()
                .unwrap()
                .remove(&unique)
                .is_some()
            {
                // Interrupted before the handler saw it: no effect at all.
                return reply.error(Errno::EINTR);
            }
            let slot = Arc::new(WriteSlot {
                state: Mutex::new(WriteState::Open(reply)),
                interrupted: AtomicBool::new(false),
            });
            writes.insert(unique, slot.clone());
            slot
        };
        let caller = Caller::of(req);
        let done = WriteDone {
            inner: self.inner.clone(),
            unique,
            fh: fh.0,
            offset,
            len: data.len() as u32,
            caller,
            slot,
        };
        ops.write(&caller, data, done);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.inner.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let caller = Caller::of(req);
        let nodes = self.inner.nodes.read().unwrap();
        let Some(node) = nodes.get(&NodeId(ino.0)) else {
            return reply.error(Errno::ENOENT);
        };
        if !Inner::visible(node, &caller) {
            return reply.error(Errno::EACCES);
        }
        let NodeKind::Dir(children) = &node.kind else {
            return reply.error(Errno::ENOTDIR);
        };
        let mut listing = vec![
            (NodeId(ino.0), FileType::Directory, ".".into()),
            (node.parent, FileType::Directory, "..".into()),
        ];
        for (name, id) in children {
            if let Some(child) = nodes.get(id) {
                if Inner::visible(child, &caller) {
                    let kind = match child.kind {
                        NodeKind::Dir(_) => FileType::Directory,
                        NodeKind::File(..) => FileType::RegularFile,
                    };
                    listing.push((*id, kind, name.clone()));
                }
            }
        }
        drop(nodes);
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inner.dir_listings.lock().unwrap().insert(fh, listing);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listings = self.inner.dir_listings.lock().unwrap();
        let Some(listing) = listings.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (id, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(id.0), (i + 1) as u64, *kind, &**name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.dir_listings.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let caller = Caller::of(req);
        let attr = match self.lookup_child(&caller, parent, name) {
            Ok((attr, _)) => attr,
            Err(e) => return reply.error(e),
        };
        if attr.kind != FileType::Directory {
            return reply.error(Errno::ENOTDIR);
        }
        let Some(hook) = self.inner.rmdir_hook.get() else {
            return reply.error(Errno::EPERM);
        };
        let id = NodeId(attr.ino.0);
        match hook(&caller, id, &name.to_string_lossy()) {
            Ok(()) => {
                // The kernel drops the dentry itself after a successful rmdir.
                if let Some((_, _, files)) = self.inner.detach(id) {
                    for file in files {
                        self.inner.notice(Notice::Changed(file));
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        ph: PollNotifier,
        _events: PollEvents,
        flags: PollFlags,
        reply: ReplyPoll,
    ) {
        let mut handles = self.inner.handles.lock().unwrap();
        let Some(handle) = handles.get_mut(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        if poll_ready(handle) {
            let ready = match handle.ops {
                Some((_, FileKind::Snapshot)) => {
                    PollEvents::POLLIN | PollEvents::POLLRDNORM | PollEvents::POLLPRI
                }
                Some((_, FileKind::Command)) => {
                    PollEvents::POLLIN
                        | PollEvents::POLLRDNORM
                        | PollEvents::POLLOUT
                        | PollEvents::POLLWRNORM
                }
                _ => PollEvents::POLLIN | PollEvents::POLLRDNORM,
            };
            handle.poll = None;
            return reply.poll(ready);
        }
        if flags.contains(PollFlags::FUSE_POLL_SCHEDULE_NOTIFY) {
            handle.poll = Some(ph);
        }
        reply.poll(PollEvents::empty());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 0);
    }
}
