//! The local backend: copies on this node, as the requesting user, in child
//! processes the kernel holds to that user's permissions.
//!
//! `plan` turns a request into the command to run, `process` starts it and
//! follows its output.

mod plan;
mod process;

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuse_ctl::Errno;

use crate::agent::{Agent, Backend, Notify, Prepared, Rejection, Requester, Step};
use crate::op::{Operation, Outcome, State, Status};
use crate::profiles::Profiles;
use crate::request::Request;
use crate::store::{Record, Store};
use crate::sys;

use plan::PlanKind;
use process::Spawner;

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
        // The native engine skips what an earlier, interrupted run of this
        // operation completed; without a journal it copies everything.
        let journal = if profile.command.is_none() && !op.request.dryrun {
            self.open_journal(op)
        } else {
            None
        };
        let journal_fd = journal.as_ref().map(AsRawFd::as_raw_fd);
        let plan = self.plan(op, &profile, journal_fd);
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
        // Recorded as started before any process exists: a crash from here
        // on (before the record with the process group is written, too)
        // makes recovery count a restart, since the copy may have written
        // into the destination. A crash before this point re-runs a copy
        // that never began, and counts none.
        self.persist_logged(op, None);
        let spawned = self.spawn(op, &plan, journal_fd);
        // The worker holds its own copy now.
        drop(journal);
        let (child, output) = match spawned {
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
        // Recorded as completed first: a crash in between re-runs nothing.
        self.store.delete_journal(&op.name);
        tracing::info!(op = %op.name, user = op.uid, status = outcome.word(), "copy completed");
    }

    fn open_journal(&self, op: &Operation) -> Option<std::fs::File> {
        // Never 0-2: the child's stdio replaces those before exec.
        let opened = self.store.open_journal(&op.name).and_then(|f| {
            if f.as_raw_fd() > 2 {
                Ok(f)
            } else {
                f.try_clone()
            }
        });
        match opened {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(op = %op.name, user = op.uid, "cannot open the resume journal, copying without one: {e}");
                None
            }
        }
    }

    fn update(&self, op: &Operation, change: impl FnOnce(&mut Status)) {
        if op.update(change) {
            self.notify.changed(op);
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
