//! `clientmountd`: mounts and unmounts the Rabbit file systems described by
//! ClientMount resources on a compute node and reports their status.
//!
//! This build runs the embedded `--spec-dir DIR` mode only; the Kubernetes
//! flags are accepted so that unit files written for the Kubernetes mode
//! fail with a clear message rather than a parse error.

mod exec;
mod inotify;
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

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    name.split('.').next().unwrap_or("").to_string()
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
    init_logging(cli.log_format);

    let Some(spec_dir) = cli.spec_dir else {
        let given = cli.kubernetes_service_host.is_some()
            || cli.kubernetes_service_port.is_some()
            || cli.service_token_file.is_some()
            || cli.service_cert_file.is_some()
            || cli.kubeconfig.is_some();
        let why = if given {
            "Kubernetes settings given"
        } else {
            "no --spec-dir given"
        };
        eprintln!(
            "clientmountd: {why}: Kubernetes mode not yet supported in this build; use --spec-dir DIR"
        );
        return ExitCode::from(1);
    };
    if cli.kubernetes_service_host.is_some() || cli.kubeconfig.is_some() {
        tracing::info!("--spec-dir given: Kubernetes settings are ignored");
    }
    let node = cli
        .node_name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(host_name);
    let cfg = Arc::new(mount::Config {
        command_timeout: cli.command_timeout,
        device_wait: cli.device_wait,
        device_dir: cli.device_dir,
        shutdown: AtomicBool::new(false),
    });
    tracing::info!(
        node = %node,
        version = env!("CARGO_PKG_VERSION"),
        command_timeout = ?cfg.command_timeout,
        "clientmountd starting in spec-dir mode"
    );
    match specdir::run(spec_dir, cfg, node) {
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
