//! systemd unit management for the compute-node daemons, shaped after the
//! upstream Go daemons (github.com/takama/daemon): `install [FLAGS...]`,
//! `remove`, `start`, `stop`, `status`, `version`, plus the hidden
//! `generate-docs DIR` used by `rpm/build.sh`.
//!
//! Administrators already run `<binary> install --flag=value ...` from their
//! deployment tooling, so the subcommand names, the unit path
//! (`/etc/systemd/system/<name>.service`) and the error texts match upstream.
//! `--root DIR` is ours: it writes under `DIR` and runs no `systemctl`, so the
//! result can be checked without touching the machine's systemd.

mod docs;
mod unit;

pub use docs::write_docs;
pub use unit::{render_unit, systemd_quote};

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The unit shipped in the RPM. `install` writes the same text with only the
/// `ExecStart=` line replaced, so the packaged and installed units never drift.
pub const NNF_DM_UNIT: &str = include_str!("../../systemd/nnf-dm.service");
/// See [`NNF_DM_UNIT`].
pub const CLIENTMOUNTD_UNIT: &str = include_str!("../../systemd/clientmountd.service");

/// What a binary needs to tell this crate about itself.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec {
    /// Unit and binary name: `nnf-dm` or `clientmountd`.
    pub name: &'static str,
    /// Used in the progress messages ("Install <description>: OK"), as upstream.
    pub description: &'static str,
    /// Printed by `version`.
    pub version: &'static str,
    /// Contents of `systemd/<name>.service`; its single `ExecStart=` line is
    /// replaced on install.
    pub unit_template: &'static str,
}

/// The nnf-dm agent. Description as upstream NearNodeFlash/nnf-dm.
pub const NNF_DM: ServiceSpec = ServiceSpec {
    name: "nnf-dm",
    description: "Near-Node Flash (NNF) Data Movement Service",
    // Every crate takes its version from the workspace, so ours is the binaries'.
    version: env!("CARGO_PKG_VERSION"),
    unit_template: NNF_DM_UNIT,
};

/// The client-mount daemon. Description as upstream NearNodeFlash/nnf-sos.
pub const CLIENTMOUNTD: ServiceSpec = ServiceSpec {
    name: "clientmountd",
    description: "Data Workflow Service (DWS) Client Mount Service",
    version: env!("CARGO_PKG_VERSION"),
    unit_template: CLIENTMOUNTD_UNIT,
};

/// Subcommands to `#[command(flatten)]` into a binary's own subcommand enum.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum ServiceCommand {
    /// Install as a systemd service started at boot
    ///
    /// Writes /etc/systemd/system/<name>.service running this program with the
    /// given flags, then runs `systemctl daemon-reload` and `systemctl enable`.
    /// Needs root unless --root is given.
    #[command(
        after_help = "Every argument after `install` except `--root DIR` is copied into ExecStart \
                      exactly as given, e.g. `install --node-name=n1 --kubernetes-qps=20`. \
                      `--root DIR` may come before or after the flags."
    )]
    Install {
        /// Write the unit under DIR instead of / and run no systemctl (for packaging and tests)
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Daemon flags to put on the ExecStart line
        // `allow_hyphen_values` + `trailing_var_arg` let `--node-name=n1`
        // through without declaring every daemon flag here; the price is that
        // clap stops parsing at the first of them, so a later `--root` lands
        // in here and `split_root` takes it back out.
        #[arg(
            value_name = "FLAGS",
            num_args = 0..,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        flags: Vec<OsString>,
    },
    /// Remove the systemd service
    ///
    /// Stops it if running, disables it and deletes
    /// /etc/systemd/system/<name>.service. Needs root unless --root is given.
    Remove {
        /// Delete the unit under DIR instead of / and run no systemctl
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Start the service (systemctl start)
    Start,
    /// Stop the service (systemctl stop)
    Stop,
    /// Show the service status (systemctl status)
    ///
    /// Exits with systemctl's status: 0 running, 3 stopped, 4 no such unit.
    Status,
    /// Print the version and exit
    Version,
    /// Write man pages and shell completions into DIR (used by rpm/build.sh)
    #[command(hide = true, name = "generate-docs")]
    GenerateDocs {
        /// Output directory; created if missing
        out_dir: PathBuf,
    },
}

/// Why a service command failed. `Display` is the message for the operator.
#[derive(Debug)]
pub enum ServiceError {
    /// Not run as root and no `--root` given.
    NotRoot,
    /// The unit file already exists.
    AlreadyInstalled(PathBuf),
    /// The unit file does not exist.
    NotInstalled(PathBuf),
    /// `start` while active.
    AlreadyRunning,
    /// `stop` while inactive.
    AlreadyStopped,
    /// The flags cannot be represented (not UTF-8, or `--root` without a value).
    BadArguments(String),
    /// `systemctl` ran and failed; `code` is its exit status (1 if killed).
    Systemctl { args: String, code: i32 },
    /// File-system or process-spawn error, with what we were doing.
    Io { context: String, source: io::Error },
    /// `status` only: systemctl already said everything (3 = stopped is not
    /// worth an "Error:" line); just exit with its code.
    Status(i32),
}

