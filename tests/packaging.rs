//! Packaging: the systemd units and drop-in examples, the `install`/`remove`/
//! `version` subcommands of the real `nnf-dm` and `clientmountd` binaries,
//! and the RPMs built by rpm/build.sh.
//!
//! Tests whose name starts with `wired_` run the real binaries' service
//! subcommands; they need `daemon_svc::ServiceCommand` flattened into both
//! binaries (`generate-docs` for the RPM test). The unit-file tests need
//! only the files in systemd/.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DAEMONS: [&str; 2] = ["nnf-dm", "clientmountd"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `target/<profile>`: this test runs from its `deps/`, and the test
/// command builds every binary first. NNF_PACKAGING_BIN_DIR points the
/// tests at other binaries instead (e.g. /usr/bin after an RPM install).
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NNF_PACKAGING_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not built", p.display());
    p
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn both(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn run(exe: &Path, args: &[&str]) -> Output {
    Command::new(exe).args(args).output().unwrap()
}

fn packaged_unit(name: &str) -> String {
    fs::read_to_string(repo().join(format!("systemd/{name}.service"))).unwrap()
}

/// Minimal man pages so `Documentation=man:<name>(1)` resolves; whether the
/// real pages exist is the RPM test's business.
fn stub_manpath(dir: &Path) -> PathBuf {
    let man = dir.join("man");
    fs::create_dir_all(man.join("man1")).unwrap();
    for name in DAEMONS {
        fs::write(
            man.join(format!("man1/{name}.1")),
            format!(".TH {name} 1\n.SH NAME\n{name} \\- stub\n"),
        )
        .unwrap();
    }
    man
}

fn verify(units: &[PathBuf], manpath: &Path, unit_path: Option<&Path>) -> Output {
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").args(units).env("MANPATH", manpath);
    if let Some(p) = unit_path {
        // Trailing ':' appends the built-in search path (for the .target units).
        cmd.env("SYSTEMD_UNIT_PATH", format!("{}:", p.display()));
    }
    cmd.output().unwrap()
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let manpath = stub_manpath(dir.path());
    let units_dir = dir.path().join("units");
    fs::create_dir(&units_dir).unwrap();
    let mut units = Vec::new();
    for name in DAEMONS {
        // verify insists ExecStart exists; /usr/bin/<name> is not installed
        // here, so point it at a binary that is. Nothing else changes.
        let unit = packaged_unit(name).replace(
            &format!("\nExecStart=/usr/bin/{name}\n"),
            "\nExecStart=/bin/true\n",
        );
        assert!(
            unit.contains("\nExecStart=/bin/true\n"),
            "{name}: ExecStart"
        );
        let p = units_dir.join(format!("{name}.service"));
        fs::write(&p, unit).unwrap();
        units.push(p);
    }
    let out = verify(&units, &manpath, None);
    assert!(out.status.success(), "{}", both(&out));
    // verify prints problems it does not fail on (unknown keys, ...) to stderr.
    assert_eq!(text(&out.stderr), "", "warnings from verify");
}

#[test]
fn override_examples_pass_systemd_analyze_verify_as_drop_ins() {
    let dir = tempfile::tempdir().unwrap();
    let manpath = stub_manpath(dir.path());
    let units_dir = dir.path().join("units");
    let mut units = Vec::new();
    for name in DAEMONS {
        let dropins = units_dir.join(format!("{name}.service.d"));
        fs::create_dir_all(&dropins).unwrap();
        let unit = packaged_unit(name).replace(&format!("/usr/bin/{name}"), "/bin/true");
        let p = units_dir.join(format!("{name}.service"));
        fs::write(&p, unit).unwrap();
        let example =
            fs::read_to_string(repo().join(format!("systemd/{name}.override.conf.example")))
                .unwrap();
        fs::write(
            dropins.join("override.conf"),
            example.replace(&format!("/usr/bin/{name}"), "/bin/true"),
        )
        .unwrap();
        units.push(p);
    }
    // SYSTEMD_UNIT_PATH makes verify load the drop-ins next to the units; a
    // drop-in that forgot the empty ExecStart= fails with "more than one".
    let out = verify(&units, &manpath, Some(&units_dir));
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(text(&out.stderr), "", "warnings from verify");
}

/// Settings the spec requires, and none of the options that would put the
/// daemon in its own mount namespace (its mounts would be invisible).
#[test]
fn unit_files_have_required_settings_and_no_mount_namespace() {
    for name in DAEMONS {
        let unit = packaged_unit(name);
        let lines: Vec<&str> = unit.lines().map(str::trim).collect();
        for want in [
            "Requires=network-online.target",
            "After=network-online.target",
            "Restart=on-failure",
            "WantedBy=multi-user.target",
            &format!("ExecStart=/usr/bin/{name}"),
        ] {
            assert!(lines.contains(&want), "{name}: missing {want}");
        }
        assert!(
            lines.iter().any(|l| l.starts_with("Description=")),
            "{name}: Description"
        );
        for bad in [
            "ProtectSystem=",
            "ProtectHome=",
            "PrivateTmp=",
            "PrivateDevices=",
            "PrivateMounts=",
            "ProtectKernelTunables=",
            "ProtectKernelModules=",
            "ProtectKernelLogs=",
            "ProtectControlGroups=",
            "ProtectClock=",
            "ProtectHostname=",
            "ProtectProc=",
            "ReadOnlyPaths=",
            "InaccessiblePaths=",
            "TemporaryFileSystem=",
            "BindPaths=",
            "RootDirectory=",
            "MountFlags=",
            "DeviceAllow=",
            "DevicePolicy=",
            "NoNewPrivileges=",
            "CapabilityBoundingSet=",
            "User=",
        ] {
            assert!(
                !lines.iter().any(|l| l.starts_with(bad)),
                "{name}: {bad} would break mounting"
            );
        }
    }
}

#[test]
fn override_examples_carry_production_flags() {
    let common = [
        "--kubernetes-service-host=",
        "--kubernetes-service-port=",
        "--node-name=",
    ];
    for (name, creds, extra) in [
        (
            "nnf-dm",
            "/etc/nnf-data-movement",
            &[
                "--nnf-node-name=",
                "--kubernetes-qps=",
                "--kubernetes-burst=",
            ][..],
        ),
        ("clientmountd", "/etc/client-mount", &[][..]),
    ] {
        let example =
            fs::read_to_string(repo().join(format!("systemd/{name}.override.conf.example")))
                .unwrap();
        let lines: Vec<&str> = example.lines().map(str::trim).collect();
        let service = lines
            .iter()
            .position(|l| *l == "[Service]")
            .expect("[Service]");
        let clear = lines
            .iter()
            .position(|l| *l == "ExecStart=")
            .expect("ExecStart=");
        let set = lines
            .iter()
            .position(|l| l.starts_with(&format!("ExecStart=/usr/bin/{name} ")))
            .expect("ExecStart=/usr/bin/<name> ...");
        assert!(service < clear && clear < set, "{name}: order");
        let token = format!("--service-token-file={creds}/service.token");
        let cert = format!("--service-cert-file={creds}/service.cert");
        for flag in common.iter().chain(extra).copied().chain([&*token, &*cert]) {
            assert!(example.contains(flag), "{name}: missing {flag}");
        }
    }
}

/// The packaged unit with only ExecStart replaced, compared line by line.
fn assert_installed_unit(name: &str, root: &Path, exec_start: &str) {
    let path = root.join(format!("etc/systemd/system/{name}.service"));
    let got = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let packaged = packaged_unit(name);
    let want: Vec<&str> = packaged
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                exec_start
            } else {
                l
            }
        })
        .collect();
    let got: Vec<&str> = got.lines().collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "{name}: unit line {}", i + 1);
    }
    assert_eq!(got.len(), want.len(), "{name}: unit line count");
}

