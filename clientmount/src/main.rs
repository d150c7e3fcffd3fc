//! `clientmountd`: mounts and unmounts the Rabbit file systems described by
//! ClientMount resources on a compute node and reports their status.
//!
//! Two drivers on one reconcile core: Kubernetes (the default; ClientMounts
//! watched in namespaces `<node>` and `default`) and the embedded
//! `--spec-dir DIR` mode (JSON files, no API server).

mod controller;
mod daemon;
mod exec;
mod inotify;
mod kubemode;
mod logging;
mod metrics;
mod mount;
mod mountinfo;
mod nvme;
mod plan;
mod reconcile;
mod signals;
mod specdir;
mod vars;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use daemon_common::logging::{LogFormat, TimeFormat};
use logging::init_logging;

#[derive(Debug, Subcommand)]
enum Cmd {
    #[command(flatten)]
    Service(daemon_svc::ServiceCommand),
}

#[derive(Debug, Parser)]
#[command(
    name = "clientmountd",
    version,
    about = "NNF compute-node ClientMount daemon"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,

    /// Embedded mode: read ClientMount, NnfStorageProfile and Servers objects
    /// from JSON files in DIR and write each status to `<name>.status.json`.
    #[arg(long, value_name = "DIR")]
    spec_dir: Option<PathBuf>,

    /// This compute node's name [default: host name cut at the first '.'].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Timeout of each external command (e.g. `30s`, `1m`, `1m30s`; `0`:
    /// none) [default: NNF_COMMAND_TIMEOUT_SECONDS, else none].
    #[arg(long, value_parser = parse_timeout)]
    command_timeout: Option<Duration>,

    /// How long to wait for an activated block device to appear
    /// [default: NNF_MAPPER_WAIT_TIMEOUT seconds, else 10s].
    #[arg(long, value_parser = parse_duration)]
    device_wait: Option<Duration>,

    /// Directory of the NVMe controller and namespace nodes that are
    /// rescanned. Only tests and unusual setups change it.
    #[arg(long, default_value = "/dev", value_name = "DIR")]
    nvme_dir: PathBuf,

    /// Report every ClientMount ready without mounting anything or running
    /// any command (for test clusters).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool, value_name = "BOOL")]
    mock: Option<bool>,

    /// Upstream's logging flags (controller-runtime's zap options), mapped
    /// onto ours: development mode means debug level.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool, value_name = "BOOL")]
    zap_devel: Option<bool>,

    /// `json` or `console` (= `--log-format json` / `text`).
    #[arg(long, value_parser = ["json", "console"])]
    zap_encoder: Option<String>,

    /// `debug`, `info`, `error`, `panic`, or a verbosity N > 0 (1: debug,
    /// 2 and more: trace).
    #[arg(long, value_parser = parse_zap_level)]
    zap_log_level: Option<String>,

    /// `info`, `error` or `panic`: accepted for compatibility; no stack
    /// traces are printed.
    #[arg(long, value_parser = ["info", "error", "panic"])]
    zap_stacktrace_level: Option<String>,

    /// Time stamps: `epoch`, `millis`, `nano`, `iso8601`, `rfc3339` or
    /// `rfc3339nano` (UTC).
    #[arg(long, value_parser = ["epoch", "millis", "nano", "iso8601", "rfc3339", "rfc3339nano"])]
    zap_time_encoding: Option<String>,

    /// Directory where activated logical volumes appear as `<vg>-<lv>`
    /// (hyphens in names doubled). Only tests and unusual setups change it.
    #[arg(long, default_value = "/dev/mapper", value_name = "DIR")]
    device_dir: PathBuf,

    /// Log line format on stderr [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,

    /// Kubernetes API server host (Kubernetes mode).
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    kubernetes_service_host: Option<String>,

    /// Kubernetes API server port (Kubernetes mode).
    #[arg(long, env = "KUBERNETES_SERVICE_PORT")]
    kubernetes_service_port: Option<String>,

    /// Bearer token file of the service account (Kubernetes mode).
    #[arg(long, env = "DWS_CLIENT_MOUNT_SERVICE_TOKEN_FILE")]
    service_token_file: Option<PathBuf>,

    /// CA certificate of the API server, PEM (Kubernetes mode).
    #[arg(long, env = "DWS_CLIENT_MOUNT_SERVICE_CERT_FILE")]
    service_cert_file: Option<PathBuf>,

    /// kubeconfig file (Kubernetes mode).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// Where Prometheus metrics are served (`/metrics`), as
    /// controller-runtime spells it: `:PORT` (every interface), `HOST:PORT`,
    /// or `0` (off). Both modes.
    #[arg(long, default_value = ":8080", value_name = "ADDR")]
    metrics_bind_address: String,
}

