//! Running one external command line under `bash -c`, with a timeout when
//! one is configured (upstream nnf-sos `pkg/command/cmd.go` runs `bash -c`
//! with no timeout unless `NNF_COMMAND_TIMEOUT_SECONDS` is set).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("could not start `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` timed out after {timeout:?} and was killed{}", stderr_suffix(.stderr))]
    Timeout {
        cmd: String,
        timeout: Duration,
        stderr: String,
    },
    #[error("`{cmd}` failed ({status}){}", stderr_suffix(.stderr))]
    Failed {
        cmd: String,
        status: ExitStatus,
        stderr: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    let trimmed = stderr.trim();
    if trimmed.is_empty() {
        String::new()
    } else {
        format!(": {trimmed}")
    }
}

/// What a successful command printed.
#[derive(Debug, Default)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Run `bash -c <cmdline>`; stdin is /dev/null, stdout and stderr are
/// captured. The command gets its own process group so that a timeout kills
/// everything it started, and so that a terminal's Ctrl-C aimed at the
/// daemon does not interrupt a mount half way (the daemon finishes the
/// command in flight on SIGTERM/SIGINT, then exits).
pub fn run(cmdline: &str, timeout: Option<Duration>) -> Result<Output, ExecError> {
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: only async-signal-safe calls between fork and exec. The daemon
    // blocks its termination signals in every thread (they are taken with
    // sigwait); a child must not inherit that mask.
    unsafe {
        command.pre_exec(|| {
            daemon_common::signals::unblock_all();
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        cmd: cmdline.to_string(),
        source,
    })?;
    let pid = child.id() as libc::pid_t;
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());

    // Wait in a helper thread so this one can give up after `timeout`. The
    // child is not reaped until that wait returns, so its pid (= process
    // group id) cannot be reused while we may still signal it.
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let first = match timeout {
        Some(t) => rx.recv_timeout(t).map_err(|_| ()),
        None => rx.recv().map_err(|_| ()),
    };
    let (status, timed_out) = match first {
        Ok(status) => (status, false),
        Err(()) => {
            // SAFETY: plain kill(2) on the child's process group.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            (
                rx.recv()
                    .unwrap_or_else(|_| Err(std::io::Error::other("wait thread died"))),
                true,
            )
        }
    };
    let _ = waiter.join();
    let out = collect(stdout);
    let err = collect(stderr);
    let status = status.map_err(|source| ExecError::Spawn {
        cmd: cmdline.to_string(),
        source,
    })?;
    if timed_out {
        return Err(ExecError::Timeout {
            cmd: cmdline.to_string(),
            timeout: timeout.unwrap_or_default(),
            stderr: err,
        });
    }
    if !status.success() {
        return Err(ExecError::Failed {
            cmd: cmdline.to_string(),
            status,
            stderr: err,
        });
    }
    Ok(Output {
        stdout: out,
        stderr: err,
    })
}

type Pending = Option<mpsc::Receiver<String>>;

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> Pending {
    let mut pipe = pipe?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        // Cap what is kept: the text ends up in a status message.
        let _ = (&mut pipe).take(64 * 1024).read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
        // Drain the rest so the writer never blocks on a full pipe.
        let _ = std::io::copy(&mut pipe, &mut std::io::sink());
    });
    Some(rx)
}

/// The output read so far. A background process started by the command may
/// keep the pipe open forever, so waiting for end-of-file is bounded.
fn collect(pending: Pending) -> String {
    pending
        .and_then(|rx| rx.recv_timeout(Duration::from_secs(1)).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_stderr_on_failure() {
        let err = run("echo out; echo oops >&2; exit 3", None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("oops"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
    }

    #[test]
    fn success_output() {
        let out = run("echo hi", Some(Duration::from_secs(10))).unwrap();
        assert_eq!(out.stdout, "hi\n");
    }

    #[test]
    fn timeout_kills_group() {
        let start = std::time::Instant::now();
        let err = run("sleep 30 & sleep 30", Some(Duration::from_millis(300))).unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
