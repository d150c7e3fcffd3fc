//! The agent under real failures: a file system that stops answering,
//! signals at any moment of start-up, SIGHUP, and a panic.

#[path = "grpc_client.rs"]
mod grpc_client;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use integration_tests::*;

const LONG: Duration = Duration::from_secs(60);

/// A FUSE server frozen with SIGSTOP (every request to its mount waits),
/// thawed on drop whatever happened, so that its mount can go.
struct Frozen(u32);

impl Frozen {
    fn stop(pid: u32) -> Frozen {
        // SAFETY: signalling a child of this test.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// One write(2) of `request` to `file` as `user`, in the background: the
/// child prints "ok" or the errno's name.
fn writer(user: &User, file: &Path, request: &str) -> Child {
    let script = format!(
        "import os, errno\nfd = os.open({:?}, os.O_WRONLY)\ntry:\n    os.write(fd, {:?}.encode())\n    print('ok')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n",
        file.to_str().unwrap(),
        request
    );
    as_user_cmd(user, "/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a writer")
}

/// Kills the writers still running when the test ends.
struct Writers(Vec<Child>);

impl Drop for Writers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (polling) for `child` to end; its status, or None past `timeout`.
fn ended(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The scheduler state of a process (`R`, `S`, `D`, ...).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

fn is_mounted(mnt: &Path) -> bool {
    let mnt = mnt.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(mnt))
}

fn errors_as(agent: &Agent, u: &User) -> String {
    stdout(&sh_as(
        u,
        &format!("cat {}", agent.path("errors").display()),
    ))
}

#[test]
fn a_hung_file_system_holds_only_its_own_requests() {
    let agent = Agent::start(&["--request-timeout", "5s"]);
    // The hung file system: another agent's mount, frozen. Its names were
    // never looked up, so every path below it waits for the frozen server.
    let hung = Agent::start(&[]);
    let frozen = Frozen::stop(hung.pid());
    let (u1, u2) = (user("nnfdmt1"), user("nnfdmt2"));
    let good = agent.dir.path().join("good");
    std::fs::create_dir(&good).unwrap();
    let request_file = agent.path("request");
    let hung_path = |tag: &str| hung.mnt.join(tag).display().to_string();
    let mut writers = Writers(Vec::new());

    // A writer waiting on the hung path sleeps interruptibly and ends at
    // once on SIGKILL or SIGINT. (The other user's: their two stuck checks
    // stay under the cap, so they are still served below.)
    for signal in [libc::SIGKILL, libc::SIGINT] {
        let mut w = writer(
            &u2,
            &request_file,
            &format!(
                "source={} destination=/tmp/x",
                hung_path(&format!("kill-{signal}"))
            ),
        );
        assert!(blocked_in_fuse(w.id(), LONG), "the writer never blocked");
        let state = proc_state(w.id());
        assert_ne!(state, Some('D'), "a waiting writer must not be in state D");
        // SAFETY: signalling a child of this test.
        unsafe { libc::kill(w.id() as i32, signal) };
        let status = ended(&mut w, Duration::from_secs(5));
        assert!(
            status.is_some(),
            "signal {signal}: the writer did not end (state {:?})",
            proc_state(w.id())
        );
        let _ = w.wait();
    }

    // Eight requests of one user on the hung path...
    for i in 0..8 {
        writers.0.push(writer(
            &u1,
            &request_file,
            &format!(
                "source={} destination={}/out-{i}",
                hung_path(&format!("gone-{i}")),
                good.display()
            ),
        ));
    }
    for w in &writers.0 {
        assert!(blocked_in_fuse(w.id(), LONG), "a writer never blocked");
    }

    // ...and everyone else is served meanwhile: requests, status, wait, ls,
    // rmdir, the gRPC door.
    for i in 0..3 {
        let out = agent.request_as(
            &u2,
            &format!(
                "name=other-{i} dryrun=true source={} destination={}/o{i}",
                good.display(),
                good.display()
            ),
        );
        assert!(out.status.success(), "{}\n{}", stderr(&out), agent.log());
    }
    let status = agent.wait_completed("other-0", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success");
    let waited = sh_as(
        &u2,
        &format!("cat {}", agent.path("other-1/wait").display()),
    );
    assert!(waited.status.success(), "{}", stderr(&waited));
    assert_eq!(field(&stdout(&waited), "state").unwrap(), "completed");
    let ls = sh_as(&u2, &format!("ls {}", agent.mnt.display()));
    assert!(stdout(&ls).contains("other-2"), "{}", stdout(&ls));
    let rmdir = sh_as(&u2, &format!("rmdir {}", agent.path("other-2").display()));
    assert!(rmdir.status.success(), "{}", stderr(&rmdir));
    let mut grpc = grpc_client::Client::connect(&agent.dir.path().join("nnf-dm.sock"));
    assert!(grpc.version().is_ok());
    let mut create = grpc_client::copy(&good.display().to_string(), "/tmp/grpc-out");
    create.dryrun = true;
    let created = grpc.create(create);
    assert!(!created.uid.is_empty(), "{created:?}");
    assert!(grpc.list(None).contains(&created.uid));

    // Past the deadline every stuck writer fails with ETIMEDOUT, and
    // `errors` names the path that did not answer. (A writer that came
    // after four of them had timed out was refused at once with EAGAIN.)
    for w in &mut writers.0 {
        assert!(
            ended(w, LONG).is_some(),
            "a writer is still waiting past its deadline"
        );
    }
    let mut timed_out = Vec::new();
    for (i, w) in std::mem::take(&mut writers.0).into_iter().enumerate() {
        let out = w.wait_with_output().unwrap();
        match stdout(&out).trim() {
            "ETIMEDOUT" => timed_out.push(i),
            "EAGAIN" => {}
            other => panic!("writer {i}: {other}"),
        }
    }
    assert!(timed_out.len() >= 4, "{timed_out:?}");
    let errors = errors_as(&agent, &u1);
    for i in timed_out {
        let line = errors
            .lines()
            .find(|l| l.contains(&hung_path(&format!("gone-{i}"))))
            .unwrap_or_else(|| panic!("no line names gone-{i}: {errors}"));
        assert!(line.contains(" ETIMEDOUT "), "{line}");
    }

    // Its checks still wait on the frozen server: past the small cap the
    // user's next request fails at once with EAGAIN (not after a deadline).
    let mut late = writer(
        &u1,
        &request_file,
        &format!("dryrun=true source={} destination=/tmp/y", good.display()),
    );
    assert!(ended(&mut late, LONG).is_some());
    let out = late.wait_with_output().unwrap();
    assert_eq!(stdout(&out).trim(), "EAGAIN");
    assert!(
        errors_as(&agent, &u1)
            .lines()
            .last()
            .unwrap()
            .contains(" EAGAIN "),
        "{}",
        errors_as(&agent, &u1)
    );
    // The other user is not affected.
    let out = agent.request_as(
        &u2,
        &format!(
            "name=other-3 dryrun=true source={} destination=/tmp/z",
            good.display()
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // Once the file system answers, nothing is left stuck: the user is
    // served again, and no request that timed out created anything.
    drop(frozen);
    let mut again = String::new();
    assert!(
        wait_until(LONG, || {
            let out = agent.request_as(
                &u1,
                &format!(
                    "name=again dryrun=true source={} destination=/tmp/w",
                    good.display()
                ),
            );
            again = stderr(&out);
            out.status.success()
        }),
        "{again}"
    );
    let ops: Vec<String> = std::fs::read_dir(&agent.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !["README", "errors", "metrics", "request", "version"].contains(&n.as_str()))
        .collect();
    assert_eq!(ops.len(), 5, "{ops:?}"); // other-0, -1, -3, the gRPC one, again
    assert!(ops.iter().all(|n| !n.contains("gone")));
    let records = std::fs::read_dir(agent.state.join("ops")).unwrap().count();
    assert_eq!(
        records, 5,
        "one record per operation, none for timed-out requests"
    );
}

/// Starts the agent on `dir` without waiting for it.
fn spawn_agent(dir: &Path, env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .unwrap();
    Command::new(bin("nnf-dm"))
        .arg("--mountpoint")
        .arg(dir.join("mnt"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("nnf-dm.sock"))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start nnf-dm")
}

/// Kills the agent and removes its mount, whatever the test did.
struct Running(Option<Child>, std::path::PathBuf);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.1)
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn sigterm_or_sigint_at_any_moment_of_start_up_exits_cleanly_with_the_mount_gone() {
    let dir = scratch();
    let mnt = dir.path().join("mnt");
    // Operations to recover, so that start-up takes a while.
    {
        let agent_dir = dir.path();
        std::fs::create_dir_all(&mnt).unwrap();
        let mut running = Running(Some(spawn_agent(agent_dir, &[])), mnt.clone());
        assert!(wait_until(LONG, || std::fs::read(mnt.join("version"))
            .is_ok_and(|v| !v.is_empty())));
        for i in 0..200 {
            let out = sh(&format!(
                "echo 'name=op{i} dryrun=true source=/etc/hostname destination=/tmp/x' > {}",
                mnt.join("request").display()
            ));
            assert!(out.status.success(), "{}", stderr(&out));
        }
        let mut child = running.0.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(ended(&mut child, LONG).is_some_and(|s| s.success()));
    }
    // The moments: from right after exec to well after serving. A delay is
    // the point of the test here, not a wait for something.
    let moments_ms = [1, 5, 15, 30, 60, 120, 250, 500, 1000];
    for (i, ms) in moments_ms.iter().enumerate() {
        let signal = if i % 2 == 0 {
            libc::SIGTERM
        } else {
            libc::SIGINT
        };
        let before = std::fs::metadata(dir.path().join("agent.log"))
            .map(|m| m.len())
            .unwrap_or(0);
        let mut running = Running(Some(spawn_agent(dir.path(), &[])), mnt.clone());
        std::thread::sleep(Duration::from_millis(*ms));
        let mut child = running.0.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = ended(&mut child, LONG).expect("the agent exits after the signal");
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
        let said = &log[before as usize..];
        // Before its first instruction blocks the signal the default action
        // ends it, having done nothing (not a line logged); else exit 0.
        assert!(
            status.success() || (status.signal() == Some(signal) && said.is_empty()),
            "signal {signal} after {ms} ms: {status:?}\n{said}"
        );
        assert!(!is_mounted(&mnt), "after {ms} ms: the mount stayed\n{said}");
        running.0 = None;
    }
}

#[test]
fn sighup_is_ignored_and_logged() {
    let mut agent = Agent::start(&[]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    assert!(wait_until(LONG, || agent.log().contains("SIGHUP ignored")));
    assert!(agent.read("version").unwrap().contains("backend=local"));
    let out = agent.request("name=after-hup dryrun=true source=/etc/hostname destination=/tmp/x");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(agent.stop().success());
    assert!(!is_mounted(&agent.mnt));
}

#[test]
fn a_panic_takes_the_agent_down_and_the_restart_recovers() {
    let mut agent = Agent::start(&[]);
    let out = agent.request("name=before dryrun=true source=/etc/hostname destination=/tmp/x");
    assert!(out.status.success(), "{}", stderr(&out));
    agent.wait_completed("before", LONG);
    assert!(agent.stop().success());

    // The test hook (debug builds only) panics while checking a request, on
    // a worker thread: the whole agent goes, as it would under systemd.
    let mut running = Running(
        Some(spawn_agent(
            agent.dir.path(),
            &[("NNF_DM_TEST_PANIC", "request")],
        )),
        agent.mnt.clone(),
    );
    assert!(wait_until(LONG, || agent
        .read("version")
        .is_ok_and(|v| !v.is_empty())));
    let out = agent.request("name=boom dryrun=true source=/etc/hostname destination=/tmp/x");
    assert!(!out.status.success(), "the write must fail");
    let mut child = running.0.take().unwrap();
    let status = ended(&mut child, LONG).expect("the agent went down");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}");
    assert!(agent.log().contains("panic:"), "{}", agent.log());

    // What systemd does next: start it again; the stale mount is cleaned and
    // every operation is back.
    agent.restart();
    let status = agent.wait_completed("before", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success");
    assert!(
        agent.read("boom/status").is_err(),
        "nothing of the panicked request"
    );
}
