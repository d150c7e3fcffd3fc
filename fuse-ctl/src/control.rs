//! The control filesystem's logic, free of fuser: every operation takes a
//! [`Caller`] and returns `Result<T, Errno>`, or answers a held request
//! through a [`reply`](crate::reply) trait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, RwLock};

use crate::handles::{Handle, Handles};
use crate::pending::{Pending, PendingRead};
use crate::reply::{EntryInvalidator, Events, PollWaker, ReadReply, WriteReply};
use crate::tree::{Attr, DirEntry, EntryKind, NodeKind, Tree};
use crate::write::{WriteDone, WriteSlot};
use crate::{Caller, Content, Errno, FileKind, NodeId, Owner, RmdirHook};

/// Work for the notifier thread: everything that writes into the kernel or
/// re-evaluates held requests happens there, never in a FUSE callback.
pub(crate) enum Notice {
    Changed(NodeId),
    Invalidate(NodeId, Box<str>),
    Stop,
}

/// One read request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadRequest {
    pub unique: u64,
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    /// `O_NONBLOCK` on this read (set after open with `fcntl`).
    pub nonblock: bool,
}

pub(crate) struct Core {
    tree: RwLock<Tree>,
    handles: Handles,
    dir_listings: Mutex<HashMap<u64, Arc<[DirEntry]>>>,
    pending: Arc<Pending>,
    next_fh: AtomicU64,
    rmdir_hook: OnceLock<Box<RmdirHook>>,
    notices: Mutex<mpsc::Sender<Notice>>,
    notices_rx: Mutex<Option<mpsc::Receiver<Notice>>>,
    invalidator: OnceLock<Box<dyn EntryInvalidator>>,
}

impl Core {
    pub fn new(root: Owner) -> Self {
        let (tx, rx) = mpsc::channel();
        Core {
            tree: RwLock::new(Tree::new(root)),
            handles: Handles::default(),
            dir_listings: Mutex::new(HashMap::new()),
            pending: Arc::new(Pending::default()),
            next_fh: AtomicU64::new(1),
            rmdir_hook: OnceLock::new(),
            notices: Mutex::new(tx),
            notices_rx: Mutex::new(Some(rx)),
            invalidator: OnceLock::new(),
        }
    }

    pub fn pending(&self) -> &Pending {
        &self.pending
    }

    #[cfg(test)]
    pub fn handles(&self) -> &Handles {
        &self.handles
    }

    // -- The application's side ---------------------------------------------

    pub fn set_rmdir_hook(&self, hook: Box<RmdirHook>) {
        let _ = self.rmdir_hook.set(hook);
    }

    pub fn add(
        &self,
        parent: NodeId,
        name: &str,
        owner: Owner,
        kind: NodeKind,
    ) -> Result<NodeId, Errno> {
        self.tree.write().unwrap().add(parent, name, owner, kind)
    }

    pub fn child(&self, parent: NodeId, name: &str) -> Option<NodeId> {
        self.tree.read().unwrap().child(parent, name)
    }

    pub fn changed(&self, node: NodeId) {
        self.notice(Notice::Changed(node));
    }

    pub fn remove(&self, node: NodeId) {
        if let Some((parent, name)) = self.detach(node) {
            self.notice(Notice::Invalidate(parent, name));
        }
    }

    pub fn remove_now(&self, node: NodeId) {
        if let Some((parent, name)) = self.detach(node) {
            match self.invalidator.get() {
                Some(kernel) => kernel.inval_entry(parent, &name),
                None => self.notice(Notice::Invalidate(parent, name)),
            }
        }
    }

    /// Drops `node`'s subtree and has its blocked readers re-evaluated;
    /// returns the parent and name whose kernel entry must go.
    fn detach(&self, node: NodeId) -> Option<(NodeId, Box<str>)> {
        let detached = self.tree.write().unwrap().detach(node)?;
        for file in detached.files {
            self.notice(Notice::Changed(file));
        }
        Some((detached.parent, detached.name))
    }

    // -- Mounting -------------------------------------------------------------

    /// The notifier thread's queue; `None` once taken (already mounted).
    pub fn take_notices(&self) -> Option<mpsc::Receiver<Notice>> {
        self.notices_rx.lock().unwrap().take()
    }

