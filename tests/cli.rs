//! The user CLI (`nnf-dm copy|ls|show|wait|cancel|rm`) and the shell examples
//! of `examples/`, end to end against a real local-backend agent.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration_tests::*;

const LONG: Duration = Duration::from_secs(30);

/// Runs `nnf-dm ARGS` in `cwd`, as `who` (root if none), against `agent`.
fn nnf_dm(agent: &Agent, who: Option<&User>, cwd: &Path, args: &[&str]) -> Output {
    let binary = bin("nnf-dm");
    let mut cmd = match who {
        Some(u) => as_user_cmd(u, binary.to_str().unwrap()),
        None => Command::new(&binary),
    };
    cmd.args(args)
        .env("NNF_DM_MOUNT", &agent.mnt)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run nnf-dm")
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        stdout(out),
        stderr(out)
    )
}

/// A directory owned by `u` inside `parent`.
fn owned_dir(parent: &Path, rel: &str, u: &User) -> PathBuf {
    let dir = parent.join(rel);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(u.uid), Some(u.gid)).unwrap();
    dir
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// A copy that stays `running` until cancelled.
const SLOW: &str = r#"[{"name":"slow","command":"sleep 30"},{"name":"bad","command":"exit 3"}]"#;

#[test]
fn copy_wait_succeeds_with_relative_paths_and_plain_lines() {
    let u = user("nnfdmt1");
    let agent = Agent::start(&[]);
    let work = owned_dir(agent.dir.path(), "work", &u);
    // Spaces and `#` in a path need the grammar's quotes.
    let src = owned_dir(&work, "in put#1", &u);
    std::fs::write(src.join("a.txt"), b"alpha\n").unwrap();
    std::os::unix::fs::chown(src.join("a.txt"), Some(u.uid), Some(u.gid)).unwrap();

    let out = nnf_dm(
        &agent,
        Some(&u),
        &work,
        &["copy", "in put#1", "out", "--name", "c1", "--wait"],
    );
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert_eq!(stdout(&out), "c1\n");
    assert_eq!(
        std::fs::read_to_string(work.join("out/a.txt")).unwrap(),
        "alpha\n"
    );
    // Not a terminal: plain lines, one per change, no bar.
    let err = stderr(&out);
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.last(), Some(&"c1: completed success"), "{err}");
    for line in &lines[..lines.len() - 1] {
        let rest = line.strip_prefix("c1: ").expect(line);
        let (state, pct) = rest.split_once(' ').expect(line);
        assert!(
            ["pending", "starting", "running"].contains(&state),
            "{line}"
        );
        assert!(
            pct.strip_suffix('%').unwrap().parse::<u8>().is_ok(),
            "{line}"
        );
    }
    let mut dedup = lines.clone();
    dedup.dedup();
    assert_eq!(dedup, lines, "a line only when something changed");

    // The paths were made absolute against the caller's directory.
    let request = agent.read("c1/request").unwrap();
    assert_eq!(
        field(&request, "source").unwrap(),
        format!("\"{}\"", src.display())
    );
    assert_eq!(
        field(&request, "destination").unwrap(),
        work.join("out").display().to_string()
    );

    // show prints the status; wait on a completed copy returns at once.
    let show = nnf_dm(&agent, Some(&u), &work, &["show", "c1"]);
    assert_eq!(code(&show), 0, "{}", describe(&show));
    assert_eq!(field(&stdout(&show), "status").as_deref(), Some("success"));
    assert_eq!(stdout(&show), agent.read("c1/status").unwrap());
    let wait = nnf_dm(&agent, Some(&u), &work, &["wait", "c1"]);
    assert_eq!(code(&wait), 0, "{}", describe(&wait));
    assert_eq!(stderr(&wait), "c1: completed success\n");

    let missing = nnf_dm(&agent, Some(&u), &work, &["show", "nope"]);
    assert_eq!(code(&missing), 1);
    assert_eq!(stderr(&missing), "nnf-dm: no operation named 'nope'\n");
}

#[test]
fn generated_name_is_printed() {
    let agent = Agent::start(&[]);
    let dir = scratch();
    let out = nnf_dm(
        &agent,
        None,
        dir.path(),
        &["copy", "/etc/hostname", "x", "--dryrun"],
    );
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let name = stdout(&out).trim().to_string();
    assert!(
        name.starts_with("dm-") && name.len() == 11,
        "{}",
        describe(&out)
    );
    let request = agent.read(&format!("{name}/request")).unwrap();
    assert_eq!(field(&request, "dryrun").as_deref(), Some("true"));
}

