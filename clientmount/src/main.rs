//! `clientmountd`: mounts and unmounts the Rabbit file systems described by
//! ClientMount resources on a compute node and reports their status.
//!
//! Two drivers on one reconcile core: Kubernetes (the default; ClientMounts
//! watched in namespaces `<node>` and `default`) and the embedded
//! `--spec-dir DIR` mode (JSON files, no API server).

mod exec;
mod inotify;
mod kubemode;
mod mount;
mod mountinfo;
mod plan;
mod reconcile;
mod specdir;
mod vars;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

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

    /// Timeout of each external command (e.g. `30s`, `1m`, `1m30s`).
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    command_timeout: Duration,

    /// How long to wait for an activated block device to appear.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    device_wait: Duration,

    /// Directory where activated logical volumes appear as `<vg>-<lv>`
    /// (hyphens in names doubled). Only tests and unusual setups change it.
    #[arg(long, default_value = "/dev/mapper", value_name = "DIR")]
    device_dir: PathBuf,

    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,

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
}

/// `30s`, `1m`, `1m30s`, `500ms`, `2h`; a bare number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?} (use e.g. 30s, 1m, 1m30s)"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|e| format!("{text:?}: {e}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            other => {
                return Err(format!(
                    "invalid unit {other:?} in duration {text:?} (use ms, s, m, h)"
                ))
            }
        };
        total += unit;
        rest = &rest[unit_len..];
    }
    if total.is_zero() {
        return Err("duration must be positive".into());
    }
    Ok(total)
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Service(cmd)) = cli.cmd {
        return daemon_svc::execute::<Cli>(&daemon_svc::CLIENTMOUNTD, cmd);
    }
    // Before any thread exists, so every thread inherits the mask and the
    // signals are only ever taken by the daemon's sigwait thread.
    specdir::block_signals();
    limit_malloc_arenas();
    init_logging(cli.log_format);

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
        command_timeout: cli.command_timeout,
        device_wait: cli.device_wait,
        device_dir: cli.device_dir,
        shutdown: AtomicBool::new(false),
    });
    let result = match cli.spec_dir {
        Some(spec_dir) => {
            tracing::info!(
                node = %node,
                version = env!("CARGO_PKG_VERSION"),
                command_timeout = ?cfg.command_timeout,
                "clientmountd starting in spec-dir mode"
            );
            specdir::run(spec_dir, cfg, node)
        }
        None => {
            tracing::info!(
                node = %node,
                version = env!("CARGO_PKG_VERSION"),
                command_timeout = ?cfg.command_timeout,
                "clientmountd starting in Kubernetes mode"
            );
            kubemode::run(conn, cfg, node)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
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
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
