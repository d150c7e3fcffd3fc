//! The upstream gRPC `datamovement.DataMover` door onto the same operations.
//!
//! One tokio runtime on its own threads serves the API on a Unix socket. The
//! caller's identity is the connection's peer credentials (`SO_PEERCRED`),
//! used exactly as the control filesystem uses the writer's: a request goes
//! through the same parser, limits and `errors` file, and a caller sees,
//! waits on, cancels and deletes only its own operations (root: all).
//! How states and statuses read over gRPC: `convert.rs`.

mod convert;
mod service;
mod waiters;

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dm_proto::data_mover_server::DataMoverServer;
use tokio::net::{UnixListener, UnixStream};

use crate::agent::Agent;
use crate::request::MAX_REQUEST_BYTES;

use service::Door;
use waiters::Waiters;

/// The socket's mode, as upstream: everyone may connect.
const SOCKET_MODE: u32 = 0o766;
/// Largest message accepted: a request is at most what one `write(2)` to the
/// control filesystem may carry (plus room for the protobuf framing).
const MAX_MESSAGE_BYTES: usize = MAX_REQUEST_BYTES + 1024;
/// How long shutdown waits for the runtime's threads.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Serves the gRPC API on a Unix socket until the returned handle is dropped.
pub struct GrpcServer {
    socket: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Why the gRPC door could not open; the agent does not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the gRPC runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the gRPC thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot use {} as the gRPC socket: it is a directory", .0.display())]
    Directory(PathBuf),
    #[error("another server is listening on {}: stop it or pass another --socket", .0.display())]
    Busy(PathBuf),
    #[error("{doing} {}", path.display())]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    fn io(doing: &'static str, path: &Path, source: std::io::Error) -> StartError {
        StartError::Io {
            doing,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Binds `socket` (removing a stale one), then serves on a background thread.
pub fn start(agent: Arc<Agent>, socket: &Path, backend: &str) -> Result<GrpcServer, StartError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .thread_name("grpc")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let std_listener = bind(socket)?;
    let listener = {
        let _entered = runtime.enter();
        UnixListener::from_std(std_listener)
            .map_err(|e| StartError::io("cannot listen on", socket, e))?
    };
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let waiters = Arc::new(Waiters::default());
    {
        let _entered = runtime.enter();
        waiters.follow(&agent);
    }
    let service = DataMoverServer::new(Door {
        agent,
        kubernetes: backend == "kubernetes",
        waiters,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(4 * 1024 * 1024);
    let shown = socket.display().to_string();
    let thread = std::thread::Builder::new()
        .name("grpc-server".into())
        .spawn(move || {
            let served = runtime.block_on(async move {
                let serve = tonic::transport::Server::builder()
                    .serve_with_incoming(service, Incoming::new(listener));
                tokio::select! {
                    result = serve => result,
                    _ = shutdown_rx => Ok(()),
                }
            });
            if let Err(e) = served {
                tracing::error!(
                    socket = %shown,
                    error = %daemon_common::error::Causes(&e),
                    "the gRPC server stopped"
                );
            }
            // Handlers still waiting (Status with maxWaitTime < 0) end here.
            runtime.shutdown_timeout(SHUTDOWN_GRACE);
        })
        .map_err(StartError::Thread)?;
    tracing::info!(socket = %socket.display(), "gRPC DataMover serving");
    Ok(GrpcServer {
        socket: socket.to_path_buf(),
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    })
}

/// Removes what a previous agent left at `socket`, binds it and opens it to
/// all (mode 0766, set after bind whatever the umask).
fn bind(socket: &Path) -> Result<std::os::unix::net::UnixListener, StartError> {
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if meta.is_dir() {
            return Err(StartError::Directory(socket.to_path_buf()));
        }
        if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(StartError::Busy(socket.to_path_buf()));
        }
        std::fs::remove_file(socket)
            .map_err(|e| StartError::io("cannot remove the stale", socket, e))?;
        tracing::warn!(socket = %socket.display(), "removed a stale gRPC socket");
    }
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .map_err(|e| StartError::io("cannot bind the gRPC socket", socket, e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| StartError::io("cannot chmod", socket, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| StartError::io("cannot listen on", socket, e))?;
    Ok(listener)
}

/// Accepted connections. An accept error (EMFILE…) pauses accepting briefly
/// rather than spinning; tonic reads each connection's peer credentials into
/// `UdsConnectInfo`.
struct Incoming {
    listener: UnixListener,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Incoming {
    fn new(listener: UnixListener) -> Self {
        Incoming {
            listener,
            pause: None,
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<UnixStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.pause = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, _))) => return Poll::Ready(Some(Ok(stream))),
                Poll::Ready(Err(e)) => {
                    tracing::warn!("gRPC accept failed: {e}");
                    self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
