//! The user commands of `nnf-dm`: a friendly face on the control files only,
//! so they work the same over every backend.
//!
//! Output conventions: stdout carries results (the generated name, `ls`,
//! `show`); progress (a bar on a terminal, plain lines otherwise) and errors
//! go to stderr, so `name=$(nnf-dm copy --wait …)` still works in scripts.
//! Exit codes: 0 success, 1 failure or refusal, 2 `--timeout` expired.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use crate::request::quote;
use crate::timefmt::{go_duration, parse_duration};

/// Where the control filesystem is mounted.
#[derive(Args, Debug, Clone)]
pub struct MountArg {
    /// The control filesystem's mount point.
    #[arg(
        long = "mount",
        env = "NNF_DM_MOUNT",
        default_value = "/run/nnf-dm",
        global = true
    )]
    pub mount: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Copy SRC to DEST through the agent; prints the operation's name.
    Copy {
        src: PathBuf,
        dest: PathBuf,
        /// The operation's name (else the agent generates one).
        #[arg(long)]
        name: Option<String>,
        /// The data-movement profile.
        #[arg(long)]
        profile: Option<String>,
        /// Go through the motions without copying anything.
        #[arg(long)]
        dryrun: bool,
        /// Wait for the copy and exit non-zero unless it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// List your operations.
    Ls,
    /// Print an operation's status (key=value lines).
    Show { name: String },
    /// Wait for an operation; exit 0 only if it succeeded (2 on timeout).
    Wait {
        name: String,
        /// Give up after this long: 30s, 5m, 1h.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Ask for an operation's cancellation.
    Cancel { name: String },
    /// Remove a completed operation.
    Rm { name: String },
}

/// Why a command failed, and its exit code.
struct Fail {
    code: u8,
    message: String,
}

impl From<String> for Fail {
    fn from(message: String) -> Self {
        Fail { code: 1, message }
    }
}

type Outcome = Result<(), Fail>;

pub fn run(mount: &MountArg, cmd: UserCommand) -> ExitCode {
    let ctl = Ctl {
        root: mount.mount.clone(),
    };
    let outcome = match cmd {
        UserCommand::Copy {
            src,
            dest,
            name,
            profile,
            dryrun,
            wait,
        } => copy(&ctl, &src, &dest, name, profile, dryrun, wait),
        UserCommand::Ls => ls(&ctl),
        UserCommand::Show { name } => show(&ctl, &name),
        UserCommand::Wait { name, timeout } => wait_for(&ctl, &name, timeout),
        UserCommand::Cancel { name } => cancel(&ctl, &name),
        UserCommand::Rm { name } => rm(&ctl, &name),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(fail) => {
            eprintln!("nnf-dm: {}", fail.message);
            ExitCode::from(fail.code)
        }
    }
}

/// The control filesystem.
struct Ctl {
    root: PathBuf,
}

impl Ctl {
    /// An operation's directory; a name with `/` would step out of the mount.
    fn op(&self, name: &str) -> Result<PathBuf, Fail> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(format!("'{name}' is not an operation name").into());
        }
        Ok(self.root.join(name))
    }

    /// Words for a failed access to an operation's file.
    fn op_error(&self, name: &str, e: io::Error) -> Fail {
        let message = match e.raw_os_error() {
            Some(libc::ENOENT) if !self.root.join("version").exists() => self.not_mounted(),
            Some(libc::ENOENT) => format!("no operation named '{name}'"),
            Some(libc::EACCES | libc::EPERM) => {
                format!("{name}: permission denied (it belongs to another user)")
            }
            _ => self.io_message(&self.root.join(name), &e),
        };
        message.into()
    }

    fn io_message(&self, path: &Path, e: &io::Error) -> String {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            return format!(
                "{}: the agent is not running ({})",
                self.root.display(),
                strerror(e)
            );
        }
        format!("{}: {}", path.display(), strerror(e))
    }

    fn not_mounted(&self) -> String {
        format!(
            "no nnf-dm control filesystem at {}: is the agent running? (--mount or NNF_DM_MOUNT)",
            self.root.display()
        )
    }

    /// The reason of the caller's newest rejection: the last line of
    /// `errors` is `<time> <ERRNO> <reason>`.
    fn last_rejection(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.root.join("errors")).ok()?;
        let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
        line.splitn(3, ' ').nth(2).map(str::to_string)
    }
}