    pub fn return_notices(&self, rx: mpsc::Receiver<Notice>) {
        *self.notices_rx.lock().unwrap() = Some(rx);
    }

    pub fn set_invalidator(&self, kernel: Box<dyn EntryInvalidator>) {
        let _ = self.invalidator.set(kernel);
    }

    pub fn notice(&self, notice: Notice) {
        let _ = self.notices.lock().unwrap().send(notice);
    }

    /// The notifier thread: runs until [`Notice::Stop`].
    pub fn notify_loop(&self, rx: mpsc::Receiver<Notice>) {
        while let Ok(notice) = rx.recv() {
            if !self.handle_notice(notice) {
                break;
            }
        }
    }

    /// Does one notice's work; `false` for [`Notice::Stop`].
    pub fn handle_notice(&self, notice: Notice) -> bool {
        match notice {
            Notice::Changed(node) => self.on_changed(node),
            Notice::Invalidate(parent, name) => {
                if let Some(kernel) = self.invalidator.get() {
                    kernel.inval_entry(parent, &name);
                }
            }
            Notice::Stop => return false,
        }
        true
    }

    fn on_changed(&self, node: NodeId) {
        let files = self.tree.read().unwrap().files_of(node);
        for &file in &files {
            self.complete_blocked_reads(file);
        }
        let mut ready: Vec<Box<dyn PollWaker>> = Vec::new();
        for handle in files.iter().flat_map(|f| self.handles.of_node(*f)) {
            let mut state = handle.state();
            if state.poll.is_some() && handle.ready(&state) != Events::NONE {
                ready.extend(state.poll.take());
            }
        }
        for poller in ready {
            poller.wake();
        }
    }

    fn complete_blocked_reads(&self, file: NodeId) {
        for (unique, read) in self.pending.reads_of(file) {
            // Held while the handler decides, so an interrupt either comes
            // first (then the reply is gone) or finds it answered.
            let mut reply = read.reply();
            if reply.is_none() {
                continue;
            }
            let ops = &read.handle.ops;
            let answer = match ops.read(&read.caller) {
                Ok(Content::NotReady) => continue,
                Ok(Content::Ready(data)) => Ok(data),
                Err(errno) => Err(errno),
            };
            let reply = reply.take().expect("checked above");
            self.pending.unpark_read(unique);
            match answer {
                Ok(data) => {
                    let snapshot: Arc<[u8]> = data.into();
                    read.handle
                        .keep_snapshot(snapshot.clone(), ops.generation());
                    reply.data(slice(&snapshot, read.offset, read.size));
                }
                Err(errno) => reply.error(errno),
            }
        }
    }

    /// At unmount: nothing held stays unanswered, then the notifier stops.
    pub fn shutdown(&self) {
        self.pending.interrupt_all();
        self.notice(Notice::Stop);
    }

    // -- The kernel's side ----------------------------------------------------

    pub fn lookup(&self, caller: &Caller, parent: NodeId, name: &str) -> Result<Attr, Errno> {
        self.tree.read().unwrap().lookup(caller, parent, name)
    }

    pub fn getattr(&self, ino: NodeId) -> Result<Attr, Errno> {
        self.tree.read().unwrap().attr(ino)
    }

    /// `echo x > file` truncates before it writes: exactly that is accepted
    /// on command files, and every other change refused.
    pub fn setattr(&self, ino: NodeId, only_truncate: bool) -> Result<Attr, Errno> {
        let tree = self.tree.read().unwrap();
        let attr = tree.attr(ino)?;
        if only_truncate && tree.is_command(ino)? {
            Ok(attr)
        } else {
            Err(Errno::EPERM)
        }
    }

    /// Opens a file; returns its descriptor id.
    pub fn open(&self, caller: &Caller, ino: NodeId, nonblock: bool) -> Result<u64, Errno> {
        let (ops, kind) = self.tree.read().unwrap().open_file(caller, ino)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .insert(fh, Handle::new(ino, ops, kind, nonblock));
        Ok(fh)
    }

    pub fn release(&self, fh: u64) {
        self.handles.remove(fh);
    }