/// A `--command-timeout`: a duration, or `0` for none.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

/// Go's `strconv.ParseBool`, as upstream's flags take booleans.
fn parse_go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("invalid boolean {text:?} (use true or false)")),
    }
}

/// controller-runtime's `--zap-log-level`: a level name or a verbosity.
fn parse_zap_level(text: &str) -> Result<String, String> {
    match text {
        "debug" | "info" | "error" | "panic" => Ok(text.to_string()),
        n => match n.parse::<u32>() {
            Ok(v) if v > 0 => Ok(n.to_string()),
            _ => Err(format!(
                "invalid log level {text:?} (use debug, info, error, panic or a number > 0)"
            )),
        },
    }
}

/// Which timeout commands run with. Precedence: `--command-timeout`, then
/// `NNF_COMMAND_TIMEOUT_SECONDS`, then none (upstream nnf-sos
/// `pkg/command/cmd.go`; its `--command-timeout` is parsed but unused, ours
/// is an explicit override). Zero means none.
fn command_timeout(flag: Option<Duration>, env: Option<&str>) -> Result<Option<Duration>, String> {
    let chosen = match (flag, env) {
        (Some(d), _) => d,
        (None, Some(text)) => match text.trim().parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                return Err(format!(
                    "NNF_COMMAND_TIMEOUT_SECONDS={text:?} is not a whole number of seconds"
                ))
            }
        },
        (None, None) => Duration::ZERO,
    };
    Ok((!chosen.is_zero()).then_some(chosen))
}

/// `NNF_MAPPER_WAIT_TIMEOUT`: whole seconds > 0, else ignored (as upstream
/// `waitForMapper` and `WaitForAppearance` do).
fn mapper_wait(env: Option<&str>) -> Option<Duration> {
    env.and_then(|t| t.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

/// Go's flag package also takes `-flag`: rewrite upstream's single-dash
/// spellings of our long flags to `--flag`.
fn double_dash(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let longs: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let Some(text) = a.to_str().filter(|_| i > 0) else {
                return a;
            };
            match text.strip_prefix('-') {
                Some(rest) if !rest.starts_with('-') => {
                    let name = rest.split('=').next().unwrap_or(rest);
                    if name.len() > 1 && longs.iter().any(|l| l == name) {
                        format!("-{text}").into()
                    } else {
                        a
                    }
                }
                _ => a,
            }
        })
        .collect()
}

/// `30s`, `1m`, `1m30s`, `500ms`, `2h`, `1d`; a bare number is seconds.
/// Zero is refused (except a bare `0`, as before the grammar was shared).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = daemon_common::time::parse_duration(text)?;
    if d.is_zero() && text.trim().parse::<u64>().is_err() {
        return Err("duration must be positive".into());
    }
    Ok(d)
}

