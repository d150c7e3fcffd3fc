//! `nnf-dm`: the NNF data-movement agent.

mod agent;
mod cli;
mod environ;
mod grpc;
mod kube;
mod local;
mod op;
mod profiles;
mod request;
mod shellword;
mod store;
mod sys;
mod timefmt;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::agent::{Agent, AgentConfig};
use crate::local::{LocalBackend, LocalConfig};
use crate::profiles::Profiles;
use crate::store::Store;

#[derive(Parser, Debug)]
#[command(
    name = "nnf-dm",
    version,
    about = "NNF data-movement agent: the /run/nnf-dm control filesystem"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    mount: cli::MountArg,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    #[command(flatten)]
    Service(daemon_svc::ServiceCommand),
    #[command(flatten)]
    User(cli::UserCommand),
    /// Copy SOURCE to TARGET as the calling user (run by the agent, not by hand).
    #[command(hide = true)]
    CopyWorker {
        #[arg(long, default_value_t = 0)]
        workers: usize,
        source: PathBuf,
        target: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    Local,
    Kubernetes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Where to mount the control filesystem.
    #[arg(long, default_value = "/run/nnf-dm")]
    mountpoint: PathBuf,
    /// Which backend executes copies [default: local unless a Kubernetes setting is given].
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    /// Where the local backend keeps one record per operation.
    #[arg(long, default_value = "/var/lib/nnf-dm")]
    state_dir: PathBuf,
    /// How long completed operations are kept (local backend): 90s, 15m, 24h, 7d.
    #[arg(long, default_value = "24h", value_parser = timefmt::parse_duration)]
    retention: Duration,
    /// JSON array of data-movement profiles added to the built-in `default`.
    #[arg(long)]
    profiles: Option<PathBuf>,
    /// Operations one user may have at once, whatever their state.
    #[arg(long, default_value_t = 1024)]
    max_ops_per_user: usize,
    /// Copies running at once; more wait as `pending`.
    #[arg(long, default_value_t = 4)]
    max_active: usize,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Unix socket of the upstream gRPC DataMover API; '' disables it.
    #[arg(long, default_value = "/var/run/nnf-dm.sock", value_parser = path_or_empty)]
    socket: PathBuf,

    #[command(flatten)]
    kube: KubeArgs,
}

/// Settings of the Kubernetes backend (upstream's flags).
#[derive(Args, Debug)]
struct KubeArgs {
    /// Kubernetes API server host (with the port, selects https://HOST:PORT).
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    kubernetes_service_host: Option<String>,
    /// Kubernetes API server port.
    #[arg(long, env = "KUBERNETES_SERVICE_PORT")]
    kubernetes_service_port: Option<String>,
    /// File holding the service account's bearer token (no trailing newline).
    #[arg(long, env = "NNF_DATA_MOVEMENT_SERVICE_TOKEN_FILE")]
    service_token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the API server's certificate.
    #[arg(long, env = "NNF_DATA_MOVEMENT_SERVICE_CERT_FILE")]
    service_cert_file: Option<PathBuf>,
    /// This compute node's name [default: the host name up to the first dot].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The Rabbit serving this node [default: looked up in the SystemConfiguration].
    #[arg(long, env = "NNF_NODE_NAME")]
    nnf_node_name: Option<String>,
    /// SystemConfiguration to look the Rabbit up in [default: default].
    #[arg(long)]
    sys_config: Option<String>,
    /// Client-side limit on API requests per second [default: 50].
    #[arg(long)]
    kubernetes_qps: Option<f64>,
    /// Client-side burst of API requests above the rate [default: 100].
    #[arg(long)]
    kubernetes_burst: Option<u32>,
    /// kubeconfig to use when no host/port is given (else in-cluster config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// How long a request may wait for the Kubernetes API server before it
    /// fails with EAGAIN [default: 10s].
    #[arg(long, value_parser = timefmt::parse_duration)]
    kubernetes_timeout: Option<Duration>,
}

