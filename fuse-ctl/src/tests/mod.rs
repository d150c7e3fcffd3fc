//! The core without a mount: fake replies record what the kernel would get,
//! and notices are processed on the test's thread by `settle`.

mod reads;
mod tree;
mod writes;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::control::{Core, Notice, ReadRequest};
use crate::reply::{EntryInvalidator, Events, PollWaker, ReadReply, WriteReply};
use crate::tree::{EntryKind, NodeKind};
use crate::{Caller, Content, Errno, FileKind, FileOps, NodeId, Owner, WriteDone};

const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 10,
};
const OWNER: Caller = Caller {
    uid: 4242,
    gid: 4242,
    pid: 11,
};
const OTHER: Caller = Caller {
    uid: 65534,
    gid: 65534,
    pid: 12,
};

// ---------------------------------------------------------------------------
// Fakes
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Data(Vec<u8>),
    Written(u32),
    Error(Errno),
    Woken,
}

/// What one reply was answered with; a second answer fails the test.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Option<Answer>>>);

impl Seen {
    fn get(&self) -> Option<Answer> {
        self.0.lock().unwrap().clone()
    }

    fn set(&self, answer: Answer) {
        let mut slot = self.0.lock().unwrap();
        assert!(slot.is_none(), "answered twice: {slot:?}, then {answer:?}");
        *slot = Some(answer);
    }

    fn reply(&self) -> Box<Fake> {
        Box::new(Fake(self.clone()))
    }
}

struct Fake(Seen);

impl ReadReply for Fake {
    fn data(self: Box<Self>, data: &[u8]) {
        self.0.set(Answer::Data(data.to_vec()));
    }
    fn error(self: Box<Self>, errno: Errno) {
        self.0.set(Answer::Error(errno));
    }
}

impl WriteReply for Fake {
    fn written(self: Box<Self>, len: u32) {
        self.0.set(Answer::Written(len));
    }
    fn error(self: Box<Self>, errno: Errno) {
        self.0.set(Answer::Error(errno));
    }
}

impl PollWaker for Fake {
    fn wake(self: Box<Self>) {
        self.0.set(Answer::Woken);
    }
}

#[derive(Default)]
struct Invalidations(Mutex<Vec<(NodeId, String)>>);

impl EntryInvalidator for Arc<Invalidations> {
    fn inval_entry(&self, parent: NodeId, name: &str) {
        self.0.lock().unwrap().push((parent, name.to_string()));
    }
}

/// A snapshot of a counter; counts its `generation` calls.
#[derive(Default)]
struct Value {
    value: AtomicU64,
    generations: AtomicU64,
}

impl FileOps for Value {
    fn read(&self, _caller: &Caller) -> Result<Content, Errno> {
        let v = self.value.load(Ordering::SeqCst);
        Ok(Content::Ready(format!("value={v}\n").into_bytes()))
    }
    fn generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::SeqCst);
        self.value.load(Ordering::SeqCst)
    }
}

/// Blocks until `ready`; ENOENT once `gone`.
#[derive(Default)]
struct Gate {
    ready: AtomicBool,
    gone: AtomicBool,
}

impl FileOps for Gate {
    fn read(&self, _caller: &Caller) -> Result<Content, Errno> {
        if self.gone.load(Ordering::SeqCst) {
            Err(Errno::ENOENT)
        } else if self.ready.load(Ordering::SeqCst) {
            Ok(Content::Ready(b"ready\n".to_vec()))
        } else {
            Ok(Content::NotReady)
        }
    }
}

/// Commands: keeps every `done` for the test to answer; `echo…` is
/// answered at once with the caller's uid, `bad…` with EINVAL.
#[derive(Default)]
struct Keep(Mutex<Vec<WriteDone>>);

impl Keep {
    fn take(&self) -> WriteDone {
        self.0
            .lock()
            .unwrap()
            .pop()
            .expect("the handler kept no write")
    }
}

impl FileOps for Keep {
    fn write(&self, caller: &Caller, data: &[u8], done: WriteDone) {
        assert_eq!(done.caller(), *caller);
        if data.starts_with(b"echo") {
            done.finish(Ok(()), format!("ok uid={}\n", caller.uid).into_bytes());
        } else if data.starts_with(b"bad") {
            done.finish(Err(Errno::EINVAL), b"error: bad\n".to_vec());
        } else {
            self.0.lock().unwrap().push(done);
        }
    }
}

/// A core with its notices in the test's hands.
struct T {
    core: Core,
    notices: Mutex<mpsc::Receiver<Notice>>,
    unique: AtomicU64,
}

impl T {
    fn new() -> Self {
        let core = Core::new(Owner::root(0o755));
        let notices = core.take_notices().unwrap();
        T {
            core,
            notices: Mutex::new(notices),
            unique: AtomicU64::new(100),
        }
    }

    fn file(&self, parent: NodeId, name: &str, kind: FileKind, ops: Arc<dyn FileOps>) -> NodeId {
        self.core
            .add(parent, name, Owner::root(0o666), NodeKind::File(ops, kind))
            .unwrap()
    }

    /// Command file `cmd` in the root, opened: its handler and descriptor.
    fn open_command(&self) -> (Arc<Keep>, u64) {
        let keep = Arc::new(Keep::default());
        let cmd = self.file(NodeId::ROOT, "cmd", FileKind::Command, keep.clone());
        (keep, self.open(cmd))
    }

    /// A file `name` of `kind` in the root, served by a fresh `O`.
    fn root_file<O: FileOps + Default>(&self, name: &str, kind: FileKind) -> NodeId {
        self.file(NodeId::ROOT, name, kind, Arc::new(O::default()))
    }

    fn dir(&self, parent: NodeId, name: &str, owner: Owner) -> NodeId {
        self.core.add(parent, name, owner, NodeKind::dir()).unwrap()
    }

    /// Does the notifier thread's work.
    fn settle(&self) {
        let notices = self.notices.lock().unwrap();
        while let Ok(notice) = notices.try_recv() {
            self.core.handle_notice(notice);
        }
    }

    fn next_unique(&self) -> u64 {
        self.unique.fetch_add(1, Ordering::SeqCst)
    }

    fn open(&self, node: NodeId) -> u64 {
        self.core.open(&ROOT, node, false).unwrap()
    }

    fn read_as(&self, unique: u64, fh: u64, offset: u64) -> Seen {
        let seen = Seen::default();
        let req = ReadRequest {
            unique,
            fh,
            offset,
            size: 100,
            nonblock: false,
        };
        self.core.read(&ROOT, req, seen.reply());
        seen
    }

    fn read(&self, fh: u64, offset: u64) -> Seen {
        self.read_as(self.next_unique(), fh, offset)
    }

    fn write_as(&self, unique: u64, fh: u64, offset: u64, data: &[u8]) -> Seen {
        let seen = Seen::default();
        self.core
            .write(&ROOT, unique, fh, offset, data, seen.reply());
        seen
    }

    fn write(&self, fh: u64, offset: u64, data: &[u8]) -> (u64, Seen) {
        let unique = self.next_unique();
        (unique, self.write_as(unique, fh, offset, data))
    }
}

fn data(text: &str) -> Option<Answer> {
    Some(Answer::Data(text.as_bytes().to_vec()))
}

fn err(errno: Errno) -> Option<Answer> {
    Some(Answer::Error(errno))
}
