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
//!
//! Layout: the filesystem's logic is a pure core (`control`, over `tree`,
//! `handles`, `pending`, `write`) that takes a [`Caller`] and returns
//! `Result<T, Errno>`, answering held requests through the small traits of
//! `reply`; `adapter` is the `fuser::Filesystem` that only converts, and
//! `mount` runs it. The core is unit-tested without a mount.

mod adapter;
mod control;
mod handles;
mod mount;
mod pending;
mod reply;
mod tree;
mod write;

#[cfg(test)]
mod tests;

use std::io;
use std::path::Path;
use std::sync::Arc;

pub use fuser::Errno;
pub use mount::{clean_stale_mount, Mounted};
pub use write::WriteDone;

use control::Core;
use tree::NodeKind;

/// The identity of the process behind a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The calling thread's id (a pid for single-threaded callers).
    pub pid: u32,
}

impl Caller {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// A node's identity: its inode number. Never reused while mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) u64);

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

    /// One whole write. Answer through `done`, now or later; a handler that
    /// answers later and commits an effect claims `done` first (see
    /// [`WriteDone::claim`]).
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

/// The control filesystem. Cheap to clone; all clones share one tree.
#[derive(Clone)]
pub struct ControlFs {
    core: Arc<Core>,
}

impl ControlFs {
    /// A tree holding only its root directory.
    pub fn new(root: Owner) -> Self {
        ControlFs {
            core: Arc::new(Core::new(root)),
        }
    }

    /// Installs the handler for `rmdir`. Without one, `rmdir` fails with EPERM.
    pub fn set_rmdir_hook(&self, hook: Box<RmdirHook>) {
        self.core.set_rmdir_hook(hook);
    }

    /// Adds a directory. Fails with EEXIST if the name is taken.
    pub fn add_dir(&self, parent: NodeId, name: &str, owner: Owner) -> Result<NodeId, Errno> {
        self.core.add(parent, name, owner, NodeKind::dir())
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
        self.core
            .add(parent, name, owner, NodeKind::File(ops, kind))
    }

    /// Removes a node and everything below it, and has the kernel forget its
    /// entry. Readers blocked on removed files are re-evaluated (their handler
    /// decides what they get), so none stays blocked.
    pub fn remove(&self, node: NodeId) {
        self.core.remove(node);
    }

    /// Like [`remove`](Self::remove), but the kernel has forgotten the entry
    /// when this returns, so no caller can see the node afterwards. The
    /// invalidation is a synchronous write into the kernel that takes the
    /// parent directory's lock: never call this from a FUSE callback.
    pub fn remove_now(&self, node: NodeId) {
        self.core.remove_now(node);
    }

    /// Finds a child by name, whoever may see it.
    pub fn child(&self, parent: NodeId, name: &str) -> Option<NodeId> {
        self.core.child(parent, name)
    }

    /// Tells the library that the files of `node` (a file, or every file
    /// directly in a directory) may have new content: wakes pollers whose
    /// condition now holds and completes blocked reads that can complete.
    pub fn changed(&self, node: NodeId) {
        self.core.changed(node);
    }

    /// Number of reads currently blocked (for tests and metrics).
    pub fn blocked_reads(&self) -> usize {
        self.core.pending().reads()
    }

    /// Number of writes not answered yet (for tests and metrics).
    pub fn pending_writes(&self) -> usize {
        self.core.pending().writes()
    }

    /// Number of interrupts the kernel sent, answered or moot (for tests and
    /// metrics).
    pub fn interrupts(&self) -> u64 {
        self.core.pending().interrupts()
    }

    /// Mounts the tree at `mountpoint`, serving it from a background thread
    /// until [`Mounted::unmount`] or drop.
    pub fn mount(&self, mountpoint: &Path, fsname: &str) -> io::Result<Mounted> {
        mount::mount(&self.core, mountpoint, fsname)
    }
}
