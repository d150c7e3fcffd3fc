//! Every flag and subcommand of `nnf-dm`, in one place.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{cli, timefmt};

/// Parses the command line (exits with clap's message on bad flags).
pub fn parse() -> Cli {
    Cli::parse()
}

#[derive(Parser, Debug)]
#[command(
    name = "nnf-dm",
    version,
    about = "NNF data-movement agent: the /run/nnf-dm control filesystem"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Cmd>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub mount: cli::MountArg,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    #[command(flatten)]
    Service(daemon_svc::ServiceCommand),
    #[command(flatten)]
    User(cli::UserCommand),
    /// Copy SOURCE to TARGET as the calling user (run by the agent, not by hand).
    #[command(hide = true)]
    CopyWorker {
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// An inherited descriptor of the operation's resume journal.
        #[arg(long)]
        journal_fd: Option<i32>,
        source: PathBuf,
        target: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    Local,
    Kubernetes,
}

pub use daemon_common::logging::LogFormat;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Where to mount the control filesystem; '' serves the gRPC socket
    /// alone (a node without FUSE).
    #[arg(long, default_value = "/run/nnf-dm", value_parser = path_or_empty)]
    pub mountpoint: PathBuf,
    /// Which backend executes copies [default: local unless a Kubernetes setting is given].
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Complete every request at once without copying or a cluster, on the
    /// same control files and socket (as upstream's `--simulated`).
    #[arg(long, conflicts_with = "backend")]
    pub simulated: bool,
    /// Where the local backend keeps one record per operation.
    #[arg(long, default_value = "/var/lib/nnf-dm")]
    pub state_dir: PathBuf,
    /// How long completed operations are kept (local backend): 90s, 15m, 24h, 7d.
    #[arg(long, default_value = "24h", value_parser = timefmt::parse_duration)]
    pub retention: Duration,
    /// JSON array of data-movement profiles added to the built-in `default`.
    #[arg(long)]
    pub profiles: Option<PathBuf>,
    /// Operations one user may have at once, whatever their state.
    #[arg(long, default_value_t = 1024)]
    pub max_ops_per_user: usize,
    /// Copies running at once; more wait as `pending`.
    #[arg(long, default_value_t = 4)]
    pub max_active: usize,
    /// How long the checks of a request that touch a file system (group
    /// lookup, source and destination as the user, the record) may take
    /// before the write fails with ETIMEDOUT: 90s, 15m, 10s.
    #[arg(long, default_value = "10s", value_parser = timefmt::parse_duration)]
    pub request_timeout: Duration,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Unix socket of the upstream gRPC DataMover API; '' disables it.
    #[arg(long, default_value = "/var/run/nnf-dm.sock", value_parser = path_or_empty)]
    pub socket: PathBuf,
    /// Serve the `metrics` file's aggregates on HTTP /metrics: `:8080`
    /// (every interface), `HOST:PORT`, or `0` (off).
    #[arg(long, default_value = "0", value_parser = metrics_bind)]
    pub metrics_bind_address: MetricsBind,

    #[command(flatten)]
    pub kube: KubeArgs,
}

/// Settings of the Kubernetes backend (upstream's flags).
#[derive(Args, Debug)]
pub struct KubeArgs {
    /// Kubernetes API server host (with the port, selects https://HOST:PORT).
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    pub kubernetes_service_host: Option<String>,
    /// Kubernetes API server port.
    #[arg(long, env = "KUBERNETES_SERVICE_PORT")]
    pub kubernetes_service_port: Option<String>,
    /// File holding the service account's bearer token (surrounding
    /// whitespace is trimmed; read again when it changes).
    #[arg(long, env = "NNF_DATA_MOVEMENT_SERVICE_TOKEN_FILE")]
    pub service_token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the API server's certificate.
    #[arg(long, env = "NNF_DATA_MOVEMENT_SERVICE_CERT_FILE")]
    pub service_cert_file: Option<PathBuf>,
    /// This compute node's name [default: the host name up to the first dot].
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The Rabbit serving this node [default: looked up in the SystemConfiguration].
    #[arg(long, env = "NNF_NODE_NAME")]
    pub nnf_node_name: Option<String>,
    /// SystemConfiguration to look the Rabbit up in [default: default].
    #[arg(long)]
    pub sys_config: Option<String>,
    /// Client-side limit on API requests per second, for each resource kind
    /// on its own (as upstream's controller-runtime client) [default: 50].
    #[arg(long)]
    pub kubernetes_qps: Option<f64>,
    /// Client-side burst of API requests above the rate, for each resource
    /// kind on its own [default: 100].
    #[arg(long)]
    pub kubernetes_burst: Option<u32>,
    /// kubeconfig to use when no host/port is given (else in-cluster config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// How long a request may wait for the Kubernetes API server before it
    /// fails with EAGAIN [default: 10s].
    #[arg(long, value_parser = timefmt::parse_duration)]
    pub kubernetes_timeout: Option<Duration>,
}

impl KubeArgs {
    /// The Kubernetes settings that were given, by flag name.
    pub fn given(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        let mut note = |set: bool, flag: &'static str| {
            if set {
                given.push(flag);
            }
        };
        note(
            self.kubernetes_service_host.is_some(),
            "--kubernetes-service-host",
        );
        note(
            self.kubernetes_service_port.is_some(),
            "--kubernetes-service-port",
        );
        note(self.service_token_file.is_some(), "--service-token-file");
        note(self.service_cert_file.is_some(), "--service-cert-file");
        note(self.nnf_node_name.is_some(), "--nnf-node-name");
        note(self.sys_config.is_some(), "--sys-config");
        note(self.kubernetes_qps.is_some(), "--kubernetes-qps");
        note(self.kubernetes_burst.is_some(), "--kubernetes-burst");
        note(self.kubeconfig.is_some(), "--kubeconfig");
        note(self.kubernetes_timeout.is_some(), "--kubernetes-timeout");
        given
    }
}

/// A parsed `--metrics-bind-address`: `None` is off.
#[derive(Clone, Copy, Debug)]
pub struct MetricsBind(pub Option<std::net::SocketAddr>);

fn metrics_bind(value: &str) -> Result<MetricsBind, String> {
    daemon_common::metrics_http::parse_bind_address(value)
        .map(MetricsBind)
        .map_err(|e| e.to_string())
}

/// Like clap's path parser, but lets `''` through (it means "disabled").
fn path_or_empty(value: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(value))
}