/// `Invalid argument`, without Rust's ` (os error 22)`.
fn strerror(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// The agent resolves nothing against the caller's directory: paths must be absolute.
fn absolute(path: &Path) -> Result<String, Fail> {
    let abs =
        std::path::absolute(path).map_err(|e| format!("{}: {}", path.display(), strerror(&e)))?;
    abs.into_os_string().into_string().map_err(|p| {
        format!(
            "{}: a request path must be valid UTF-8",
            p.to_string_lossy()
        )
        .into()
    })
}

fn copy(
    ctl: &Ctl,
    src: &Path,
    dest: &Path,
    name: Option<String>,
    profile: Option<String>,
    dryrun: bool,
    wait: bool,
) -> Outcome {
    let mut request = format!(
        "source={} destination={}",
        quote(&absolute(src)?),
        quote(&absolute(dest)?)
    );
    if let Some(name) = &name {
        request += &format!(" name={}", quote(name));
    }
    if let Some(profile) = &profile {
        request += &format!(" profile={}", quote(profile));
    }
    if dryrun {
        request += " dryrun=true";
    }
    request.push('\n');

    let path = ctl.root.join("request");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => ctl.not_mounted(),
            _ => ctl.io_message(&path, &e),
        })?;
    // One write(2) is one whole request: never let it be split.
    let written = file.write(request.as_bytes());
    // The agent's reply (`<name>` or `error: <reason>`) is served at the
    // descriptor's offset after the write, whether it succeeded or not.
    let mut reply = String::new();
    let _ = file.read_to_string(&mut reply);
    match written {
        Ok(n) if n == request.len() => {}
        Ok(n) => {
            return Err(format!(
                "the agent took {n} of the request's {} bytes",
                request.len()
            )
            .into())
        }
        Err(e) => {
            let reason = reply
                .strip_prefix("error: ")
                .map(|r| r.trim_end().to_string())
                .or_else(|| ctl.last_rejection())
                .unwrap_or_else(|| "the agent gave no reason".into());
            return Err(format!("request refused ({}): {reason}", strerror(&e)).into());
        }
    }
    let created = match reply.trim() {
        "" => {
            name.ok_or_else(|| "the agent did not say which name it gave the copy".to_string())?
        }
        given => given.to_string(),
    };
    println!("{created}");
    if wait {
        wait_for(ctl, &created, None)
    } else {
        Ok(())
    }
}

/// The value of `key` in `key=value` lines.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or("")
}

/// Undoes the escapes of a `status` value (`\n`, `\\`) or of a quoted request value (also `\"`).
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// A value of the normalised `request`: double-quoted when it needs to be.
fn request_value(request: &str, key: &str) -> String {
    let value = field(request, key);
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => unescape(inner),
        None => value.to_string(),
    }
}

fn ls(ctl: &Ctl) -> Outcome {
    if !ctl.root.join("version").exists() {
        return Err(ctl.not_mounted().into());
    }
    let entries = std::fs::read_dir(&ctl.root).map_err(|e| ctl.io_message(&ctl.root, &e))?;
    let mut rows = Vec::new();
    for entry in entries.flatten() {
        // Operations are the directories; the fixed files are not.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        // Gone since readdir (removed, expired): not worth an error.
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let request = std::fs::read_to_string(dir.join("request")).unwrap_or_default();
        rows.push([
            entry.file_name().to_string_lossy().into_owned(),
            field(&status, "state").to_string(),
            field(&status, "status").to_string(),
            format!("{}%", field(&status, "progress")),
            format!(
                "{} -> {}",
                request_value(&request, "source"),
                request_value(&request, "destination")
            ),
        ]);
    }
    if rows.is_empty() {
        return Ok(());
    }
    rows.sort();
    let header = [
        "NAME",
        "STATE",
        "STATUS",
        "PROGRESS",
        "SOURCE -> DESTINATION",
    ]
    .map(String::from);
    let mut widths = [0; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = io::stdout().lock();
    for row in std::iter::once(&header).chain(&rows) {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    Ok(())
}

fn show(ctl: &Ctl, name: &str) -> Outcome {
    let status =
        std::fs::read_to_string(ctl.op(name)?.join("status")).map_err(|e| ctl.op_error(name, e))?;
    print!("{status}");
    Ok(())
}

fn cancel(ctl: &Ctl, name: &str) -> Outcome {
    OpenOptions::new()
        .write(true)
        .open(ctl.op(name)?.join("cancel"))
        .and_then(|mut f| f.write_all(b"1\n"))
        .map_err(|e| ctl.op_error(name, e))
}

fn rm(ctl: &Ctl, name: &str) -> Outcome {
    std::fs::remove_dir(ctl.op(name)?).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => format!(
            "{name} is still running: cancel it (nnf-dm cancel {name}) or wait for it first"
        )
        .into(),
        _ => ctl.op_error(name, e),
    })
}

/// How often the elapsed time and ETA are refreshed when nothing else wakes us.
const TICK: Duration = Duration::from_secs(1);