    pub fn read(&self, caller: &Caller, req: ReadRequest, reply: Box<dyn ReadReply>) {
        let Some(handle) = self.handles.get(req.fh) else {
            return reply.error(Errno::EBADF);
        };
        if handle.kind == FileKind::Command {
            let state = handle.state();
            let data = match &state.write_reply {
                Some((end, text)) if req.offset >= *end => slice(text, req.offset - end, req.size),
                _ => &[],
            };
            return reply.data(data);
        }
        if req.offset > 0 {
            let snapshot = handle.state().snapshot.clone();
            if let Some(snapshot) = snapshot {
                return reply.data(slice(&snapshot, req.offset, req.size));
            }
        }
        let generation = handle.ops.generation();
        match handle.ops.read(caller) {
            Ok(Content::Ready(data)) => {
                let snapshot: Arc<[u8]> = data.into();
                handle.keep_snapshot(snapshot.clone(), generation);
                reply.data(slice(&snapshot, req.offset, req.size));
            }
            Ok(Content::NotReady) => {
                if handle.nonblock || req.nonblock {
                    return reply.error(Errno::EAGAIN);
                }
                let node = handle.node;
                let read = PendingRead::new(handle, *caller, req.offset, req.size, reply);
                if let Err(read) = self.pending.park_read(req.unique, read) {
                    return read.fail(Errno::EINTR);
                }
                // Content may have become ready between the check and the
                // registration: re-evaluate once so no wake-up is lost.
                self.notice(Notice::Changed(node));
            }
            Err(errno) => reply.error(errno),
        }
    }

    pub fn write(
        &self,
        caller: &Caller,
        unique: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        reply: Box<dyn WriteReply>,
    ) {
        let Some(handle) = self.handles.get(fh) else {
            return reply.error(Errno::EBADF);
        };
        if handle.kind != FileKind::Command {
            return reply.error(Errno::EACCES);
        }
        let slot = WriteSlot::new(*caller, reply);
        if !self.pending.register_write(unique, &slot) {
            // Interrupted before the handler saw it: no effect at all.
            if let Some(reply) = slot.interrupt() {
                reply.error(Errno::EINTR);
            }
            return;
        }
        let ops = handle.ops.clone();
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let done = WriteDone::new(self.pending.clone(), unique, handle, offset, len, slot);
        ops.write(caller, data, done);
    }

    pub fn interrupt(&self, unique: u64) {
        self.pending.interrupt(unique);
    }

    /// Opens a directory: its listing as `caller` sees it now.
    pub fn opendir(&self, caller: &Caller, ino: NodeId) -> Result<u64, Errno> {
        let listing = self.tree.read().unwrap().listing(caller, ino)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dir_listings.lock().unwrap().insert(fh, listing.into());
        Ok(fh)
    }

    pub fn readdir(&self, fh: u64) -> Result<Arc<[DirEntry]>, Errno> {
        self.dir_listings
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dir_listings.lock().unwrap().remove(&fh);
    }

    /// `rmdir` of a visible directory goes to the hook; on `Ok` the node
    /// goes (the kernel drops the entry itself after a successful rmdir).
    pub fn rmdir(&self, caller: &Caller, parent: NodeId, name: &str) -> Result<(), Errno> {
        let attr = self.lookup(caller, parent, name)?;
        if attr.kind != EntryKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let hook = self.rmdir_hook.get().ok_or(Errno::EPERM)?;
        hook(caller, attr.ino, name)?;
        self.detach(attr.ino);
        Ok(())
    }

    /// What is ready on descriptor `fh`. With a waker (the kernel asked to
    /// be notified) and nothing ready, the waker fires once something is.
    pub fn poll(&self, fh: u64, waker: Option<Box<dyn PollWaker>>) -> Result<Events, Errno> {
        let handle = self.handles.get(fh).ok_or(Errno::EBADF)?;
        let mut state = handle.state();
        let ready = handle.ready(&state);
        if ready != Events::NONE {
            state.poll = None;
        } else if waker.is_some() {
            state.poll = waker;
        }
        Ok(ready)
    }
}

pub(crate) fn slice(data: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let end = start.saturating_add(size as usize).min(data.len());
    &data[start..end]
}
