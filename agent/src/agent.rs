//! The agent core: the operation registry, the rules every backend shares
//! (names, limits, ownership, the `errors` file, retention) and the tree of
//! control files over them.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
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

/// The control filesystem's directory of each visible operation, by name:
/// the FUSE door's own map, so that an `Operation` knows nothing of FUSE.
#[derive(Clone, Default)]
struct Dirs(Arc<Mutex<HashMap<String, NodeId>>>);

impl Dirs {
    fn get(&self, name: &str) -> Option<NodeId> {
        self.0.lock().unwrap().get(name).copied()
    }

    fn insert(&self, name: &str, node: NodeId) {
        self.0.lock().unwrap().insert(name.to_string(), node);
    }

    fn remove(&self, name: &str) -> Option<NodeId> {
        self.0.lock().unwrap().remove(name)
    }
}

/// Wakes readers of an operation's files after its status changed.
#[derive(Clone)]
pub struct Notify {
    fs: ControlFs,
    dirs: Dirs,
}

impl Notify {
    /// The control filesystem the agent will serve, to hand its backend
    /// before the agent exists.
    pub fn new() -> Notify {
        // Like /tmp: everyone may write the request file, and the sticky bit
        // lets owners (only) rmdir their operations.
        Notify {
            fs: ControlFs::new(Owner::root(0o1777)),
            dirs: Dirs::default(),
        }
    }

    pub fn changed(&self, op: &Operation) {
        // A late change of an operation already replaced under its name
        // wakes the new one's readers: they re-read and find nothing new.
        if let Some(node) = self.dirs.get(&op.name) {
            self.fs.changed(node);
        }
    }
}

/// What a backend's `prepare` is doing right now, for the message of a
/// request that ran past its deadline ("stat of source '/lus/x' as uid 1000").
#[derive(Default)]
pub struct Step(Mutex<String>);

impl Step {
    pub fn set(&self, doing: impl Into<String>) {
        *self.0.lock().unwrap() = doing.into();
    }

    fn get(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

/// A checked request: the operation to make visible and what the backend
/// needs to run it. The plan travels with the request, never by name, so
/// that two writers of one name cannot swap what they prepared.
pub struct Prepared {
    pub op: Operation,
    pub plan: Box<dyn Any + Send>,
}

/// What executes operations. The core owns names, limits and visibility;
/// a backend validates what only it can, runs copies and keeps records.
///
/// The core never calls `prepare` or `accept` on a door's thread (a FUSE
/// dispatch thread, a gRPC handler): they run on the core's blocking pool,
/// and may wait on file systems or the network.
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Checks the request as `who` and builds the operation. Whatever it
    /// leaves behind (a record) `discard` undoes. `step` says what it is
    /// doing, for the message should it not finish in time.
    fn prepare(
        &self,
        who: &Requester,
        name: String,
        request: Request,
        step: &Step,
    ) -> Result<Prepared, Rejection>;
    /// The writer went away or the deadline passed after `prepare`: leave
    /// nothing of the request behind.
    fn discard(&self, _op: &Operation, _plan: Box<dyn Any + Send>) {}
    /// The operation is registered and visible: run it.
    fn accept(&self, op: Arc<Operation>, plan: Box<dyn Any + Send>) -> Result<(), Rejection>;
    /// Ask for cancellation; a no-op once completed.
    fn cancel(&self, op: &Arc<Operation>);
    /// Forget a completed operation's record.
    fn remove(&self, op: &Operation) -> Result<(), Rejection>;
    /// How long `prepare` may take before the request fails with ETIMEDOUT.
    /// A backend with its own, longer timeout (the API server's) may extend
    /// it, so that its own words (EAGAIN) reach the writer.
    fn deadline(&self, request_timeout: Duration) -> Duration {
        request_timeout
    }
}

pub struct AgentConfig {
    pub max_ops_per_user: usize,
    pub retention: Duration,
    /// Deadline of the checks of one request (`--request-timeout`).
    pub request_timeout: Duration,
}

/// Requests of one user whose deadline passed while their checks still
/// wait on a file system: past this many, the user's next request fails
/// with EAGAIN at once instead of tying up one more worker.
pub const MAX_STUCK_PER_USER: usize = 4;
/// Requests of one user being checked at once; more fail with EAGAIN.
pub const MAX_CHECKING_PER_USER: usize = 64;

struct Registry {
    ops: HashMap<String, Arc<Operation>>,
    /// Names taken by requests still being checked: name → (token, uid).
    reserved: HashMap<String, (u64, u32)>,
    /// Operations and reservations of each user (the ENOSPC limit).
    per_user: HashMap<u32, usize>,
    next_token: u64,
}

impl Registry {
    fn in_use(&self, name: &str) -> bool {
        self.ops.contains_key(name) || self.reserved.contains_key(name)
    }

