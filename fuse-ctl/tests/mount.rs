//! fuse-ctl on its own: a tiny tree per test, mounted for real in a temp dir
//! and exercised by real processes (`cat`, `bash`, python3 for exact errno,
//! offset and poll behaviour, `setpriv` for an unprivileged caller).
//!
//! Runs as root (FUSE mounts with mount(2)). Every mount is unmounted by the
//! fixture's drop, after the test's child processes were killed, so a failing
//! test leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use fuse_ctl::{
    clean_stale_mount, Caller, Content, ControlFs, Errno, FileKind, FileOps, Mounted, NodeId,
    Owner, WriteDone,
};

/// The system interpreter: a pyenv shim under /root is out of reach of the
/// unprivileged caller.
const PY: &str = "/usr/bin/python3";
/// The unprivileged caller.
const NOBODY: u32 = 65534;
/// The owner of the private directory.
const OWNER_UID: u32 = 4242;
/// How long a signal or a change may take to end a blocked read.
const PROMPT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// The tree and its handlers
// ---------------------------------------------------------------------------

/// What the handlers share with the test.
#[derive(Default)]
struct State {
    /// The snapshot file's value and generation.
    value: AtomicU64,
    /// How many snapshots the snapshot handler produced.
    snap_reads: AtomicU64,
    /// The blocking files have content.
    ready: AtomicBool,
    /// The blocking files' operation is gone: their reads fail with ENOENT.
    gone: AtomicBool,
    /// Set once the tree is built, cleared by the fixture's drop (it would
    /// otherwise keep the tree alive through its own handlers).
    fs: Mutex<Option<ControlFs>>,
    snap: OnceLock<NodeId>,
    block: OnceLock<NodeId>,
}

impl State {
    fn changed(&self, node: Option<&NodeId>) {
        let fs = self.fs.lock().unwrap().clone();
        if let (Some(fs), Some(node)) = (fs, node) {
            fs.changed(*node);
        }
    }

    fn bump(&self) -> u64 {
        let value = self.value.fetch_add(1, Ordering::SeqCst) + 1;
        self.changed(self.snap.get());
        value
    }

    fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
        self.changed(self.block.get());
    }
}

/// A counter-backed snapshot: every snapshot names the value and its own
/// sequence number, so a re-snapshot is always visible in the content.
struct Snap(Arc<State>);

impl FileOps for Snap {
    fn read(&self, _caller: &Caller) -> Result<Content, Errno> {
        let n = self.0.snap_reads.fetch_add(1, Ordering::SeqCst) + 1;
        let value = self.0.value.load(Ordering::SeqCst);
        Ok(Content::Ready(
            format!("value={value:04} read={n:04}\n").into_bytes(),
        ))
    }

    fn generation(&self) -> u64 {
        self.0.value.load(Ordering::SeqCst)
    }
}

/// Blocks until `ready`; fails with ENOENT once `gone`.
struct Block(Arc<State>);

impl FileOps for Block {
    fn read(&self, _caller: &Caller) -> Result<Content, Errno> {
        if self.0.gone.load(Ordering::SeqCst) {
            Err(Errno::ENOENT)
        } else if self.0.ready.load(Ordering::SeqCst) {
            Ok(Content::Ready(b"ready\n".to_vec()))
        } else {
            Ok(Content::NotReady)
        }
    }

    fn generation(&self) -> u64 {
        u64::from(self.0.ready.load(Ordering::SeqCst))
    }
}

/// Commands: `bump` (the snapshot's value), `ready` (the blocking files),
/// `slow` (answered later from another thread), `bad…` (EINVAL with a reply
/// text), anything else is echoed with the caller's uid.
struct Cmd(Arc<State>);

impl FileOps for Cmd {
    fn write(&self, caller: &Caller, data: &[u8], done: WriteDone) {
        let text = String::from_utf8_lossy(data).trim().to_string();
        match text.as_str() {
            "bump" => {
                let value = self.0.bump();
                done.finish(Ok(()), format!("value {value}\n").into_bytes());
            }
            "ready" => {
                self.0.set_ready();
                done.finish(Ok(()), b"ready\n".to_vec());
            }
            "slow" => {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    done.finish(Ok(()), b"slow done\n".to_vec());
                });
            }
            t if t.starts_with("bad") => {
                done.finish(Err(Errno::EINVAL), b"error: bad request\n".to_vec())
            }
            t => done.finish(Ok(()), format!("ok {t} uid={}\n", caller.uid).into_bytes()),
        }
    }
}

struct Ids {
    snap: NodeId,
    block: NodeId,
    cmd: NodeId,
    private: NodeId,
    gone: NodeId,
    gone_wait: NodeId,
}