#[test]
fn failed_copy_exits_non_zero_with_the_message() {
    let dir = scratch();
    let profiles = profiles_file(dir.path(), SLOW);
    let agent = Agent::start(&["--profiles", &profiles]);
    let dest = dir.path().join("x").display().to_string();

    let out = nnf_dm(
        &agent,
        None,
        dir.path(),
        &[
            "copy",
            "/etc/hostname",
            &dest,
            "--profile",
            "bad",
            "--name",
            "f1",
        ],
    );
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let wait = nnf_dm(&agent, None, dir.path(), &["wait", "f1"]);
    assert_eq!(code(&wait), 1, "{}", describe(&wait));
    // `message` holds the raw text (`status` escapes its newlines).
    let message = agent.read("f1/message").unwrap();
    let message = message.trim_end();
    assert!(!message.is_empty());
    assert!(
        stderr(&wait).ends_with(&format!("nnf-dm: f1 failed: {message}\n")),
        "{}",
        describe(&wait)
    );

    let out = nnf_dm(
        &agent,
        None,
        dir.path(),
        &["copy", "/etc/hostname", &dest, "--profile", "bad", "--wait"],
    );
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stderr(&out).contains(" failed: "), "{}", describe(&out));
}

#[test]
fn ls_shows_only_the_callers_operations() {
    let (u1, u2) = (user("nnfdmt1"), user("nnfdmt2"));
    let agent = Agent::start(&[]);
    let d1 = owned_dir(agent.dir.path(), "one", &u1);
    let d2 = owned_dir(agent.dir.path(), "two", &u2);
    for (u, d, name) in [(&u1, &d1, "la1"), (&u2, &d2, "lb1")] {
        let out = nnf_dm(
            &agent,
            Some(u),
            d,
            &["copy", "/etc/hostname", "out", "--name", name, "--wait"],
        );
        assert_eq!(code(&out), 0, "{}", describe(&out));
    }
    for (u, d, mine, theirs) in [(&u1, &d1, "la1", "lb1"), (&u2, &d2, "lb1", "la1")] {
        let out = nnf_dm(&agent, Some(u), d, &["ls"]);
        assert_eq!(code(&out), 0, "{}", describe(&out));
        let text = stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NAME",
                "STATE",
                "STATUS",
                "PROGRESS",
                "SOURCE",
                "->",
                "DESTINATION"
            ]
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        let dest = d.join("out").display().to_string();
        assert_eq!(
            row,
            [
                mine,
                "completed",
                "success",
                "100%",
                "/etc/hostname",
                "->",
                &dest
            ]
        );
        assert!(!text.contains(theirs), "{text}");
    }
    // Root sees everyone's.
    let all = stdout(&nnf_dm(&agent, None, &d1, &["ls"]));
    assert!(all.contains("la1") && all.contains("lb1"), "{all}");
    // Another user's operation cannot be shown.
    let out = nnf_dm(&agent, Some(&u1), &d1, &["show", "lb1"]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
}