#[test]
fn wired_install_root_writes_the_packaged_unit_with_flags() {
    for name in DAEMONS {
        let exe = bin(name);
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_str().unwrap();
        let out = run(
            &exe,
            &[
                "install",
                "--root",
                r,
                "--node-name=n1",
                "--kubernetes-service-port",
                "6443",
            ],
        );
        assert!(out.status.success(), "{name}: {}", both(&out));
        assert!(text(&out.stdout).contains(": OK"), "{name}: {}", both(&out));
        assert_installed_unit(
            name,
            root.path(),
            &format!(
                "ExecStart={} --node-name=n1 --kubernetes-service-port 6443",
                exe.display()
            ),
        );
    }
}

#[test]
fn wired_install_twice_is_refused() {
    for name in DAEMONS {
        let exe = bin(name);
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_str().unwrap();
        assert!(
            run(&exe, &["install", "--root", r]).status.success(),
            "{name}"
        );
        let out = run(&exe, &["install", "--root", r, "--node-name=n2"]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", both(&out));
        assert!(
            text(&out.stderr).contains("Service has already been installed"),
            "{name}: {}",
            both(&out)
        );
        assert_installed_unit(name, root.path(), &format!("ExecStart={}", exe.display()));
    }
}

#[test]
fn wired_root_after_flags_and_with_equals_is_not_copied() {
    for name in DAEMONS {
        let exe = bin(name);
        for form in ["after", "equals"] {
            let root = tempfile::tempdir().unwrap();
            let r = root.path().to_str().unwrap();
            let eq = format!("--root={r}");
            let args: Vec<&str> = match form {
                "after" => vec!["install", "--node-name=n1", "--x", "--root", r],
                _ => vec!["install", "--node-name=n1", &eq, "--x"],
            };
            let out = run(&exe, &args);
            assert!(out.status.success(), "{name} {form}: {}", both(&out));
            assert_installed_unit(
                name,
                root.path(),
                &format!("ExecStart={} --node-name=n1 --x", exe.display()),
            );
        }
    }
}

#[test]
fn wired_remove_root_deletes_the_unit() {
    for name in DAEMONS {
        let exe = bin(name);
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_str().unwrap();
        assert!(
            run(&exe, &["install", "--root", r]).status.success(),
            "{name}"
        );
        let out = run(&exe, &["remove", "--root", r]);
        assert!(out.status.success(), "{name}: {}", both(&out));
        assert!(!root
            .path()
            .join(format!("etc/systemd/system/{name}.service"))
            .exists());
        let out = run(&exe, &["remove", "--root", r]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", both(&out));
        assert!(
            text(&out.stderr).contains("Service is not installed"),
            "{name}: {}",
            both(&out)
        );
    }
}

#[test]
fn wired_install_refused_when_not_root() {
    integration_tests::require_root("it switches to nobody");
    for name in DAEMONS {
        // A world-readable copy: nobody may not be able to reach target/.
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.path().join(name);
        integration_tests::copy_executable(&bin(name), &copy);
        let system_unit = PathBuf::from(format!("/etc/systemd/system/{name}.service"));
        let existed = system_unit.exists();
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&copy)
            .args(["install", "--node-name=n1"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}: {}", both(&out));
        assert!(
            text(&out.stderr).contains("root"),
            "{name}: message should say root is needed: {}",
            both(&out)
        );
        assert_eq!(
            system_unit.exists(),
            existed,
            "{name}: touched {system_unit:?}"
        );
    }
}

#[test]
fn wired_version_prints_the_workspace_version() {
    for name in DAEMONS {
        let out = run(&bin(name), &["version"]);
        assert!(out.status.success(), "{name}: {}", both(&out));
        assert!(
            text(&out.stdout).contains(env!("CARGO_PKG_VERSION")),
            "{name}: {}",
            both(&out)
        );
    }
}

#[test]
fn wired_installed_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let manpath = stub_manpath(dir.path());
    let root = dir.path().join("root");
    let r = root.to_str().unwrap();
    let mut units = Vec::new();
    for name in DAEMONS {
        let out = run(
            &bin(name),
            &["install", "--root", r, "--node-name=n1", "a b"],
        );
        assert!(out.status.success(), "{name}: {}", both(&out));
        units.push(root.join(format!("etc/systemd/system/{name}.service")));
    }
    let out = verify(&units, &manpath, None);
    assert!(out.status.success(), "{}", both(&out));
}

/// A recording `systemctl` first on PATH: logs its arguments, says "active"
/// to `is-active` when FAKE_ACTIVE=1, exits FAKE_CODE from `status`.
fn run_with_fake_systemctl(exe: &Path, args: &[&str], active: bool, code: i32) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("systemctl");
    integration_tests::write_executable(
        &script,
        b"#!/bin/sh\necho \"$*\" >> \"$FAKE_LOG\"\n\
         case \"$1\" in\n\
         is-active) [ \"$FAKE_ACTIVE\" = 1 ] && exit 0 || exit 3 ;;\n\
         status) echo \"fake status of $2\"; exit \"$FAKE_CODE\" ;;\n\
         esac\nexit 0\n",
    );
    let log = dir.path().join("log");
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(exe)
        .args(args)
        .env("PATH", path)
        .env("FAKE_LOG", &log)
        .env("FAKE_ACTIVE", if active { "1" } else { "0" })
        .env("FAKE_CODE", code.to_string())
        .output()
        .unwrap();
    (out, fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn wired_status_wraps_systemctl_and_keeps_its_exit_code() {
    for name in DAEMONS {
        for code in [0, 3] {
            let (out, log) = run_with_fake_systemctl(&bin(name), &["status"], false, code);
            assert_eq!(out.status.code(), Some(code), "{name}: {}", both(&out));
            assert_eq!(log, format!("status {name}.service\n"), "{name}");
            assert!(
                text(&out.stdout).contains("fake status"),
                "{name}: {}",
                both(&out)
            );
        }
    }
}

#[test]
fn wired_start_and_stop_wrap_systemctl() {
    integration_tests::require_root("start/stop refuse to run otherwise");
    for name in DAEMONS {
        let (out, log) = run_with_fake_systemctl(&bin(name), &["start"], false, 0);
        assert!(out.status.success(), "{name}: {}", both(&out));
        assert!(
            log.ends_with(&format!("start {name}.service\n")),
            "{name}: {log}"
        );
        let (out, log) = run_with_fake_systemctl(&bin(name), &["stop"], true, 0);
        assert!(out.status.success(), "{name}: {}", both(&out));
        assert!(
            log.ends_with(&format!("stop {name}.service\n")),
            "{name}: {log}"
        );
        let (out, _) = run_with_fake_systemctl(&bin(name), &["start"], true, 0);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", both(&out));
        assert!(
            text(&out.stderr).contains("Service is already running"),
            "{name}"
        );
    }
}

/// rpm/build.sh with debug binaries (NNF_RPM_PROFILE=debug), taken from
/// this test's target dir (NNF_RPM_BIN_DIR: `cargo test` holds the target
/// lock, so the script must not run cargo), into a private _topdir.
/// Needs `generate-docs` in both binaries, README.md and LICENSE.
#[test]
fn wired_rpm_build_and_rpm_qlp_lists_everything() {
    let top = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("rpm/build.sh"))
        .env("NNF_RPM_PROFILE", "debug")
        .env("NNF_RPM_BIN_DIR", bin_dir())
        .env("NNF_RPM_TOPDIR", top.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", both(&out));

    let arch = text(
        &Command::new("rpm")
            .args(["--eval", "%{_arch}"])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_string();
    let version = env!("CARGO_PKG_VERSION").replace('-', "~");
    for (pkg, name) in [("nnf-dm", "nnf-dm"), ("nnf-clientmount", "clientmountd")] {
        let rpm = find_one(
            &top.path().join("RPMS").join(&arch),
            &format!("{pkg}-{version}-"),
        );
        find_one(&top.path().join("SRPMS"), &format!("{pkg}-{version}-"));

        let out = Command::new("rpm").arg("-qlp").arg(&rpm).output().unwrap();
        assert!(out.status.success(), "{}", both(&out));
        let listed = text(&out.stdout);
        let files: Vec<&str> = listed.lines().collect();
        let has = |p: &str| files.contains(&p);
        // Man pages may or may not be gzipped by the distribution's rpm.
        let has_man = |page: &str| {
            let p = format!("/usr/share/man/man1/{page}.1");
            has(&p) || has(&format!("{p}.gz"))
        };
        for want in [
            format!("/usr/bin/{name}"),
            format!("/usr/lib/systemd/system/{name}.service"),
            format!("/usr/share/doc/{pkg}/README.md"),
            format!("/usr/share/doc/{pkg}/{name}.override.conf.example"),
            format!("/usr/share/licenses/{pkg}/LICENSE"),
            format!("/usr/share/bash-completion/completions/{name}"),
            format!("/usr/share/zsh/site-functions/_{name}"),
            format!("/usr/share/fish/vendor_completions.d/{name}.fish"),
        ] {
            assert!(has(&want), "{pkg}: {want} not in\n{listed}");
        }
        for page in [
            "", "-install", "-remove", "-start", "-stop", "-status", "-version",
        ] {
            assert!(
                has_man(&format!("{name}{page}")),
                "{pkg}: man {name}{page} not in\n{listed}"
            );
        }
        // Nothing outside the expected places.
        let allowed = [
            format!("/usr/bin/{name}"),
            format!("/usr/lib/systemd/system/{name}.service"),
            format!("/usr/share/doc/{pkg}"),
            format!("/usr/share/licenses/{pkg}"),
            format!("/usr/share/man/man1/{name}"),
            format!("/usr/share/bash-completion/completions/{name}"),
            format!("/usr/share/zsh/site-functions/_{name}"),
            format!("/usr/share/fish/vendor_completions.d/{name}.fish"),
        ];
        for f in &files {
            assert!(
                allowed.iter().any(|a| f.starts_with(a.as_str())),
                "{pkg}: unexpected {f}"
            );
        }
        // The packaged unit is the repository's file, byte for byte:
        // compare the digest rpm recorded (`--dump`: path size mtime digest ...).
        let out = Command::new("rpm")
            .arg("-qp")
            .arg("--dump")
            .arg(&rpm)
            .output()
            .unwrap();
        let dump = text(&out.stdout);
        let unit_path = format!("/usr/lib/systemd/system/{name}.service");
        let digest = dump
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&unit_path.as_str())).then(|| f[3].to_string())
            })
            .unwrap_or_else(|| panic!("{pkg}: no {unit_path} in --dump\n{dump}"));
        let out = Command::new("sha256sum")
            .arg(repo().join(format!("systemd/{name}.service")))
            .output()
            .unwrap();
        let want = text(&out.stdout);
        assert_eq!(
            Some(digest.as_str()),
            want.split_whitespace().next(),
            "{pkg}: packaged unit differs from systemd/{name}.service"
        );
    }
}

fn find_one(dir: &Path, prefix: &str) -> PathBuf {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".rpm"))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{prefix}*.rpm in {}: {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}