/// A mounted tree:
///
/// ```text
/// /            root 0755
/// ├── snap     snapshot 0444
/// ├── block    blocking 0444
/// ├── cmd      command 0666
/// ├── private/ uid 4242, 0700, private
/// │   └── secret  snapshot 0444
/// ├── busy/    (the rmdir hook answers EBUSY)
/// └── gone/
///     └── wait    blocking 0444
/// ```
struct Fx {
    mounted: Option<Mounted>,
    fs: ControlFs,
    st: Arc<State>,
    ids: Ids,
    /// (caller uid, name) of every rmdir the hook saw.
    rmdirs: Arc<Mutex<Vec<(u32, String)>>>,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fx {
    fn new() -> Self {
        Self::build(true)
    }

    fn build(with_rmdir_hook: bool) -> Self {
        let dir = scratch();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let st = Arc::new(State::default());
        let fs = ControlFs::new(Owner::root(0o755));
        let file = |perm| Owner::root(perm);
        let root = NodeId::ROOT;
        let snap = fs
            .add_file(
                root,
                "snap",
                file(0o444),
                FileKind::Snapshot,
                Arc::new(Snap(st.clone())),
            )
            .unwrap();
        let block = fs
            .add_file(
                root,
                "block",
                file(0o444),
                FileKind::Blocking,
                Arc::new(Block(st.clone())),
            )
            .unwrap();
        let cmd = fs
            .add_file(
                root,
                "cmd",
                file(0o666),
                FileKind::Command,
                Arc::new(Cmd(st.clone())),
            )
            .unwrap();
        let owner = Owner {
            uid: OWNER_UID,
            gid: OWNER_UID,
            perm: 0o700,
            private: true,
        };
        let private = fs.add_dir(root, "private", owner).unwrap();
        fs.add_file(
            private,
            "secret",
            Owner {
                perm: 0o444,
                private: false,
                ..owner
            },
            FileKind::Snapshot,
            Arc::new(Snap(st.clone())),
        )
        .unwrap();
        fs.add_dir(root, "busy", Owner::root(0o755)).unwrap();
        let gone = fs.add_dir(root, "gone", Owner::root(0o755)).unwrap();
        let gone_wait = fs
            .add_file(
                gone,
                "wait",
                file(0o444),
                FileKind::Blocking,
                Arc::new(Block(st.clone())),
            )
            .unwrap();
        assert_eq!(
            fs.add_dir(root, "snap", Owner::root(0o755)),
            Err(Errno::EEXIST)
        );
        let rmdirs = Arc::new(Mutex::new(Vec::new()));
        if with_rmdir_hook {
            let seen = rmdirs.clone();
            fs.set_rmdir_hook(Box::new(move |caller, _node, name| {
                seen.lock().unwrap().push((caller.uid, name.to_string()));
                if name == "busy" {
                    Err(Errno::EBUSY)
                } else {
                    Ok(())
                }
            }));
        }
        st.snap.set(snap).unwrap();
        st.block.set(block).unwrap();
        *st.fs.lock().unwrap() = Some(fs.clone());
        let mounted = fs.mount(&mnt, "fuse-ctl-test").expect("mount");
        Fx {
            mounted: Some(mounted),
            fs,
            st,
            ids: Ids {
                snap,
                block,
                cmd,
                private,
                gone,
                gone_wait,
            },
            rmdirs,
            mnt,
            _dir: dir,
        }
    }

    fn path(&self, rel: &str) -> String {
        self.mnt.join(rel).to_str().unwrap().to_string()
    }

    /// Waits until `n` reads are held by the library.
    fn wait_blocked(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(2), || self.fs.blocked_reads() == n),
            "expected {n} blocked reads, have {}",
            self.fs.blocked_reads()
        );
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        self.st.fs.lock().unwrap().take();
        if let Some(mounted) = self.mounted.take() {
            if mounted.unmount().is_err() {
                // Something still holds the mount (a failed test's leftover):
                // never leave it attached.
                detach(&self.mnt);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A directory every test uid can enter, removed on drop.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("fuse-ctl-test-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// `program args` as root, or as `uid` (gid alike, no groups) via setpriv.
fn command(uid: Option<u32>, program: &str, args: &[&str]) -> Command {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args).current_dir("/").stdin(Stdio::null());
    cmd
}

const PRELUDE: &str = r#"
import errno, os, select, signal, sys, threading, time
def e(f, *a):
    try:
        r = f(*a)
        return 'ok' if r is None else r
    except OSError as x:
        return errno.errorcode[x.errno]
def cmd(text):
    fd = os.open(sys.argv[1] + '/cmd', os.O_WRONLY)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)
"#;

/// Runs a python snippet (after [`PRELUDE`]) with the mountpoint as argv[1]
/// and returns its stdout lines; fails the test if the snippet failed.
fn py(uid: Option<u32>, fx: &Fx, script: &str) -> Vec<String> {
    let out = py_command(uid, fx, script).output().unwrap();
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    lines(&out)
}

fn py_command(uid: Option<u32>, fx: &Fx, script: &str) -> Command {
    let script = format!("{PRELUDE}\n{script}");
    let mut c = command(uid, PY, &["-u", "-c", &script, fx.mnt.to_str().unwrap()]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn sh(uid: Option<u32>, script: &str) -> Output {
    command(uid, "bash", &["-c", script]).output().unwrap()
}

/// A child killed and reaped on drop, so a failing test never leaves a
/// process holding the mount.
struct Proc(Child);

impl Proc {
    fn spawn(mut cmd: Command) -> Self {
        Proc(cmd.spawn().unwrap())
    }

    fn cat(path: &str) -> Self {
        let mut c = command(None, "cat", &[path]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        Proc::spawn(c)
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) of our own, not yet reaped, child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// The exit status if it ends within `timeout`.
    fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends within `timeout` and returns (status, stdout, stderr).
    fn finish(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let started = Instant::now();
        let status = self
            .wait_for(timeout)
            .unwrap_or_else(|| panic!("pid {} still running after {timeout:?}", self.pid()));
        assert!(started.elapsed() <= timeout);
        let mut out = String::new();
        let mut err = String::new();
        use std::io::Read;
        if let Some(mut s) = self.0.stdout.take() {
            s.read_to_string(&mut out).unwrap();
        }
        if let Some(mut s) = self.0.stderr.take() {
            s.read_to_string(&mut err).unwrap();
        }
        (status, out, err)
    }

    /// The scheduler state (`/proc/<pid>/stat` field 3).
    fn state(&self) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // The command name may hold spaces and parentheses: the state
        // follows the last ')'.
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        rest.trim_start().chars().next().unwrap()
    }

    /// Asserts the process sleeps interruptibly (state S), not in D.
    fn assert_sleeps_interruptibly(&self) {
        let mut last = '?';
        let ok = wait_until(PROMPT, || {
            last = self.state();
            last == 'S'
        });
        assert!(ok, "pid {} is in state {last}, not S", self.pid());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn detach(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is NUL-terminated; errors (not mounted) are irrelevant here.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Snapshot files
// ---------------------------------------------------------------------------

#[test]
fn snapshot_is_taken_at_offset_zero_and_continued_after() {
    let fx = Fx::new();
    let out = py(
        None,
        &fx,
        r#"
fd = os.open(sys.argv[1] + '/snap', os.O_RDONLY)
print(os.read(fd, 6))
cmd(b'bump')                # the content changes mid-read
print(os.read(fd, 100))     # the rest of the first snapshot
print(os.read(fd, 100))     # its end
print(os.pread(fd, 100, 11))  # any offset > 0 still continues it
os.lseek(fd, 0, os.SEEK_SET)
print(os.read(fd, 100))     # offset 0 again: a fresh snapshot
cmd(b'bump')
print(os.pread(fd, 100, 0)) # pread at 0 refreshes too
"#,
    );
    assert_eq!(
        out,
        [
            "b'value='",
            "b'0000 read=0001\\n'",
            "b''",
            "b'read=0001\\n'",
            "b'value=0001 read=0002\\n'",
            "b'value=0002 read=0003\\n'",
        ]
    );
    assert_eq!(fx.st.snap_reads.load(Ordering::SeqCst), 3);
}

#[test]
fn snapshot_is_served_by_direct_io_despite_zero_size() {
    let fx = Fx::new();
    let meta = std::fs::metadata(fx.path("snap")).unwrap();
    assert_eq!(meta.len(), 0, "control files report size 0");
    // Each `cat` opens anew and reads at 0: a fresh snapshot, never a page
    // cache copy of the previous one.
    for (i, value) in [(1, 0), (2, 1)] {
        let (status, out, err) = Proc::cat(&fx.path("snap")).finish(PROMPT);
        assert!(status.success(), "{err}");
        assert_eq!(out, format!("value={value:04} read={i:04}\n"));
        fx.st.bump();
    }
    // A read larger than the content, from a fresh descriptor at offset > 0.
    let out = py(
        None,
        &fx,
        "fd = os.open(sys.argv[1] + '/snap', os.O_RDONLY)\nprint(os.pread(fd, 4096, 6))",
    );
    assert_eq!(out, ["b'0002 read=0003\\n'"]);
}

#[test]
fn writes_to_snapshot_and_blocking_files_fail_with_eacces() {
    let fx = Fx::new();
    // Root passes the mode check, so the library's answer is what shows.
    let out = py(
        None,
        &fx,
        r#"
for name in ('snap', 'block'):
    fd = os.open(sys.argv[1] + '/' + name, os.O_WRONLY)
    print(name, e(os.write, fd, b'x\n'))
"#,
    );
    assert_eq!(out, ["snap EACCES", "block EACCES"]);
    // An unprivileged caller is stopped by the mode already.
    let out = py(
        Some(NOBODY),
        &fx,
        "print(e(os.open, sys.argv[1] + '/snap', os.O_WRONLY))",
    );
    assert_eq!(out, ["EACCES"]);
}

// ---------------------------------------------------------------------------
// Command files
// ---------------------------------------------------------------------------

#[test]
fn command_file_works_from_the_shell() {
    let fx = Fx::new();
    let cmd = fx.path("cmd");
    // `>` truncates (SETATTR size=0) before it writes: accepted.
    let out = sh(None, &format!("echo hello > {cmd}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The handler's errno is write(2)'s.
    let out = sh(None, &format!("echo bad > {cmd}"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Invalid argument"), "{err}");
    // Write and read back the reply on one descriptor, as root and as an
    // unprivileged caller (the handler sees who called).
    let script = format!("exec 3<>{cmd}; echo hi >&3; cat <&3");
    for (uid, expect) in [(None, "ok hi uid=0\n"), (Some(NOBODY), "ok hi uid=65534\n")] {
        let out = sh(uid, &script);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), expect);
    }
    // A fresh descriptor has no reply: EOF before any write.
    let (status, out, _) = Proc::cat(&cmd).finish(PROMPT);
    assert!(status.success());
    assert_eq!(out, "");
}

#[test]
fn command_reply_offsets_and_errno() {
    let fx = Fx::new();
    let out = py(
        None,
        &fx,
        r#"
fd = os.open(sys.argv[1] + '/cmd', os.O_RDWR)
print(os.read(fd, 100))                 # nothing written yet: EOF
print(os.write(fd, b'hello\n'))
print(os.lseek(fd, 0, os.SEEK_CUR))
print(os.read(fd, 100))                 # the reply, after the written bytes
print(os.read(fd, 100))                 # then EOF
print(os.pread(fd, 100, 0))             # before the reply's offset: nothing
print(os.pread(fd, 100, 6 + 3))         # inside the reply
pos = os.lseek(fd, 0, os.SEEK_CUR)
print(e(os.write, fd, b'bad input\n'))  # the handler's errno
print(os.lseek(fd, 0, os.SEEK_CUR) == pos)
print(os.read(fd, 100))                 # its reply, at the write's start
print(os.pread(fd, 100, 6))             # the old reply is replaced
print(os.write(fd, b'slow\n'))          # answered later, from another thread
print(os.read(fd, 100))
"#,
    );
    assert_eq!(
        out,
        [
            "b''",
            "6",
            "6",
            "b'ok hello uid=0\\n'",
            "b''",
            "b''",
            "b'hello uid=0\\n'",
            "EINVAL",
            "True",
            "b'error: bad request\\n'",
            "b''",
            "5",
            "b'slow done\\n'",
        ]
    );
}

#[test]
fn setattr_other_than_truncate_is_eperm() {
    let fx = Fx::new();
    let out = py(
        None,
        &fx,
        r#"
m = sys.argv[1]
print(e(os.truncate, m + '/cmd', 0))
print(e(os.truncate, m + '/cmd', 5))
print(e(os.chmod, m + '/cmd', 0o600))
print(e(os.chown, m + '/cmd', 1, 1))
print(e(os.utime, m + '/cmd', (1, 1)))
print(e(os.truncate, m + '/snap', 0))
print(e(os.chmod, m + '/busy', 0o700))
"#,
    );
    assert_eq!(
        out,
        ["ok", "EPERM", "EPERM", "EPERM", "EPERM", "EPERM", "EPERM"]
    );
}

// ---------------------------------------------------------------------------
// Blocking files
// ---------------------------------------------------------------------------

#[test]
fn blocking_read_waits_until_ready_and_all_readers_complete() {
    let fx = Fx::new();
    let mut readers: Vec<Proc> = (0..3).map(|_| Proc::cat(&fx.path("block"))).collect();
    fx.wait_blocked(3);
    std::thread::sleep(Duration::from_millis(100));
    for r in &mut readers {
        assert!(r.wait_for(Duration::ZERO).is_none(), "a reader ended early");
    }
    // Ready without `changed()` wakes nobody...
    fx.st.ready.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fx.fs.blocked_reads(), 3);
    // ...one `changed()` completes them all.
    fx.fs.changed(fx.ids.block);
    for r in readers {
        let (status, out, err) = r.finish(PROMPT);
        assert!(status.success(), "{err}");
        assert_eq!(out, "ready\n");
    }
    assert_eq!(fx.fs.blocked_reads(), 0);
}

#[test]
fn blocking_read_with_o_nonblock_is_eagain() {
    let fx = Fx::new();
    let out = py(
        None,
        &fx,
        r#"
import fcntl
p = sys.argv[1] + '/block'
fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
print(e(os.read, fd, 100))
fd2 = os.open(p, os.O_RDONLY)           # O_NONBLOCK set after open counts too
fcntl.fcntl(fd2, fcntl.F_SETFL, os.O_NONBLOCK)
print(e(os.read, fd2, 100))
cmd(b'ready')
print(e(os.read, fd, 100))
"#,
    );
    assert_eq!(out, ["EAGAIN", "EAGAIN", "b'ready\\n'"]);
    assert_eq!(fx.fs.blocked_reads(), 0);
}

/// Proves the vendored fuser's FUSE_INTERRUPT patch: the reader sleeps in S
/// and a signal ends its read at once.
#[test]
fn signals_end_a_blocked_read_promptly() {
    let fx = Fx::new();
    for sig in [libc::SIGINT, libc::SIGKILL] {
        let mut reader = Proc::cat(&fx.path("block"));
        fx.wait_blocked(1);
        reader.assert_sleeps_interruptibly();
        reader.signal(sig);
        let status = reader
            .wait_for(PROMPT)
            .expect("signal did not end the read");
        assert_eq!(status.signal(), Some(sig));
        fx.wait_blocked(0);
    }
    // A handled signal: read(2) itself returns EINTR (ctypes, so that
    // Python does not retry it) and the handler runs.
    let mut c = py_command(
        None,
        &fx,
        r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
fd = os.open(sys.argv[1] + '/block', os.O_RDONLY)
buf = ctypes.create_string_buffer(100)
n = libc.read(fd, buf, 100)
err = ctypes.get_errno()
time.sleep(0.01)
print(n, errno.errorcode.get(err, err), got == [signal.SIGUSR1])
"#,
    );
    c.stdin(Stdio::null());
    let reader = Proc::spawn(c);
    fx.wait_blocked(1);
    reader.assert_sleeps_interruptibly();
    reader.signal(libc::SIGUSR1);
    let (status, out, err) = reader.finish(PROMPT);
    assert!(status.success(), "{err}");
    assert_eq!(out.trim(), "-1 EINTR True");
    assert_eq!(fx.fs.blocked_reads(), 0);
    // The interrupted reads left nothing behind: the next one completes.
    let reader = Proc::cat(&fx.path("block"));
    fx.wait_blocked(1);
    fx.st.set_ready();
    let (status, out, _) = reader.finish(PROMPT);
    assert!(status.success());
    assert_eq!(out, "ready\n");
}

// ---------------------------------------------------------------------------
// poll
// ---------------------------------------------------------------------------

#[test]
fn snapshot_polls_ready_when_generation_changes_after_last_read_at_zero() {
    let fx = Fx::new();
    let out = py(
        None,
        &fx,
        r#"
fd = os.open(sys.argv[1] + '/snap', os.O_RDONLY)
p = select.poll()
p.register(fd, select.POLLIN | select.POLLPRI)
def ev(ms):
    return sum(e for _, e in p.poll(ms))
print(ev(0))                  # nothing changed since open
os.read(fd, 100)
print(ev(0))
cmd(b'bump')
print(ev(0))                  # POLLIN | POLLPRI
os.pread(fd, 100, 3)          # a read past 0 does not consume the change
print(ev(0))
os.pread(fd, 100, 0)          # a read at 0 does
print(ev(0))
# A poller that sleeps is woken by the change.
threading.Timer(0.2, cmd, [b'bump']).start()
t = time.monotonic()
r = ev(3000)
print(r, 0.1 < time.monotonic() - t < 1.5)
"#,
    );
    assert_eq!(out, ["0", "0", "3", "3", "0", "3 True"]);
}

#[test]
fn blocking_file_polls_readable_once_ready() {
    let fx = Fx::new();
    let out = py(
        None,
        &fx,
        r#"
fd = os.open(sys.argv[1] + '/block', os.O_RDONLY)
p = select.poll()
p.register(fd, select.POLLIN)
print(p.poll(0))
print(select.select([fd], [], [], 0)[0])
threading.Timer(0.2, cmd, [b'ready']).start()
t = time.monotonic()
r = p.poll(3000)
print(r == [(fd, select.POLLIN)], 0.1 < time.monotonic() - t < 1.5)
print(select.select([fd], [], [], 0)[0] == [fd])
print(os.read(fd, 100))
"#,
    );
    assert_eq!(out, ["[]", "[]", "True True", "True", "b'ready\\n'"]);
}

// ---------------------------------------------------------------------------
// Visibility
// ---------------------------------------------------------------------------

#[test]
fn private_node_is_visible_only_to_its_owner_and_root() {
    let fx = Fx::new();
    let all = ["block", "busy", "cmd", "gone", "private", "snap"];
    let listing = |names: &[&str]| {
        let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
        format!("[{}]", quoted.join(", "))
    };
    let public: Vec<&str> = all.into_iter().filter(|n| *n != "private").collect();
    let script = r#"
m = sys.argv[1]
print(sorted(os.listdir(m)))
print(e(lambda: os.stat(m + '/private').st_uid))
print(e(lambda: open(m + '/private/secret', 'rb').read()[:6]))
print(e(os.listdir, m + '/private'))
"#;
    // Never listed to others. Looked up by another caller, the node is not
    // found; once the owner or root has cached its entry, another caller may
    // find the entry but is refused by its mode (EACCES): both are "not yours".
    let check = |uid: Option<u32>, visible: bool| {
        let out = py(uid, &fx, script);
        if visible {
            assert_eq!(
                out,
                [
                    listing(&all),
                    format!("{OWNER_UID}"),
                    "b'value='".into(),
                    "['secret']".into()
                ],
                "uid {uid:?}"
            );
        } else {
            assert_eq!(out[0], listing(&public), "uid {uid:?}");
            assert!(
                out[1] == "ENOENT" || out[1] == format!("{OWNER_UID}"),
                "uid {uid:?}: {out:?}"
            );
            for refused in &out[2..] {
                assert!(
                    refused == "ENOENT" || refused == "EACCES",
                    "uid {uid:?}: {out:?}"
                );
            }
        }
    };
    // Before anyone allowed looked: not found at all.
    let out = py(Some(NOBODY), &fx, script);
    assert_eq!(
        out,
        [
            listing(&public),
            "ENOENT".into(),
            "ENOENT".into(),
            "ENOENT".into()
        ]
    );
    check(None, true);
    check(Some(NOBODY), false);
    check(Some(OWNER_UID), true);
    check(Some(NOBODY), false);
    check(None, true);
    // The test process (root) sees it through std too.
    assert_eq!(names(&fx.mnt), all);
}

// ---------------------------------------------------------------------------
// rmdir and the other namespace operations
// ---------------------------------------------------------------------------

#[test]
fn rmdir_goes_through_the_hook() {
    let fx = Fx::new();
    std::fs::metadata(fx.path("gone")).unwrap();
    std::fs::remove_dir(fx.path("gone")).unwrap();
    assert_eq!(
        errno_of(std::fs::metadata(fx.path("gone"))),
        Some(libc::ENOENT)
    );
    assert!(!names(&fx.mnt).contains(&"gone".to_string()));
    assert!(fx.fs.child(NodeId::ROOT, "gone").is_none());
    // The hook's errno is rmdir's; the node stays.
    assert_eq!(
        errno_of(std::fs::remove_dir(fx.path("busy"))),
        Some(libc::EBUSY)
    );
    assert!(std::fs::metadata(fx.path("busy")).unwrap().is_dir());
    // Not a directory, or not visible: the hook is not asked.
    assert_eq!(
        errno_of(std::fs::remove_dir(fx.path("snap"))),
        Some(libc::ENOTDIR)
    );
    let out = py(
        Some(NOBODY),
        &fx,
        "print(e(os.rmdir, sys.argv[1] + '/private'))",
    );
    assert_eq!(out, ["ENOENT"]);
    assert_eq!(
        *fx.rmdirs.lock().unwrap(),
        [(0, "gone".to_string()), (0, "busy".to_string())]
    );
}

#[test]
fn rmdir_without_hook_and_namespace_changes_are_eperm() {
    let fx = Fx::build(false);
    let out = py(
        None,
        &fx,
        r#"
m = sys.argv[1]
print(e(os.rmdir, m + '/busy'))
print(e(os.mkdir, m + '/new'))
print(e(os.open, m + '/new', os.O_CREAT | os.O_WRONLY, 0o644))
print(e(os.mknod, m + '/fifo', 0o644 | 0o010000))
print(e(os.unlink, m + '/snap'))
print(e(os.rename, m + '/snap', m + '/snap2'))
print(e(os.rename, m + '/busy', m + '/gone/busy'))
print(sorted(os.listdir(m)))
"#,
    );
    assert_eq!(
        out,
        [
            "EPERM",
            "EPERM",
            "EPERM",
            "EPERM",
            "EPERM",
            "EPERM",
            "EPERM",
            "['block', 'busy', 'cmd', 'gone', 'private', 'snap']",
        ]
    );
}

// ---------------------------------------------------------------------------
// Removal from the application side
// ---------------------------------------------------------------------------

#[test]
fn remove_now_is_gone_on_return_despite_the_entry_cache() {
    let fx = Fx::new();
    // Cache the entries (60 s TTL).
    for p in ["gone", "gone/wait", "snap"] {
        std::fs::metadata(fx.path(p)).unwrap();
    }
    fx.fs.remove_now(fx.ids.gone);
    assert_eq!(
        errno_of(std::fs::metadata(fx.path("gone"))),
        Some(libc::ENOENT)
    );
    assert_eq!(
        errno_of(std::fs::metadata(fx.path("gone/wait"))),
        Some(libc::ENOENT)
    );
    fx.fs.remove_now(fx.ids.snap);
    assert_eq!(
        errno_of(std::fs::metadata(fx.path("snap"))),
        Some(libc::ENOENT)
    );
    assert_eq!(names(&fx.mnt), ["block", "busy", "cmd", "private"]);
    // Removing again (or a node of a removed subtree) is a no-op.
    fx.fs.remove_now(fx.ids.gone);
    fx.fs.remove_now(fx.ids.gone_wait);
    fx.fs.remove(fx.ids.snap);
}

#[test]
fn remove_is_gone_shortly_after() {
    let fx = Fx::new();
    for p in ["private", "cmd"] {
        std::fs::metadata(fx.path(p)).unwrap();
    }
    fx.fs.remove(fx.ids.private);
    fx.fs.remove(fx.ids.cmd);
    for p in ["private", "private/secret", "cmd"] {
        assert!(
            wait_until(PROMPT, || errno_of(std::fs::metadata(fx.path(p)))
                == Some(libc::ENOENT)),
            "{p} still visible"
        );
    }
    assert_eq!(names(&fx.mnt), ["block", "busy", "gone", "snap"]);
}

#[test]
fn removal_releases_blocked_readers() {
    let fx = Fx::new();
    let script = "print(e(lambda: open(sys.argv[1] + '/' + sys.argv[2], 'rb').read()))";
    let spawn = |rel: &str| {
        let mut c = py_command(None, &fx, script);
        c.arg(rel);
        Proc::spawn(c)
    };
    let direct = spawn("block");
    let nested = spawn("gone/wait");
    fx.wait_blocked(2);
    // The handlers decide: their operation is gone.
    fx.st.gone.store(true, Ordering::SeqCst);
    fx.fs.remove_now(fx.ids.block);
    fx.fs.remove(fx.ids.gone);
    for reader in [direct, nested] {
        let (status, out, err) = reader.finish(PROMPT);
        assert!(status.success(), "{err}");
        assert_eq!(out.trim(), "ENOENT");
    }
    assert_eq!(fx.fs.blocked_reads(), 0);
}

// ---------------------------------------------------------------------------
// Stale mounts
// ---------------------------------------------------------------------------

/// What tests/helpers/mount_and_sleep.rs prints once it has mounted.
const HELPER_READY: &str = "FUSE-CTL-HELPER-MOUNTED";

/// The helper child; killed, reaped and its mount detached on drop.
struct Helper {
    proc: Proc,
    mnt: PathBuf,
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Already reaped when the test got that far: kill is then a no-op.
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
        detach(&self.mnt);
    }
}

fn statfs_errno(path: &Path) -> Option<i32> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is NUL-terminated and `buf` a writable statfs.
    let rc = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut buf)
    };
    (rc != 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap())
}

fn is_fuse(path: &Path) -> bool {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: as above.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut buf) == 0 && buf.f_type == 0x6573_5546
    }
}

#[test]
fn clean_stale_mount_detaches_a_dead_mount() {
    let dir = scratch();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // A plain directory is no stale mount.
    assert!(!clean_stale_mount(&mnt).unwrap());
    assert!(!clean_stale_mount(&dir.path().join("missing")).unwrap());

    let mut c = Command::new(env!("CARGO_BIN_EXE_fuse-ctl-test-mount"));
    c.arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut helper = Helper {
        proc: Proc::spawn(c),
        mnt: mnt.clone(),
    };
    let stdout = helper.proc.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(HELPER_READY) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the helper did not mount");
    assert!(is_fuse(&mnt));
    assert_eq!(
        std::fs::read_to_string(mnt.join("snap")).unwrap(),
        "value=0000 read=0001\n"
    );
    // A healthy mount is left alone.
    assert!(!clean_stale_mount(&mnt).unwrap());
    assert!(is_fuse(&mnt));

    helper.proc.signal(libc::SIGKILL);
    assert!(helper.proc.wait_for(PROMPT).is_some());
    assert_eq!(statfs_errno(&mnt), Some(libc::ENOTCONN));
    assert!(clean_stale_mount(&mnt).unwrap());
    assert_eq!(statfs_errno(&mnt), None);
    assert!(!is_fuse(&mnt));
    assert!(std::fs::read_dir(&mnt).unwrap().next().is_none());
    // Once clean it is a plain directory again.
    assert!(!clean_stale_mount(&mnt).unwrap());
}

#[test]
fn unmount_explicitly_and_on_drop() {
    let mut fx = Fx::new();
    assert!(is_fuse(&fx.mnt));
    fx.mounted.take().unwrap().unmount().unwrap();
    assert!(!is_fuse(&fx.mnt));
    // A blocked reader gets EINTR, not EIO, when the filesystem goes away,
    // and the mount is gone when the drop returns even though the reader
    // may still hold its descriptor.
    let mut fx = Fx::new();
    let reader = Proc::cat(&fx.path("block"));
    fx.wait_blocked(1);
    let started = Instant::now();
    drop(fx.mounted.take());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!is_fuse(&fx.mnt), "still mounted after Mounted was dropped");
    // cat retries an EINTR read; the retry fails on the aborted connection
    // (ECONNABORTED if it was in flight, ENOTCONN if it came after).
    let (status, _, err) = reader.finish(PROMPT);
    assert!(!status.success());
    assert!(
        err.contains("Transport endpoint is not connected")
            || err.contains("Software caused connection abort"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// Writes answered later
// ---------------------------------------------------------------------------

/// One write the handler handed to the test thread, unanswered.
struct HeldWrite {
    caller: Caller,
    data: Vec<u8>,
    done: WriteDone,
}

/// A command file whose handler answers nothing itself: it hands every
/// write's `done` to the test, which answers (or not) from its own thread.
struct Held(Mutex<mpsc::Sender<HeldWrite>>);

impl FileOps for Held {
    fn write(&self, caller: &Caller, data: &[u8], done: WriteDone) {
        let held = HeldWrite {
            caller: *caller,
            data: data.to_vec(),
            done,
        };
        // The test is gone: dropping `done` answers EIO.
        let _ = self.0.lock().unwrap().send(held);
    }
}

/// A mounted tree with one such file, `/held` (0666).
struct HeldFx {
    mounted: Option<Mounted>,
    fs: ControlFs,
    writes: mpsc::Receiver<HeldWrite>,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl HeldFx {
    fn new() -> Self {
        let dir = scratch();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let (tx, writes) = mpsc::channel();
        let fs = ControlFs::new(Owner::root(0o755));
        fs.add_file(
            NodeId::ROOT,
            "held",
            Owner::root(0o666),
            FileKind::Command,
            Arc::new(Held(Mutex::new(tx))),
        )
        .unwrap();
        let mounted = fs.mount(&mnt, "fuse-ctl-test").expect("mount");
        HeldFx {
            mounted: Some(mounted),
            fs,
            writes,
            mnt,
            _dir: dir,
        }
    }

    fn held(&self) -> String {
        self.mnt.join("held").to_str().unwrap().to_string()
    }

    /// The next write the handler got.
    fn next_write(&self) -> HeldWrite {
        self.writes
            .recv_timeout(Duration::from_secs(10))
            .expect("the handler got no write")
    }

    /// Waits until the kernel has sent `n` interrupts in all.
    fn wait_interrupts(&self, n: u64) {
        assert!(
            wait_until(Duration::from_secs(5), || self.fs.interrupts() >= n),
            "expected {n} interrupts, have {}",
            self.fs.interrupts()
        );
    }
}

impl Drop for HeldFx {
    fn drop(&mut self) {
        if let Some(mounted) = self.mounted.take() {
            if mounted.unmount().is_err() {
                detach(&self.mnt);
            }
        }
    }
}

/// `bash -c script` with its output captured.
fn bash(script: &str) -> Proc {
    let mut c = command(None, "bash", &["-c", script]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    Proc::spawn(c)
}

impl Proc {
    /// Asserts the process sleeps interruptibly and stays so for a while:
    /// never in D, which no signal ends.
    fn assert_never_uninterruptible(&self) {
        self.assert_sleeps_interruptibly();
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            let state = self.state();
            assert_ne!(state, 'D', "pid {} sleeps uninterruptibly", self.pid());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn signals_end_a_held_write_promptly() {
    let fx = HeldFx::new();
    for sig in [libc::SIGKILL, libc::SIGINT] {
        let mut writer = bash(&format!("echo x > {}", fx.held()));
        let held = fx.next_write();
        assert_eq!(held.data, b"x\n");
        assert_eq!(fx.fs.pending_writes(), 1);
        writer.assert_never_uninterruptible();
        writer.signal(sig);
        let status = writer
            .wait_for(PROMPT)
            .expect("the signal did not end the write");
        assert_eq!(status.signal(), Some(sig), "{status}");
        // The writer got EINTR: the holder learns it and must not commit.
        assert!(held.done.is_interrupted());
        assert!(!held.done.claim());
        assert_eq!(fx.fs.pending_writes(), 0);
        // Finishing now records and answers nothing (and does not panic).
        held.done.finish(Ok(()), b"too late\n".to_vec());
    }
    // A handled signal: write(2) itself fails with EINTR, then the trap runs.
    let writer = bash(&format!(
        "trap 'echo trapped' USR1; echo x > {}; echo rc=$?",
        fx.held()
    ));
    let held = fx.next_write();
    writer.assert_never_uninterruptible();
    writer.signal(libc::SIGUSR1);
    let (status, out, err) = writer.finish(PROMPT);
    assert!(status.success(), "{err}");
    assert!(err.contains("Interrupted system call"), "{err}");
    assert_eq!(out, "trapped\nrc=1\n");
    assert!(!held.done.claim());
    assert!(held.done.is_interrupted());
    drop(held);
    assert_eq!(fx.fs.pending_writes(), 0);
}

#[test]
fn held_write_answered_later_succeeds_or_fails_with_its_errno() {
    let fx = HeldFx::new();
    let writer = bash(&format!("echo hello > {}", fx.held()));
    let held = fx.next_write();
    // The writer's identity, on the callback and on `done` alike.
    assert_eq!(held.caller.uid, 0);
    assert_eq!(held.caller.pid, writer.pid() as u32);
    assert_eq!(held.done.caller(), held.caller);
    assert!(held.done.claim());
    assert!(held.done.claim(), "claiming twice is still a claim");
    assert!(!held.done.is_interrupted());
    std::thread::sleep(Duration::from_millis(100));
    held.done.finish(Ok(()), b"done\n".to_vec());
    let (status, _, err) = writer.finish(PROMPT);
    assert!(status.success(), "{err}");
    // Without a claim: `finish` claims itself.
    let writer = bash(&format!("echo hello > {}", fx.held()));
    let held = fx.next_write();
    held.done.finish(Err(Errno::EBUSY), Vec::new());
    let (status, _, err) = writer.finish(PROMPT);
    assert!(!status.success());
    assert!(err.contains("Device or resource busy"), "{err}");
    assert_eq!(fx.fs.pending_writes(), 0);
}

#[test]
fn claimed_write_gets_finish_result_despite_an_interrupt() {
    let fx = HeldFx::new();
    let interrupts = fx.fs.interrupts();
    // write(2) through ctypes, so that Python does not retry it on EINTR.
    let script = r#"
import ctypes, errno, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
fd = os.open(sys.argv[1], os.O_WRONLY)
n = libc.write(fd, b'go\n', 3)
err = ctypes.get_errno() if n < 0 else 0
print(n, errno.errorcode.get(err, err), got == [signal.SIGUSR1])
"#;
    let mut c = command(None, PY, &["-u", "-c", script, &fx.held()]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut writer = Proc::spawn(c);
    let held = fx.next_write();
    assert!(held.done.claim());
    writer.signal(libc::SIGUSR1);
    fx.wait_interrupts(interrupts + 1);
    // Claimed: the interrupt did not answer the write.
    assert!(writer.wait_for(Duration::from_millis(200)).is_none());
    assert!(!held.done.is_interrupted());
    assert_eq!(fx.fs.pending_writes(), 1);
    held.done.finish(Err(Errno::EBUSY), Vec::new());
    let (status, out, err) = writer.finish(PROMPT);
    assert!(status.success(), "{err}");
    assert_eq!(out.trim(), "-1 EBUSY True");
    // And a claimed write that succeeds reports its length.
    let script = script.replace("got == [signal.SIGUSR1]", "got");
    let mut c = command(None, PY, &["-u", "-c", &script, &fx.held()]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let writer = Proc::spawn(c);
    let held = fx.next_write();
    assert!(held.done.claim());
    writer.signal(libc::SIGUSR1);
    fx.wait_interrupts(interrupts + 2);
    held.done.finish(Ok(()), Vec::new());
    let (status, out, err) = writer.finish(PROMPT);
    assert!(status.success(), "{err}");
    assert_eq!(out.trim(), "3 0 [10]");
}