impl ServiceError {
    /// The process exit status to use: systemctl's own where it ran (so
    /// `status` keeps its 0/3/4 meanings), otherwise 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServiceError::Systemctl { code, .. } | ServiceError::Status(code) => {
                u8::try_from(*code).unwrap_or(1).max(1)
            }
            _ => 1,
        }
    }

    fn io(context: impl Into<String>, source: io::Error) -> Self {
        ServiceError::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Upstream's ErrRootPrivileges text, plus our way out for tests.
            ServiceError::NotRoot => write!(
                f,
                "You must have root user privileges. Possibly using 'sudo' command should help \
                 (or pass --root DIR to write the unit under DIR)"
            ),
            // Upstream's ErrAlreadyInstalled / ErrNotInstalled texts come
            // first: deployment scripts grep for them.
            ServiceError::AlreadyInstalled(p) => {
                write!(f, "Service has already been installed ({})", p.display())
            }
            ServiceError::NotInstalled(p) => {
                write!(f, "Service is not installed ({} not found)", p.display())
            }
            ServiceError::AlreadyRunning => write!(f, "Service is already running"),
            ServiceError::AlreadyStopped => write!(f, "Service has already been stopped"),
            ServiceError::BadArguments(m) => write!(f, "{m}"),
            ServiceError::Systemctl { args, code } => {
                write!(f, "`systemctl {args}` failed with exit status {code}")
            }
            ServiceError::Io { context, source } => write!(f, "{context}: {source}"),
            ServiceError::Status(code) => write!(f, "systemctl status exited with {code}"),
        }
    }
}

