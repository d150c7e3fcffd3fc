//! The `fuser::Filesystem` face of the core: converts fuser's arguments and
//! replies to the core's types and back, and decides nothing itself.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, Notifier, OpenFlags,
    PollEvents, PollFlags, PollNotifier, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyPoll, ReplyWrite, Request, RequestId, TimeOrNow,
};

use crate::control::{Core, ReadRequest};
use crate::reply::{EntryInvalidator, Events, PollWaker, ReadReply, WriteReply};
use crate::tree::{Attr, EntryKind};
use crate::{Caller, Errno, NodeId};

/// How long the kernel may cache entries and attributes. Nodes never change
/// owner or mode and every removal is invalidated explicitly (rmdir by the
/// kernel itself), so the cache can be long: it saves a lookup per path
/// component on every open.
const TTL: Duration = Duration::from_secs(60);

pub(crate) struct Adapter {
    core: Arc<Core>,
}

impl Adapter {
    pub fn new(core: Arc<Core>) -> Self {
        Adapter { core }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn node(ino: INodeNo) -> NodeId {
    NodeId(ino.0)
}

/// Names are UTF-8 in this tree: any other name is not found.
fn name(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::ENOENT)
}

fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::Dir => FileType::Directory,
        EntryKind::File => FileType::RegularFile,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino.0),
        size: 0,
        blocks: 0,
        atime: attr.created,
        mtime: attr.created,
        ctime: attr.created,
        crtime: attr.created,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: match attr.kind {
            EntryKind::Dir => 2,
            EntryKind::File => 1,
        },
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn poll_events(events: Events) -> PollEvents {
    let mut out = PollEvents::empty();
    if events.readable {
        out |= PollEvents::POLLIN | PollEvents::POLLRDNORM;
    }
    if events.changed {
        out |= PollEvents::POLLPRI;
    }
    if events.writable {
        out |= PollEvents::POLLOUT | PollEvents::POLLWRNORM;
    }
    out
}

impl ReadReply for ReplyData {
    fn data(self: Box<Self>, data: &[u8]) {
        (*self).data(data);
    }

    fn error(self: Box<Self>, errno: Errno) {
        (*self).error(errno);
    }
}

impl WriteReply for ReplyWrite {
    fn written(self: Box<Self>, len: u32) {
        (*self).written(len);
    }

    fn error(self: Box<Self>, errno: Errno) {
        (*self).error(errno);
    }
}

impl PollWaker for PollNotifier {
    fn wake(self: Box<Self>) {
        // The poller may be gone already: nothing to wake then.
        let _ = self.notify();
    }
}

/// The kernel's entry cache, through the session's notifier.
pub(crate) struct KernelEntries(pub Notifier);

impl EntryInvalidator for KernelEntries {
    fn inval_entry(&self, parent: NodeId, name: &str) {
        // ENOENT only means the kernel had nothing cached.
        let _ = self.0.inval_entry(INodeNo(parent.0), OsStr::new(name));
    }
}

impl Filesystem for Adapter {
    fn interrupt(&self, _req: &Request, unique: RequestId) -> bool {
        self.core.interrupt(unique.0);
        true
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name_: &OsStr, reply: ReplyEntry) {
        let found = name(name_).and_then(|n| self.core.lookup(&caller(req), node(parent), n));
        match found {
            Ok(attr) => reply.entry_with_ttls(&TTL, &TTL, &file_attr(&attr), fuser::Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr(node(ino)) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(e),
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
        let only_truncate = mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && atime.is_none()
            && mtime.is_none()
            && size == Some(0);
        match self.core.setattr(node(ino), only_truncate) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let nonblock = flags.0 & libc::O_NONBLOCK != 0;
        match self.core.open(&caller(req), node(ino), nonblock) {
            // Direct I/O: reads must reach us whatever the (zero) file size
            // says, and never be served from a stale page cache. No flush on
            // close: every outcome is reported by write(2) itself.
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NOFLUSH,
            ),
            Err(e) => reply.error(e),
        }
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
        let request = ReadRequest {
            unique: req.unique().0,
            fh: fh.0,
            offset,
            size,
            nonblock: flags.0 & libc::O_NONBLOCK != 0,
        };
        self.core.read(&caller(req), request, Box::new(reply));
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
        self.core.write(
            &caller(req),
            req.unique().0,
            fh.0,
            offset,
            data,
            Box::new(reply),
        );
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
        self.core.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core.opendir(&caller(req), node(ino)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listing = match self.core.readdir(fh.0) {
            Ok(listing) => listing,
            Err(e) => return reply.error(e),
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (id, kind, name)) in listing.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(id.0), (i + 1) as u64, file_type(*kind), &**name) {
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
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name_: &OsStr, reply: ReplyEmpty) {
        match name(name_).and_then(|n| self.core.rmdir(&caller(req), node(parent), n)) {
            Ok(()) => reply.ok(),
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
        let waker: Option<Box<dyn PollWaker>> = flags
            .contains(PollFlags::FUSE_POLL_SCHEDULE_NOTIFY)
            .then(|| Box::new(ph) as Box<dyn PollWaker>);
        match self.core.poll(fh.0, waker) {
            Ok(events) => reply.poll(poll_events(events)),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 0);
    }
}
