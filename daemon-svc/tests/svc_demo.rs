//! The service subcommands driven through `examples/svc-demo.rs`, which wires
//! `daemon_svc` the way the daemons do: real clap parsing, real exit codes,
//! real files (under `--root`), and a recording fake `systemctl` on PATH.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `cargo test` builds the examples next to `deps/`, where this test runs.
fn demo() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    let demo = target.join("examples").join("svc-demo");
    assert!(demo.exists(), "{} not built", demo.display());
    demo
}

fn run(args: &[&str]) -> Output {
    Command::new(demo()).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unit(root: &Path) -> PathBuf {
    root.join("etc/systemd/system/nnf-dm.service")
}

/// The packaged unit with only its ExecStart= line replaced.
fn expected_unit(exec_start: &str) -> Vec<String> {
    daemon_svc::NNF_DM_UNIT
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                exec_start.to_string()
            } else {
                l.to_string()
            }
        })
        .collect()
}

/// Line-by-line comparison so a failure names the first differing line.
fn assert_unit(root: &Path, exec_start: &str) {
    let got = fs::read_to_string(unit(root)).unwrap();
    let got: Vec<&str> = got.lines().collect();
    let want = expected_unit(exec_start);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "unit line {}", i + 1);
    }
    assert_eq!(got.len(), want.len(), "unit line count");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn install_root_writes_packaged_unit_with_flags() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let out = run(&[
        "install",
        "--root",
        r,
        "--node-name=n1",
        "--kubernetes-qps",
        "20",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Install Near-Node Flash (NNF) Data Movement Service: OK"),
        "{}",
        text(&out.stdout)
    );
    let exec = format!(
        "ExecStart={} --node-name=n1 --kubernetes-qps 20",
        demo().display()
    );
    assert_unit(root.path(), &exec);
    let mode = fs::metadata(unit(root.path()))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o022, 0, "unit must not be group/world writable");
}

#[test]
fn install_twice_is_refused_and_leaves_the_unit() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    assert!(run(&["install", "--root", r, "--node-name=n1"])
        .status
        .success());
    let before = fs::read(unit(root.path())).unwrap();
    let out = run(&["install", "--root", r, "--node-name=n2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Service has already been installed"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(fs::read(unit(root.path())).unwrap(), before);
}

#[test]
fn root_before_after_and_with_equals() {
    let exec = format!("ExecStart={} --node-name=n1 --x", demo().display());
    for args in [
        vec!["install", "--root", "ROOT", "--node-name=n1", "--x"],
        vec!["install", "--node-name=n1", "--x", "--root", "ROOT"],
        vec!["install", "--node-name=n1", "--root=ROOT", "--x"],
        vec!["install", "--root=ROOT", "--node-name=n1", "--x"],
    ] {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_str().unwrap();
        let args: Vec<&str> = args
            .iter()
            .map(|a| match *a {
                "ROOT" => r,
                "--root=ROOT" => Box::leak(format!("--root={r}").into_boxed_str()),
                a => a,
            })
            .collect();
        let out = run(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert_unit(root.path(), &exec);
    }
}

#[test]
fn flags_are_copied_exactly_and_quoted_only_when_needed() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    let out = run(&[
        "install",
        "--root",
        r,
        "--kubernetes-service-host=10.0.0.1",
        "--service-token-file=/etc/nnf-data-movement/service.token",
        "-v",
        "--",
        "a b",
        "50%",
        "$HOME",
        r#"x"y"#,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exec = format!(
        r#"ExecStart={} --kubernetes-service-host=10.0.0.1 --service-token-file=/etc/nnf-data-movement/service.token -v -- "a b" 50%% $$HOME "x\"y""#,
        demo().display()
    );
    assert_unit(root.path(), &exec);
}

#[test]
fn install_without_flags() {
    let root = tempfile::tempdir().unwrap();
    let out = run(&["install", "--root", root.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_unit(root.path(), &format!("ExecStart={}", demo().display()));
}

#[test]
fn remove_root_deletes_then_reports_not_installed() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    assert!(run(&["install", "--root", r]).status.success());
    let out = run(&["remove", "--root", r]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!unit(root.path()).exists());
    let out = run(&["remove", "--root", r]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Service is not installed"),
        "{}",
        text(&out.stderr)
    );
}

/// Run the demo as `nobody` with no `--root`: refused before touching /etc.
#[test]
fn install_and_remove_refused_when_not_root() {
    assert!(
        is_root(),
        "this test must run as root: it switches to nobody"
    );
    // nobody must be able to reach the binary; the target dir may be private.
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join("nnf-dm");
    copy_executable(&demo(), &copy);
    let system_unit = Path::new("/etc/systemd/system/nnf-dm.service");
    let existed = system_unit.exists();
    for args in [&["install", "--node-name=n1"][..], &["remove"][..]] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&copy)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains("You must have root user privileges"),
            "{}",
            text(&out.stderr)
        );
    }
    assert_eq!(system_unit.exists(), existed);
}

