//! The local backend: copies on this node, as the requesting user, in child
//! processes the kernel holds to that user's permissions.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, PipeReader};

use copy_engine::{Counts, WorkerEvent};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fuse_ctl::Errno;

use crate::agent::{Agent, Backend, Notify, Prepared, Rejection, Requester, Step};
use crate::op::{Counters, Operation, Outcome, State, Status};
use crate::profiles::{Profile, Profiles};
use crate::request::Request;
use crate::store::{Record, Store};
use crate::sys;

/// Grace between SIGTERM and SIGKILL of a cancelled copy.
const CANCEL_GRACE: Duration = Duration::from_secs(1);
/// How much command output a failed copy keeps in `message`.
const MESSAGE_TAIL_BYTES: usize = 4096;

pub struct LocalConfig {
    pub max_active: usize,
    pub profiles: Profiles,
    pub store: Store,
}

struct Queue {
    /// Waiting operations per user, served round-robin across users.
    waiting: BTreeMap<u32, VecDeque<Arc<Operation>>>,
    last_uid: Option<u32>,
    active: usize,
}

/// A running copy's process group, for cancel.
struct Running {
    pgid: i32,
}

pub struct LocalBackend {
    max_active: usize,
    profiles: Profiles,
    store: Store,
    queue: Mutex<Queue>,
    running: Mutex<BTreeMap<String, Running>>,
    records: Mutex<()>,
    spawner: Spawner,
    notify: Notify,
    cpus: usize,
    me: std::sync::Weak<LocalBackend>,
}

impl LocalBackend {
    pub fn new(config: LocalConfig, notify: Notify) -> Arc<LocalBackend> {
        Arc::new_cyclic(|me| LocalBackend {
            max_active: config.max_active.max(1),
            profiles: config.profiles,
            store: config.store,
            queue: Mutex::new(Queue {
                waiting: BTreeMap::new(),
                last_uid: None,
                active: 0,
            }),
            running: Mutex::new(BTreeMap::new()),
            records: Mutex::new(()),
            spawner: Spawner::start(),
            notify,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            me: me.clone(),
        })
    }

    /// Re-registers every recorded operation; copies that a previous agent
    /// left unfinished run again with `restarts` + 1.
    pub fn recover(self: &Arc<Self>, agent: &Agent) -> std::io::Result<usize> {
        let records = self.store.load_all()?;
        let count = records.len();
        for record in records {
            let mut status = record.status.clone();
            let rerun = matches!(status.state, State::Starting | State::Running);
            if rerun {
                if let (Some(pgid), Some(start)) = (record.pgid, record.leader_start) {
                    // Only if the group leader is the very process we started:
                    // after a reboot the number belongs to someone else.
                    if sys::process_start_time(pgid) == Some(start) {
                        sys::kill_group(pgid, libc::SIGKILL);
                    }
                }
                status.restarts += 1;
                status.state = State::Pending;
                status.progress = 0;
            }
            if status.state == State::Cancelling {
                status.state = State::Completed;
                status.outcome = Outcome::Cancelled;
                status.end_time.get_or_insert_with(SystemTime::now);
            }
            let op = Arc::new(Operation::new(
                record.name.clone(),
                record.uid,
                record.gid,
                record.request.clone(),
                record.target.clone(),
                status,
            ));
            if let Err(rejection) = agent.register(op.clone()) {
                tracing::error!(op = %record.name, user = record.uid, "cannot restore operation: {}", rejection.reason);
                continue;
            }
            if rerun {
                tracing::info!(op = %op.name, user = op.uid, restarts = op.status().restarts, "re-running copy interrupted by a restart");
                let _ = self.persist(&op, None);
            }
            if op.status().state == State::Pending {
                self.enqueue(op);
            }
        }
        Ok(count)
    }

    fn persist(&self, op: &Operation, process: Option<(i32, u64)>) -> std::io::Result<()> {
        // Serialised with `remove`, so that a late write from the copy thread
        // cannot bring back the record of an operation just removed.
        let _records = self.records.lock().unwrap();
        if op.removed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.store.save(&Record {
            name: op.name.clone(),
            uid: op.uid,
            gid: op.gid,
            request: op.request.clone(),
            target: op.target.clone(),
            created: op.created,
            status: op.status(),
            pgid: process.map(|p| p.0),
            leader_start: process.map(|p| p.1),
        })
    }

