//! The agent core: the operation registry, the rules every backend shares
//! (names, limits, ownership, the `errors` file, retention) and the tree of
//! control files over them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use fuse_ctl::{Caller, Content, ControlFs, Errno, FileKind, FileOps, NodeId, Owner, WriteDone};

use crate::op::{Operation, State};
use crate::request::Request;
use crate::timefmt::rfc3339;

/// How many rejections the `errors` file keeps per user.
const ERRORS_KEPT: usize = 32;

/// A refused request: the errno of `write(2)` and the words for `errors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: Errno,
    pub reason: String,
}

impl Rejection {
    pub fn new(errno: Errno, reason: impl Into<String>) -> Self {
        Rejection {
            errno,
            reason: reason.into(),
        }
    }
}

/// Who wrote a request.
#[derive(Debug, Clone, Copy)]
pub struct Requester {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Wakes readers of an operation's files after its status changed.
#[derive(Clone)]
pub struct Notify {
    fs: ControlFs,
}

impl Notify {
    pub fn changed(&self, op: &Operation) {
        if let Some(node) = op.node.get() {
            self.fs.changed(*node);
        }
    }
}

/// What executes operations. The core owns names, limits and visibility;
/// a backend validates what only it can, runs copies and keeps records.
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Checks the request as `who` and builds the operation (no side effects).
    fn prepare(
        &self,
        who: &Requester,
        name: String,
        request: Request,
    ) -> Result<Operation, Rejection>;
    /// The operation is registered and visible: record it and run it.
    fn accept(&self, op: Arc<Operation>) -> Result<(), Rejection>;
    /// Ask for cancellation; a no-op once completed.
    fn cancel(&self, op: &Arc<Operation>);
    /// Forget a completed operation's record.
    fn remove(&self, op: &Operation) -> Result<(), Rejection>;
    /// Whether `prepare`/`accept` may wait on the network: then a write to
    /// `request` is handled off the filesystem's dispatch threads.
    fn blocking(&self) -> bool {
        false
    }
}

pub struct AgentConfig {
    pub max_ops_per_user: usize,
    pub retention: Duration,
}

struct Registry {
    ops: HashMap<String, Arc<Operation>>,
    per_user: HashMap<u32, usize>,
}

pub struct Agent {
    fs: ControlFs,
    registry: RwLock<Registry>,
    errors: Mutex<HashMap<u32, VecDeque<String>>>,
    backend: OnceLock<Arc<dyn Backend>>,
    config: AgentConfig,
}

impl Agent {
    pub fn new(config: AgentConfig) -> Arc<Agent> {
        // Like /tmp: everyone may write the request file, and the sticky bit
        // lets owners (only) rmdir their operations.
        let fs = ControlFs::new(Owner::root(0o1777));
        Arc::new(Agent {
            fs,
            registry: RwLock::new(Registry {
                ops: HashMap::new(),
                per_user: HashMap::new(),
            }),
            errors: Mutex::new(HashMap::new()),
            backend: OnceLock::new(),
            config,
        })
    }

    pub fn notify(&self) -> Notify {
        Notify {
            fs: self.fs.clone(),
        }
    }

    pub fn fs(&self) -> &ControlFs {
        &self.fs
    }

    fn backend(&self) -> &Arc<dyn Backend> {
        self.backend.get().expect("backend installed at start")
    }