/// glibc gives every thread that mallocs its own arena and keeps the
/// arenas' memory after the thread exits: after a burst of concurrent
/// reconciles (one thread each) the idle daemon would stay tens of MiB
/// larger. Two arenas are plenty for a daemon whose work is waiting on
/// external commands.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Our log settings from ours and upstream's flags. Precedence:
/// `RUST_LOG` > `--zap-log-level` > `--zap-devel` (debug) > info, and
/// `--log-format` > `--zap-encoder` > `--zap-devel=false` (json, zap's
/// production encoder) > text.
fn log_settings(cli: &Cli) -> (String, LogFormat, TimeFormat) {
    let level = match cli.zap_log_level.as_deref() {
        Some("debug") | Some("1") => "debug",
        Some("info") => "info",
        Some("error") | Some("panic") => "error",
        Some(_) => "trace",
        None if cli.zap_devel == Some(true) => "debug",
        None => "info",
    };
    let format = match (cli.log_format, cli.zap_encoder.as_deref(), cli.zap_devel) {
        (Some(f), _, _) => f,
        (None, Some("json"), _) => LogFormat::Json,
        (None, Some(_), _) => LogFormat::Text,
        (None, None, Some(false)) => LogFormat::Json,
        _ => LogFormat::Text,
    };
    let time = match cli.zap_time_encoding.as_deref() {
        Some("epoch") => TimeFormat::Epoch,
        Some("millis") => TimeFormat::Millis,
        Some("nano") => TimeFormat::Nano,
        Some("iso8601") => TimeFormat::Iso8601,
        Some("rfc3339") => TimeFormat::Rfc3339,
        Some("rfc3339nano") => TimeFormat::Rfc3339Nano,
        _ => TimeFormat::Default,
    };
    (level.to_string(), format, time)
}