    fn persist_logged(&self, op: &Operation, process: Option<(i32, u64)>) {
        if let Err(e) = self.persist(op, process) {
            tracing::error!(op = %op.name, user = op.uid, "cannot record operation state: {e}");
        }
    }

    fn enqueue(&self, op: Arc<Operation>) {
        self.queue
            .lock()
            .unwrap()
            .waiting
            .entry(op.uid)
            .or_default()
            .push_back(op);
        self.pump();
    }

    /// Starts waiting copies while fewer than `max_active` run, taking users
    /// in turn so that one user's many requests cannot starve another's.
    fn pump(&self) {
        loop {
            let to_start = self.take_startable();
            if to_start.is_empty() {
                return;
            }
            for op in to_start {
                if op.request.dryrun {
                    // Nothing to run: completing it here spares a thread.
                    self.run(&op);
                    self.queue.lock().unwrap().active -= 1;
                    continue;
                }
                let me = self.me.upgrade().expect("backend alive while pumping");
                let spawned = std::thread::Builder::new()
                    .name(format!("copy-{}", op.name))
                    .spawn(move || {
                        me.run(&op);
                        me.queue.lock().unwrap().active -= 1;
                        me.pump();
                    });
                if let Err(e) = spawned {
                    tracing::error!("cannot start a copy thread: {e}");
                    self.queue.lock().unwrap().active -= 1;
                }
            }
        }
    }

    fn take_startable(&self) -> Vec<Arc<Operation>> {
        let mut to_start = Vec::new();
        let mut queue = self.queue.lock().unwrap();
        while queue.active < self.max_active && !queue.waiting.is_empty() {
            let after = queue.last_uid;
            let uid = after
                .and_then(|last| queue.waiting.range(last + 1..).next().map(|(uid, _)| *uid))
                .or_else(|| queue.waiting.keys().next().copied())
                .expect("queue is not empty");
            let list = queue.waiting.get_mut(&uid).expect("uid is present");
            let op = list.pop_front().expect("lists are never left empty");
            if list.is_empty() {
                queue.waiting.remove(&uid);
            }
            queue.last_uid = Some(uid);
            queue.active += 1;
            to_start.push(op);
        }
        to_start
    }

    /// Runs one copy to completion and records how it ended.
    fn run(&self, op: &Arc<Operation>) {
        if op.cancel_requested.load(Ordering::Acquire) {
            self.finish(op, Outcome::Cancelled, String::new());
            return;
        }
        let Some(profile) = self.profiles.get(op.request.profile.as_deref()).cloned() else {
            self.finish(
                op,
                Outcome::Failed,
                format!(
                    "profile '{}' no longer exists",
                    op.request.profile.as_deref().unwrap_or("")
                ),
            );
            return;
        };
        let plan = self.plan(op, &profile);
        self.update(op, |s| {
            s.state = State::Starting;
            s.start_time.get_or_insert_with(SystemTime::now);
            s.end_time = None;
            s.command = plan.display.clone();
            s.message.clear();
        });
        tracing::info!(op = %op.name, user = op.uid, command = %plan.display, "copy starting");
        if op.request.dryrun {
            self.finish(op, Outcome::Success, String::new());
            return;
        }
        let (child, output) = match self.spawn(op, &plan) {
            Ok(spawned) => spawned,
            Err(e) => {
                self.finish(op, Outcome::Failed, format!("cannot start the copy: {e}"));
                return;
            }
        };
        let pgid = child.id() as i32;
        let leader_start = sys::process_start_time(pgid).unwrap_or(0);
        self.running
            .lock()
            .unwrap()
            .insert(op.name.clone(), Running { pgid });
        self.update(op, |s| s.state = State::Running);
        self.persist_logged(op, Some((pgid, leader_start)));
        // A cancel that raced with the start finds the group now.
        if op.cancel_requested.load(Ordering::Acquire) {
            self.signal_cancel(op);
        }
        let (outcome, message) = match plan.kind {
            PlanKind::Native => self.follow_native(op, child, output),
            PlanKind::Command => self.follow_command(op, child, output, &profile),
        };
        self.running.lock().unwrap().remove(&op.name);
        let outcome = if op.cancel_requested.load(Ordering::Acquire) && outcome != Outcome::Success
        {
            Outcome::Cancelled
        } else {
            outcome
        };
        self.finish(op, outcome, message);
    }