impl std::error::Error for ServiceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServiceError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Run `cmd`, print the outcome like upstream ("Install <description>: OK",
/// or "...: FAILED" and "Error: ..." on stderr) and return the exit code.
/// `C` is the binary's top-level parser; `generate-docs` documents it.
pub fn execute<C: clap::CommandFactory>(spec: &ServiceSpec, cmd: ServiceCommand) -> ExitCode {
    let result = match cmd {
        ServiceCommand::GenerateDocs { out_dir } => write_docs(C::command(), &out_dir)
            .map_err(|e| ServiceError::io(format!("writing docs to {}", out_dir.display()), e)),
        cmd => run(spec, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !matches!(e, ServiceError::Status(_)) {
                eprintln!("Error: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Run one service command, printing progress to stdout. `generate-docs`
/// needs the binary's parser, so it is handled by [`execute`] (here it is
/// an error).
pub fn run(spec: &ServiceSpec, cmd: ServiceCommand) -> Result<(), ServiceError> {
    match cmd {
        ServiceCommand::Install { root, flags } => {
            let (root, flags) = split_root(root, flags)?;
            let exe = std::env::current_exe()
                .map_err(|e| ServiceError::io("finding this program's path", e))?;
            action(&format!("Install {}", spec.description), || {
                install(spec, root.as_deref(), &exe, &flags)
            })
        }
        ServiceCommand::Remove { root } => {
            action(&format!("Removing {}", spec.description), || {
                remove(spec, root.as_deref())
            })
        }
        ServiceCommand::Start => action(&format!("Starting {}", spec.description), || {
            require_root()?;
            if is_active(spec)? {
                return Err(ServiceError::AlreadyRunning);
            }
            systemctl(&["start", &unit_name(spec)])
        }),
        ServiceCommand::Stop => action(&format!("Stopping {}", spec.description), || {
            require_root()?;
            if !is_active(spec)? {
                return Err(ServiceError::AlreadyStopped);
            }
            systemctl(&["stop", &unit_name(spec)])
        }),
        // systemctl prints the status itself; unlike upstream we do not
        // demand root, since reading status needs no privilege.
        ServiceCommand::Status => systemctl(&["status", &unit_name(spec)]).map_err(|e| match e {
            ServiceError::Systemctl { code, .. } => ServiceError::Status(code),
            e => e,
        }),
        ServiceCommand::Version => {
            // Upstream clientmountd prints "Version <v>".
            println!("Version {}", spec.version);
            Ok(())
        }
        ServiceCommand::GenerateDocs { .. } => Err(ServiceError::BadArguments(
            "generate-docs must go through daemon_svc::execute".into(),
        )),
    }
}

/// Print "<what>: OK" or "<what>: FAILED" around `f`, as upstream does
/// (without its colour codes: the output usually ends up in logs).
fn action(what: &str, f: impl FnOnce() -> Result<(), ServiceError>) -> Result<(), ServiceError> {
    let r = f();
    match &r {
        Ok(()) => println!("{what}: OK"),
        Err(_) => {
            // Flush stdout first so the two streams interleave sensibly.
            let _ = io::stdout().flush();
            eprintln!("{what}: FAILED");
        }
    }
    r
}

/// Where `install` writes and `remove` deletes the unit.
pub fn unit_path(spec: &ServiceSpec, root: Option<&Path>) -> PathBuf {
    let rel = format!("etc/systemd/system/{}.service", spec.name);
    match root {
        Some(root) => root.join(rel),
        None => Path::new("/").join(rel),
    }
}

fn unit_name(spec: &ServiceSpec) -> String {
    format!("{}.service", spec.name)
}

fn require_root() -> Result<(), ServiceError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ServiceError::NotRoot);
    }
    Ok(())
}

/// Pull `--root DIR` / `--root=DIR` out of install's trailing flags (clap
/// hands us everything from the first daemon flag on verbatim, so a `--root`
/// after the flags arrives here). Neither daemon has a `--root` flag of its
/// own, so every occurrence is ours; the last one wins. Everything else,
/// including a `--`, is kept in order.
pub fn split_root(
    root: Option<PathBuf>,
    flags: Vec<OsString>,
) -> Result<(Option<PathBuf>, Vec<String>), ServiceError> {
    let mut root = root;
    let mut out = Vec::with_capacity(flags.len());
    let mut it = flags.into_iter();
    while let Some(arg) = it.next() {
        // A unit file is text; a non-UTF-8 argument cannot be written into it.
        let arg = arg.into_string().map_err(|a| {
            ServiceError::BadArguments(format!(
                "argument {a:?} is not UTF-8 and cannot be written into a unit file"
            ))
        })?;
        if arg == "--root" {
            let dir = it
                .next()
                .ok_or_else(|| ServiceError::BadArguments("--root needs a directory".into()))?;
            root = Some(PathBuf::from(dir));
        } else if let Some(dir) = arg.strip_prefix("--root=") {
            root = Some(PathBuf::from(dir));
        } else {
            out.push(arg);
        }
    }
    if root.as_deref() == Some(Path::new("")) {
        return Err(ServiceError::BadArguments(
            "--root needs a directory".into(),
        ));
    }
    Ok((root, out))
}

/// Write the unit (and, without `root`, reload and enable it).
fn install(
    spec: &ServiceSpec,
    root: Option<&Path>,
    exe: &Path,
    flags: &[String],
) -> Result<(), ServiceError> {
    if root.is_none() {
        require_root()?;
    }
    let path = unit_path(spec, root);
    // symlink_metadata: a dangling symlink at the path is still "installed"
    // as far as systemd is concerned (it would shadow our file).
    if path.symlink_metadata().is_ok() {
        return Err(ServiceError::AlreadyInstalled(path));
    }
    let exe = exe
        .to_str()
        .ok_or_else(|| ServiceError::BadArguments(format!("program path {exe:?} is not UTF-8")))?;
    let text = render_unit(spec.unit_template, exe, flags);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| ServiceError::io(format!("creating {}", dir.display()), e))?;
    }
    // create_new so two concurrent installs cannot both "win".
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ServiceError::AlreadyInstalled(path.clone()),
            _ => ServiceError::io(format!("creating {}", path.display()), e),
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| ServiceError::io(format!("writing {}", path.display()), e))?;
    drop(file);
    println!("Wrote {}", path.display());
    if root.is_some() {
        return Ok(());
    }
    let enabled =
        systemctl(&["daemon-reload"]).and_then(|()| systemctl(&["enable", &unit_name(spec)]));
    if enabled.is_err() {
        // Leave nothing behind, or the retry would be refused as "already
        // installed" (upstream leaves the file; that trap is not worth keeping).
        let _ = fs::remove_file(&path);
        let _ = quiet_systemctl(&["daemon-reload"]);
    }
    enabled
}

/// Stop, disable and delete the unit (without `root`), or just delete it.
fn remove(spec: &ServiceSpec, root: Option<&Path>) -> Result<(), ServiceError> {
    if root.is_none() {
        require_root()?;
    }
    let path = unit_path(spec, root);
    if path.symlink_metadata().is_err() {
        return Err(ServiceError::NotInstalled(path));
    }
    if root.is_none() {
        // As upstream: a running service is stopped before it is disabled.
        if is_active(spec)? {
            systemctl(&["stop", &unit_name(spec)])?;
        }
        systemctl(&["disable", &unit_name(spec)])?;
    }
    fs::remove_file(&path)
        .map_err(|e| ServiceError::io(format!("deleting {}", path.display()), e))?;
    println!("Deleted {}", path.display());
    if root.is_none() {
        // Without this systemd keeps the deleted unit loaded until the next
        // reload (or falls back to the packaged one in /usr/lib only then).
        systemctl(&["daemon-reload"])?;
    }
    Ok(())
}

