//! Shared helpers of the integration tests: the real binaries, real users,
//! real mounts, and cleanup that happens even when a test fails.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A workspace binary, built next to the test executables.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace)",
        path.display()
    );
    path
}

/// Fails the test, naming `tool` and the package that brings it, when the
/// tool is not on PATH: a missing tool is never a silent pass.
/// `nnf-dm` on its local backend in `dir` (mount point `dir/mnt`, made
/// here, state in `dir/state`), with no Kubernetes setting taken from this
/// environment.
pub fn nnf_dm_local(dir: &Path) -> Command {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).expect("mount point");
    let mut cmd = Command::new(bin("nnf-dm"));
    cmd.arg("--mountpoint")
        .arg(&mnt)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("KUBECONFIG");
    cmd
}

/// A count from the environment (benchmark sizes), else `default`.
pub fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", "command -v \"$1\" >/dev/null", "sh", tool])
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "{tool} is missing: install {package}");
}

/// Fails the test unless it runs as root (`why` says what needs it).
pub fn require_root(why: &str) {
    // SAFETY: geteuid has no preconditions and always succeeds.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test must run as root: {why}");
}

/// A scratch directory every test user can enter, removed on drop.
pub fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("nnf-dm-test-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    dir
}

/// A test user: created when missing, shared by all tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
}

static USERADD: Mutex<()> = Mutex::new(());

pub fn user(name: &'static str) -> User {
    let _guard = USERADD.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..50 {
        if let Some((uid, gid)) = lookup_user(name) {
            return User { name, uid, gid };
        }
        // Several test processes may race here: a locked passwd file or an
        // "already exists" both mean try the lookup again.
        let _ = Command::new("useradd")
            .args([
                "--no-create-home",
                "--user-group",
                "--shell",
                "/bin/bash",
                name,
            ])
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot create test user {name}");
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let out = Command::new("id").arg(name).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let uid = Command::new("id").args(["-u", name]).output().ok()?;
    let gid = Command::new("id").args(["-g", name]).output().ok()?;
    Some((
        String::from_utf8_lossy(&uid.stdout).trim().parse().ok()?,
        String::from_utf8_lossy(&gid.stdout).trim().parse().ok()?,
    ))
}

/// Runs `script` under bash as root.
pub fn sh(script: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run bash")
}

/// Runs `script` under bash as `user` (uid, gid and their groups).
pub fn sh_as(user: &User, script: &str) -> Output {
    as_user_cmd(user, "bash")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run bash as user")
}

/// A command that runs `program` as `user`.
pub fn as_user_cmd(user: &User, program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--init-groups")
        .arg("--")
        .arg(program);
    cmd
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes a `--profiles` file into `dir`; returns its path.
pub fn profiles_file(dir: &Path, json: &str) -> String {
    let path = dir.join("profiles.json");
    std::fs::write(&path, json).unwrap();
    path.display().to_string()
}

/// A command profile whose copy runs until [`Gate::open`]: the test decides
/// when it completes, so what it saw blocked was blocked, however loaded
/// the machine is.
pub struct Gate {
    pub name: String,
    release: PathBuf,
}

impl Gate {
    /// The profile `name`, its release file in `dir`.
    pub fn new(dir: &Path, name: &str) -> Gate {
        Gate {
            name: name.to_string(),
            release: dir.join(format!("{name}.release")),
        }
    }

    /// The profile, for a `--profiles` list.
    pub fn profile(&self) -> String {
        format!(
            r#"{{"name":"{}","command":"while [ ! -e {} ]; do sleep 0.05; done"}}"#,
            self.name,
            self.release.display()
        )
    }

    pub fn open(&self) {
        std::fs::write(&self.release, b"").unwrap();
    }
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Polls until `pid` sleeps in the kernel waiting for a FUSE answer (its
/// read or write has reached the server), for up to `timeout`.
pub fn blocked_in_fuse(pid: u32, timeout: Duration) -> bool {
    wait_until(timeout, || in_fuse(pid))
}

/// [`blocked_in_fuse`] in a `read(2)`, not in the `open(2)` before it.
pub fn blocked_reading(pid: u32, timeout: Duration) -> bool {
    wait_until(timeout, || {
        // `/proc/PID/syscall` starts with the number of the call it sleeps in.
        let in_read = std::fs::read_to_string(format!("/proc/{pid}/syscall"))
            .is_ok_and(|s| s.split(' ').next() == Some(&libc::SYS_read.to_string()));
        in_read && in_fuse(pid)
    })
}

fn in_fuse(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/wchan"))
        .is_ok_and(|w| w.contains("fuse") || w.contains("request_wait_answer"))
}

/// The value of `key` in a `key=value` text.
pub fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
        })
        .map(str::to_string)
}

/// A running `nnf-dm` agent on a private mount point and state directory.
/// Dropping it kills the agent and unmounts, whatever happened.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub state: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    /// `--mountpoint ''`: the gRPC socket is the only door.
    socket_only: bool,
}