    fn finish(&self, op: &Operation, outcome: Outcome, message: String) {
        self.update(op, |s| {
            s.state = State::Completed;
            s.outcome = outcome;
            s.end_time = Some(SystemTime::now());
            s.start_time.get_or_insert(s.end_time.unwrap());
            if outcome == Outcome::Success {
                s.progress = 100;
            }
            if !message.is_empty() {
                s.message = message;
            }
        });
        self.persist_logged(op, None);
        tracing::info!(op = %op.name, user = op.uid, status = outcome.word(), "copy completed");
    }

    fn update(&self, op: &Operation, change: impl FnOnce(&mut Status)) {
        if op.update(change) {
            self.notify.changed(op);
        }
    }

    fn plan(&self, op: &Operation, profile: &Profile) -> Plan {
        let req = &op.request;
        if op.request.dryrun {
            return Plan {
                kind: PlanKind::Native,
                argv: Vec::new(),
                display: "true".into(),
                hostfile: None,
            };
        }
        match &profile.command {
            None => {
                let workers = if req.slots > 0 {
                    req.slots as usize
                } else {
                    self.cpus
                };
                let exe =
                    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
                let argv = vec![
                    exe.to_string_lossy().into_owned(),
                    "copy-worker".into(),
                    "--workers".into(),
                    workers.to_string(),
                    "--".into(),
                    req.source.clone(),
                    op.target.to_string_lossy().into_owned(),
                ];
                let display = argv
                    .iter()
                    .map(|a| crate::request::quote(a))
                    .collect::<Vec<_>>()
                    .join(" ");
                Plan {
                    kind: PlanKind::Native,
                    argv,
                    display,
                    hostfile: None,
                }
            }
            Some(template) => {
                let slots = if req.slots >= 0 {
                    req.slots
                } else {
                    profile.slots
                };
                let max_slots = if req.max_slots >= 0 {
                    req.max_slots
                } else {
                    profile.max_slots
                };
                let mut hostfile_line = "localhost".to_string();
                if slots > 0 {
                    hostfile_line.push_str(&format!(" slots={slots}"));
                }
                if max_slots > 0 {
                    hostfile_line.push_str(&format!(" max_slots={max_slots}"));
                }
                hostfile_line.push('\n');
                let hostfile = self.store.hostfile(&op.name);
                let command = build_command(template, req, op.uid, op.gid, &hostfile);
                Plan {
                    kind: PlanKind::Command,
                    argv: vec!["/bin/bash".into(), "-c".into(), command.clone()],
                    display: command,
                    hostfile: Some(hostfile_line),
                }
            }
        }
    }