    /// Installs the backend and the fixed files of the root.
    pub fn install(self: &Arc<Self>, backend: Arc<dyn Backend>) {
        let _ = self.backend.set(backend);
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
                Arc::new(RequestFile(Arc::downgrade(self))),
            ),
            (
                "errors",
                0o444,
                FileKind::Snapshot,
                Arc::new(ErrorsFile(Arc::downgrade(self))),
            ),
        ];
        for (name, perm, kind, ops) in fixed {
            self.fs
                .add_file(root, name, Owner::root(perm), kind, ops)
                .expect("fixed names are unique");
        }
        let weak = Arc::downgrade(self);
        self.fs
            .set_rmdir_hook(Box::new(move |caller, _node, name| match weak.upgrade() {
                // On success the library drops the node; the kernel its dentry.
                Some(agent) => agent.remove_op(caller.uid, name).map(|_| ()),
                None => Err(Errno::ENOENT),
            }));
    }

    /// Handles one write to `request`: the new operation's name, or why not.
    /// A rejection is recorded for the `errors` file either way.
    pub fn create(&self, who: &Requester, bytes: &[u8]) -> Result<String, Rejection> {
        Request::parse(bytes)
            .map_err(|e| Rejection::new(Errno::EINVAL, e.0))
            .and_then(|request| self.create_checked(who, request))
            .inspect_err(|rejection| self.reject(who, rejection))
    }

    /// Creates an operation from an already parsed request (the gRPC door).
    pub fn submit(&self, who: &Requester, request: Request) -> Result<String, Rejection> {
        self.create_checked(who, request)
            .inspect_err(|rejection| self.reject(who, rejection))
    }

    fn create_checked(&self, who: &Requester, mut request: Request) -> Result<String, Rejection> {
        if let Some(name) = &request.name {
            crate::request::validate_name(name).map_err(|e| Rejection::new(Errno::EINVAL, e.0))?;
        }
        if request.workflow.is_none() && request.namespace.is_none() {
            let env = crate::environ::workflow_of(who.pid);
            request.workflow = env.0;
            request.namespace = env.1;
        }
        let name = match &request.name {
            Some(name) => name.clone(),
            None => self.generate_name(),
        };
        {
            let registry = self.registry.read().unwrap();
            if registry.ops.contains_key(&name) {
                return Err(Rejection::new(
                    Errno::EEXIST,
                    format!("name '{name}' is in use"),
                ));
            }
            self.check_limit(&registry, who.uid)?;
        }
        let op = Arc::new(self.backend().prepare(who, name.clone(), request)?);
        self.register(op.clone())?;
        if let Err(rejection) = self.backend().accept(op.clone()) {
            // Inside the write callback of `request`: the kernel is told later.
            self.unregister(&op, false);
            return Err(rejection);
        }
        tracing::info!(op = %name, user = who.uid, source = %op.request.source, destination = %op.request.destination, "operation created");
        Ok(name)
    }

    /// The operation `name` if `uid` may see it (its owner, or root).
    pub fn lookup(&self, uid: u32, name: &str) -> Option<Arc<Operation>> {
        let op = self.registry.read().unwrap().ops.get(name).cloned()?;
        (uid == 0 || op.uid == uid).then_some(op)
    }

    /// The operations `uid` may see, by name.
    pub fn list(&self, uid: u32) -> Vec<Arc<Operation>> {
        let mut ops: Vec<Arc<Operation>> = self
            .registry
            .read()
            .unwrap()
            .ops
            .values()
            .filter(|op| uid == 0 || op.uid == uid)
            .cloned()
            .collect();
        ops.sort_by(|a, b| a.name.cmp(&b.name));
        ops
    }

    /// Asks for cancellation; nothing happens to a completed operation.
    pub fn cancel(&self, op: &Arc<Operation>) {
        tracing::info!(op = %op.name, user = op.uid, "cancel requested");
        self.backend().cancel(op);
    }

    /// Removes a completed operation, as `rmdir` does (EBUSY until completed).
    pub fn delete(&self, uid: u32, name: &str) -> Result<(), Errno> {
        let op = self.remove_op(uid, name)?;
        if let Some(node) = op.node.get() {
            self.fs.remove_now(*node);
        }
        Ok(())
    }

    fn check_limit(&self, registry: &Registry, uid: u32) -> Result<(), Rejection> {
        let count = registry.per_user.get(&uid).copied().unwrap_or(0);
        if count >= self.config.max_ops_per_user {
            return Err(Rejection::new(
                Errno::ENOSPC,
                format!(
                    "uid {uid} has {count} operations, the limit is {}: rmdir finished ones",
                    self.config.max_ops_per_user
                ),
            ));
        }
        Ok(())
    }

    /// Makes an operation visible: registry entry and its directory.
    pub fn register(&self, op: Arc<Operation>) -> Result<(), Rejection> {
        let mut registry = self.registry.write().unwrap();
        if registry.ops.contains_key(&op.name) {
            return Err(Rejection::new(
                Errno::EEXIST,
                format!("name '{}' is in use", op.name),
            ));
        }
        self.check_limit(&registry, op.uid)?;
        let node = self.add_op_dir(&op).map_err(|e| {
            Rejection::new(
                Errno::EIO,
                format!("cannot create the directory of '{}': {e:?}", op.name),
            )
        })?;
        let _ = op.node.set(node);
        registry.ops.insert(op.name.clone(), op.clone());
        *registry.per_user.entry(op.uid).or_default() += 1;
        Ok(())
    }

    /// Makes an operation disappear without asking the backend (its record
    /// is already gone, e.g. a resource deleted by someone else).
    pub fn forget(&self, op: &Operation) {
        op.removed.store(true, std::sync::atomic::Ordering::Release);
        self.unregister(op, true);
    }

    /// Forgets an operation; `now` waits until the kernel forgot it too (not
    /// allowed from a FUSE callback).
    fn unregister(&self, op: &Operation, now: bool) {
        let mut registry = self.registry.write().unwrap();
        if registry.ops.remove(&op.name).is_some() {
            if let Some(count) = registry.per_user.get_mut(&op.uid) {
                *count = count.saturating_sub(1);
            }
        }
        drop(registry);
        if let Some(node) = op.node.get() {
            if now {
                self.fs.remove_now(*node);
            } else {
                self.fs.remove(*node);
            }
        }
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

    fn generate_name(&self) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        loop {
            let mut bytes = [0u8; 8];
            crate::sys::random_bytes(&mut bytes);
            let suffix: String = bytes
                .iter()
                .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
                .collect();
            let name = format!("dm-{suffix}");
            if !self.registry.read().unwrap().ops.contains_key(&name) {
                return name;
            }
        }
    }

    /// Records a rejection for the `errors` file and the log.
    fn reject(&self, who: &Requester, rejection: &Rejection) {
        let line = format!(
            "{} {} {}",
            rfc3339(SystemTime::now()),
            errno_name(rejection.errno),
            rejection.reason
        );
        tracing::warn!(
            user = who.uid,
            errno = errno_name(rejection.errno),
            "request rejected: {}",
            rejection.reason
        );
        let mut errors = self.errors.lock().unwrap();
        let list = errors.entry(who.uid).or_default();
        if list.len() == ERRORS_KEPT {
            list.pop_front();
        }
        list.push_back(line);
    }

    /// Forgets a completed operation everywhere but in the filesystem tree.
    fn remove_op(&self, uid: u32, name: &str) -> Result<Arc<Operation>, Errno> {
        let op = self
            .registry
            .read()
            .unwrap()
            .ops
            .get(name)
            .cloned()
            .ok_or(Errno::ENOENT)?;
        if uid != 0 && uid != op.uid {
            return Err(Errno::EACCES);
        }
        if !op.is_completed() {
            return Err(Errno::EBUSY);
        }
        if let Err(rejection) = self.backend().remove(&op) {
            tracing::warn!(op = %name, user = uid, "cannot remove: {}", rejection.reason);
            return Err(rejection.errno);
        }
        let mut registry = self.registry.write().unwrap();
        registry.ops.remove(name);
        if let Some(count) = registry.per_user.get_mut(&op.uid) {
            *count = count.saturating_sub(1);
        }
        tracing::info!(op = %name, user = uid, "operation removed");
        Ok(op)
    }

    /// Removes completed operations older than the retention period.
    pub fn expire(&self) {
        let now = SystemTime::now();
        let expired: Vec<Arc<Operation>> = self
            .registry
            .read()
            .unwrap()
            .ops
            .values()
            .filter(|op| {
                let status = op.status();
                status.is_completed()
                    && status
                        .end_time
                        .and_then(|end| now.duration_since(end).ok())
                        .is_some_and(|age| age >= self.config.retention)
            })
            .cloned()
            .collect();
        for op in expired {
            if self.backend().remove(&op).is_ok() {
                self.unregister(&op, true);
                tracing::info!(op = %op.name, user = op.uid, "operation expired after the retention period");
            }
        }
    }
}