impl Agent {
    pub fn start(args: &[&str]) -> Agent {
        Agent::start_as(args, false)
    }

    /// An agent with no control filesystem (`--mountpoint ''`), up once its
    /// socket answers.
    pub fn start_socket_only(args: &[&str]) -> Agent {
        Agent::start_as(args, true)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("nnf-dm.sock")
    }

    /// The gRPC socket once it accepts connections (the agent serves gRPC
    /// just after mounting, which is what [`Agent::start`] waits for).
    pub fn answering_socket(&self) -> PathBuf {
        let sock = self.socket();
        assert!(
            wait_until(Duration::from_secs(10), || {
                std::os::unix::net::UnixStream::connect(&sock).is_ok()
            }),
            "no gRPC socket; log:\n{}",
            self.log()
        );
        sock
    }

    fn start_as(args: &[&str], socket_only: bool) -> Agent {
        let dir = scratch();
        let mnt = dir.path().join("mnt");
        let state = dir.path().join("state");
        std::fs::create_dir(&mnt).unwrap();
        let mut agent = Agent {
            log: dir.path().join("agent.log"),
            dir,
            mnt,
            state,
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            socket_only,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mountpoint = if self.socket_only {
            PathBuf::new()
        } else {
            self.mnt.clone()
        };
        let child = Command::new(bin("nnf-dm"))
            .arg("--mountpoint")
            .arg(&mountpoint)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--socket")
            .arg(self.socket())
            .args(&self.args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("KUBECONFIG")
            // The gRPC door's debug lines say when a Status wait began.
            .env("NNF_DM_LOG", "info,nnf_dm::grpc=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nnf-dm");
        self.child = Some(child);
        let version = self.mnt.join("version");
        let socket = self.socket();
        if !wait_until(Duration::from_secs(10), || {
            if self.socket_only {
                std::os::unix::net::UnixStream::connect(&socket).is_ok()
            } else {
                std::fs::read(&version).is_ok_and(|v| !v.is_empty())
            }
        }) {
            panic!("nnf-dm did not come up; log:\n{}", self.log());
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `cat` of the control file `rel` in the background, once it sleeps in
    /// its `read(2)` (a blocking file such as `wait`); its output is piped.
    pub fn blocked_cat(&self, rel: &str) -> Child {
        let cat = Command::new("cat")
            .arg(self.path(rel))
            .stdout(Stdio::piped())
            .spawn()
            .expect("cat");
        assert!(
            blocked_reading(cat.id(), Duration::from_secs(30)),
            "cat {rel} never blocked in read(2)"
        );
        cat
    }

    /// How many gRPC `Status` calls have begun to wait for a completion
    /// (the agent's debug line, which the harness turns on).
    pub fn status_waits(&self) -> usize {
        self.log().matches("Status waits for completion").count()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().expect("wait for nnf-dm")
    }

    /// SIGKILL: leaves a stale mount behind, as a crash would.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("agent running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or crash the agent first");
        self.spawn();
    }

    /// Writes `request` through bash's `echo`, as a user would.
    pub fn request(&self, request: &str) -> Output {
        sh(&format!(
            "echo {} > {}",
            shell_quote(request),
            self.path("request").display()
        ))
    }

    pub fn request_as(&self, user: &User, request: &str) -> Output {
        sh_as(
            user,
            &format!(
                "echo {} > {}",
                shell_quote(request),
                self.path("request").display()
            ),
        )
    }

    pub fn read(&self, rel: &str) -> io::Result<String> {
        std::fs::read_to_string(self.path(rel))
    }

    /// Waits for the operation to complete (by polling `state`) and returns its status.
    pub fn wait_completed(&self, name: &str, timeout: Duration) -> String {
        let state = self.path(&format!("{name}/state"));
        if !wait_until(timeout, || {
            std::fs::read_to_string(&state).is_ok_and(|s| s == "completed\n")
        }) {
            panic!(
                "{name} did not complete in {timeout:?}; status:\n{}\nlog:\n{}",
                self.read(&format!("{name}/status")).unwrap_or_default(),
                self.log()
            );
        }
        self.read(&format!("{name}/status")).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

/// Quotes `s` for bash.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs a Python snippet (for exact errno checks and raw system calls).
pub fn python(script: &str) -> Output {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run python3")
}
pub mod clientmount;
pub mod kube;
pub mod python_grpc;

/// Creates an executable file through another process. Writing it from this
/// (multi-threaded) test process would let a child forked meanwhile by another
/// test inherit the write descriptor, and exec would then fail with ETXTBSY.
pub fn write_executable(path: &Path, content: &[u8]) {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, content).expect("write staging file");
    let status = Command::new("install")
        .arg("-m")
        .arg("0755")
        .arg(&staging)
        .arg(path)
        .status()
        .expect("run install");
    assert!(status.success(), "install {}", path.display());
    let _ = std::fs::remove_file(&staging);
}

/// Copies an executable through another process (see `write_executable`).
pub fn copy_executable(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(status.success(), "cp {} {}", from.display(), to.display());
}