    fn release(&mut self, uid: u32) {
        if let Some(count) = self.per_user.get_mut(&uid) {
            *count = count.saturating_sub(1);
        }
    }
}

/// A name held for one request until it becomes an operation or its checks
/// return (even past their deadline: until then its record may still be
/// written, and the name must not pass to another request).
struct Reservation {
    name: String,
    token: u64,
}

/// Requests of one user in the core's hands.
#[derive(Default, Clone, Copy)]
struct Checking {
    /// Admitted and not yet returned from the backend.
    running: usize,
    /// Of those, past their deadline.
    stuck: usize,
}

/// What a door gives the core with a request: how to answer it.
pub trait Reply: Send + 'static {
    /// Asked once, just before the operation is committed: `false` means
    /// the requester is gone (its write was interrupted), so nothing may be
    /// created.
    fn claim(&self) -> bool {
        true
    }
    /// Whether the requester already went away (cheap, may be asked often).
    fn is_gone(&self) -> bool {
        false
    }
    /// The answer, given exactly once (or never, after a `claim` of false).
    fn finish(self: Box<Self>, result: Result<String, Rejection>);
}

/// A request as a door received it.
pub enum Input {
    /// The bytes of one write to `request`.
    Text(Vec<u8>),
    /// Already parsed (the gRPC door).
    Parsed(Request),
}

/// One request between its admission and its answer, shared by the task
/// that keeps its deadline and the worker that checks it.
struct Attempt {
    agent: Arc<Agent>,
    who: Requester,
    step: Step,
    state: Mutex<AttemptState>,
}

struct AttemptState {
    reply: Option<Box<dyn Reply>>,
    committed: bool,
    stuck: bool,
}

impl Attempt {
    /// The deadline passed: the writer gets ETIMEDOUT unless the operation
    /// is already committed (then the worker answers).
    fn expire(&self, after: Duration) {
        let mut state = self.state.lock().unwrap();
        if state.committed {
            return;
        }
        let Some(reply) = state.reply.take() else {
            return;
        };
        state.stuck = true;
        drop(state);
        self.agent
            .checking
            .lock()
            .unwrap()
            .entry(self.who.uid)
            .or_default()
            .stuck += 1;
        let doing = self.step.get();
        let rejection = Rejection::new(
            Errno::ETIMEDOUT,
            format!(
                "no answer within {}s while {}: its file system does not answer",
                after.as_secs_f64(),
                if doing.is_empty() {
                    "checking the request".to_string()
                } else {
                    doing
                }
            ),
        );
        self.agent.reject(&self.who, &rejection);
        reply.finish(Err(rejection));
    }

    /// The last moment to give up: whether the operation may be created.
    fn commit(&self) -> bool {
        let mut state = self.state.lock().unwrap();
        let Some(reply) = state.reply.as_ref() else {
            return false;
        };
        if !reply.claim() {
            // The writer already got EINTR: no answer is owed.
            state.reply = None;
            return false;
        }
        state.committed = true;
        true
    }

    /// Whether nobody waits for this request any more.
    fn is_gone(&self) -> bool {
        self.state
            .lock()
            .unwrap()
            .reply
            .as_ref()
            .is_none_or(|reply| reply.is_gone())
    }

