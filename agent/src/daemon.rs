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

use crate::agent::{self, Agent, AgentConfig, Events, Notify};
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
    if args.mountpoint.as_os_str().is_empty() && args.socket.as_os_str().is_empty() {
        return Err("--mountpoint '' and --socket '' leave no way in: give one of them".into());
    }
    let kube_given = args.kube.given();
    if args.simulated {
        return run_simulated(core_parts(&args)?, &args, &signals);
    }
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
    let core = core_parts(&args)?;
    match backend {
        BackendKind::Local => run_local(core, &args, &signals),
        BackendKind::Kubernetes => run_kube(core, &args, &signals),
    }
}

fn core_parts(args: &RunArgs) -> Result<Core, Error> {
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
    Ok(Core {
        config,
        rt: Some(rt),
        events: Some(Events::new()),
    })
}

/// What the core is made of, before its backend exists.
struct Core {
    config: AgentConfig,
    rt: Option<tokio::runtime::Runtime>,
    /// Taken by `with`: the core's event channel, which its backend reports on.
    events: Option<Events>,
}

impl Drop for Core {
    fn drop(&mut self) {
        // Checks still stuck on a hung file system must not hold the exit.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Core {
    /// Where the backend reports progress: the core's event channel.
    fn notify(&self) -> Notify {
        self.events
            .as_ref()
            .expect("the backend is made before the agent")
            .notify()
    }

    fn with(&mut self, backend: Arc<dyn agent::Backend>) -> Arc<Agent> {
        let rt = self.rt.as_ref().expect("runtime lives as long as the core");
        let events = self.events.take().expect("one agent per core");
        let name = backend.name();
        crate::metrics::install(
            Agent::new(
                AgentConfig { ..self.config },
                rt.handle().clone(),
                events,
                backend,
            ),
            name,
        )
    }
}

/// `--simulated`: the same doors, every request completed at once.
fn run_simulated(mut core: Core, args: &RunArgs, signals: &Blocked) -> Result<(), Error> {
    if let Some(flag) = args.kube.given().first() {
        tracing::info!(flag, "simulated: Kubernetes settings are not used");
    }
    let backend = crate::simulated::SimulatedBackend::new(core.notify());
    let agent = &core.with(backend);
    prepare_mountpoint(&args.mountpoint)?;
    serve(agent, args, "simulated", 0, signals, |agent| {
        start_retention(agent, args.retention)
    })
}

/// Forgets completed operations older than `--retention`.
fn start_retention(agent: &Arc<Agent>, retention: Duration) -> Result<(), Error> {
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
}

fn run_local(mut core: Core, args: &RunArgs, signals: &Blocked) -> Result<(), Error> {
    let profiles = match &args.profiles {
        Some(path) => Profiles::load(path).map_err(|e| Error::with("cannot use --profiles", e))?,
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
        core.notify(),
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
        start_retention(agent, args.retention)
    })
}

/// The Kubernetes backend: connect (startup checks, exit 1 on failure), list
/// what this node created, then serve the same doors as the local backend.
fn run_kube(mut core: Core, args: &RunArgs, signals: &Blocked) -> Result<(), Error> {
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
    let backend = kube::KubeBackend::connect(settings, core.notify())
        .map_err(|e| Error::with("cannot start the Kubernetes backend", e))?;
    let agent = &core.with(backend.clone());
    prepare_mountpoint(&args.mountpoint)?;
    backend.start();
    // What the watches listed is visible before either door opens.
    agent.settle();
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
    if mountpoint.as_os_str().is_empty() {
        return Ok(());
    }
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
    })?;
    // Linux stacks mounts: mounting over a live one would hide it (another
    // agent's, or a file system an administrator put there) instead of
    // failing, so refuse here with the reason.
    if is_mount_point(mountpoint) {
        return Err(format!(
            "the mount point {} is busy: something is mounted there (another nnf-dm?)",
            mountpoint.display()
        )
        .into());
    }
    Ok(())
}

/// Whether `path` is the root of a mount (its device differs from its
/// parent's, or it is its own parent).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let parent = path.join("..");
    match std::fs::metadata(&parent) {
        Ok(up) => up.dev() != meta.dev() || up.ino() == meta.ino(),
        Err(_) => false,
    }
}

/// Why the control filesystem could not be mounted, in an administrator's
/// words: the usual causes are named, with the way out.
fn mount_failure(mountpoint: &Path, e: std::io::Error) -> Error {
    let at = mountpoint.display();
    let hint = if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse is missing: this node has no FUSE (load the fuse module, or run with --mountpoint '' to serve the gRPC socket alone)".to_string())
    } else if effective_uid() != 0 {
        Some(
            "not running as root: the agent mounts for every user and copies as each of them"
                .to_string(),
        )
    } else if e.raw_os_error() == Some(libc::EBUSY) {
        Some("the mount point is busy".to_string())
    } else {
        None
    };
    match hint {
        Some(hint) => Error::with(
            format!("cannot mount the control filesystem at {at}: {hint}"),
            e,
        ),
        None => Error::with(format!("cannot mount the control filesystem at {at}"), e),
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
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
        Some(
            crate::grpc::start(agent.clone(), &args.socket, backend)
                .map_err(|e| Error::with("cannot open the gRPC door", e))?,
        )
    };

    crate::metrics::serve_http(agent, args.metrics_bind_address.0)
        .map_err(|e| Error::with("--metrics-bind-address", e))?;
    let mounted = if args.mountpoint.as_os_str().is_empty() {
        tracing::info!(socket = %args.socket.display(), backend, restored, "nnf-dm serving the gRPC socket alone (--mountpoint '')");
        None
    } else {
        let mounted = agent
            .fs()
            .mount(&args.mountpoint, "nnf-dm")
            .map_err(|e| mount_failure(&args.mountpoint, e))?;
        tracing::info!(mountpoint = %args.mountpoint.display(), backend, restored, "nnf-dm serving");
        Some(mounted)
    };

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
    if let Some(mounted) = mounted {
        mounted
            .unmount()
            .map_err(|e| Error::with(format!("cannot unmount {}", args.mountpoint.display()), e))?;
    }
    extra
}
