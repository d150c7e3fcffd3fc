//! Starting a copy as the requesting user and following its output.

use std::io::{BufRead, BufReader, PipeReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use copy_engine::{Counts, WorkerEvent};

use super::plan::{progress_of_line, Plan, PlanKind};
use super::{LocalBackend, MESSAGE_TAIL_BYTES};
use crate::op::{Counters, Operation, Outcome};
use crate::profiles::Profile;
use crate::sys;

impl LocalBackend {
    pub(super) fn spawn(
        &self,
        op: &Operation,
        plan: &Plan,
        journal_fd: Option<i32>,
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
                // Opened close-on-exec, so that copies started meanwhile do
                // not inherit it; this one child keeps it.
                if let Some(fd) = journal_fd {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = self.spawner.spawn(cmd)?;
        Ok((child, BufReader::new(reader)))
    }

    /// Follows the native engine's JSON progress lines until it exits.
    pub(super) fn follow_native(
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
                        s.resumed_files = Some(counts.resumed_files);
                        s.resumed_bytes = Some(counts.resumed_bytes);
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
                    self.update(op, |s| {
                        s.counters = Some(counters(&counts));
                        s.resumed_files = Some(counts.resumed_files);
                        s.resumed_bytes = Some(counts.resumed_bytes);
                    });
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
    pub(super) fn follow_command(
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
    // What a re-run skipped is done as much as what it copies.
    let p = (c.bytes.saturating_add(c.resumed_bytes))
        .saturating_mul(100)
        .checked_div(total_bytes)
        .or_else(|| c.items.saturating_mul(100).checked_div(total_items))
        .unwrap_or(0);
    p.min(99) as u8
}

/// Spawns children from one long-lived thread: PR_SET_PDEATHSIG fires when
/// the *thread* that forked exits, and pool threads retire when idle.
pub(super) struct Spawner {
    tx: Mutex<mpsc::Sender<(Command, mpsc::Sender<std::io::Result<Child>>)>>,
}

impl Spawner {
    pub(super) fn start() -> Spawner {
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