fn is_active(spec: &ServiceSpec) -> Result<bool, ServiceError> {
    // `is-active` exits 0 only for "active"; anything else (inactive,
    // failed, unknown unit) counts as not running, as in upstream.
    Ok(quiet_systemctl(&["is-active", "--quiet", &unit_name(spec)])? == 0)
}

/// Run `systemctl ARGS` with inherited stdio; non-zero exit is an error.
fn systemctl(args: &[&str]) -> Result<(), ServiceError> {
    // Found through PATH (as upstream's exec.Command does), which also lets
    // tests put a recording fake first.
    let status = Command::new("systemctl")
        .args(args)
        .status()
        .map_err(|e| ServiceError::io("running systemctl", e))?;
    if status.success() {
        return Ok(());
    }
    Err(ServiceError::Systemctl {
        args: args.join(" "),
        code: status.code().unwrap_or(1),
    })
}

/// Run `systemctl ARGS` silently and return its exit code.
fn quiet_systemctl(args: &[&str]) -> Result<i32, ServiceError> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| ServiceError::io("running systemctl", e))?;
    Ok(out.status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_flags_are_untouched() {
        for w in [
            "--node-name=n1",
            "--kubernetes-qps",
            "20",
            "/etc/nnf-data-movement/service.token",
            "--x=a,b:c@d+e",
        ] {
            assert_eq!(systemd_quote(w), w);
        }
    }

    #[test]
    fn special_words_are_quoted_or_escaped() {
        assert_eq!(systemd_quote("a b"), r#""a b""#);
        assert_eq!(systemd_quote(""), r#""""#);
        assert_eq!(systemd_quote(";"), r#"";""#);
        assert_eq!(systemd_quote("--x=it's"), r#""--x=it's""#);
        assert_eq!(systemd_quote(r#"x"y"#), r#""x\"y""#);
        assert_eq!(systemd_quote(r"a\b"), r#""a\\b""#);
        assert_eq!(systemd_quote("a\nb"), r#""a\nb""#);
        assert_eq!(systemd_quote("a\u{1}b"), r#""a\x01b""#);
        // Specifiers and variables are expanded even inside quotes.
        assert_eq!(systemd_quote("50%"), "50%%");
        assert_eq!(systemd_quote("$HOME"), "$$HOME");
        assert_eq!(systemd_quote("%h $X"), r#""%%h $$X""#);
    }

    #[test]
    fn packaged_units_have_one_exec_start_of_usr_bin() {
        for (unit, name) in [(NNF_DM_UNIT, "nnf-dm"), (CLIENTMOUNTD_UNIT, "clientmountd")] {
            let lines: Vec<_> = unit
                .lines()
                .filter(|l| l.starts_with("ExecStart="))
                .collect();
            assert_eq!(lines, [format!("ExecStart=/usr/bin/{name}")]);
        }
    }

    #[test]
    fn render_replaces_only_exec_start() {
        let flags = vec!["--node-name=n1".to_string(), "a b".to_string()];
        let out = render_unit(NNF_DM_UNIT, "/opt/x/nnf-dm", &flags);
        let want: Vec<String> = NNF_DM_UNIT
            .lines()
            .map(|l| {
                if l.starts_with("ExecStart=") {
                    r#"ExecStart=/opt/x/nnf-dm --node-name=n1 "a b""#.to_string()
                } else {
                    l.to_string()
                }
            })
            .collect();
        assert_eq!(out.lines().collect::<Vec<_>>(), want);
        assert!(out.ends_with('\n'));
    }

    #[test]
    fn split_root_anywhere() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let (root, flags) = split_root(None, os(&["--a=1", "--root", "/r", "--b"])).unwrap();
        assert_eq!(root.as_deref(), Some(Path::new("/r")));
        assert_eq!(flags, ["--a=1", "--b"]);
        let (root, flags) = split_root(Some("/x".into()), os(&["--a", "--root=/r"])).unwrap();
        assert_eq!(root.as_deref(), Some(Path::new("/r")));
        assert_eq!(flags, ["--a"]);
        assert!(split_root(None, os(&["--a", "--root"])).is_err());
        assert!(split_root(None, os(&["--root="])).is_err());
    }

    #[test]
    fn exit_codes() {
        let e = ServiceError::Systemctl {
            args: "status x".into(),
            code: 3,
        };
        assert_eq!(e.exit_code(), 3);
        assert_eq!(ServiceError::NotRoot.exit_code(), 1);
        let e = ServiceError::Systemctl {
            args: "x".into(),
            code: 300,
        };
        assert_eq!(e.exit_code(), 1);
    }
}