    fn spawn(
        &self,
        op: &Operation,
        plan: &Plan,
    ) -> std::io::Result<(Child, BufReader<PipeReader>)> {
        if let Some(content) = &plan.hostfile {
            self.store.write_hostfile(&op.name, content)?;
        }
        let profile = self.profiles.get(op.request.profile.as_deref());
        let create_parent =
            plan.kind == PlanKind::Native || profile.is_some_and(|p| p.create_dest_dir);
        let mut cmd = Command::new(&plan.argv[0]);
        cmd.args(&plan.argv[1..])
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("LANG", "C.UTF-8")
            .current_dir("/")
            .stdin(Stdio::null());
        if let Some(w) = &op.request.workflow {
            cmd.env("DW_WORKFLOW_NAME", w);
        }
        if let Some(ns) = &op.request.namespace {
            cmd.env("DW_WORKFLOW_NAMESPACE", ns);
        }
        let (reader, writer) = std::io::pipe()?;
        cmd.stdout(writer.try_clone()?).stderr(writer);
        let groups = sys::groups_of(op.uid, op.gid);
        let (uid, gid) = (op.uid, op.gid);
        let parent_dir = if create_parent {
            op.target.parent().map(Path::to_path_buf)
        } else {
            None
        };
        if let Some(dir) = &parent_dir {
            // Missing parents of the destination are created as the user, so
            // the kernel decides whether they may.
            let dir = dir.clone();
            sys::as_user(uid, gid, &groups, || std::fs::create_dir_all(&dir))??;
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            let agent_pid = libc::getpid();
            cmd.pre_exec(move || {
                if libc::setpgid(0, 0) != 0
                    || libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // After the uid change, which clears it; then make sure the
                // agent did not die before it was set.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != agent_pid {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = self.spawner.spawn(cmd)?;
        Ok((child, BufReader::new(reader)))
    }

    /// Follows the native engine's JSON progress lines until it exits.
    fn follow_native(
        &self,
        op: &Operation,
        mut child: Child,
        output: BufReader<PipeReader>,
    ) -> (Outcome, String) {
        let mut totals = (0u64, 0u64);
        let mut last_sample: Option<(Instant, u64)> = None;
        let mut done: Option<(u64, Vec<String>, Vec<String>)> = None;
        let mut fatal: Option<String> = None;
        let mut stray = String::new();
        for line in output.lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<WorkerEvent>(&line) {
                Ok(WorkerEvent::Scan {
                    total_bytes,
                    total_items,
                }) => totals = (total_bytes, total_items),
                Ok(WorkerEvent::Progress(counts)) => {
                    let now = Instant::now();
                    let rate = last_sample.and_then(|(at, bytes)| {
                        let dt = now.duration_since(at).as_secs_f64();
                        (dt > 0.0).then(|| (counts.bytes.saturating_sub(bytes) as f64 / dt) as u64)
                    });
                    last_sample = Some((now, counts.bytes));
                    self.update(op, |s| {
                        s.counters = Some(counters(&counts));
                        s.progress = percent(&counts, totals);
                        if rate.is_some() {
                            s.rate_bytes_per_second = rate;
                        }
                    });
                }
                Ok(WorkerEvent::Done {
                    counts,
                    failure_count,
                    failures,
                    notes,
                }) => {
                    self.update(op, |s| s.counters = Some(counters(&counts)));
                    done = Some((failure_count, failures, notes));
                }
                Ok(WorkerEvent::Fatal { message }) => fatal = Some(message),
                Err(_) => {
                    // Not ours (a loader or allocator complaint): keep it for the message.
                    if stray.len() < MESSAGE_TAIL_BYTES {
                        stray.push_str(&line);
                        stray.push('\n');
                    }
                }
            }
        }
        let exit = child.wait();
        let notes = done.as_ref().map(|d| d.2.join("\n")).unwrap_or_default();
        match exit {
            Ok(status) if status.success() => (Outcome::Success, notes),
            Ok(status) if status.code().is_some() => {
                if let Some(message) = fatal {
                    return (Outcome::Failed, message);
                }
                match done {
                    Some((count, failures, _)) => {
                        let mut message =
                            format!("{count} of {} items failed", totals.1.max(count));
                        for failure in failures {
                            message.push('\n');
                            message.push_str(&failure);
                        }
                        if !notes.is_empty() {
                            message.push('\n');
                            message.push_str(&notes);
                        }
                        (Outcome::Failed, message)
                    }
                    None => (
                        Outcome::Failed,
                        format!("copy exited with {status}: {}", stray.trim_end()),
                    ),
                }
            }
            Ok(status) => (Outcome::Failed, format!("copy process ended by {status}")),
            Err(e) => (
                Outcome::Failed,
                format!("cannot wait for the copy process: {e}"),
            ),
        }
    }

    /// Follows a profile command's output: dcp's `Copied ... (NN%)` lines
    /// give progress, the last line is `last_message`.
    fn follow_command(
        &self,
        op: &Operation,
        mut child: Child,
        output: BufReader<PipeReader>,
        profile: &Profile,
    ) -> (Outcome, String) {
        let store_all = op.request.store_stdout || profile.store_stdout;
        let log_all = op.request.log_stdout || profile.log_stdout;
        let mut kept = String::new();
        for line in output.lines() {
            let Ok(line) = line else { break };
            if log_all {
                tracing::info!(op = %op.name, user = op.uid, "output: {line}");
            }
            kept.push_str(&line);
            kept.push('\n');
            if !store_all && kept.len() > 2 * MESSAGE_TAIL_BYTES {
                let cut = kept.len() - MESSAGE_TAIL_BYTES;
                let cut = (cut..kept.len())
                    .find(|i| kept.is_char_boundary(*i))
                    .unwrap_or(cut);
                kept.drain(..cut);
            }
            let progress = progress_of_line(&line);
            self.update(op, |s| {
                if let Some(p) = progress {
                    s.progress = p;
                }
                s.last_message = line.clone();
                s.last_message_time = Some(SystemTime::now());
            });
        }
        match child.wait() {
            Ok(status) if status.success() => (
                Outcome::Success,
                if store_all { kept } else { String::new() },
            ),
            Ok(status) => {
                tracing::warn!(op = %op.name, user = op.uid, "copy command failed ({status}); output:\n{kept}");
                (
                    Outcome::Failed,
                    format!("copy command failed ({status})\n{}", kept.trim_end()),
                )
            }
            Err(e) => (
                Outcome::Failed,
                format!("cannot wait for the copy command: {e}"),
            ),
        }
    }

    /// SIGTERM to the copy's process group now, SIGKILL after a grace period.
    fn signal_cancel(&self, op: &Operation) {
        let Some(pgid) = self.running.lock().unwrap().get(&op.name).map(|r| r.pgid) else {
            return;
        };
        sys::kill_group(pgid, libc::SIGTERM);
        let me = self.me.clone();
        let name = op.name.clone();
        let _ = std::thread::Builder::new()
            .name("cancel-grace".into())
            .spawn(move || {
                std::thread::sleep(CANCEL_GRACE);
                if let Some(me) = me.upgrade() {
                    if me.running.lock().unwrap().get(&name).map(|r| r.pgid) == Some(pgid) {
                        sys::kill_group(pgid, libc::SIGKILL);
                    }
                }
            });
    }
}

fn counters(c: &Counts) -> Counters {
    Counters {
        items: c.items,
        directories: c.directories,
        files: c.files,
        links: c.links,
        bytes: c.bytes,
    }
}

fn percent(c: &Counts, (total_bytes, total_items): (u64, u64)) -> u8 {
    let p = c
        .bytes
        .saturating_mul(100)
        .checked_div(total_bytes)
        .or_else(|| c.items.saturating_mul(100).checked_div(total_items))
        .unwrap_or(0);
    p.min(99) as u8
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn prepare(
        &self,
        who: &Requester,
        name: String,
        mut request: Request,
        step: &Step,
    ) -> Result<Prepared, Rejection> {
        let profile = self
            .profiles
            .get(request.profile.as_deref())
            .ok_or_else(|| {
                Rejection::new(
                    Errno::ENOENT,
                    format!(
                        "profile '{}' does not exist",
                        request.profile.as_deref().unwrap_or("")
                    ),
                )
            })?;
        request.profile = Some(profile.name.clone());
        request.name = Some(name.clone());
        let native = profile.command.is_none();
        if !native {
            // Split into words now, so a bad quote is the writer's EINVAL.
            for (key, value) in [
                ("dcp_options", &request.dcp_options),
                ("mpirun_options", &request.mpirun_options),
            ] {
                crate::shellword::split_options(key, value)
                    .map_err(|e| Rejection::new(Errno::EINVAL, e))?;
            }
        }
        step.set(format!("looking up the groups of uid {}", who.uid));
        let groups = sys::groups_of(who.uid, who.gid);

        let (source, destination) = (
            PathBuf::from(&request.source),
            PathBuf::from(&request.destination),
        );
        // Checked as the user: what they cannot see does not exist for them.
        let probe = sys::as_user(who.uid, who.gid, &groups, || {
            step.set(format!(
                "checking source '{}' as uid {}",
                request.source, who.uid
            ));
            std::fs::symlink_metadata(&source)?;
            step.set(format!(
                "checking destination '{}' as uid {}",
                request.destination, who.uid
            ));
            Ok::<_, std::io::Error>(if native {
                copy_engine::resolve_destination(&source, &destination)
            } else {
                destination
            })
        })
        .map_err(|e| {
            Rejection::new(
                Errno::EIO,
                format!("cannot check the source as uid {}: {e}", who.uid),
            )
        })?;
        let target = probe.map_err(|e| {
            Rejection::new(
                Errno::ENOENT,
                format!(
                    "source '{}' does not exist or is not visible to uid {}: {e}",
                    request.source, who.uid
                ),
            )
        })?;
        let op = Operation::new(name, who.uid, who.gid, request, target, Status::default());
        step.set(format!(
            "writing the record of '{}' to the state directory",
            op.name
        ));
        self.persist(&op, None).map_err(|e| {
            Rejection::new(
                Errno::EIO,
                format!("cannot record the operation in the state directory: {e}"),
            )
        })?;
        Ok(Prepared {
            op: Arc::new(op),
            plan: Box::new(()),
        })
    }

    fn discard(&self, op: &Operation, _plan: Box<dyn Any + Send>) {
        let _records = self.records.lock().unwrap();
        if let Err(e) = self.store.delete(&op.name) {
            tracing::error!(op = %op.name, user = op.uid, "cannot delete the record of an abandoned request: {e}");
        }
    }

    fn accept(&self, op: Arc<Operation>, _plan: Box<dyn Any + Send>) -> Result<(), Rejection> {
        self.enqueue(op);
        Ok(())
    }

    fn cancel(&self, op: &Arc<Operation>) {
        if op.is_completed() {
            return;
        }
        op.cancel_requested.store(true, Ordering::Release);
        // Still waiting: it never runs.
        let was_waiting = {
            let mut queue = self.queue.lock().unwrap();
            let mut found = false;
            if let Some(list) = queue.waiting.get_mut(&op.uid) {
                let before = list.len();
                list.retain(|o| o.name != op.name);
                found = list.len() != before;
                if list.is_empty() {
                    queue.waiting.remove(&op.uid);
                }
            }
            found
        };
        if was_waiting {
            self.finish(op, Outcome::Cancelled, String::new());
            return;
        }
        self.update(op, |s| {
            if s.state != State::Completed {
                s.state = State::Cancelling;
            }
        });
        self.persist_logged(op, None);
        self.signal_cancel(op);
    }

    fn remove(&self, op: &Operation) -> Result<(), Rejection> {
        let _records = self.records.lock().unwrap();
        op.removed.store(true, Ordering::Release);
        self.store.delete(&op.name).map_err(|e| {
            Rejection::new(
                Errno::EIO,
                format!("cannot delete the record of '{}': {e}", op.name),
            )
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PlanKind {
    Native,
    Command,
}

struct Plan {
    kind: PlanKind,
    argv: Vec<String>,
    display: String,
    hostfile: Option<String>,
}

/// Substitutes the profile's variables and inserts the user's options
/// after `dcp` and `mpirun`, as upstream does (nnf-dm
/// `internal/controller/helpers/datamovement_helpers.go` `BuildDMCommand`).
/// Unlike upstream, every substituted value is shell-quoted into exactly one
/// word and the options are split by the request grammar's quoting into
/// separate words, so a file name or an option never becomes shell code;
/// the substitution is one pass over the profile's own text, so a value
/// holding `$DEST` or `dcp` is never substituted again.
pub fn build_command(template: &str, req: &Request, uid: u32, gid: u32, hostfile: &Path) -> String {
    use crate::shellword::{quote, split_options};
    let words = |key: &str, value: &str| -> String {
        // Checked when the request was accepted; an operation recorded by an
        // older agent still runs its options as one word rather than as code.
        let words = split_options(key, value).unwrap_or_else(|_| vec![value.to_string()]);
        words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
    };
    let mut inserts: Vec<(usize, String)> = Vec::new();
    for (word, key, value) in [
        ("dcp", "dcp_options", &req.dcp_options),
        ("mpirun", "mpirun_options", &req.mpirun_options),
    ] {
        if let Some(at) = word_end(template, word) {
            let options = words(key, value);
            if !options.is_empty() {
                inserts.push((at, format!(" {options}")));
            }
        }
    }
    let variables = [
        ("$HOSTFILE", quote(&hostfile.to_string_lossy())),
        ("$UID", uid.to_string()),
        ("$GID", gid.to_string()),
        ("$SRC", quote(&req.source)),
        ("$DEST", quote(&req.destination)),
    ];
    let mut cmd = String::with_capacity(template.len() + 64);
    let mut at = 0;
    while at <= template.len() {
        for (_, text) in inserts.iter().filter(|(i, _)| *i == at) {
            cmd.push_str(text);
        }
        let Some(c) = template[at..].chars().next() else {
            break;
        };
        if let Some((name, value)) = variables
            .iter()
            .find(|(name, _)| template[at..].starts_with(name))
        {
            cmd.push_str(value);
            at += name.len();
        } else {
            cmd.push(c);
            at += c.len_utf8();
        }
    }
    cmd
}

/// Where the first `word` of the profile's text ends: a whole word, or the
/// last component of a path (`/opt/bin/dcp`).
fn word_end(cmd: &str, word: &str) -> Option<usize> {
    let bytes = cmd.as_bytes();
    let is_word_char =
        |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.' || b == b'/';
    let mut start = 0;
    while let Some(found) = cmd[start..].find(word) {
        let at = start + found;
        let end = at + word.len();
        let before_ok = at == 0 || !is_word_char(bytes[at - 1]) || bytes[at - 1] == b'/';
        let after_ok = end == bytes.len() || !is_word_char(bytes[end]);
        if before_ok && after_ok {
            return Some(end);
        }
        start = end;
    }
    None
}

/// `Copied ... (NN%)` lines of dcp give the percentage.
pub fn progress_of_line(line: &str) -> Option<u8> {
    let copied = line.find("Copied")?;
    let rest = &line[copied + "Copied".len()..];
    let mut best = None;
    for (i, _) in rest.match_indices('(') {
        if i == 0 {
            continue;
        }
        let digits: String = rest[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        if (1..=3).contains(&digits.len()) && rest[i + 1 + digits.len()..].starts_with("%)") {
            best = digits.parse::<u8>().ok().map(|p| p.min(100));
        }
    }
    best
}

/// Spawns children from one long-lived thread: PR_SET_PDEATHSIG fires when
/// the *thread* that forked exits, and pool threads retire when idle.
struct Spawner {
    tx: Mutex<mpsc::Sender<(Command, mpsc::Sender<std::io::Result<Child>>)>>,
}

impl Spawner {
    fn start() -> Spawner {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::Sender<std::io::Result<Child>>)>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the spawner thread");
        Spawner { tx: Mutex::new(tx) }
    }

    fn spawn(&self, cmd: Command) -> std::io::Result<Child> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .lock()
            .unwrap()
            .send((cmd, reply_tx))
            .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
        reply_rx
            .recv()
            .map_err(|_| std::io::Error::other("spawner thread is gone"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(source: &str, destination: &str, dcp: &str, mpirun: &str) -> Request {
        Request {
            source: source.into(),
            destination: destination.into(),
            dcp_options: dcp.into(),
            mpirun_options: mpirun.into(),
            ..Request::default()
        }
    }

    #[test]
    fn plain_values_read_as_before() {
        let req = request("/a/src", "/b/dst", "--quiet", "-x Y");
        let cmd = build_command(
            "mpirun --hostfile $HOSTFILE -u $UID -g $GID /opt/bin/dcp $SRC $DEST",
            &req,
            7,
            8,
            Path::new("/var/lib/h"),
        );
        assert_eq!(
            cmd,
            "mpirun -x Y --hostfile /var/lib/h -u 7 -g 8 /opt/bin/dcp --quiet /a/src /b/dst"
        );
    }

    #[test]
    fn every_value_is_one_word() {
        let req = request(
            "/s/we ird;touch x",
            "/d/$(id)`id`'\"\n-rf $SRC",
            "--label \"a b;c\" -v",
            "",
        );
        let cmd = build_command("dcp $SRC $DEST", &req, 0, 0, Path::new("/h"));
        assert_eq!(
            cmd,
            "dcp --label 'a b;c' -v '/s/we ird;touch x' '/d/$(id)`id`'\\''\"\n-rf $SRC'"
        );
    }

    #[test]
    fn options_never_land_inside_a_path() {
        let req = request("/x/dcp/y", "/z", "--quiet", "");
        let cmd = build_command("cp -r $SRC $DEST; dcp", &req, 0, 0, Path::new("/h"));
        assert_eq!(cmd, "cp -r /x/dcp/y /z; dcp --quiet");
    }
}