/// Follows `<name>/status` until the operation completes or `timeout` passes.
fn wait_for(ctl: &Ctl, name: &str, timeout: Option<Duration>) -> Outcome {
    let file = File::open(ctl.op(name)?.join("status")).map_err(|e| ctl.op_error(name, e))?;
    let tty = io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_line = String::new();
    loop {
        let status = read_fresh(&file).map_err(|e| ctl.op_error(name, e))?;
        let state = field(&status, "state");
        let progress = field(&status, "progress");
        let done = state == "completed";
        if tty {
            eprint!("\r{}\x1b[K", bar(name, &status, started.elapsed()));
            if done {
                eprintln!();
            }
        } else {
            // Plain lines for logs: one per change of state or progress.
            let line = if done {
                format!("{name}: completed {}", field(&status, "status"))
            } else {
                format!("{name}: {state} {progress}%")
            };
            if line != last_line {
                eprintln!("{line}");
                last_line = line;
            }
        }
        if done {
            let message = unescape(field(&status, "message"));
            return match field(&status, "status") {
                "success" => Ok(()),
                outcome if message.trim().is_empty() => Err(format!("{name} {outcome}").into()),
                outcome => Err(format!("{name} {outcome}: {}", message.trim_end()).into()),
            };
        }
        let mut nap = TICK;
        if let Some(timeout) = timeout {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                if tty {
                    eprintln!();
                }
                return Err(Fail {
                    code: 2,
                    message: format!(
                        "timed out after {} waiting for {name} (still {state}, {progress}%)",
                        go_duration(timeout)
                    ),
                });
            }
            nap = nap.min(left);
        }
        wait_change(&file, nap);
    }
}

/// Reads a whole file from offset 0: a fresh snapshot, which also re-arms poll.
fn read_fresh(file: &File) -> io::Result<String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = file.read_at(&mut buf, data.len() as u64)?;
        if n == 0 {
            return Ok(String::from_utf8_lossy(&data).into_owned());
        }
        data.extend_from_slice(&buf[..n]);
    }
}

/// Sleeps until the status changes (POLLPRI, sysfs-style) or `timeout` passes.
fn wait_change(file: &File, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLPRI,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd that outlives the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    // If poll cannot watch this file, sleep rather than spin on re-reads.
    if n < 0 || pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        std::thread::sleep(timeout);
    }
}

/// One line of the progress bar: `out1 [#####     ]  45%  1.2 GiB  80.0 MiB/s  ETA 12s`.
fn bar(name: &str, status: &str, waited: Duration) -> String {
    const WIDTH: usize = 24;
    let progress: u64 = field(status, "progress").parse().unwrap_or(0).min(100);
    let filled = (progress as usize * WIDTH) / 100;
    let mut line = format!(
        "{name} [{}{}] {progress:>3}%",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled)
    );
    if let Ok(bytes) = field(status, "bytes").parse::<f64>() {
        line += &format!("  {}", human_bytes(bytes));
    }
    if let Ok(rate) = field(status, "rate_bytes_per_second").parse::<f64>() {
        line += &format!("  {}/s", human_bytes(rate));
    }
    // The agent's elapsed time, or ours while it has none (pending).
    let elapsed = field(status, "elapsed_seconds")
        .parse::<f64>()
        .unwrap_or(waited.as_secs_f64());
    match field(status, "state") {
        "completed" => line += &format!("  {} in {}", field(status, "status"), clock(elapsed)),
        "running" if progress > 0 && progress < 100 => {
            // Assumes the rest goes as fast as what is done so far.
            let eta = elapsed * (100 - progress) as f64 / progress as f64;
            line += &format!("  {} elapsed  ETA {}", clock(elapsed), clock(eta));
        }
        state => line += &format!("  {state}  {} elapsed", clock(elapsed)),
    }
    line
}

fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `12s`, `3m05s`, `1h02m03s`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_status_and_request_values() {
        assert_eq!(unescape(r"a\nb\\c"), "a\nb\\c");
        assert_eq!(request_value("source=/plain\n", "source"), "/plain");
        let odd = "/x y/#\"\\\n";
        let request = format!("name=a\nsource={}\n", quote(odd));
        assert_eq!(request_value(&request, "source"), odd);
    }

    #[test]
    fn formats_sizes_and_times() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(clock(5.0), "5s");
        assert_eq!(clock(185.0), "3m05s");
        assert_eq!(clock(3723.0), "1h02m03s");
    }

    #[test]
    fn draws_a_bar() {
        let status = "name=o\nstate=running\nstatus=unknown\nprogress=50\nelapsed_seconds=10\nbytes=2048\nrate_bytes_per_second=1024\n";
        let line = bar("o", status, Duration::ZERO);
        assert_eq!(
            line,
            "o [############            ]  50%  2.0 KiB  1.0 KiB/s  10s elapsed  ETA 10s"
        );
    }
}
