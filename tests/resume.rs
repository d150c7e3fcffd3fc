//! A native copy interrupted by `kill -9` of the agent resumes after the
//! restart: it skips what the interrupted run had completely written, redoes
//! the rest, and the destination ends byte-identical to the source. Run as
//! an unprivileged user through the real control-filesystem mount.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::*;

const LONG: Duration = Duration::from_secs(120);

/// `dirs` directories of `n` 4 KiB files, each file's content its own, plus
/// a symlink and a hard-link pair, owned by `u`.
fn many_files(root: &Path, dirs: usize, n: usize, u: &User) {
    let out = python(&format!(
        r#"
import os
root = {root:?}
for d in range({dirs}):
    p = os.path.join(root, 'd%03d' % d)
    os.makedirs(p)
    for f in range({n}):
        name = os.path.join(p, 'f%05d' % f)
        head = name.encode()
        with open(name, 'wb') as fh:
            fh.write((head * (4096 // len(head) + 1))[:4096])
os.symlink('d000/f00000', os.path.join(root, 'link'))
with open(os.path.join(root, 'hard-a'), 'wb') as fh:
    fh.write(b'linked twice\n' * 1000)
os.link(os.path.join(root, 'hard-a'), os.path.join(root, 'hard-b'))
os.utime(os.path.join(root, 'd001'), ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
"#,
        root = root.to_str().unwrap()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    chown(root, u);
}

/// `count` files of `mib` MiB of distinct data each, owned by `u`.
fn large_files(root: &Path, count: usize, mib: usize, u: &User) {
    let out = python(&format!(
        r#"
import os
root = {root:?}
os.makedirs(root)
for i in range({count}):
    with open(os.path.join(root, 'big%d' % i), 'wb') as fh:
        for _ in range({mib}):
            fh.write(os.urandom(1 << 20))
"#,
        root = root.to_str().unwrap()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    chown(root, u);
}

fn chown(path: &Path, u: &User) {
    let out = sh(&format!("chown -hR {}:{} {}", u.uid, u.gid, path.display()));
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A directory the user may write into.
fn user_dir(path: &Path, u: &User) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    chown(path, u);
}

fn journal(agent: &Agent, name: &str) -> PathBuf {
    agent.state.join("journals").join(name)
}

fn journal_len(agent: &Agent, name: &str) -> u64 {
    std::fs::metadata(journal(agent, name)).map_or(0, |m| m.len())
}

/// The copy worker of the copy into `target`, once it runs.
fn worker_of(target: &Path) -> i32 {
    let needle = target.to_str().unwrap().as_bytes().to_vec();
    let mut found = None;
    assert!(
        poll_fast(LONG, || {
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let has = |w: &[u8]| cmdline.windows(w.len()).any(|x| x == w);
                if has(b"copy-worker") && has(&needle) {
                    found = Some(pid);
                    return true;
                }
            }
            false
        }),
        "no copy worker for {} appeared",
        target.display()
    );
    found.unwrap()
}

/// Whether `pid` is stopped (state T in /proc/<pid>/stat).
fn stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(true)
}

/// Polls fast (the copy does not wait for us) until `cond` or the deadline.
fn poll_fast(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// Lets the copy run until the interrupted run has recorded completed files
/// (and `more` holds), then `kill -9`s the agent mid-copy and starts it
/// again on the same state directory. On a fast file system the whole copy
/// takes a fraction of a second, so the worker is stopped as soon as it is
/// seen and let run in slices of a few milliseconds between the checks:
/// however fast the disk, the kill lands in the middle. The agent's death
/// then takes the stopped worker down (SIGKILL reaches a stopped process).
fn crash_mid_copy(agent: &mut Agent, name: &str, target: &Path, more: impl Fn(&Agent) -> bool) {
    kill_mid_copy(agent, name, target, more);
    agent.restart();
}

/// [`crash_mid_copy`] without the restart.
fn kill_mid_copy(agent: &mut Agent, name: &str, target: &Path, more: impl Fn(&Agent) -> bool) {
    let worker = worker_of(target);
    // SAFETY: signalling the copy worker the agent started for this test.
    let signal = |sig| unsafe { libc::kill(worker, sig) };
    signal(libc::SIGSTOP);
    let deadline = Instant::now() + LONG;
    while !(journal_len(agent, name) > 0 && more(agent)) {
        assert!(
            Instant::now() < deadline,
            "no progress recorded; status:\n{}",
            agent.read(&format!("{name}/status")).unwrap_or_default()
        );
        signal(libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(3));
        signal(libc::SIGSTOP);
        assert!(
            poll_fast(Duration::from_secs(10), || stopped(worker)),
            "the worker stops"
        );
    }
    let state = agent.read(&format!("{name}/state")).unwrap();
    assert_eq!(state, "running\n", "the copy was still running when killed");
    agent.crash();
    assert!(
        wait_until(Duration::from_secs(10), || !Path::new(&format!(
            "/proc/{worker}"
        ))
        .exists()),
        "the worker died with the agent"
    );
}

fn number(status: &str, key: &str) -> u64 {
    field(status, key)
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in\n{status}"))
}

/// Content (diff -r, symlinks not followed) and, for every entry, type,
/// mode, owner, size and mtime to the nanosecond; hard-link pairs stay one
/// inode.
fn assert_same_tree(src: &Path, dst: &Path) {
    let diff = sh(&format!(
        "diff -r --no-dereference {} {}",
        src.display(),
        dst.display()
    ));
    assert!(diff.status.success(), "{}{}", stdout(&diff), stderr(&diff));
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (a, b) = (src.join(&rel), dst.join(&rel));
        let (ma, mb) = (
            std::fs::symlink_metadata(&a).unwrap(),
            std::fs::symlink_metadata(&b).unwrap(),
        );
        let facts = |m: &std::fs::Metadata| {
            (
                m.mode(),
                m.uid(),
                m.gid(),
                if m.is_dir() { 0 } else { m.len() },
                m.mtime(),
                m.mtime_nsec(),
            )
        };
        assert_eq!(facts(&ma), facts(&mb), "{}", rel.display());
        if ma.is_dir() {
            for e in std::fs::read_dir(&a).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
}

#[test]
fn kill_9_in_a_many_file_copy_resumes_where_it_stopped() {
    let u = user("nnfdmt1");
    let mut agent = Agent::start(&[]);
    let src = agent.dir.path().join("src");
    many_files(&src, 20, 1000, &u);
    let out = agent.dir.path().join("out");
    user_dir(&out, &u);
    let dst = out.join("copy");
    let req = agent.request_as(
        &u,
        &format!(
            "name=many slots=1 source={} destination={}",
            src.display(),
            dst.display()
        ),
    );
    assert!(req.status.success(), "{}", stderr(&req));
    crash_mid_copy(&mut agent, "many", &dst, |a| {
        a.read("many/status")
            .ok()
            .and_then(|s| field(&s, "bytes"))
            .and_then(|b| b.parse::<u64>().ok())
            .is_some_and(|b| b > 0)
    });
    let status = agent.wait_completed("many", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    assert_eq!(number(&status, "restarts"), 1);
    let total = 20 * 1000 * 4096 + 2 * 13_000;
    let (bytes, resumed_bytes) = (number(&status, "bytes"), number(&status, "resumed_bytes"));
    let resumed_files = number(&status, "resumed_files");
    assert!(resumed_files > 0, "{status}");
    assert!(
        bytes < total,
        "the second run wrote less than everything: {status}"
    );
    assert_eq!(bytes + resumed_bytes, total, "{status}");
    // The status.json counters say the same.
    let json: serde_json::Value =
        serde_json::from_str(&agent.read("many/status.json").unwrap()).unwrap();
    assert_eq!(json["resumed_files"], resumed_files);
    assert_eq!(json["resumed_bytes"], resumed_bytes);
    assert_eq!(json["bytes"], bytes);
    assert_same_tree(&src, &dst);
    let (a, b) = (
        std::fs::metadata(dst.join("hard-a")).unwrap(),
        std::fs::metadata(dst.join("hard-b")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "the hard-link pair is one inode");
    assert_eq!(
        std::fs::read_link(dst.join("link")).unwrap(),
        Path::new("d000/f00000")
    );
    // The user waits on the finished operation like any other.
    let wait = sh_as(&u, &format!("cat {}", agent.path("many/wait").display()));
    assert!(wait.status.success(), "{}", stderr(&wait));
    assert!(
        !journal(&agent, "many").exists(),
        "the journal goes with the finished operation"
    );
}

#[test]
fn kill_9_in_a_large_file_copy_redoes_only_the_partial_file() {
    let u = user("nnfdmt2");
    let mut agent = Agent::start(&[]);
    let src = agent.dir.path().join("src");
    let (count, mib) = (5u64, 64u64);
    large_files(&src, count as usize, mib as usize, &u);
    let out = agent.dir.path().join("out");
    user_dir(&out, &u);
    let dst = out.join("copy");
    agent.request_as(
        &u,
        &format!(
            "name=large slots=1 source={} destination={}",
            src.display(),
            dst.display()
        ),
    );
    crash_mid_copy(&mut agent, "large", &dst, |_| true);
    let status = agent.wait_completed("large", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    assert_eq!(number(&status, "restarts"), 1);
    let total = (count * mib) << 20;
    let resumed_files = number(&status, "resumed_files");
    assert!((1..count).contains(&resumed_files), "{status}");
    assert_eq!(
        number(&status, "resumed_bytes"),
        resumed_files * (mib << 20)
    );
    assert_eq!(
        number(&status, "bytes"),
        total - resumed_files * (mib << 20),
        "{status}"
    );
    assert_same_tree(&src, &dst);
}

#[test]
fn files_the_operation_did_not_write_or_whose_source_changed_are_copied_again() {
    let u = user("nnfdmt3");
    let mut agent = Agent::start(&[]);
    let src = agent.dir.path().join("src");
    many_files(&src, 20, 1000, &u);
    let out = agent.dir.path().join("out");
    user_dir(&out, &u);
    // The copy lands in out/src (cp -r into an existing directory).
    let dst = out.join("src");
    // Before the operation, the destination holds every file with the
    // source's size and mtime but other content: only a copy that trusts
    // nothing it did not write itself ends identical.
    let fake = python(&format!(
        r#"
import os
src, dst = {src:?}, {dst:?}
for dirpath, dirs, files in os.walk(src):
    rel = os.path.relpath(dirpath, src)
    os.makedirs(os.path.join(dst, rel), exist_ok=True)
    for f in files:
        s = os.path.join(dirpath, f)
        if os.path.islink(s):
            continue
        st = os.stat(s)
        d = os.path.join(dst, rel, f)
        with open(d, 'wb') as fh:
            fh.write(b'x' * st.st_size)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
"#,
        src = src.to_str().unwrap(),
        dst = dst.to_str().unwrap()
    ));
    assert!(fake.status.success(), "{}", stderr(&fake));
    chown(&out, &u);
    agent.request_as(
        &u,
        &format!(
            "name=mixed slots=1 source={} destination={}",
            src.display(),
            out.display()
        ),
    );
    kill_mid_copy(&mut agent, "mixed", &dst, |_| true);
    // Between the runs, every other file the first run had completed gets
    // new content of the same size under its old mtime: only its change
    // time tells, and it must be copied again.
    let changed = python(&format!(
        r#"
import os
src, dst = {src:?}, {dst:?}
done = []
for dirpath, dirs, files in os.walk(src):
    for f in sorted(files):
        s = os.path.join(dirpath, f)
        d = os.path.join(dst, os.path.relpath(s, src))
        if os.path.islink(s) or not os.path.exists(d):
            continue
        with open(s, 'rb') as a, open(d, 'rb') as b:
            if a.read() == b.read():
                done.append(s)
for s in done[::2]:
    st = os.stat(s)
    with open(s, 'r+b') as fh:
        fh.write(b'changed!')
    os.utime(s, ns=(st.st_atime_ns, st.st_mtime_ns))
print(len(done))
"#,
        src = src.to_str().unwrap(),
        dst = dst.to_str().unwrap()
    ));
    assert!(changed.status.success(), "{}", stderr(&changed));
    let completed: u64 = stdout(&changed).trim().parse().unwrap();
    assert!(
        completed >= 2,
        "the first run completed files: {}",
        agent.log()
    );
    agent.restart();
    let status = agent.wait_completed("mixed", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    let resumed = number(&status, "resumed_files");
    assert!(resumed > 0, "{status}");
    assert!(
        resumed <= completed - completed / 2,
        "changed sources were not trusted ({completed} completed): {status}"
    );
    assert_same_tree(&src, &dst);
}

#[test]
fn a_dry_run_reports_no_resume_counters() {
    let agent = Agent::start(&[]);
    agent.request("name=plain source=/etc/hostname destination=/tmp/x dryrun=1");
    let status = agent.wait_completed("plain", LONG);
    assert_eq!(field(&status, "resumed_files").unwrap(), "");
    assert_eq!(field(&status, "resumed_bytes").unwrap(), "");
    let json: serde_json::Value =
        serde_json::from_str(&agent.read("plain/status.json").unwrap()).unwrap();
    assert!(json["resumed_files"].is_null(), "{json}");
}