fn describe_timeout(t: Option<Duration>) -> String {
    t.map(|d| format!("{d:?}")).unwrap_or_else(|| "none".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(double_dash(std::env::args_os().collect()));
    if let Some(Cmd::Service(cmd)) = cli.cmd {
        return daemon_svc::execute::<Cli>(&daemon_svc::CLIENTMOUNTD, cmd);
    }
    let env = |k: &str| std::env::var(k).ok();
    let timeout = match command_timeout(
        cli.command_timeout,
        env("NNF_COMMAND_TIMEOUT_SECONDS").as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("clientmountd: {e}");
            return ExitCode::from(1);
        }
    };
    let metrics_addr =
        match daemon_common::metrics_http::parse_bind_address(&cli.metrics_bind_address) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("clientmountd: --metrics-bind-address: {e}");
                return ExitCode::from(1);
            }
        };
    let mapper = mapper_wait(env("NNF_MAPPER_WAIT_TIMEOUT").as_deref());
    // Before any thread exists, so every thread inherits the mask and the
    // signals are only ever taken by the daemon's sigwait thread.
    signals::block_signals();
    limit_malloc_arenas();
    let (level, format, time) = log_settings(&cli);
    init_logging(&level, format, time);

    let conn = kube_connect::Connection {
        host: cli.kubernetes_service_host,
        port: cli.kubernetes_service_port,
        token_file: cli.service_token_file,
        cert_file: cli.service_cert_file,
        kubeconfig: cli.kubeconfig,
        qps: None,
        burst: None,
    };
    if cli.spec_dir.is_some() && conn.given() {
        tracing::info!("--spec-dir given: Kubernetes settings are ignored");
    }
    if cli.spec_dir.is_none() {
        // Startup checks before anything runs: a broken installation fails
        // here, with the flag to fix, rather than with 401s later.
        if let Err(e) = conn.check() {
            eprintln!("clientmountd: {e}");
            return ExitCode::from(1);
        }
    }
    let node = kube_connect::node_name(cli.node_name);
    if node.is_empty() && cli.spec_dir.is_none() {
        // An empty namespace would mean a watch over every namespace.
        eprintln!("clientmountd: cannot determine the node name: give --node-name or NODE_NAME");
        return ExitCode::from(1);
    }
    let cfg = Arc::new(mount::Config {
        command_timeout: timeout,
        device_wait: cli
            .device_wait
            .or(mapper)
            .unwrap_or(Duration::from_secs(10)),
        vg_wait: mapper.unwrap_or(Duration::from_secs(1)),
        nvme_dir: cli.nvme_dir,
        mock: cli.mock.unwrap_or(false),
        device_dir: cli.device_dir,
        shutdown: AtomicBool::new(false),
        metrics: Arc::new(metrics::Metrics::default()),
    });
    tracing::debug!(
        device_dir = %cfg.device_dir.display(),
        device_wait = ?cfg.device_wait,
        vg_wait = ?cfg.vg_wait,
        nvme_dir = %cfg.nvme_dir.display(),
        level = %level,
        "configuration"
    );
    if cfg.mock {
        tracing::warn!(
            "--mock: ClientMounts are reported ready; nothing is mounted and no command runs"
        );
    }
    tracing::info!(
        node = %node,
        version = env!("CARGO_PKG_VERSION"),
        command_timeout = %describe_timeout(cfg.command_timeout),
        mode = if cli.spec_dir.is_some() { "spec-dir" } else { "Kubernetes" },
        "clientmountd starting"
    );
    let result = match cli.spec_dir {
        Some(spec_dir) => specdir::run(spec_dir, cfg, node, metrics_addr),
        None => kubemode::run(conn, cfg, node, metrics_addr),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = daemon_common::error::Causes(&e);
            tracing::error!(error = %e, "clientmountd failed");
            eprintln!("clientmountd: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn timeout_precedence() {
        let s = Duration::from_secs;
        assert_eq!(command_timeout(None, None), Ok(None));
        assert_eq!(command_timeout(None, Some("30")), Ok(Some(s(30))));
        assert_eq!(command_timeout(None, Some("0")), Ok(None));
        assert_eq!(command_timeout(Some(s(5)), Some("30")), Ok(Some(s(5))));
        assert_eq!(command_timeout(Some(Duration::ZERO), Some("30")), Ok(None));
        assert!(command_timeout(None, Some("1m")).is_err());
        assert_eq!(mapper_wait(Some("3")), Some(s(3)));
        assert_eq!(mapper_wait(Some("0")), None);
        assert_eq!(mapper_wait(Some("x")), None);
        assert_eq!(mapper_wait(None), None);
        assert_eq!(parse_timeout("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn upstream_flags() {
        let parse = |args: &[&str]| {
            let mut v = vec!["clientmountd".into()];
            v.extend(args.iter().map(std::ffi::OsString::from));
            Cli::try_parse_from(double_dash(v))
        };
        let cli = parse(&["-mock", "--zap-devel", "-zap-log-level=error"]).unwrap();
        assert_eq!(cli.mock, Some(true));
        assert_eq!(log_settings(&cli).0, "error");
        let cli = parse(&["--mock=false", "--zap-devel=false"]).unwrap();
        assert_eq!(cli.mock, Some(false));
        assert!(matches!(log_settings(&cli), (l, LogFormat::Json, _) if l == "info"));
        let cli = parse(&["--zap-devel", "--zap-encoder", "console"]).unwrap();
        assert!(matches!(log_settings(&cli), (l, LogFormat::Text, _) if l == "debug"));
        let cli = parse(&[
            "--zap-log-level",
            "3",
            "--zap-encoder=json",
            "--log-format",
            "text",
        ])
        .unwrap();
        assert!(matches!(log_settings(&cli), (l, LogFormat::Text, _) if l == "trace"));
        assert!(parse(&["--zap-log-level", "loud"]).is_err());
        assert!(parse(&["--zap-encoder", "xml"]).is_err());
        assert!(parse(&["--zap-nope"]).is_err());
        assert!(parse(&["--mock=maybe"]).is_err());
        assert!(parse(&[
            "--zap-stacktrace-level",
            "panic",
            "--zap-time-encoding",
            "epoch"
        ])
        .is_ok());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
