//! What both drivers' `run` share around their `Controller`s: the runtime,
//! the metrics endpoint, the stop on SIGTERM/SIGINT, and the errors that
//! end the daemon.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tracing::info;

use crate::mount::Config;

/// Why the daemon could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Metrics(#[from] daemon_common::metrics_http::BindError),
    #[error(transparent)]
    Connect(#[from] kube_connect::ConnectError),
    #[error("--spec-dir {}", .path.display())]
    SpecDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--spec-dir {}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot watch {}", .path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spec directory {} was removed", .0.display())]
    SpecDirRemoved(PathBuf),
}

/// Runs `driver` on a current-thread runtime with the metrics endpoint
/// bound first (a busy port is a start-up error naming the address) and a
/// [`Stop`] that SIGTERM/SIGINT trigger; returns once `driver` has.
pub fn run<F, Fut>(
    cfg: &Arc<Config>,
    metrics_addr: Option<SocketAddr>,
    driver: F,
) -> Result<(), Error>
where
    F: FnOnce(Arc<Stop>) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    rt.block_on(async move {
        crate::metrics::serve(metrics_addr, cfg.metrics.clone()).await?;
        let stop = Arc::new(Stop::default());
        {
            let (stop, cfg) = (stop.clone(), cfg.clone());
            crate::signals::spawn_sigwait_thread(move || {
                stop.stop(&cfg);
                true
            });
        }
        let result = driver(stop).await;
        info!("stopped");
        result
    })
}

/// Graceful shutdown of every `Controller` of the daemon at once.
pub struct Stop {
    /// `None` once stopped.
    senders: Mutex<Option<Vec<futures::channel::oneshot::Sender<()>>>>,
}

impl Default for Stop {
    fn default() -> Self {
        Stop {
            senders: Mutex::new(Some(Vec::new())),
        }
    }
}

impl Stop {
    /// For `Controller::graceful_shutdown_on`.
    pub fn signalled(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        use futures::FutureExt;
        let (tx, rx) = futures::channel::oneshot::channel();
        match self
            .senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(senders) => senders.push(tx),
            None => drop(tx),
        }
        // A dropped sender (stopped already) ends the wait too.
        rx.map(|_| ())
    }

    /// Commands in flight finish, no other starts, the controllers end
    /// once their running reconciles did.
    pub fn stop(&self, cfg: &Config) {
        cfg.shutdown.store(true, Ordering::SeqCst);
        let senders = self
            .senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for tx in senders.into_iter().flatten() {
            let _ = tx.send(());
        }
    }
}
