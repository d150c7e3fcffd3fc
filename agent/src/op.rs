//! One data-movement operation and how its status reads.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::request::Request;
use crate::timefmt::{go_duration, rfc3339};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Starting,
    Running,
    Completed,
    Cancelling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Unknown,
    Success,
    Failed,
    Cancelled,
    Invalid,
}

impl State {
    pub fn word(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Starting => "starting",
            State::Running => "running",
            State::Completed => "completed",
            State::Cancelling => "cancelling",
        }
    }
}

impl Outcome {
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Unknown => "unknown",
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::Invalid => "invalid",
        }
    }
}

/// Item counters reported by the copy, when the backend has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub items: u64,
    pub directories: u64,
    pub files: u64,
    pub links: u64,
    pub bytes: u64,
}

/// Everything `status` shows, as last known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    pub outcome: Outcome,
    pub progress: u8,
    pub message: String,
    pub start_time: Option<SystemTime>,
    pub end_time: Option<SystemTime>,
    pub command: String,
    pub last_message: String,
    pub last_message_time: Option<SystemTime>,
    pub counters: Option<Counters>,
    pub rate_bytes_per_second: Option<u64>,
    pub restarts: u32,
    /// What a re-run found complete from an earlier run and did not copy
    /// again; `None` where the copy does not resume (profile commands).
    #[serde(default)]
    pub resumed_files: Option<u64>,
    #[serde(default)]
    pub resumed_bytes: Option<u64>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            state: State::Pending,
            outcome: Outcome::Unknown,
            progress: 0,
            message: String::new(),
            start_time: None,
            end_time: None,
            command: String::new(),
            last_message: String::new(),
            last_message_time: None,
            counters: None,
            rate_bytes_per_second: None,
            restarts: 0,
            resumed_files: None,
            resumed_bytes: None,
        }
    }
}

impl Status {
    pub fn is_completed(&self) -> bool {
        self.state == State::Completed
    }

    pub fn elapsed(&self) -> Option<Duration> {
        let start = self.start_time?;
        let end = self.end_time.unwrap_or_else(SystemTime::now);
        Some(end.duration_since(start).unwrap_or_default())
    }

    /// The `status` file: every key, always in this order.
    pub fn render(&self, name: &str) -> String {
        let mut out = String::with_capacity(512);
        let opt_time = |t: Option<SystemTime>| t.map(rfc3339).unwrap_or_default();
        let counter = |f: fn(&Counters) -> u64| {
            self.counters
                .as_ref()
                .map(|c| f(c).to_string())
                .unwrap_or_default()
        };
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        let fields: [(&str, String); 20] = [
            ("name", escape(name)),
            ("state", self.state.word().into()),
            ("status", self.outcome.word().into()),
            ("progress", self.progress.to_string()),
            ("message", escape(&self.message)),
            ("start_time", opt_time(self.start_time)),
            ("end_time", opt_time(self.end_time)),
            (
                "elapsed_seconds",
                self.elapsed()
                    .map(|d| format!("{:.3}", d.as_secs_f64()))
                    .unwrap_or_default(),
            ),
            ("command", escape(&self.command)),
            ("last_message", escape(&self.last_message)),
            ("last_message_time", opt_time(self.last_message_time)),
            ("items", counter(|c| c.items)),
            ("directories", counter(|c| c.directories)),
            ("files", counter(|c| c.files)),
            ("links", counter(|c| c.links)),
            ("bytes", counter(|c| c.bytes)),
            (
                "rate_bytes_per_second",
                self.rate_bytes_per_second
                    .map(|r| r.to_string())
                    .unwrap_or_default(),
            ),
            ("restarts", self.restarts.to_string()),
            ("resumed_files", opt(self.resumed_files)),
            ("resumed_bytes", opt(self.resumed_bytes)),
        ];
        for (key, value) in fields {
            let _ = writeln!(out, "{key}={value}");
        }
        out
    }

    /// The `status.json` file: the copy-offload status body plus name and counters.
    pub fn render_json(&self, name: &str) -> String {
        let opt_time = |t: Option<SystemTime>| t.map(rfc3339).unwrap_or_default();
        let counter = |f: fn(&Counters) -> u64| self.counters.as_ref().map(f);
        let value = serde_json::json!({
            "name": name,
            "state": self.state.word(),
            "status": self.outcome.word(),
            "message": self.message,
            "commandStatus": {
                "command": self.command,
                "progress": self.progress,
                "elapsedTime": self.elapsed().map(go_duration).unwrap_or_default(),
                "lastMessage": self.last_message,
                "lastMessageTime": opt_time(self.last_message_time),
            },
            "startTime": opt_time(self.start_time),
            "endTime": opt_time(self.end_time),
            "items": counter(|c| c.items),
            "directories": counter(|c| c.directories),
            "files": counter(|c| c.files),
            "links": counter(|c| c.links),
            "bytes": counter(|c| c.bytes),
            "rate_bytes_per_second": self.rate_bytes_per_second,
            "restarts": self.restarts,
            "resumed_files": self.resumed_files,
            "resumed_bytes": self.resumed_bytes,
        });
        let mut text = value.to_string();
        text.push('\n');
        text
    }
}

/// `status` values hold no newline: escape newlines and backslashes.
pub fn escape(value: &str) -> String {
    if !value.contains(['\n', '\\']) {
        return value.to_string();
    }
    value.replace('\\', "\\\\").replace('\n', "\\n")
}

/// One operation, shared by the control filesystem, the backend and the store.
#[derive(Debug)]
pub struct Operation {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// The accepted request, with name and profile filled in.
    pub request: Request,
    /// Where the copy lands, resolved once when the request was accepted.
    pub target: PathBuf,
    pub created: SystemTime,
    status: Mutex<Status>,
    /// Bumped whenever state, progress or message change (what `poll` wakes on).
    generation: AtomicU64,
    pub cancel_requested: AtomicBool,
    /// Set once removed, so that no late update records it again.
    pub removed: AtomicBool,
}

impl Operation {
    pub fn new(
        name: String,
        uid: u32,
        gid: u32,
        request: Request,
        target: PathBuf,
        status: Status,
    ) -> Self {
        Operation {
            name,
            uid,
            gid,
            request,
            target,
            created: SystemTime::now(),
            status: Mutex::new(status),
            generation: AtomicU64::new(1),
            cancel_requested: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        }
    }

    pub fn status(&self) -> Status {
        self.status.lock().unwrap().clone()
    }

    pub fn is_completed(&self) -> bool {
        self.status.lock().unwrap().is_completed()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Applies `change` and reports whether a poller-visible field changed.
    pub fn update(&self, change: impl FnOnce(&mut Status)) -> bool {
        let mut status: MutexGuard<'_, Status> = self.status.lock().unwrap();
        let before = (
            status.state,
            status.outcome,
            status.progress,
            status.message.clone(),
        );
        change(&mut status);
        crate::metrics::updated(self, before.0, &status);
        let visible = before
            != (
                status.state,
                status.outcome,
                status.progress,
                status.message.clone(),
            );
        if visible {
            // The backend that made the change tells the core (`Notify`).
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        visible
    }
}
