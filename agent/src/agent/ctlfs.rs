//! The control-filesystem door: the fixed files, one directory per visible
//! operation, and the map from operation to its directory (so that an
//! `Operation` knows nothing of FUSE).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fuse_ctl::{Caller, Content, Errno, FileKind, FileOps, NodeId, Owner, WriteDone};

use crate::op::{Operation, State};

use super::{Agent, Backend, Input, Rejection, Reply, Requester};

/// The control filesystem's directory of each visible operation, by name:
/// the FUSE door's own map, so that an `Operation` knows nothing of FUSE.
#[derive(Clone, Default)]
pub(super) struct Dirs(Arc<Mutex<HashMap<String, NodeId>>>);

impl Dirs {
    pub(super) fn get(&self, name: &str) -> Option<NodeId> {
        self.0.lock().unwrap().get(name).copied()
    }

    pub(super) fn insert(&self, name: &str, node: NodeId) {
        self.0.lock().unwrap().insert(name.to_string(), node);
    }

    pub(super) fn remove(&self, name: &str) -> Option<NodeId> {
        self.0.lock().unwrap().remove(name)
    }
}

impl Agent {
    /// The fixed files of the root and the rmdir hook.
    pub(super) fn install(self: &Arc<Self>) {
        let root = NodeId::ROOT;
        let fixed: [(&str, u16, FileKind, Arc<dyn FileOps>); 4] = [
            (
                "README",
                0o444,
                FileKind::Snapshot,
                Arc::new(StaticFile(README.as_bytes().to_vec())),
            ),
            (
                "version",
                0o444,
                FileKind::Snapshot,
                Arc::new(StaticFile(
                    format!(
                        "version={}\napi_versions=1\nbackend={}\n",
                        env!("CARGO_PKG_VERSION"),
                        self.backend().name()
                    )
                    .into_bytes(),
                )),
            ),
            (
                "request",
                0o666,
                FileKind::Command,
                Arc::new(RequestFile(self.clone())),
            ),
            (
                "errors",
                0o444,
                FileKind::Snapshot,
                Arc::new(ErrorsFile(self.clone())),
            ),
        ];
        for (name, perm, kind, ops) in fixed {
            self.fs
                .add_file(root, name, Owner::root(perm), kind, ops)
                .expect("fixed names are unique");
        }
        // The tree holds the agent: both live as long as the process.
        let agent = self.clone();
        self.fs.set_rmdir_hook(Box::new(move |caller, _node, name| {
            // On success the library drops the node; the kernel its dentry.
            agent.remove_op(caller.uid, name).map(|_| ())
        }));
    }

    /// The operation's directory in the tree, and the door's map from its
    /// name to the node.
    pub(super) fn show_op_dir(&self, op: &Arc<Operation>) -> Result<(), Rejection> {
        let node = self.add_op_dir(op).map_err(|e| {
            Rejection::new(
                Errno::EIO,
                format!("cannot create the directory of '{}': {e:?}", op.name),
            )
        })?;
        self.dirs.insert(&op.name, node);
        Ok(())
    }

    fn add_op_dir(&self, op: &Arc<Operation>) -> Result<NodeId, Errno> {
        let owner = |perm| Owner {
            uid: op.uid,
            gid: op.gid,
            perm,
            private: true,
        };
        let dir = self.fs.add_dir(NodeId::ROOT, &op.name, owner(0o500))?;
        let files: [(&str, u16, FileKind, OpFileKind); 8] = [
            ("request", 0o400, FileKind::Snapshot, OpFileKind::Request),
            ("status", 0o400, FileKind::Snapshot, OpFileKind::Status),
            (
                "status.json",
                0o400,
                FileKind::Snapshot,
                OpFileKind::StatusJson,
            ),
            ("state", 0o400, FileKind::Snapshot, OpFileKind::State),
            ("progress", 0o400, FileKind::Snapshot, OpFileKind::Progress),
            ("message", 0o400, FileKind::Snapshot, OpFileKind::Message),
            ("wait", 0o400, FileKind::Blocking, OpFileKind::Wait),
            ("cancel", 0o200, FileKind::Command, OpFileKind::Cancel),
        ];
        for (name, perm, kind, which) in files {
            let ops = Arc::new(OpFile {
                op: op.clone(),
                which,
                backend: self.backend().clone(),
            });
            self.fs.add_file(dir, name, owner(perm), kind, ops)?;
        }
        Ok(dir)
    }
}

struct StaticFile(Vec<u8>);

impl FileOps for StaticFile {
    fn read(&self, _caller: &Caller) -> Result<Content, Errno> {
        Ok(Content::Ready(self.0.clone()))
    }
}

struct RequestFile(Arc<Agent>);