    /// Answers the requester, if it still waits.
    fn answer(&self, result: Result<String, Rejection>) {
        let reply = self.state.lock().unwrap().reply.take();
        if let Some(reply) = reply {
            if let Err(rejection) = &result {
                // An abandoned request was nobody's mistake: no `errors` line.
                if rejection.errno != Errno::EINTR {
                    self.agent.reject(&self.who, rejection);
                }
            }
            reply.finish(result);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let stuck = self.state.get_mut().unwrap().stuck;
        let mut checking = self.agent.checking.lock().unwrap();
        if let Some(c) = checking.get_mut(&self.who.uid) {
            c.running = c.running.saturating_sub(1);
            if stuck {
                c.stuck = c.stuck.saturating_sub(1);
            }
            if c.running == 0 {
                checking.remove(&self.who.uid);
            }
        }
    }
}

/// A request given up on before its operation was committed.
fn abandoned() -> Rejection {
    Rejection::new(Errno::EINTR, "the request was abandoned")
}

pub struct Agent {
    fs: ControlFs,
    dirs: Dirs,
    registry: RwLock<Registry>,
    errors: Mutex<HashMap<u32, VecDeque<String>>>,
    checking: Mutex<HashMap<u32, Checking>>,
    backend: Arc<dyn Backend>,
    config: AgentConfig,
    /// Where requests are checked: never on a door's thread.
    rt: tokio::runtime::Handle,
}

impl Agent {
    /// The core over `backend`, serving the tree `notify` came with (see
    /// `Notify::new`); `rt` runs the checks of every request (its blocking
    /// pool bounds how many threads wait on file systems).
    pub fn new(
        config: AgentConfig,
        rt: tokio::runtime::Handle,
        notify: Notify,
        backend: Arc<dyn Backend>,
    ) -> Arc<Agent> {
        let agent = Arc::new(Agent {
            fs: notify.fs,
            dirs: notify.dirs,
            registry: RwLock::new(Registry {
                ops: HashMap::new(),
                reserved: HashMap::new(),
                per_user: HashMap::new(),
                next_token: 0,
            }),
            errors: Mutex::new(HashMap::new()),
            checking: Mutex::new(HashMap::new()),
            backend,
            config,
            rt,
        });
        agent.install();
        agent
    }

    pub fn fs(&self) -> &ControlFs {
        &self.fs
    }

    fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The fixed files of the root and the rmdir hook.
    fn install(self: &Arc<Self>) {
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

    /// Takes one request from a door and returns at once: the checks run on
    /// the core's blocking pool under the request's deadline, and `reply`
    /// gets the new operation's name or why not (also recorded for the
    /// `errors` file).
    pub fn start_create(self: &Arc<Self>, who: Requester, input: Input, reply: Box<dyn Reply>) {
        if let Err(rejection) = self.admit(who.uid) {
            self.reject(&who, &rejection);
            return reply.finish(Err(rejection));
        }
        let attempt = Arc::new(Attempt {
            agent: self.clone(),
            who,
            step: Step::default(),
            state: Mutex::new(AttemptState {
                reply: Some(reply),
                committed: false,
                stuck: false,
            }),
        });
        let deadline = self.backend().deadline(self.config.request_timeout);
        let worker = attempt.clone();
        let started = std::time::Instant::now();
        let checks = self.rt.spawn_blocking(move || {
            let result = worker.agent.create_checked(&worker, input);
            crate::metrics::answered(worker.who.uid, started, &result);
            worker.answer(result);
        });
        self.rt.spawn(async move {
            if tokio::time::timeout(deadline, checks).await.is_err() {
                attempt.expire(deadline);
            }
        });
    }

    /// Creates an operation and waits for the answer (the gRPC door). The
    /// request is abandoned if the caller stops waiting.
    pub async fn create(
        self: &Arc<Self>,
        who: Requester,
        input: Input,
    ) -> Result<String, Rejection> {
        struct Channel(tokio::sync::oneshot::Sender<Result<String, Rejection>>);
        impl Reply for Channel {
            fn claim(&self) -> bool {
                !self.0.is_closed()
            }
            fn is_gone(&self) -> bool {
                self.0.is_closed()
            }
            fn finish(self: Box<Self>, result: Result<String, Rejection>) {
                let _ = self.0.send(result);
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.start_create(who, input, Box::new(Channel(tx)));
        rx.await.unwrap_or_else(|_| Err(abandoned()))
    }

    /// Counts a request of `uid` in, or refuses it when too many of theirs
    /// are still being checked.
    fn admit(&self, uid: u32) -> Result<(), Rejection> {
        let mut checking = self.checking.lock().unwrap();
        let c = checking.entry(uid).or_default();
        if c.stuck >= MAX_STUCK_PER_USER {
            return Err(Rejection::new(
                Errno::EAGAIN,
                format!(
                    "{} earlier requests of uid {uid} still wait on file systems that do not answer: try again later",
                    c.stuck
                ),
            ));
        }
        if c.running >= MAX_CHECKING_PER_USER {
            return Err(Rejection::new(
                Errno::EAGAIN,
                format!(
                    "{} requests of uid {uid} are being checked: try again",
                    c.running
                ),
            ));
        }
        c.running += 1;
        Ok(())
    }

    /// The checks and the creation of one request, on a worker thread.
    fn create_checked(&self, attempt: &Attempt, input: Input) -> Result<String, Rejection> {
        let who = &attempt.who;
        if attempt.is_gone() {
            // Interrupted or timed out while queued: nothing to do.
            return Err(abandoned());
        }
        #[cfg(debug_assertions)]
        if std::env::var_os("NNF_DM_TEST_PANIC").is_some_and(|v| v == "request") {
            panic!("test hook NNF_DM_TEST_PANIC=request");
        }
        let mut request = match input {
            Input::Text(bytes) => {
                Request::parse(&bytes).map_err(|e| Rejection::new(Errno::EINVAL, e.0))?
            }
            Input::Parsed(request) => {
                request
                    .check()
                    .map_err(|e| Rejection::new(Errno::EINVAL, e.0))?;
                request
            }
        };
        if let Some(name) = &request.name {
            crate::request::validate_name(name).map_err(|e| Rejection::new(Errno::EINVAL, e.0))?;
        }
        if request.workflow.is_none() && request.namespace.is_none() {
            let env = crate::environ::workflow_of(who.pid);
            request.workflow = env.0;
            request.namespace = env.1;
        }
        let reservation = self.reserve(who.uid, request.name.clone())?;
        let name = reservation.name.clone();
        let prepared = match self
            .backend()
            .prepare(who, name.clone(), request, &attempt.step)
        {
            Ok(prepared) => prepared,
            Err(rejection) => {
                self.unreserve(who.uid, &reservation);
                return Err(rejection);
            }
        };
        if !attempt.commit() {
            tracing::info!(op = %name, user = who.uid, "request abandoned by its writer or its deadline: nothing created");
            self.backend().discard(&prepared.op, prepared.plan);
            self.unreserve(who.uid, &reservation);
            return Err(abandoned());
        }
        let op = Arc::new(prepared.op);
        if let Err(rejection) = self.register_reserved(op.clone(), &reservation) {
            self.backend().discard(&op, prepared.plan);
            self.unreserve(who.uid, &reservation);
            return Err(rejection);
        }
        if let Err(rejection) = self.backend().accept(op.clone(), prepared.plan) {
            // Not in a FUSE callback: the kernel may be told at once.
            self.unregister(&op, true);
            return Err(rejection);
        }
        tracing::info!(op = %name, user = who.uid, source = %op.request.source, destination = %op.request.destination, "operation created");
        Ok(name)
    }

    /// Takes `name` (or a generated one) for `uid` before any backend work,
    /// counting it against the user's limit.
    fn reserve(&self, uid: u32, name: Option<String>) -> Result<Reservation, Rejection> {
        let mut registry = self.registry.write().unwrap();
        let name = match name {
            Some(name) => {
                if registry.ops.contains_key(&name) {
                    return Err(Rejection::new(
                        Errno::EEXIST,
                        format!("name '{name}' is in use"),
                    ));
                }
                if registry.reserved.contains_key(&name) {
                    return Err(Rejection::new(
                        Errno::EEXIST,
                        format!("name '{name}' is in use by a request still being checked"),
                    ));
                }
                name
            }
            None => loop {
                let name = generate_name();
                if !registry.in_use(&name) {
                    break name;
                }
            },
        };
        self.check_limit(&registry, uid)?;
        registry.next_token += 1;
        let token = registry.next_token;
        registry.reserved.insert(name.clone(), (token, uid));
        *registry.per_user.entry(uid).or_default() += 1;
        Ok(Reservation { name, token })
    }

    /// Gives a reserved name back (only if it is still this reservation's).
    fn unreserve(&self, uid: u32, reservation: &Reservation) {
        let mut registry = self.registry.write().unwrap();
        if registry.reserved.get(&reservation.name).map(|r| r.0) == Some(reservation.token) {
            registry.reserved.remove(&reservation.name);
            registry.release(uid);
        }
    }

    /// Turns a reservation into a visible operation.
    fn register_reserved(
        &self,
        op: Arc<Operation>,
        reservation: &Reservation,
    ) -> Result<(), Rejection> {
        let mut registry = self.registry.write().unwrap();
        if registry.reserved.get(&op.name).map(|r| r.0) != Some(reservation.token) {
            return Err(Rejection::new(
                Errno::EIO,
                format!("the reservation of '{}' was lost", op.name),
            ));
        }
        let node = self.add_op_dir(&op).map_err(|e| {
            Rejection::new(
                Errno::EIO,
                format!("cannot create the directory of '{}': {e:?}", op.name),
            )
        })?;
        self.dirs.insert(&op.name, node);
        registry.reserved.remove(&op.name);
        registry.ops.insert(op.name.clone(), op.clone());
        Ok(())
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
        let (_, node) = self.remove_op(uid, name)?;
        if let Some(node) = node {
            self.fs.remove_now(node);
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

    /// Makes an operation visible that needs no checks (one restored from
    /// a record or a resource): registry entry and its directory.
    pub fn register(&self, op: Arc<Operation>) -> Result<(), Rejection> {
        let mut registry = self.registry.write().unwrap();
        if registry.in_use(&op.name) {
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
        self.dirs.insert(&op.name, node);
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
        // Only this very operation: its name may have passed to another.
        if !registry
            .ops
            .get(&op.name)
            .is_some_and(|o| std::ptr::eq(&**o, op))
        {
            return;
        }
        registry.ops.remove(&op.name);
        registry.release(op.uid);
        let node = self.dirs.remove(&op.name);
        drop(registry);
        if let Some(node) = node {
            if now {
                self.fs.remove_now(node);
            } else {
                self.fs.remove(node);
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

    /// Records a rejection for the `errors` file and the log.
    fn reject(&self, who: &Requester, rejection: &Rejection) {
        crate::metrics::rejected(who.uid, rejection.errno);
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
    /// Returns the operation and its directory, which the caller removes
    /// (the rmdir hook: the library does).
    fn remove_op(&self, uid: u32, name: &str) -> Result<(Arc<Operation>, Option<NodeId>), Errno> {
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
        let mut node = None;
        if registry.ops.get(name).is_some_and(|o| Arc::ptr_eq(o, &op)) {
            registry.ops.remove(name);
            registry.release(op.uid);
            node = self.dirs.remove(name);
        }
        drop(registry);
        tracing::info!(op = %name, user = uid, "operation removed");
        Ok((op, node))
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

/// A fresh name for a request that gave none.
fn generate_name() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 8];
    crate::sys::random_bytes(&mut bytes);
    let suffix: String = bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    format!("dm-{suffix}")
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
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EINTR => "EINTR",
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
