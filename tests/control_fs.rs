//! The /run/nnf-dm contract (control-fs.md), line by line, through a real
//! mount of the real agent on its local backend.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::*;

const LONG: Duration = Duration::from_secs(30);

/// Writes `data` in one write(2) to `path`; "ok" or the errno's name.
fn write_errno(path: &Path, data: &[u8]) -> String {
    // The request goes through stdin: a 64 KiB argument is over the kernel's limit.
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import os, sys, errno\ndata = sys.stdin.buffer.read()\nfd = os.open({:?}, os.O_WRONLY)\ntry:\n    os.write(fd, data)\n    print('ok')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n",
            path.to_str().unwrap()
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    stdout(&out).trim().to_string()
}

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(
        root.join("sub/b.bin"),
        (0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(root.join("sub/deeper/c"), b"").unwrap();
    std::fs::set_permissions(root.join("a.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("../a.txt", root.join("sub/link")).unwrap();
    sh(&format!(
        "touch -h -d '2020-01-02 03:04:05.123456789' {0}/a.txt {0}/sub/link {0}/sub",
        root.display()
    ));
}

#[test]
fn root_layout_modes_and_version() {
    let agent = Agent::start(&[]);
    let meta = std::fs::metadata(&agent.mnt).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o1777, "root is 1777 like /tmp");
    let mut names: Vec<String> = std::fs::read_dir(&agent.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["README", "errors", "metrics", "request", "version"]);
    for (name, mode) in [
        ("README", 0o444),
        ("version", 0o444),
        ("request", 0o666),
        ("errors", 0o444),
        ("metrics", 0o444),
    ] {
        assert_eq!(
            std::fs::metadata(agent.path(name)).unwrap().mode() & 0o777,
            mode,
            "{name}"
        );
    }
    let version = agent.read("version").unwrap();
    assert_eq!(
        field(&version, "version").unwrap(),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(field(&version, "api_versions").unwrap(), "1");
    assert_eq!(field(&version, "backend").unwrap(), "local");
    assert!(agent.read("README").unwrap().contains("echo 1 > cancel"));
    assert!(agent.read("README").unwrap().contains("cat metrics"));
    // A fresh request file reads empty before any write.
    assert_eq!(agent.read("request").unwrap(), "");
    // Nothing else may be created at the root.
    let out = sh(&format!("mkdir {0}/x; touch {0}/y", agent.mnt.display()));
    let err = stderr(&out);
    assert_eq!(err.matches("Operation not permitted").count(), 2, "{err}");
}

#[test]
fn copy_preserves_content_modes_times_and_links() {
    let agent = Agent::start(&[]);
    let src = agent.dir.path().join("src");
    make_tree(&src);
    let dst = agent.dir.path().join("out/nested/dst");
    let out = agent.request(&format!(
        "name=tree source={} destination={}",
        src.display(),
        dst.display()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    // The operation exists as soon as echo returned.
    assert!(agent.path("tree/status").exists());
    let status = agent.wait_completed("tree", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    assert_eq!(field(&status, "progress").unwrap(), "100");
    assert_eq!(field(&status, "files").unwrap(), "3");
    assert_eq!(field(&status, "links").unwrap(), "1");
    assert_eq!(field(&status, "bytes").unwrap(), (6 + 200_000).to_string());
    let diff = sh(&format!(
        "diff -r --no-dereference {} {}",
        src.display(),
        dst.display()
    ));
    assert!(diff.status.success(), "{}", stdout(&diff));
    for rel in ["a.txt", "sub", "sub/link", "sub/b.bin"] {
        let a = std::fs::symlink_metadata(src.join(rel)).unwrap();
        let b = std::fs::symlink_metadata(dst.join(rel)).unwrap();
        assert_eq!(a.mode(), b.mode(), "mode of {rel}");
        assert_eq!(
            (a.mtime(), a.mtime_nsec()),
            (b.mtime(), b.mtime_nsec()),
            "mtime of {rel}"
        );
    }
    assert_eq!(
        std::fs::read_link(dst.join("sub/link"))
            .unwrap()
            .to_str()
            .unwrap(),
        "../a.txt"
    );
}

#[test]
fn copy_onto_an_existing_directory_lands_inside_it_and_reruns_stay_put() {
    let mut agent = Agent::start(&[]);
    let src = agent.dir.path().join("data");
    many_files(&src, 2, 500);
    let dst = agent.dir.path().join("existing");
    std::fs::create_dir(&dst).unwrap();
    agent.request(&format!(
        "name=into slots=1 source={} destination={}",
        src.display(),
        dst.display()
    ));
    // Interrupt the copy by a crash while it has created data/ inside dst:
    // the re-run must not land one level deeper (dst/data/data).
    let worker = freeze_copy_process(&dst.join("data"));
    assert!(wait_until(LONG, || agent.read("into/state").unwrap() == "running\n"));
    // As if the interrupted run had got as far as creating its target.
    std::fs::create_dir_all(dst.join("data")).unwrap();
    agent.crash();
    assert!(wait_until(Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{worker}")).exists()
    }));
    agent.restart();
    let status = agent.wait_completed("into", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    assert_eq!(field(&status, "restarts").unwrap(), "1");
    assert!(
        dst.join("data/d1/f0499").exists(),
        "cp -r semantics: lands inside"
    );
    assert!(
        !dst.join("data/data").exists(),
        "the re-run copied to the recorded target"
    );
    assert!(sh(&format!(
        "diff -r {} {}",
        src.display(),
        dst.join("data").display()
    ))
    .status
    .success());
}

#[test]
fn status_files_hold_every_key_in_order() {
    let agent = Agent::start(&[]);
    let src = agent.dir.path().join("f");
    std::fs::write(&src, b"x").unwrap();
    agent.request(&format!(
        "name=keys source={} destination={}/g",
        src.display(),
        agent.dir.path().display()
    ));
    let status = agent.wait_completed("keys", LONG);
    let keys: Vec<&str> = status
        .lines()
        .map(|l| l.split('=').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "name",
            "state",
            "status",
            "progress",
            "message",
            "start_time",
            "end_time",
            "elapsed_seconds",
            "command",
            "last_message",
            "last_message_time",
            "items",
            "directories",
            "files",
            "links",
            "bytes",
            "rate_bytes_per_second",
            "restarts",
            "resumed_files",
            "resumed_bytes"
        ]
    );
    assert_eq!(agent.read("keys/state").unwrap(), "completed\n");
    assert_eq!(agent.read("keys/progress").unwrap(), "100\n");
    let start = field(&status, "start_time").unwrap();
    assert!(start.ends_with('Z') && start.len() == 20, "{start}");
    let json: serde_json::Value =
        serde_json::from_str(&agent.read("keys/status.json").unwrap()).unwrap();
    assert_eq!(json["name"], "keys");
    assert_eq!(json["state"], "completed");
    assert_eq!(json["status"], "success");
    assert_eq!(json["commandStatus"]["progress"], 100);
    assert_eq!(json["startTime"].as_str().unwrap(), start);
    assert_eq!(json["files"], 1);
    // The normalised request is itself a valid request: write it back renamed
    // (in one write: bash's own echo writes a multi-line text line by line).
    let request = agent.read("keys/request").unwrap();
    assert!(request.starts_with("name=keys\nsource="), "{request}");
    let out = sh(&format!(
        "sed 's/^name=keys$/name=keys2/' {}/keys/request > {}/request",
        agent.mnt.display(),
        agent.mnt.display()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    agent.wait_completed("keys2", LONG);
}

#[test]
fn generated_name_reads_back_on_the_same_descriptor() {
    let agent = Agent::start(&[]);
    let req = agent.path("request");
    let out = sh(&format!(
        "exec 3<>{0}; echo 'source=/etc/hostname destination={1}/h dryrun=true' >&3; read -r n <&3; echo \"$n\"",
        req.display(),
        agent.dir.path().display()
    ));
    let name = stdout(&out).trim().to_string();
    assert!(
        name.starts_with("dm-") && name.len() == 11,
        "{name:?} {}",
        stderr(&out)
    );
    assert!(name[3..]
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    assert!(agent.path(&name).is_dir());
    // Python: os.write then os.read gets the reply; a failed write gets "error: ...".
    let out = python(&format!(
        "import os\nfd = os.open({p:?}, os.O_RDWR)\nprint(os.read(fd, 100))\nos.write(fd, b'source=/etc/hostname destination=/tmp/x dryrun=1 name=py1')\nprint(os.read(fd, 100))\ntry:\n    os.write(fd, b'source=relative destination=/x')\nexcept OSError as e:\n    print(e.errno)\nprint(os.read(fd, 200))\n",
        p = req.to_str().unwrap()
    ));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines[0], "b''", "EOF before any write");
    assert_eq!(lines[1], "b'py1\\n'");
    assert_eq!(lines[2], libc::EINVAL.to_string());
    assert!(
        lines[3].contains("error: source: 'relative' is not an absolute path\\n"),
        "{}",
        lines[3]
    );
}

#[test]
fn every_rejection_has_its_errno_and_a_line_in_errors() {
    let agent = Agent::start(&["--max-ops-per-user", "3"]);
    let req = agent.path("request");
    let d = agent.dir.path().display().to_string();
    let big = format!(
        "source=/a destination=/b dcp_options=\"{}\"",
        "x".repeat(70 * 1024)
    );
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            b"source=/a destination=/b bogus=1".to_vec(),
            "EINVAL",
            "unknown key 'bogus'",
        ),
        (
            b"source=/a source=/a destination=/b".to_vec(),
            "EINVAL",
            "given twice",
        ),
        (b"source=/a destination".to_vec(), "EINVAL", "missing '='"),
        (
            b"source=/a destination=\"/b".to_vec(),
            "EINVAL",
            "unterminated quote",
        ),
        (
            b"source=a destination=/b".to_vec(),
            "EINVAL",
            "not an absolute path",
        ),
        (
            b"source=/a destination=/b name=..x".to_vec(),
            "EINVAL",
            "is not 1-63",
        ),
        (
            b"source=/a destination=/b name=version".to_vec(),
            "EINVAL",
            "reserved",
        ),
        (
            b"source=/a destination=/b slots=x".to_vec(),
            "EINVAL",
            "integer",
        ),
        (b"source=/a\0 destination=/b".to_vec(), "EINVAL", "NUL"),
        (b"source=/\xff destination=/b".to_vec(), "EINVAL", "UTF-8"),
        (big.into_bytes(), "EINVAL", "over the 65536-byte limit"),
        (
            format!("source={d}/missing destination={d}/x").into_bytes(),
            "ENOENT",
            "does not exist or is not visible",
        ),
        (
            format!("source=/etc/hostname destination={d}/x profile=nope").into_bytes(),
            "ENOENT",
            "profile 'nope' does not exist",
        ),
    ];
    for (data, errno, words) in &cases {
        assert_eq!(
            &write_errno(&req, data),
            errno,
            "{}",
            String::from_utf8_lossy(&data[..data.len().min(80)])
        );
        let errors = agent.read("errors").unwrap();
        let last = errors.lines().last().unwrap();
        assert!(
            last.contains(&format!(" {errno} ")) && last.contains(words),
            "{last}"
        );
    }
    // EEXIST, then ENOSPC once the user holds three operations.
    let ok = format!("source=/etc/hostname destination={d}/x dryrun=true");
    assert_eq!(write_errno(&req, format!("{ok} name=one").as_bytes()), "ok");
    assert_eq!(
        write_errno(&req, format!("{ok} name=one").as_bytes()),
        "EEXIST"
    );
    assert_eq!(write_errno(&req, format!("{ok} name=two").as_bytes()), "ok");
    assert_eq!(
        write_errno(&req, format!("{ok} name=three").as_bytes()),
        "ok"
    );
    assert_eq!(
        write_errno(&req, format!("{ok} name=four").as_bytes()),
        "ENOSPC"
    );
    let errors = agent.read("errors").unwrap();
    assert!(
        errors
            .lines()
            .any(|l| l.contains(" EEXIST name 'one' is in use")),
        "{errors}"
    );
    assert!(
        errors.lines().last().unwrap().contains(" ENOSPC "),
        "{errors}"
    );
    // Every line: RFC 3339 time, errno name, reason.
    for line in errors.lines() {
        let mut parts = line.splitn(3, ' ');
        let time = parts.next().unwrap();
        assert!(time.len() == 20 && time.ends_with('Z'), "{line}");
        assert!(parts.next().unwrap().starts_with('E'), "{line}");
    }
    // Removing one frees a slot.
    agent.wait_completed("one", LONG);
    std::fs::remove_dir(agent.path("one")).unwrap();
    assert_eq!(
        write_errno(&req, format!("{ok} name=four").as_bytes()),
        "ok"
    );
    // echo shows the error and fails.
    let out = agent.request("source=/a destination=/b nonsense=1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Invalid argument"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn errors_file_keeps_32_lines_per_user_newest_last() {
    let agent = Agent::start(&[]);
    let req = agent.path("request");
    for i in 0..40 {
        assert_eq!(
            write_errno(&req, format!("source=/a destination=/b k{i}=1").as_bytes()),
            "EINVAL"
        );
    }
    let errors = agent.read("errors").unwrap();
    assert_eq!(errors.lines().count(), 32);
    assert!(errors.lines().last().unwrap().contains("unknown key 'k39'"));
    assert!(errors.lines().next().unwrap().contains("unknown key 'k8'"));
    // Another user sees only their own.
    let u = user("nnfdmt1");
    let theirs = sh_as(&u, &format!("cat {}", agent.path("errors").display()));
    assert_eq!(stdout(&theirs), "");
}

#[test]
fn quoted_values_hold_spaces() {
    let agent = Agent::start(&[]);
    let src = agent.dir.path().join("with space");
    std::fs::write(&src, b"q").unwrap();
    let dst = agent.dir.path().join("dest dir/f");
    let out = agent.request(&format!(
        "name=q source=\"{}\" destination=\"{}\" dcp_options=\"--a \\\"b\\\"\"",
        src.display(),
        dst.display()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    agent.wait_completed("q", LONG);
    assert_eq!(std::fs::read(&dst).unwrap(), b"q");
    let request = agent.read("q/request").unwrap();
    assert!(
        request.contains(&format!("source=\"{}\"", src.display())),
        "{request}"
    );
    assert!(
        request.contains("dcp_options=\"--a \\\"b\\\"\""),
        "{request}"
    );
}

#[test]
fn workflow_comes_from_the_writers_environment() {
    let agent = Agent::start(&[]);
    let out = sh(&format!(
        "DW_WORKFLOW_NAME=wf1 DW_WORKFLOW_NAMESPACE=ns1 bash -c \"echo 'name=w source=/etc/hostname destination=/tmp/x dryrun=1' > {}\"",
        agent.path("request").display()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let request = agent.read("w/request").unwrap();
    assert!(
        request.contains("workflow=wf1\nnamespace=ns1\n"),
        "{request}"
    );
    // An explicit workflow= wins over the environment.
    sh(&format!(
        "DW_WORKFLOW_NAME=wf1 bash -c \"echo 'name=w2 workflow=mine source=/etc/hostname destination=/tmp/x dryrun=1' > {}\"",
        agent.path("request").display()
    ));
    assert!(agent
        .read("w2/request")
        .unwrap()
        .contains("workflow=mine\n"));
}

#[test]
fn users_see_only_their_own_operations_and_copy_as_themselves() {
    let agent = Agent::start(&[]);
    let (u1, u2) = (user("nnfdmt1"), user("nnfdmt2"));
    let base = agent.dir.path();
    let src = base.join("u1src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"mine").unwrap();
    sh(&format!("chown -R {}:{} {}", u1.uid, u1.gid, src.display()));
    let out_dir = base.join("u1out");
    std::fs::create_dir(&out_dir).unwrap();
    sh(&format!(
        "chown {}:{} {}",
        u1.uid,
        u1.gid,
        out_dir.display()
    ));

    let out = agent.request_as(
        &u1,
        &format!(
            "name=u1op source={} destination={}/copy",
            src.display(),
            out_dir.display()
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let status = agent.wait_completed("u1op", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    let meta = std::fs::metadata(out_dir.join("copy/f")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (u1.uid, u1.gid),
        "created files belong to the requester"
    );
    let dir_meta = std::fs::metadata(agent.path("u1op")).unwrap();
    assert_eq!(
        (dir_meta.uid(), dir_meta.gid(), dir_meta.mode() & 0o777),
        (u1.uid, u1.gid, 0o500)
    );
    assert_eq!(
        std::fs::metadata(agent.path("u1op/status")).unwrap().mode() & 0o777,
        0o400
    );
    assert_eq!(
        std::fs::metadata(agent.path("u1op/cancel")).unwrap().mode() & 0o777,
        0o200
    );

    // The other user neither lists nor reads, cancels or removes it.
    let ls = sh_as(&u2, &format!("ls {}", agent.mnt.display()));
    assert!(!stdout(&ls).contains("u1op"), "{}", stdout(&ls));
    let ls1 = sh_as(&u1, &format!("ls {}", agent.mnt.display()));
    assert!(stdout(&ls1).contains("u1op"));
    let root_ls = sh(&format!("ls {}", agent.mnt.display()));
    assert!(stdout(&root_ls).contains("u1op"), "root sees all");
    for cmd in [
        "cat {m}/u1op/status",
        "echo 1 > {m}/u1op/cancel",
        "rmdir {m}/u1op",
    ] {
        let out = sh_as(&u2, &cmd.replace("{m}", &agent.mnt.display().to_string()));
        let err = stderr(&out);
        assert!(!out.status.success(), "{cmd} must fail");
        assert!(
            err.contains("No such file")
                || err.contains("Permission denied")
                || err.contains("Operation not permitted"),
            "{cmd}: {err}"
        );
    }
    assert!(agent.path("u1op").exists());

    // A user cannot copy what they cannot read, nor write where they cannot.
    let secret = base.join("secret");
    std::fs::write(&secret, b"root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    agent.request_as(
        &u1,
        &format!(
            "name=steal source={} destination={}/stolen",
            secret.display(),
            out_dir.display()
        ),
    );
    let status = agent.wait_completed("steal", LONG);
    assert_eq!(field(&status, "status").unwrap(), "failed", "{status}");
    assert!(
        field(&status, "message")
            .unwrap()
            .contains("Permission denied"),
        "{status}"
    );
    assert!(!out_dir.join("stolen").exists());
    let rootdir = base.join("rootonly");
    std::fs::create_dir(&rootdir).unwrap();
    agent.request_as(
        &u1,
        &format!(
            "name=plant source={}/f destination={}/f",
            src.display(),
            rootdir.display()
        ),
    );
    let status = agent.wait_completed("plant", LONG);
    assert_eq!(field(&status, "status").unwrap(), "failed", "{status}");
    assert!(!rootdir.join("f").exists());
    // What the user cannot even see is ENOENT at request time.
    let hidden = base.join("hidden");
    std::fs::create_dir(&hidden).unwrap();
    std::fs::write(hidden.join("x"), b"").unwrap();
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = sh_as(
        &u1,
        &format!(
            "echo 'source={}/x destination=/tmp/y' > {} 2>/dev/null; echo $?; cat {}",
            hidden.display(),
            agent.path("request").display(),
            agent.path("errors").display()
        ),
    );
    assert!(stdout(&out).contains(" ENOENT source"), "{}", stdout(&out));

    // The owner removes their own completed operation.
    let out = sh_as(&u1, &format!("rmdir {}/u1op", agent.mnt.display()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!agent.path("u1op").exists());
}

#[test]
fn two_hundred_concurrent_requests_from_several_users_are_all_kept() {
    let agent = Agent::start(&["--max-active", "8"]);
    let users = [user("nnfdmt1"), user("nnfdmt2")];
    let base = agent.dir.path().to_path_buf();
    let src = base.join("small");
    std::fs::write(&src, b"payload").unwrap();
    for u in &users {
        let d = base.join(format!("out-{}", u.name));
        std::fs::create_dir(&d).unwrap();
        sh(&format!("chown {}:{} {}", u.uid, u.gid, d.display()));
    }
    let req = agent.path("request");
    let mut children = Vec::new();
    for (i, u) in users.iter().enumerate() {
        // 4 writers per user, 25 requests each, all at once.
        for w in 0..4 {
            let script = format!(
                "for n in $(seq 0 24); do echo \"name=c{i}-{w}-$n source={src} destination={base}/out-{user}/f{w}-$n\" > {req} || exit 1; done",
                src = src.display(),
                base = base.display(),
                user = u.name,
                req = req.display()
            );
            children.push(
                as_user_cmd(u, "bash")
                    .arg("-c")
                    .arg(script)
                    .spawn()
                    .unwrap(),
            );
        }
    }
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let mut names = Vec::new();
    for i in 0..2 {
        for w in 0..4 {
            for n in 0..25 {
                names.push(format!("c{i}-{w}-{n}"));
            }
        }
    }
    assert_eq!(names.len(), 200);
    for name in &names {
        let status = agent.wait_completed(name, Duration::from_secs(60));
        assert_eq!(
            field(&status, "status").unwrap(),
            "success",
            "{name}: {status}"
        );
    }
    for (i, u) in users.iter().enumerate() {
        for w in 0..4 {
            for n in 0..25 {
                let f = base.join(format!("out-{}/f{w}-{n}", u.name));
                assert_eq!(
                    std::fs::read(&f).unwrap(),
                    b"payload",
                    "{i} {}",
                    f.display()
                );
                assert_eq!(std::fs::metadata(&f).unwrap().uid(), u.uid);
            }
        }
    }
}

/// An agent with the profiles `json` (a `--profiles` array) and `extra` flags;
/// the directory holding the profiles file lives as long as the first value.
fn agent_with_profiles(json: &str, extra: &[&str]) -> (tempfile::TempDir, Agent) {
    let dir = scratch();
    let profiles = profiles_file(dir.path(), json);
    let mut args = vec!["--profiles", profiles.as_str()];
    args.extend_from_slice(extra);
    let agent = Agent::start(&args);
    (dir, agent)
}

#[test]
fn cancel_stops_a_running_copy_and_its_process_group() {
    let dir = scratch();
    let profiles = profiles_file(
        dir.path(),
        r#"[{"name":"slow","command":"echo started; sleep 60; echo never"}]"#,
    );
    let agent = Agent::start(&["--profiles", &profiles]);
    agent.request("name=slow1 profile=slow source=/etc/hostname destination=/tmp/nowhere");
    assert!(wait_until(LONG, || agent.read("slow1/state").unwrap() == "running\n"));
    assert!(wait_until(LONG, || field(
        &agent.read("slow1/status").unwrap(),
        "last_message"
    )
    .unwrap()
        == "started"));
    // rmdir of a running operation is refused.
    let out = sh(&format!("rmdir {}", agent.path("slow1").display()));
    assert!(
        stderr(&out).contains("Device or resource busy"),
        "{}",
        stderr(&out)
    );
    let started = Instant::now();
    let out = sh(&format!(
        "echo 1 > {}",
        agent.path("slow1/cancel").display()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "cancel returns at once"
    );
    let status = agent.wait_completed("slow1", Duration::from_secs(10));
    assert_eq!(field(&status, "status").unwrap(), "cancelled", "{status}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The bracket keeps pgrep from matching the shell that runs it.
    let leftovers = sh("pgrep -f 'slee[p] 60; echo never' || true");
    assert_eq!(
        stdout(&leftovers).trim(),
        "",
        "no process of the copy survives"
    );
    // Cancel of a completed operation succeeds and changes nothing.
    let out = sh(&format!(
        "echo 1 > {}",
        agent.path("slow1/cancel").display()
    ));
    assert!(out.status.success());
    assert_eq!(
        field(&agent.read("slow1/status").unwrap(), "status").unwrap(),
        "cancelled"
    );
    // Now it can be removed, record and all.
    assert!(agent.state.join("ops/slow1.json").exists());
    let out = sh(&format!("rmdir {}", agent.path("slow1").display()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!agent.path("slow1").exists());
    assert!(!agent.state.join("ops/slow1.json").exists());
}

#[test]
fn cancel_before_start_completes_as_cancelled() {
    let (_profiles, agent) = agent_with_profiles(
        r#"[{"name":"slow","command":"sleep 60"}]"#,
        &["--max-active", "1"],
    );
    agent.request("name=first profile=slow source=/etc/hostname destination=/tmp/x");
    agent.request("name=second profile=slow source=/etc/hostname destination=/tmp/x");
    assert!(wait_until(LONG, || agent.read("first/state").unwrap() == "running\n"));
    assert_eq!(agent.read("second/state").unwrap(), "pending\n");
    sh(&format!(
        "echo 1 > {}",
        agent.path("second/cancel").display()
    ));
    let status = agent.wait_completed("second", Duration::from_secs(5));
    assert_eq!(field(&status, "status").unwrap(), "cancelled");
    assert!(sh(&format!("rmdir {}", agent.path("second").display()))
        .status
        .success());
    sh(&format!(
        "echo 1 > {}",
        agent.path("first/cancel").display()
    ));
    agent.wait_completed("first", Duration::from_secs(10));
}

#[test]
fn wait_blocks_until_completion_and_is_eagain_when_nonblocking() {
    let dir = scratch();
    let gate = Gate::new(dir.path(), "two");
    let (_profiles, agent) = agent_with_profiles(&format!("[{}]", gate.profile()), &[]);
    agent.request("name=w1 profile=two source=/etc/hostname destination=/tmp/x");
    let out = python(&format!(
        "import os, errno\nfd = os.open({:?}, os.O_RDONLY | os.O_NONBLOCK)\ntry:\n    os.read(fd, 4096)\n    print('read')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n",
        agent.path("w1/wait").to_str().unwrap()
    ));
    assert_eq!(stdout(&out).trim(), "EAGAIN");
    // The copy completes only once `cat` sleeps in its read.
    let started = Instant::now();
    let cat = agent.blocked_cat("w1/wait");
    assert_eq!(agent.read("w1/state").unwrap(), "running\n");
    gate.open();
    let out = cat.wait_with_output().unwrap();
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10));
    assert_eq!(field(&stdout(&out), "state").unwrap(), "completed");
    assert_eq!(field(&stdout(&out), "status").unwrap(), "success");
    // Completed: returns at once.
    let started = Instant::now();
    sh(&format!("cat {}", agent.path("w1/wait").display()));
    assert!(started.elapsed() < Duration::from_secs(1));
}

fn blocked_wait_ends_on(signal: &str) {
    let (_profiles, agent) = agent_with_profiles(r#"[{"name":"slow","command":"sleep 60"}]"#, &[]);
    agent.request("name=s profile=slow source=/etc/hostname destination=/tmp/x");
    let mut cat = agent.blocked_cat("s/wait");
    let pid = cat.id();
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = state
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(state, "S", "a blocked reader sleeps interruptibly");
    let started = Instant::now();
    sh(&format!("kill -{signal} {pid}"));
    let status = cat.wait().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{signal} ended the read after {:?}",
        started.elapsed()
    );
    assert!(!status.success());
    assert!(wait_until(Duration::from_secs(2), || agent
        .read("s/state")
        .is_ok()));
    assert_eq!(
        agent.read("s/state").unwrap(),
        "running\n",
        "the operation is untouched"
    );
    sh(&format!("echo 1 > {}", agent.path("s/cancel").display()));
    agent.wait_completed("s", Duration::from_secs(10));
}

#[test]
fn blocked_wait_ends_on_sigint() {
    blocked_wait_ends_on("INT");
}

#[test]
fn blocked_wait_ends_on_sigkill() {
    blocked_wait_ends_on("KILL");
}

#[test]
fn blocked_wait_ends_for_a_handled_signal_and_sa_restart_waits_again() {
    let dir = scratch();
    let gate = Gate::new(dir.path(), "slow");
    let (_profiles, agent) = agent_with_profiles(&format!("[{}]", gate.profile()), &[]);
    agent.request("name=h profile=slow source=/etc/hostname destination=/tmp/x");
    // Python's default SIGINT handler raises KeyboardInterrupt: the read ends at once.
    let out = python(&format!(
        "import os, signal, threading, time\nthreading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\nt = time.time()\ntry:\n    open({:?}).read()\n    print('completed')\nexcept KeyboardInterrupt:\n    print('interrupted', round(time.time() - t, 1))\n",
        agent.path("h/wait").to_str().unwrap()
    ));
    let text = stdout(&out);
    assert!(text.starts_with("interrupted"), "{text} {}", stderr(&out));
    let secs: f64 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(secs < 1.5, "{secs}");
    gate.open();
    agent.wait_completed("h", LONG);
}

#[test]
fn poll_wakes_on_state_changes_only() {
    let dir = scratch();
    let profiles = profiles_file(
        dir.path(),
        r#"[{"name":"steps","command":"sleep 1; echo 'Copied 1 of 2 (50%)'; sleep 1"}]"#,
    );
    let agent = Agent::start(&["--profiles", &profiles, "--max-active", "1"]);
    // Occupy the only slot so the watched operation starts pending.
    agent.request("name=hold profile=steps source=/etc/hostname destination=/tmp/x");
    agent.request("name=p profile=steps source=/etc/hostname destination=/tmp/x");
    let out = python(&format!(
        "import select, os, time\nfd = os.open({s:?}, os.O_RDONLY)\nos.read(fd, 4096)\np = select.poll()\np.register(fd, select.POLLPRI | select.POLLIN)\nseen = []\nt = time.time()\nwhile time.time() - t < 20:\n    ev = p.poll(20000)\n    if not ev:\n        break\n    os.lseek(fd, 0, os.SEEK_SET)\n    text = os.read(fd, 4096).decode()\n    kv = dict(l.split('=', 1) for l in text.splitlines())\n    seen.append(kv['state'] + ':' + kv['progress'])\n    if kv['state'] == 'completed':\n        break\nprint(' '.join(seen))\n",
        s = agent.path("p/status").to_str().unwrap()
    ));
    let seen = stdout(&out);
    let steps: Vec<&str> = seen.split_whitespace().collect();
    assert!(steps.len() >= 2, "poll woke: {seen:?} {}", stderr(&out));
    assert_eq!(*steps.last().unwrap(), "completed:100", "{seen}");
    assert!(steps.iter().any(|s| s.starts_with("running")), "{seen}");
    assert!(steps.contains(&"running:50"), "{seen}");
    // Each wake-up reflects a change: no two identical in a row.
    assert!(steps.windows(2).all(|w| w[0] != w[1]), "{seen}");
    // The wait file polls readable once completed.
    let out = python(&format!(
        "import select, os\nfd = os.open({:?}, os.O_RDONLY)\nprint(select.select([fd], [], [], 5)[0] == [fd])\n",
        agent.path("p/wait").to_str().unwrap()
    ));
    assert_eq!(stdout(&out).trim(), "True");
}

#[test]
fn reads_are_snapshots_and_seek_zero_refreshes() {
    let (_profiles, agent) = agent_with_profiles(r#"[{"name":"slow","command":"sleep 1"}]"#, &[]);
    agent.request("name=snap profile=slow source=/etc/hostname destination=/tmp/x");
    let out = python(&format!(
        "import os, time\nfd = os.open({:?}, os.O_RDONLY)\nfirst = os.read(fd, 10)\ntime.sleep(2.5)\nrest = os.read(fd, 4096)\nos.lseek(fd, 0, os.SEEK_SET)\nfresh = os.read(fd, 4096)\nprint((first + rest).decode().splitlines()[1])\nprint(fresh.decode().splitlines()[1])\n",
        agent.path("snap/status").to_str().unwrap()
    ));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert!(
        lines[0] == "state=running" || lines[0] == "state=starting" || lines[0] == "state=pending",
        "{lines:?}"
    );
    assert_eq!(lines[1], "state=completed", "{lines:?}");
}

#[test]
fn failed_files_do_not_stop_the_others() {
    let agent = Agent::start(&[]);
    let u = user("nnfdmt2");
    let src = agent.dir.path().join("mixed");
    std::fs::create_dir(&src).unwrap();
    for i in 0..5 {
        std::fs::write(src.join(format!("ok{i}")), b"fine").unwrap();
    }
    std::fs::write(src.join("locked"), b"no").unwrap();
    std::fs::set_permissions(src.join("locked"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let out_dir = agent.dir.path().join("mixed-out");
    std::fs::create_dir(&out_dir).unwrap();
    sh(&format!("chown {}:{} {}", u.uid, u.gid, out_dir.display()));
    agent.request_as(
        &u,
        &format!(
            "name=mixed source={} destination={}/m",
            src.display(),
            out_dir.display()
        ),
    );
    let status = agent.wait_completed("mixed", LONG);
    assert_eq!(field(&status, "status").unwrap(), "failed", "{status}");
    let message = agent.read("mixed/message").unwrap();
    assert!(message.starts_with("1 of "), "{message}");
    assert!(message.contains("locked: Permission denied"), "{message}");
    for i in 0..5 {
        assert_eq!(
            std::fs::read(out_dir.join(format!("m/ok{i}"))).unwrap(),
            b"fine"
        );
    }
    // In `status` the multi-line message is one escaped line.
    let escaped = field(&status, "message").unwrap();
    assert!(escaped.contains("\\n"), "{escaped}");
}

#[test]
fn profile_commands_get_variables_hostfile_progress_and_output() {
    let dir = scratch();
    let profiles = profiles_file(
        dir.path(),
        r#"[{"name":"rec","command":"echo SRC=$SRC DEST=$DEST UID=$UID GID=$GID; cat $HOSTFILE; echo mpirun dcp; echo 'Copied 3 of 4 items (75%)'","slots":3,"maxSlots":5,"storeStdout":true}]"#,
    );
    let agent = Agent::start(&["--profiles", &profiles]);
    let u = user("nnfdmt1");
    agent.request_as(&u, "name=rec profile=rec source=/etc/hostname destination=/tmp/d mpirun_options=\"-x Y\" dcp_options=--quiet");
    let status = agent.wait_completed("rec", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    let message = agent.read("rec/message").unwrap();
    assert!(
        message.contains(&format!(
            "SRC=/etc/hostname DEST=/tmp/d UID={} GID={}",
            u.uid, u.gid
        )),
        "{message}"
    );
    assert!(
        message.contains("localhost slots=3 max_slots=5"),
        "{message}"
    );
    assert_eq!(
        field(&status, "last_message").unwrap(),
        "Copied 3 of 4 items (75%)"
    );
    assert!(!field(&status, "last_message_time").unwrap().is_empty());
    let command = field(&status, "command").unwrap();
    assert!(
        command.contains("echo mpirun -x Y dcp --quiet"),
        "{command}"
    );
    // slots=0 on the request leaves slots= out of the hostfile.
    agent.request_as(
        &u,
        "name=rec0 profile=rec slots=0 source=/etc/hostname destination=/tmp/d",
    );
    agent.wait_completed("rec0", LONG);
    let message = agent.read("rec0/message").unwrap();
    assert!(message.contains("localhost max_slots=5\n"), "{message}");
}

#[test]
fn failing_profile_command_reports_its_output() {
    let dir = scratch();
    let profiles = profiles_file(
        dir.path(),
        r#"[{"name":"bad","command":"echo oops >&2; exit 3"}]"#,
    );
    let agent = Agent::start(&["--profiles", &profiles]);
    agent.request("name=bad profile=bad source=/etc/hostname destination=/tmp/d");
    let status = agent.wait_completed("bad", LONG);
    assert_eq!(field(&status, "status").unwrap(), "failed");
    let message = agent.read("bad/message").unwrap();
    assert!(
        message.contains("exit status: 3") && message.contains("oops"),
        "{message}"
    );
}

#[test]
fn dryrun_copies_nothing_and_succeeds() {
    let agent = Agent::start(&[]);
    let dst = agent.dir.path().join("never");
    agent.request(&format!(
        "name=dry source=/etc dryrun=true destination={}",
        dst.display()
    ));
    let status = agent.wait_completed("dry", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success");
    assert_eq!(field(&status, "command").unwrap(), "true");
    assert!(!dst.exists());
}

#[test]
fn restart_keeps_every_operation() {
    let mut agent = Agent::start(&[]);
    let src = agent.dir.path().join("f");
    std::fs::write(&src, b"keep").unwrap();
    agent.request(&format!(
        "name=kept source={} destination={}/k",
        src.display(),
        agent.dir.path().display()
    ));
    agent.request("name=bad source=/nonexistent-path destination=/tmp/x");
    let before = agent.wait_completed("kept", LONG);
    let status = agent.stop();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    assert!(
        !sh(&format!("mountpoint -q {}", agent.mnt.display()))
            .status
            .success(),
        "SIGTERM unmounts"
    );
    agent.restart();
    let after = agent.read("kept/status").unwrap();
    assert_eq!(before, after);
    assert!(agent.path("kept/wait").exists());
    assert!(!agent.path("bad").exists());
}

#[test]
fn crash_leaves_a_stale_mount_that_the_next_start_cleans_and_reruns_the_copy() {
    let dir = scratch();
    let marker = dir.path().join("runs");
    let profiles = profiles_file(
        dir.path(),
        &format!(
            r#"[{{"name":"slow","command":"echo run >> {}; sleep 3"}}]"#,
            marker.display()
        ),
    );
    let mut agent = Agent::start(&["--profiles", &profiles]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    agent.request("name=crashy profile=slow source=/etc/hostname destination=/tmp/x");
    assert!(wait_until(LONG, || agent.read("crashy/state").unwrap() == "running\n"));
    // Not `exists()`: `>>` creates the file before echo writes, and a crash
    // in between would leave it empty.
    assert!(wait_until(LONG, || std::fs::read_to_string(&marker)
        .is_ok_and(|runs| runs == "run\n")));
    agent.crash();
    // statfs always asks the (dead) server; stat may be answered from cache.
    let out = python(&format!(
        "import os\ntry:\n    os.statvfs({:?})\nexcept OSError as e:\n    print(e.errno)\n",
        agent.mnt.to_str().unwrap()
    ));
    assert_eq!(
        stdout(&out).trim(),
        libc::ENOTCONN.to_string(),
        "a crash leaves a stale mount"
    );
    // The copy's shell died with the agent (the bracket keeps pgrep from matching its own shell).
    assert!(wait_until(Duration::from_secs(5), || stdout(&sh(
        "pgrep -f 'runs; slee[p] 3' || true"
    ))
    .trim()
    .is_empty()));
    agent.restart();
    assert!(
        agent.log().contains("cleaned a stale mount"),
        "{}",
        agent.log()
    );
    let status = agent.wait_completed("crashy", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    assert_eq!(field(&status, "restarts").unwrap(), "1");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\nrun\n");
}

#[test]
fn completed_operations_expire_after_the_retention_period() {
    let agent = Agent::start(&["--retention", "2s"]);
    agent.request("name=old source=/etc/hostname destination=/tmp/x dryrun=1");
    agent.wait_completed("old", LONG);
    assert!(wait_until(Duration::from_secs(10), || !agent
        .path("old")
        .exists()));
    assert!(!agent.state.join("ops/old.json").exists());
}

#[test]
fn pending_copies_are_taken_round_robin_across_users() {
    let dir = scratch();
    let order = dir.path().join("order");
    std::fs::write(&order, b"").unwrap();
    std::fs::set_permissions(&order, std::fs::Permissions::from_mode(0o666)).unwrap();
    let profiles = profiles_file(
        dir.path(),
        &format!(
            r#"[{{"name":"log","command":"echo $DEST >> {}; sleep 0.3"}}]"#,
            order.display()
        ),
    );
    let agent = Agent::start(&["--profiles", &profiles, "--max-active", "1"]);
    let (a, b) = (user("nnfdmt1"), user("nnfdmt2"));
    agent.request_as(
        &a,
        "name=block profile=log source=/etc/hostname destination=/blocker",
    );
    for i in 0..5 {
        agent.request_as(
            &a,
            &format!("name=a{i} profile=log source=/etc/hostname destination=/a{i}"),
        );
    }
    agent.request_as(
        &b,
        "name=b0 profile=log source=/etc/hostname destination=/b0",
    );
    agent.wait_completed("a4", LONG);
    agent.wait_completed("b0", LONG);
    let ran = std::fs::read_to_string(&order).unwrap();
    let ran: Vec<&str> = ran.lines().collect();
    let b_at = ran.iter().position(|l| *l == "/b0").unwrap();
    assert!(b_at <= 2, "user b waited behind all of a's copies: {ran:?}");
}

#[test]
fn kubernetes_flags_are_refused_by_the_local_backend() {
    let dir = scratch();
    let out = std::process::Command::new(bin("nnf-dm"))
        .args([
            "--backend",
            "local",
            "--kubernetes-qps",
            "5",
            "--mountpoint",
        ])
        .arg(dir.path().join("m"))
        .arg("--state-dir")
        .arg(dir.path().join("s"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--kubernetes-qps is not supported by the local backend"),
        "{}",
        stderr(&out)
    );
    let out = std::process::Command::new(bin("nnf-dm"))
        .arg("version")
        .output()
        .unwrap();
    assert!(
        out.status.success() && stdout(&out).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        stdout(&out)
    );
}

#[test]
fn two_default_profiles_refuse_to_start_naming_them() {
    let dir = scratch();
    let profiles = profiles_file(
        dir.path(),
        r#"[{"name":"p1","default":true},{"name":"p2","default":true}]"#,
    );
    let out = std::process::Command::new(bin("nnf-dm"))
        .args(["--profiles", &profiles, "--mountpoint"])
        .arg(dir.path().join("m"))
        .arg("--state-dir")
        .arg(dir.path().join("s"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("p1, p2"), "{}", stderr(&out));
}

#[test]
fn a_removed_operation_is_gone_from_the_kernel_cache() {
    let agent = Agent::start(&[]);
    agent.request("name=gone source=/etc/hostname destination=/tmp/x dryrun=1");
    agent.wait_completed("gone", LONG);
    assert!(sh(&format!("rmdir {}", agent.path("gone").display()))
        .status
        .success());
    assert!(!agent.path("gone/status").exists());
    // The same name is free again at once, and shows the new operation.
    agent.request("name=gone source=/etc/hostname destination=/tmp/y dryrun=1");
    agent.wait_completed("gone", LONG);
    assert!(agent
        .read("gone/request")
        .unwrap()
        .contains("destination=/tmp/y"));
}

#[test]
fn fifos_are_recreated_and_holes_are_kept() {
    let agent = Agent::start(&[]);
    let src = agent.dir.path().join("special");
    std::fs::create_dir(&src).unwrap();
    sh(&format!(
        "mkfifo {0}/pipe && truncate -s 64M {0}/sparse && echo tail >> {0}/sparse",
        src.display()
    ));
    let dst = agent.dir.path().join("special-out");
    agent.request(&format!(
        "name=sp source={} destination={}",
        src.display(),
        dst.display()
    ));
    let status = agent.wait_completed("sp", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    let message = agent.read("sp/message").unwrap();
    assert_eq!(message.trim(), "", "{message}");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(dst.join("pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
    let copied = std::fs::metadata(dst.join("sparse")).unwrap();
    assert_eq!(copied.len(), 64 * 1024 * 1024 + 5);
    assert!(
        copied.blocks() * 512 < 1024 * 1024,
        "the hole was kept: {} blocks",
        copied.blocks()
    );
    assert!(sh(&format!(
        "cmp {0}/sparse {1}/sparse",
        src.display(),
        dst.display()
    ))
    .status
    .success());
}

#[test]
fn json_logs_carry_the_operation_and_user_on_every_line() {
    let agent = Agent::start(&["--log-format", "json"]);
    let u = user("nnfdmt2");
    agent.request_as(
        &u,
        "name=logged source=/etc/hostname destination=/tmp/nnf-dm-log-test dryrun=1",
    );
    agent.wait_completed("logged", LONG);
    agent.request_as(&u, "name=bad source=relative destination=/x");
    let log = agent.log();
    let mut about_ops = 0;
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let fields = &event["fields"];
        let message = fields["message"].as_str().unwrap_or_default();
        if message.contains("operation created") || message.contains("copy completed") {
            about_ops += 1;
            assert_eq!(fields["op"], "logged", "{line}");
            assert_eq!(fields["user"], u.uid, "{line}");
        }
        if message.contains("request rejected") {
            assert_eq!(fields["user"], u.uid, "{line}");
            assert_eq!(fields["errno"], "EINVAL", "{line}");
        }
    }
    assert!(about_ops >= 2, "{log}");
}

/// Stops (SIGSTOP) the copy process writing to `target` as soon as it
/// exists, and returns its pid.
fn freeze_copy_process(target: &Path) -> i32 {
    let needle = target.to_str().unwrap().as_bytes().to_vec();
    let mut worker = None;
    assert!(wait_until(LONG, || {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(b"/")
                && cmdline
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice())
            {
                // SAFETY: signalling a process the agent started for this test.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                worker = Some(pid);
                return true;
            }
        }
        false
    }));
    worker.unwrap()
}

/// `n` empty files in each of `dirs` directories under `root`.
fn many_files(root: &Path, dirs: usize, n: usize) {
    let out = python(&format!(
        "import os\nfor d in range({dirs}):\n    p = os.path.join({:?}, 'd%d' % d)\n    os.makedirs(p)\n    for f in range({n}):\n        os.close(os.open(os.path.join(p, 'f%04d' % f), os.O_CREAT | os.O_WRONLY, 0o644))\n",
        root.to_str().unwrap()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn cancel_of_a_native_copy_escalates_to_sigkill() {
    let agent = Agent::start(&[]);
    let src = agent.dir.path().join("many");
    many_files(&src, 3, 1000);
    let dst = agent.dir.path().join("many-out");
    agent.request(&format!(
        "name=big slots=1 source={} destination={}",
        src.display(),
        dst.display()
    ));
    // Frozen, it can neither finish nor act on SIGTERM: only the agent's
    // SIGKILL after the grace ends it.
    let worker = freeze_copy_process(&dst);
    assert!(wait_until(LONG, || agent.read("big/state").unwrap() == "running\n"));
    let started = Instant::now();
    sh(&format!("echo 1 > {}", agent.path("big/cancel").display()));
    assert_eq!(agent.read("big/state").unwrap(), "cancelling\n");
    let status = agent.wait_completed("big", Duration::from_secs(10));
    assert_eq!(field(&status, "status").unwrap(), "cancelled", "{status}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{worker}")).exists(),
        "the copy process is gone"
    );
}