#[test]
fn version_prints_version() {
    let out = run(&["version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("Version {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn generate_docs_writes_man_pages_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["generate-docs", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for page in [
        "", "-install", "-remove", "-start", "-stop", "-status", "-version",
    ] {
        let p = dir.path().join(format!("man1/nnf-dm{page}.1"));
        let roff = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(roff.contains(".TH nnf-dm"), "{}", p.display());
        assert!(roff.contains(env!("CARGO_PKG_VERSION")), "{}", p.display());
    }
    // Hidden: no page for the packaging-only subcommand.
    assert!(!dir.path().join("man1/nnf-dm-generate-docs.1").exists());
    for f in ["bash/nnf-dm", "zsh/_nnf-dm", "fish/nnf-dm.fish"] {
        let s = fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(s.contains("install"), "{f}");
    }
}

/// A fake `systemctl` first on PATH: logs its arguments, answers
/// `is-active` from FAKE_ACTIVE and `status` with FAKE_STATUS_CODE.
struct FakeSystemctl {
    dir: tempfile::TempDir,
}

impl FakeSystemctl {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("systemctl");
        write_executable(
            &script,
            br#"#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$1" in
  is-active) [ "$FAKE_ACTIVE" = 1 ] && exit 0 || exit 3 ;;
  status) echo "fake status of $2"; exit "${FAKE_STATUS_CODE:-0}" ;;
esac
exit 0
"#,
        );
        FakeSystemctl { dir }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn run(&self, args: &[&str], active: bool, status_code: i32) -> (Output, Vec<String>) {
        let path = format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let _ = fs::remove_file(self.log());
        let out = Command::new(demo())
            .args(args)
            .env("PATH", path)
            .env("FAKE_LOG", self.log())
            .env("FAKE_ACTIVE", if active { "1" } else { "0" })
            .env("FAKE_STATUS_CODE", status_code.to_string())
            .output()
            .unwrap();
        let log = fs::read_to_string(self.log()).unwrap_or_default();
        (out, log.lines().map(str::to_string).collect())
    }
}

#[test]
fn start_stop_status_wrap_systemctl() {
    assert!(
        is_root(),
        "this test must run as root: start/stop refuse to run otherwise"
    );
    let fake = FakeSystemctl::new();

    let (out, log) = fake.run(&["start"], false, 0);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        log,
        ["is-active --quiet nnf-dm.service", "start nnf-dm.service"]
    );

    let (out, log) = fake.run(&["start"], true, 0);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("Service is already running"));
    assert_eq!(log, ["is-active --quiet nnf-dm.service"]);

    let (out, log) = fake.run(&["stop"], true, 0);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        log,
        ["is-active --quiet nnf-dm.service", "stop nnf-dm.service"]
    );

    let (out, _) = fake.run(&["stop"], false, 0);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("Service has already been stopped"));

    // status: systemctl's output and exit status pass straight through.
    for code in [0, 3, 4] {
        let (out, log) = fake.run(&["status"], false, code);
        assert_eq!(out.status.code(), Some(code));
        assert_eq!(text(&out.stdout), "fake status of nnf-dm.service\n");
        // A stopped service is reported by systemctl, not as our error.
        assert_eq!(text(&out.stderr), "");
        assert_eq!(log, ["status nnf-dm.service"]);
    }
}

#[test]
fn remove_without_root_option_needs_the_system_unit() {
    assert!(is_root(), "this test must run as root");
    assert!(
        !Path::new("/etc/systemd/system/nnf-dm.service").exists(),
        "/etc/systemd/system/nnf-dm.service exists: this test needs a machine without nnf-dm installed"
    );
    let fake = FakeSystemctl::new();
    let (out, log) = fake.run(&["remove"], false, 0);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("Service is not installed"));
    assert!(log.is_empty(), "{log:?}");
}

#[test]
fn installed_unit_passes_systemd_analyze_verify() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    assert!(run(&["install", "--root", r, "--node-name=n1", "a b"])
        .status
        .success());
    // Documentation=man:nnf-dm(1) is checked too: give it the generated page.
    let docs = root.path().join("docs");
    assert!(run(&["generate-docs", docs.to_str().unwrap()])
        .status
        .success());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit(root.path()))
        .env("MANPATH", &docs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Creates an executable through another process: writing it here would let
/// a child forked meanwhile by another test thread hold the write descriptor,
/// and exec would fail with ETXTBSY.
fn write_executable(path: &Path, content: &[u8]) {
    let staging = path.with_extension("staging");
    fs::write(&staging, content).unwrap();
    let status = Command::new("install")
        .arg("-m")
        .arg("0755")
        .arg(&staging)
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
    let _ = fs::remove_file(&staging);
}

/// Copies an executable through another process (see `write_executable`).
fn copy_executable(from: &Path, to: &Path) {
    assert!(Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success());
}