#[test]
fn cancel_and_rm_of_a_running_copy() {
    let dir = scratch();
    let profiles = profiles_file(dir.path(), SLOW);
    let agent = Agent::start(&["--profiles", &profiles]);
    let run = |args: &[&str]| nnf_dm(&agent, None, dir.path(), args);

    let out = run(&[
        "copy",
        "/etc/hostname",
        "/tmp/nowhere",
        "--profile",
        "slow",
        "--name",
        "s1",
    ]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert!(wait_until(LONG, || agent.read("s1/state").unwrap() == "running\n"));

    let out = run(&["rm", "s1"]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(
        stderr(&out).starts_with("nnf-dm: s1 is still running"),
        "{}",
        describe(&out)
    );
    assert!(agent.path("s1").exists());

    let out = run(&["cancel", "s1"]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let out = run(&["wait", "s1", "--timeout", "30s"]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(
        stderr(&out).contains("s1: completed cancelled\nnnf-dm: s1 cancelled"),
        "{}",
        describe(&out)
    );

    let out = run(&["rm", "s1"]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert!(!agent.path("s1").exists());
    let out = run(&["rm", "s1"]);
    assert_eq!(stderr(&out), "nnf-dm: no operation named 's1'\n");
}

#[test]
fn wait_timeout_exits_2() {
    let dir = scratch();
    let profiles = profiles_file(dir.path(), SLOW);
    let agent = Agent::start(&["--profiles", &profiles]);
    let out = nnf_dm(
        &agent,
        None,
        dir.path(),
        &[
            "copy",
            "/etc/hostname",
            "/tmp/nowhere",
            "--profile",
            "slow",
            "--name",
            "t1",
        ],
    );
    assert_eq!(code(&out), 0, "{}", describe(&out));

    let started = Instant::now();
    let out = nnf_dm(&agent, None, dir.path(), &["wait", "t1", "--timeout", "1s"]);
    let took = started.elapsed();
    assert_eq!(code(&out), 2, "{}", describe(&out));
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        stderr(&out).contains("nnf-dm: timed out after 1s waiting for t1 (still "),
        "{}",
        describe(&out)
    );
    let out = nnf_dm(
        &agent,
        None,
        dir.path(),
        &["wait", "t1", "--timeout", "soon"],
    );
    assert_eq!(code(&out), 2, "clap's usage error: {}", describe(&out));
    nnf_dm(&agent, None, dir.path(), &["cancel", "t1"]);
}

#[test]
fn refused_copy_repeats_the_agents_reason() {
    let agent = Agent::start(&[]);
    let dir = scratch();
    let run = |args: &[&str]| nnf_dm(&agent, None, dir.path(), args);

    let out = run(&["copy", "missing", "out"]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    let errors = agent.read("errors").unwrap();
    let reason = errors
        .lines()
        .last()
        .unwrap()
        .splitn(3, ' ')
        .nth(2)
        .unwrap();
    assert!(reason.contains("missing"), "{errors}");
    assert_eq!(
        stderr(&out),
        format!("nnf-dm: request refused (No such file or directory): {reason}\n")
    );

    assert_eq!(
        code(&run(&["copy", "/etc/hostname", "a", "--name", "n1"])),
        0
    );
    let out = run(&["copy", "/etc/hostname", "b", "--name", "n1"]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(
        stderr(&out).starts_with("nnf-dm: request refused (File exists): "),
        "{}",
        describe(&out)
    );

    // A bad name arrives quoted, and the agent says what is wrong with it.
    let out = run(&["copy", "/etc/hostname", "b", "--name", "bad name"]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(
        stderr(&out).starts_with("nnf-dm: request refused (Invalid argument): "),
        "{}",
        describe(&out)
    );
}

#[test]
fn no_agent_is_said_plainly() {
    let empty = scratch();
    for args in [
        &["ls"][..],
        &["copy", "/etc/hostname", "/tmp/x"],
        &["show", "a"],
    ] {
        let out = Command::new(bin("nnf-dm"))
            .args(args)
            .arg("--mount")
            .arg(empty.path())
            .output()
            .unwrap();
        assert_eq!(code(&out), 1, "{}", describe(&out));
        assert!(
            stderr(&out).contains("is the agent running?"),
            "{}",
            describe(&out)
        );
    }
}

#[test]
fn progress_bar_on_a_terminal() {
    // script(1) gives the CLI a terminal.
    require_tool("script", "util-linux (bsdutils on Debian)");
    let dir = scratch();
    let profiles = profiles_file(dir.path(), r#"[{"name":"two","command":"sleep 2"}]"#);
    let agent = Agent::start(&["--profiles", &profiles]);
    // script(1) runs the command on a pseudo-terminal: stderr is a TTY.
    let out = sh(&format!(
        "NNF_DM_MOUNT={} script -qec '{} copy /etc/hostname /tmp/x --profile two --name b1 --wait' /dev/null",
        agent.mnt.display(),
        bin("nnf-dm").display()
    ));
    let text = stdout(&out);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert!(text.contains("\rb1 ["), "{text:?}");
    assert!(text.contains("] 100%  success in "), "{text:?}");
    // Redrawn in place: several frames (1 s ticks) over the 2 s copy.
    assert!(text.matches("\rb1 [").count() >= 2, "{text:?}");
    assert!(text.contains(" elapsed"), "{text:?}");
}

#[test]
fn job_stage_out_example() {
    let u = user("nnfdmt1");
    let agent = Agent::start(&[]);
    let work = owned_dir(agent.dir.path(), "job", &u);
    let results = owned_dir(&work, "my results", &u);
    std::fs::write(results.join("r.dat"), b"42\n").unwrap();
    let dest = work.join("staged");
    let run = |results: &Path| {
        as_user_cmd(&u, "bash")
            .arg(example("job-stage-out.sh"))
            .arg(results)
            .arg(&dest)
            .env("NNF_DM_MOUNT", &agent.mnt)
            .env("SLURM_JOB_ID", "4242")
            .current_dir(&work)
            .output()
            .unwrap()
    };

    let out = run(&results);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert_eq!(std::fs::read(dest.join("r.dat")).unwrap(), b"42\n");
    assert!(!agent.path("stage-out-4242").exists(), "removed on success");

    // A refused request: the script says why, from `errors`.
    let out = run(&work.join("no such dir"));
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(
        stderr(&out).contains("request refused:") && stderr(&out).contains("no such dir"),
        "{}",
        describe(&out)
    );

    // A failed copy: the status is printed and the record kept.
    let private = agent.dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = as_user_cmd(&u, "bash")
        .arg(example("job-stage-out.sh"))
        .arg(&results)
        .arg(private.join("out"))
        .env("NNF_DM_MOUNT", &agent.mnt)
        .env("SLURM_JOB_ID", "4243")
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stderr(&out).contains("status=failed"), "{}", describe(&out));
    assert_eq!(
        agent
            .read("stage-out-4243/status")
            .map(|s| field(&s, "status"))
            .unwrap()
            .as_deref(),
        Some("failed")
    );
}

#[test]
fn prolog_and_epilog_examples() {
    let (u1, u2) = (user("nnfdmt1"), user("nnfdmt2"));
    let dir = scratch();
    let profiles = profiles_file(dir.path(), SLOW);
    let agent = Agent::start(&["--profiles", &profiles]);
    let d1 = owned_dir(dir.path(), "one", &u1);
    let d2 = owned_dir(dir.path(), "two", &u2);
    let copy = |u: &User, d: &Path, name: &str, profile: &str| {
        let out = nnf_dm(
            &agent,
            Some(u),
            d,
            &[
                "copy",
                "/etc/hostname",
                name,
                "--name",
                name,
                "--profile",
                profile,
            ],
        );
        assert_eq!(code(&out), 0, "{}", describe(&out));
    };
    let script = |name: &str, env: &[(&str, &str)]| {
        let mut cmd = Command::new("bash");
        cmd.arg(example(name)).env("NNF_DM_MOUNT", &agent.mnt);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };

    copy(&u1, &d1, "ok1", "default");
    copy(&u1, &d1, "bad1", "bad");
    copy(&u1, &d1, "slow1", "slow");
    copy(&u2, &d2, "other1", "default");
    for name in ["ok1", "bad1", "other1"] {
        agent.wait_completed(name, LONG);
    }
    assert!(wait_until(LONG, || agent.read("slow1/state").unwrap() == "running\n"));

    // Epilog: waits (bounded), reports, removes what completed.
    let out = script("epilog.sh", &[("NNF_DM_EPILOG_TIMEOUT", "2")]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let err = stderr(&out);
    assert!(err.contains("epilog: bad1 failed: "), "{err}");
    assert!(
        err.contains("epilog: slow1 still running after 2s; left in place"),
        "{err}"
    );
    assert!(!err.contains("ok1") && !err.contains("other1"), "{err}");
    for name in ["ok1", "bad1", "other1"] {
        assert!(!agent.path(name).exists(), "{name} removed");
    }
    assert!(agent.path("slow1").exists());

    // Prolog: the agent answers; the same user's completed leftovers go,
    // another user's and running ones stay.
    copy(&u1, &d1, "done2", "default");
    copy(&u2, &d2, "other2", "default");
    for name in ["done2", "other2"] {
        agent.wait_completed(name, LONG);
    }
    let out = script("prolog.sh", &[("SLURM_JOB_USER", u1.name)]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert!(stdout(&out).contains("removed done2"), "{}", describe(&out));
    assert!(!agent.path("done2").exists());
    assert!(agent.path("other2").exists() && agent.path("slow1").exists());

    // Prolog: no agent → non-zero, so the WLM holds the node.
    let out = Command::new("bash")
        .arg(example("prolog.sh"))
        .env("NNF_DM_MOUNT", dir.path().join("one"))
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(
        stderr(&out).contains("does not answer"),
        "{}",
        describe(&out)
    );

    nnf_dm(&agent, None, dir.path(), &["cancel", "slow1"]);
}
