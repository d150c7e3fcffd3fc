//! The agent's life: start-up, serving both doors, signals, shutdown.
//!
//! Signals: SIGTERM and SIGINT are blocked before any thread starts and
//! taken with `sigwait` once both doors are open, so a signal at any moment
//! of start-up (recovery, connecting, mounting) ends in the same clean
//! unmount and exit, only later. SIGHUP is ignored (logged): the log is
//! stderr, there is nothing to reopen, and a terminal hang-up must not take
//! the agent down. A panic anywhere logs one line and aborts the process, so
//! that systemd restarts it and recovery runs, instead of a dispatch thread
//! or a copy slot silently disappearing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use daemon_common::logging::{Logging, TimeFormat};
use daemon_common::signals::{self, Blocked, Signal};

use crate::agent::{self, Agent, AgentConfig, Notify};
use crate::flags::{BackendKind, LogFormat, RunArgs};
use crate::kube;
use crate::local::{LocalBackend, LocalConfig};
use crate::profiles::Profiles;
use crate::store::Store;

/// Why the agent could not start or stopped: what it was doing, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct Error {
    what: String,
    #[source]
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    fn with(
        what: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            what: what.into(),
            cause: Some(Box::new(cause)),
        }
    }
}

impl From<String> for Error {
    fn from(what: String) -> Self {
        Error { what, cause: None }
    }
}

impl From<&str> for Error {
    fn from(what: &str) -> Self {
        what.to_string().into()
    }
}

const SIGNALS: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: RunArgs) -> Result<(), Error> {
    // First of all: every thread started from here on inherits the mask.
    let signals = signals::block(&SIGNALS);
    init_logging(args.log_format);
    install_panic_abort();
    let kube_given = args.kube.given();
    let backend = args.backend.unwrap_or(if kube_given.is_empty() {
        BackendKind::Local
    } else {
        BackendKind::Kubernetes
    });
    if backend == BackendKind::Local {
        if let Some(flag) = kube_given.first() {
            return Err(format!("{flag} is not supported by the local backend").into());
        }
    }
    if backend == BackendKind::Kubernetes && args.profiles.is_some() {
        return Err("--profiles is not supported by the kubernetes backend (its profiles are the NnfDataMovementProfiles in nnf-system)".into());
    }
    // The core's workers: every request is checked on its blocking pool,
    // never on a door's thread. The pool bounds the threads that may wait
    // on hung file systems; per-user caps keep one user from filling it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(512)
        .thread_name("core")
        .enable_time()
        .build()
        .map_err(|e| Error::with("cannot start the request workers", e))?;
    let config = AgentConfig {
        max_ops_per_user: args.max_ops_per_user,
        retention: args.retention,
        request_timeout: args.request_timeout,
    };
    let core = Core {
        config,
        rt: rt.handle().clone(),
        notify: Notify::new(),
    };
    let served = match backend {
        BackendKind::Local => run_local(core, &args, &signals),
        BackendKind::Kubernetes => run_kube(core, &args, &signals),
    };
    // Checks still stuck on a hung file system must not hold the exit.
    rt.shutdown_background();
    served
}

/// What the core is made of, before its backend exists.
struct Core {
    config: AgentConfig,
    rt: tokio::runtime::Handle,
    notify: Notify,
}

impl Core {
    fn with(self, backend: Arc<dyn agent::Backend>) -> Arc<Agent> {
        Agent::new(self.config, self.rt, self.notify, backend)
    }
}

fn run_local(core: Core, args: &RunArgs, signals: &Blocked) -> Result<(), Error> {
    let profiles = match &args.profiles {
        Some(path) => Profiles::load(path)?,
        None => Profiles::builtin(),
    };
    let store = Store::open(&args.state_dir).map_err(|e| {
        Error::with(
            format!(
                "cannot use the state directory {}",
                args.state_dir.display()
            ),
            e,
        )
    })?;
    let backend = LocalBackend::new(
        LocalConfig {
            max_active: args.max_active,
            profiles,
            store,
        },
        core.notify.clone(),
    );
    let agent = &core.with(backend.clone());
    prepare_mountpoint(&args.mountpoint)?;
    let restored = backend.recover(agent).map_err(|e| {
        Error::with(
            format!(
                "cannot read the state directory {}",
                args.state_dir.display()
            ),
            e,
        )
    })?;

    serve(agent, args, "local", restored, signals, |agent| {
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
            .map_err(|e| Error::with("cannot start the retention thread", e))
    })
}

/// The Kubernetes backend: connect (startup checks, exit 1 on failure), list
/// what this node created, then serve the same doors as the local backend.
fn run_kube(core: Core, args: &RunArgs, signals: &Blocked) -> Result<(), Error> {
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
    let backend = kube::KubeBackend::connect(settings, core.notify.clone())?;
    let agent = &core.with(backend.clone());
    prepare_mountpoint(&args.mountpoint)?;
    backend.start(agent);
    let restored = agent.list(0).len();
    serve(agent, args, "kubernetes", restored, signals, |_| Ok(()))
}

fn init_logging(format: LogFormat) {
    Logging {
        filter_env: "NNF_DM_LOG",
        default_filter: "info",
        format,
        time: TimeFormat::Default,
        target: true,
    }
    .init();
}

/// A panic on any thread takes the agent down (after one log line), so that
/// nothing half-dead keeps the mount: systemd restarts it and recovery runs.
fn install_panic_abort() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            "panic: {info}; aborting so that the service restarts and recovers"
        );
        std::process::abort();
    }));
}

fn prepare_mountpoint(mountpoint: &Path) -> Result<(), Error> {
    if fuse_ctl::clean_stale_mount(mountpoint).map_err(|e| {
        Error::with(
            format!("cannot clean the stale mount at {}", mountpoint.display()),
            e,
        )
    })? {
        tracing::warn!(mountpoint = %mountpoint.display(), "cleaned a stale mount left by a previous agent");
    }
    std::fs::create_dir_all(mountpoint).map_err(|e| {
        Error::with(
            format!("cannot create the mount point {}", mountpoint.display()),
            e,
        )
    })
}

/// Opens both doors, runs `extra`, and serves until SIGTERM or SIGINT.
fn serve(
    agent: &Arc<Agent>,
    args: &RunArgs,
    backend: &str,
    restored: usize,
    signals: &Blocked,
    extra: impl FnOnce(&Arc<Agent>) -> Result<(), Error>,
) -> Result<(), Error> {
    // Both doors open before either is announced: the socket first, so a
    // client that saw the mount can also connect.
    let _grpc = if args.socket.as_os_str().is_empty() {
        None
    } else {
        Some(crate::grpc::start(agent.clone(), &args.socket, backend)?)
    };

    let mounted = agent.fs().mount(&args.mountpoint, "nnf-dm").map_err(|e| {
        Error::with(
            format!(
                "cannot mount the control filesystem at {}",
                args.mountpoint.display()
            ),
            e,
        )
    })?;
    tracing::info!(mountpoint = %args.mountpoint.display(), backend, restored, "nnf-dm serving");

    // Unmounted whatever `extra` says.
    let extra = extra(agent);
    if extra.is_ok() {
        loop {
            let taken = signals.wait();
            let signal = taken as libc::c_int;
            if taken == Signal::SIGHUP {
                tracing::info!(
                    signal,
                    "SIGHUP ignored (the log is stderr: nothing to reopen)"
                );
                continue;
            }
            tracing::info!(signal, "unmounting and exiting");
            break;
        }
    }
    mounted
        .unmount()
        .map_err(|e| Error::with(format!("cannot unmount {}", args.mountpoint.display()), e))?;
    extra
}