/// The errno's symbolic name, as the `errors` file shows it.
pub fn errno_name(errno: Errno) -> &'static str {
    match errno.code() {
        libc::EINVAL => "EINVAL",
        libc::EEXIST => "EEXIST",
        libc::ENOENT => "ENOENT",
        libc::EPERM => "EPERM",
        libc::ENOSPC => "ENOSPC",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        _ => "EIO",
    }
}

struct StaticFile(Vec<u8>);

impl FileOps for StaticFile {
    fn read(&self, _caller: &Caller) -> Result<Content, Errno> {
        Ok(Content::Ready(self.0.clone()))
    }
}

struct RequestFile(std::sync::Weak<Agent>);

impl FileOps for RequestFile {
    fn write(&self, caller: &Caller, data: &[u8], done: WriteDone) {
        let Some(agent) = self.0.upgrade() else {
            return done.finish(
                Err(Errno::EIO),
                b"error: the agent is shutting down\n".to_vec(),
            );
        };
        let who = Requester {
            uid: caller.uid,
            gid: caller.gid,
            pid: caller.pid,
        };
        if !agent.backend().blocking() {
            return finish_create(agent.create(&who, data), done);
        }
        // The backend waits on the network: never on a dispatch thread. The
        // write stays unanswered (the writer blocked) until the backend is
        // done or its own timeout passed.
        static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        use std::sync::atomic::Ordering::AcqRel;
        if IN_FLIGHT.fetch_add(1, AcqRel) >= MAX_CREATES_IN_FLIGHT {
            IN_FLIGHT.fetch_sub(1, AcqRel);
            let rejection = Rejection::new(
                Errno::EAGAIN,
                format!("{MAX_CREATES_IN_FLIGHT} requests are already being created: try again"),
            );
            agent.reject(&who, &rejection);
            return finish_create(Err(rejection), done);
        }
        let data = data.to_vec();
        let spawned = std::thread::Builder::new()
            .name("create".into())
            .spawn(move || {
                finish_create(agent.create(&who, &data), done);
                IN_FLIGHT.fetch_sub(1, AcqRel);
            });
        if spawned.is_err() {
            IN_FLIGHT.fetch_sub(1, AcqRel);
            // `done` went down with the closure: the write fails with EIO.
        }
    }
}

/// Requests a blocking backend works on at once; more fail with EAGAIN.
const MAX_CREATES_IN_FLIGHT: usize = 256;

fn finish_create(result: Result<String, Rejection>, done: WriteDone) {
    match result {
        Ok(name) => done.finish(Ok(()), format!("{name}\n").into_bytes()),
        Err(rejection) => {
            let reply = format!("error: {}\n", rejection.reason.replace('\n', " "));
            done.finish(Err(rejection.errno), reply.into_bytes());
        }
    }
}

struct ErrorsFile(std::sync::Weak<Agent>);

impl FileOps for ErrorsFile {
    fn read(&self, caller: &Caller) -> Result<Content, Errno> {
        let agent = self.0.upgrade().ok_or(Errno::EIO)?;
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