impl FileOps for RequestFile {
    fn write(&self, caller: &Caller, data: &[u8], done: WriteDone) {
        let agent = &self.0;
        let who = Requester {
            uid: caller.uid,
            gid: caller.gid,
            pid: caller.pid,
        };
        // The write stays unanswered (the writer waits, interruptibly) while
        // the core checks the request elsewhere: this dispatch thread is free
        // for everyone else's reads and writes at once.
        agent.start_create(who, Input::Text(data.to_vec()), Box::new(WriteReply(done)));
    }
}

/// The answer to one write of `request`.
struct WriteReply(WriteDone);

impl Reply for WriteReply {
    fn claim(&self) -> bool {
        self.0.claim()
    }

    fn is_gone(&self) -> bool {
        self.0.is_interrupted()
    }

    fn finish(self: Box<Self>, result: Result<String, Rejection>) {
        finish_create(result, self.0);
    }
}

fn finish_create(result: Result<String, Rejection>, done: WriteDone) {
    match result {
        Ok(name) => done.finish(Ok(()), format!("{name}\n").into_bytes()),
        Err(rejection) => {
            let reply = format!("error: {}\n", rejection.reason.replace('\n', " "));
            done.finish(Err(rejection.errno), reply.into_bytes());
        }
    }
}

struct ErrorsFile(Arc<Agent>);

impl FileOps for ErrorsFile {
    fn read(&self, caller: &Caller) -> Result<Content, Errno> {
        let agent = &self.0;
        let errors = agent.errors.lock().unwrap();
        let mut text = String::new();
        for line in errors.get(&caller.uid).into_iter().flatten() {
            text.push_str(line);
            text.push('\n');
        }
        Ok(Content::Ready(text.into_bytes()))
    }
}

#[derive(Clone, Copy)]
enum OpFileKind {
    Request,
    Status,
    StatusJson,
    State,
    Progress,
    Message,
    Wait,
    Cancel,
}

struct OpFile {
    op: Arc<Operation>,
    which: OpFileKind,
    backend: Arc<dyn Backend>,
}

impl OpFile {
    fn allowed(&self, caller: &Caller) -> Result<(), Errno> {
        if caller.is_root() || caller.uid == self.op.uid {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }
}

impl FileOps for OpFile {
    fn read(&self, caller: &Caller) -> Result<Content, Errno> {
        self.allowed(caller)?;
        let op = &self.op;
        let text = match self.which {
            OpFileKind::Request => op.request.render(),
            OpFileKind::Status => op.status().render(&op.name),
            OpFileKind::StatusJson => op.status().render_json(&op.name),
            OpFileKind::State => format!("{}\n", op.status().state.word()),
            OpFileKind::Progress => format!("{}\n", op.status().progress),
            OpFileKind::Message => {
                let mut message = op.status().message;
                if !message.is_empty() && !message.ends_with('\n') {
                    message.push('\n');
                }
                message
            }
            OpFileKind::Wait => {
                let status = op.status();
                if status.state != State::Completed {
                    return Ok(Content::NotReady);
                }
                status.render(&op.name)
            }
            OpFileKind::Cancel => String::new(),
        };
        Ok(Content::Ready(text.into_bytes()))
    }

    fn write(&self, caller: &Caller, _data: &[u8], done: WriteDone) {
        if let Err(e) = self.allowed(caller) {
            return done.finish(Err(e), Vec::new());
        }
        if matches!(self.which, OpFileKind::Cancel) {
            tracing::info!(op = %self.op.name, user = caller.uid, "cancel requested");
            self.backend.cancel(&self.op);
            done.finish(Ok(()), Vec::new());
        } else {
            done.finish(Err(Errno::EACCES), Vec::new());
        }
    }

    fn generation(&self) -> u64 {
        self.op.generation()
    }
}

const README: &str = "\
nnf-dm control filesystem

Create a copy (one write = one whole request, at most 64 KiB):
  echo \"name=out1 source=/path/src destination=/path/dest\" > request
Keys: source, destination (absolute paths, required), name, workflow,
namespace, profile, dryrun, slots, max_slots, dcp_options, mpirun_options,
log_stdout, store_stdout. Quote values with spaces: dcp_options=\"-a b\".
workflow/namespace default to DW_WORKFLOW_NAME/DW_WORKFLOW_NAMESPACE of the
writing process's environment as it was started; pass workflow= otherwise.
A generated name can be read back on the same descriptor:
  exec 3<>request; echo \"source=/a destination=/b\" >&3; read -r name <&3

Rejected requests fail the write; `cat errors` says why.
`cat metrics`: the agent's counters (Prometheus text; root sees each user's).

Each operation is a directory <name>/ with:
  status       key=value lines (name state status progress message ...)
  status.json  the same as JSON
  state        pending|starting|running|completed|cancelling
  progress     0..100
  message      text
  request      the accepted request, normalised
  wait         blocks until completed, then prints status (Ctrl-C ends it)
  cancel       echo 1 > cancel
Remove a completed operation with rmdir <name>.
";