impl KubeArgs {
    /// The Kubernetes settings that were given, by flag name.
    fn given(&self) -> Vec<&'static str> {
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

/// Like clap's path parser, but lets `''` through (it means "disabled").
fn path_or_empty(value: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(value))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Service(cmd)) => daemon_svc::execute::<Cli>(&daemon_svc::NNF_DM, cmd),
        Some(Cmd::User(cmd)) => cli::run(&cli.mount, cmd),
        Some(Cmd::CopyWorker {
            workers,
            source,
            target,
        }) => {
            let code =
                copy_engine::run_worker(&source, &target, workers, Duration::from_millis(250));
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        None => {
            init_logging(cli.run.log_format);
            match run(cli.run) {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    tracing::error!("{message}");
                    eprintln!("nnf-dm: {message}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("NNF_DM_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(args: RunArgs) -> Result<(), String> {
    let kube_given = args.kube.given();
    let backend = args.backend.unwrap_or(if kube_given.is_empty() {
        BackendKind::Local
    } else {
        BackendKind::Kubernetes
    });
    if backend == BackendKind::Kubernetes {
        return run_kube(args);
    }
    if let Some(flag) = kube_given.first() {
        return Err(format!("{flag} is not supported by the local backend"));
    }
    let profiles = match &args.profiles {
        Some(path) => Profiles::load(path)?,
        None => Profiles::builtin(),
    };
    let store = Store::open(&args.state_dir).map_err(|e| {
        format!(
            "cannot use the state directory {}: {e}",
            args.state_dir.display()
        )
    })?;

    // Signals are taken synchronously below; block them before any thread
    // starts so that every thread inherits the mask.
    let signals = sys_signals::block(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);

    let agent = Agent::new(AgentConfig {
        max_ops_per_user: args.max_ops_per_user,
        retention: args.retention,
    });
    let backend = LocalBackend::new(
        LocalConfig {
            max_active: args.max_active,
            profiles,
            store,
        },
        agent.notify(),
    );
    agent.install(backend.clone() as Arc<dyn agent::Backend>);
    prepare_mountpoint(&args)?;
    let restored = backend.recover(&agent).map_err(|e| {
        format!(
            "cannot read the state directory {}: {e}",
            args.state_dir.display()
        )
    })?;

    serve(&agent, &args, "local", restored, signals, |agent| {
        let retention = args.retention;
        let expiring = Arc::downgrade(agent);
        std::thread::Builder::new()
            .name("retention".into())
            .spawn(move || {
                let period = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
                loop {
                    std::thread::sleep(period);
                    match expiring.upgrade() {
                        Some(agent) => agent.expire(),
                        None => return,
                    }
                }
            })
            .map(drop)
            .map_err(|e| format!("cannot start the retention thread: {e}"))
    })
}

/// The Kubernetes backend: connect (startup checks, exit 1 on failure), list
/// what this node created, then serve the same doors as the local backend.
fn run_kube(args: RunArgs) -> Result<(), String> {
    if args.profiles.is_some() {
        return Err("--profiles is not supported by the kubernetes backend (its profiles are the NnfDataMovementProfiles in nnf-system)".into());
    }
    let k = &args.kube;
    let settings = kube::KubeSettings {
        connection: kube_connect::Connection {
            host: k.kubernetes_service_host.clone(),
            port: k.kubernetes_service_port.clone(),
            token_file: k.service_token_file.clone(),
            cert_file: k.service_cert_file.clone(),
            kubeconfig: k.kubeconfig.clone(),
            qps: Some(k.kubernetes_qps.unwrap_or(50.0)),
            burst: Some(k.kubernetes_burst.unwrap_or(100)),
        },
        node: kube_connect::node_name(k.node_name.clone()),
        rabbit: k.nnf_node_name.clone(),
        sys_config: k.sys_config.clone().unwrap_or_else(|| "default".into()),
        timeout: k.kubernetes_timeout.unwrap_or(Duration::from_secs(10)),
    };
    // Block the signals before the backend's runtime starts its threads.
    let signals = sys_signals::block(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    let agent = Agent::new(AgentConfig {
        max_ops_per_user: args.max_ops_per_user,
        retention: args.retention,
    });
    let backend = kube::KubeBackend::connect(settings, agent.notify())?;
    agent.install(backend.clone() as Arc<dyn agent::Backend>);
    prepare_mountpoint(&args)?;
    backend.start(&agent);
    let restored = agent.list(0).len();
    serve(&agent, &args, "kubernetes", restored, signals, |_| Ok(()))
}

fn prepare_mountpoint(args: &RunArgs) -> Result<(), String> {
    if fuse_ctl::clean_stale_mount(&args.mountpoint).map_err(|e| {
        format!(
            "cannot clean the stale mount at {}: {e}",
            args.mountpoint.display()
        )
    })? {
        tracing::warn!(mountpoint = %args.mountpoint.display(), "cleaned a stale mount left by a previous agent");
    }
    std::fs::create_dir_all(&args.mountpoint).map_err(|e| {
        format!(
            "cannot create the mount point {}: {e}",
            args.mountpoint.display()
        )
    })
}

/// Opens both doors, runs `extra`, and serves until a signal.
fn serve(
    agent: &Arc<Agent>,
    args: &RunArgs,
    backend: &str,
    restored: usize,
    signals: libc::sigset_t,
    extra: impl FnOnce(&Arc<Agent>) -> Result<(), String>,
) -> Result<(), String> {
    // Both doors open before either is announced: the socket first, so a
    // client that saw the mount can also connect.
    let _grpc = if args.socket.as_os_str().is_empty() {
        None
    } else {
        Some(grpc::start(agent.clone(), &args.socket)?)
    };

    let mounted = agent.fs().mount(&args.mountpoint, "nnf-dm").map_err(|e| {
        format!(
            "cannot mount the control filesystem at {}: {e}",
            args.mountpoint.display()
        )
    })?;
    tracing::info!(mountpoint = %args.mountpoint.display(), backend, restored, "nnf-dm serving");

    extra(agent)?;

    let signal = sys_signals::wait(&signals);
    tracing::info!(signal, "unmounting and exiting");
    mounted
        .unmount()
        .map_err(|e| format!("cannot unmount {}: {e}", args.mountpoint.display()))?;
    Ok(())
}

mod sys_signals {
    /// Blocks `signals` in the calling thread (and every thread it starts).
    pub fn block(signals: &[libc::c_int]) -> libc::sigset_t {
        // SAFETY: sigset manipulation on a local, zero-initialised set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in signals {
                libc::sigaddset(&mut set, *s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        }
    }

    /// Waits for one of the blocked signals.
    pub fn wait(set: &libc::sigset_t) -> libc::c_int {
        let mut signal = 0;
        // SAFETY: `set` was initialised by `block`.
        unsafe { libc::sigwait(set, &mut signal) };
        signal
    }
}
