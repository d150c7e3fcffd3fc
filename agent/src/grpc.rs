//! The upstream gRPC `datamovement.DataMover` door onto the same operations.
//!
//! One tokio runtime on its own threads serves the API on a Unix socket. The
//! caller's identity is the connection's peer credentials (`SO_PEERCRED`),
//! used exactly as the control filesystem uses the writer's: a request goes
//! through the same parser, limits and `errors` file, and a caller sees,
//! waits on, cancels and deletes only its own operations (root: all).
//! How states and statuses read over gRPC: shared/spec/grpc.md.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use dm_proto::data_mover_server::{DataMover, DataMoverServer};
use dm_proto::{
    data_movement_cancel_response as cancel_response,
    data_movement_create_response as create_response,
    data_movement_delete_response as delete_response,
    data_movement_status_response as status_response, DataMovementCancelRequest,
    DataMovementCancelResponse, DataMovementCommandStatus, DataMovementCreateRequest,
    DataMovementCreateResponse, DataMovementDeleteRequest, DataMovementDeleteResponse,
    DataMovementListRequest, DataMovementListResponse, DataMovementStatusRequest,
    DataMovementStatusResponse, DataMovementVersionResponse, DataMovementWorkflow,
};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request as GrpcRequest, Response, Status as GrpcStatus};

use crate::agent::{Agent, Rejection, Requester};
use crate::op::{Operation, Outcome, State};
use crate::request::{Request, MAX_REQUEST_BYTES};
use crate::timefmt::{go_duration, rfc3339};

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

/// Binds `socket` (removing a stale one), then serves on a background thread.
pub fn start(agent: Arc<Agent>, socket: &Path, backend: &str) -> Result<GrpcServer, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .thread_name("grpc")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the gRPC runtime: {e}"))?;
    let std_listener = bind(socket)?;
    let listener = {
        let _entered = runtime.enter();
        UnixListener::from_std(std_listener)
            .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?
    };
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let service = DataMoverServer::new(Door {
        agent,
        kubernetes: backend == "kubernetes",
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
                    result = serve => result.map_err(|e| e.to_string()),
                    _ = shutdown_rx => Ok(()),
                }
            });
            if let Err(e) = served {
                tracing::error!(socket = %shown, "the gRPC server stopped: {e}");
            }
            // Handlers still waiting (Status with maxWaitTime < 0) end here.
            runtime.shutdown_timeout(SHUTDOWN_GRACE);
        })
        .map_err(|e| format!("cannot start the gRPC thread: {e}"))?;
    tracing::info!(socket = %socket.display(), "gRPC DataMover serving");
    Ok(GrpcServer {
        socket: socket.to_path_buf(),
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    })
}

/// Removes what a previous agent left at `socket`, binds it and opens it to
/// all (mode 0766, set after bind whatever the umask).
fn bind(socket: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if meta.is_dir() {
            return Err(format!(
                "cannot use {} as the gRPC socket: it is a directory",
                socket.display()
            ));
        }
        if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(format!(
                "another server is listening on {}: stop it or pass another --socket",
                socket.display()
            ));
        }
        std::fs::remove_file(socket)
            .map_err(|e| format!("cannot remove the stale {}: {e}", socket.display()))?;
        tracing::warn!(socket = %socket.display(), "removed a stale gRPC socket");
    }
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .map_err(|e| format!("cannot bind the gRPC socket {}: {e}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| format!("cannot chmod {}: {e}", socket.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
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

/// The DataMover service over the agent.
struct Door {
    agent: Arc<Agent>,
    /// Not-found answers of the Kubernetes backend are FAILED (upstream).
    kubernetes: bool,
}

/// The caller, from the connection's peer credentials.
fn requester<T>(request: &GrpcRequest<T>) -> Result<Requester, GrpcStatus> {
    let cred = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or_else(|| GrpcStatus::unauthenticated("no peer credentials on this connection"))?;
    Ok(Requester {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
    })
}

/// Runs blocking agent work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, GrpcStatus> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| GrpcStatus::internal(format!("the request failed: {e}")))
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

/// The workflow name and namespace the message gives, each `None` if empty.
fn workflow_of(workflow: Option<DataMovementWorkflow>) -> (Option<String>, Option<String>) {
    match workflow {
        Some(w) => (non_empty(w.name), non_empty(w.namespace)),
        None => (None, None),
    }
}

/// The control-filesystem request a `Create` message stands for.
fn request_of(message: DataMovementCreateRequest) -> Request {
    let (workflow, namespace) = workflow_of(message.workflow);
    Request {
        name: None,
        source: message.source,
        destination: message.destination,
        workflow,
        namespace,
        profile: non_empty(message.profile),
        dryrun: message.dryrun,
        slots: message.slots,
        max_slots: message.max_slots,
        dcp_options: message.dcp_options,
        mpirun_options: message.mpirun_options,
        log_stdout: message.log_stdout,
        store_stdout: message.store_stdout,
    }
}

/// INVALID for what the caller got wrong, FAILED for what the backend refused.
/// The Kubernetes backend's ENOENT (workflow, ClientMount holding `source`,
/// LustreFileSystem or profile not found) is FAILED, as upstream's `Create`
/// answers (server_default.go), with the reason in `message`.
fn create_status(rejection: &Rejection, kubernetes: bool) -> create_response::Status {
    match rejection.errno.code() {
        libc::ENOENT if kubernetes => create_response::Status::Failed,
        libc::EINVAL | libc::ENOENT | libc::ENOSPC | libc::EEXIST => {
            create_response::Status::Invalid
        }
        _ => create_response::Status::Failed,
    }
}

fn opt_time(t: Option<SystemTime>) -> String {
    t.map(rfc3339).unwrap_or_default()
}

/// The table of grpc.md: never INVALID (status' zero value) while going.
fn status_response_of(op: &Operation) -> DataMovementStatusResponse {
    let status = op.status();
    let state = match status.state {
        State::Pending => status_response::State::Pending,
        State::Starting => status_response::State::Starting,
        State::Running => status_response::State::Running,
        State::Completed => status_response::State::Completed,
        State::Cancelling => status_response::State::Cancelling,
    };
    let outcome = match (status.state, status.outcome) {
        (State::Completed, Outcome::Success) => status_response::Status::Success,
        (State::Completed, Outcome::Failed) => status_response::Status::Failed,
        (State::Completed, Outcome::Cancelled) => status_response::Status::Cancelled,
        (State::Completed, Outcome::Invalid) => status_response::Status::Invalid,
        _ => status_response::Status::UnknownStatus,
    };
    DataMovementStatusResponse {
        state: state as i32,
        status: outcome as i32,
        message: status.message.clone(),
        command_status: Some(DataMovementCommandStatus {
            command: status.command.clone(),
            progress: i32::from(status.progress),
            elapsed_time: status.elapsed().map(go_duration).unwrap_or_default(),
            last_message: status.last_message.clone(),
            last_message_time: opt_time(status.last_message_time),
        }),
        start_time: opt_time(status.start_time),
        end_time: opt_time(status.end_time),
    }
}

fn status_not_found(uid: &str) -> DataMovementStatusResponse {
    DataMovementStatusResponse {
        state: status_response::State::UnknownState as i32,
        status: status_response::Status::NotFound as i32,
        message: format!("request '{uid}' not found"),
        ..Default::default()
    }
}

/// Waits until `op` is completed: `max_wait` seconds at most when positive,
/// for ever when negative. Ends early when the client goes away (tonic then
/// drops this future).
async fn wait_completed(op: &Operation, max_wait: i64) {
    if max_wait == 0 {
        return;
    }
    // Dropped unfinished when tonic drops the call: the client went away.
    struct Abandoned<'a>(Option<&'a Operation>);
    impl Drop for Abandoned<'_> {
        fn drop(&mut self) {
            if let Some(op) = self.0 {
                tracing::info!(op = %op.name, user = op.uid, "Status wait ended: the client went away");
            }
        }
    }
    let mut abandoned = Abandoned(Some(op));
    // Subscribe before looking, so no completion slips in between.
    let mut changes = op.subscribe();
    let completed = async {
        while !op.is_completed() {
            if changes.changed().await.is_err() {
                // The sender lives in `op`, which we hold: cannot happen.
                break;
            }
        }
    };
    if max_wait > 0 {
        let _ = tokio::time::timeout(Duration::from_secs(max_wait.unsigned_abs()), completed).await;
    } else {
        completed.await;
    }
    abandoned.0 = None;
}

#[tonic::async_trait]
impl DataMover for Door {
    async fn version(
        &self,
        _request: GrpcRequest<()>,
    ) -> Result<Response<DataMovementVersionResponse>, GrpcStatus> {
        Ok(Response::new(DataMovementVersionResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_versions: vec!["1".to_string()],
        }))
    }

    async fn create(
        &self,
        request: GrpcRequest<DataMovementCreateRequest>,
    ) -> Result<Response<DataMovementCreateResponse>, GrpcStatus> {
        let who = requester(&request)?;
        let request = request_of(request.into_inner());
        let agent = self.agent.clone();
        // Checked by the control filesystem's own parser (paths, slots, size,
        // NUL bytes): the same validation and words as a write to `request`.
        let created = blocking(move || {
            let text = request.render();
            match Request::parse(text.as_bytes()) {
                Ok(checked) => agent.submit(&who, checked),
                // Rejected as a write would be, with its line in `errors`.
                Err(_) => agent.create(&who, text.as_bytes()),
            }
        })
        .await?;
        let response = match created {
            Ok(name) => DataMovementCreateResponse {
                uid: name,
                status: create_response::Status::Success as i32,
                message: String::new(),
            },
            Err(rejection) => DataMovementCreateResponse {
                uid: String::new(),
                status: create_status(&rejection, self.kubernetes) as i32,
                message: rejection.reason,
            },
        };
        Ok(Response::new(response))
    }

    async fn status(
        &self,
        request: GrpcRequest<DataMovementStatusRequest>,
    ) -> Result<Response<DataMovementStatusResponse>, GrpcStatus> {
        let who = requester(&request)?;
        let message = request.into_inner();
        if message.uid.is_empty() {
            return Ok(Response::new(DataMovementStatusResponse {
                state: status_response::State::UnknownState as i32,
                status: status_response::Status::Invalid as i32,
                message: "uid is empty".into(),
                ..Default::default()
            }));
        }
        let Some(op) = self.agent.lookup(who.uid, &message.uid) else {
            return Ok(Response::new(status_not_found(&message.uid)));
        };
        wait_completed(&op, message.max_wait_time).await;
        Ok(Response::new(status_response_of(&op)))
    }

    async fn delete(
        &self,
        request: GrpcRequest<DataMovementDeleteRequest>,
    ) -> Result<Response<DataMovementDeleteResponse>, GrpcStatus> {
        let who = requester(&request)?;
        let uid = request.into_inner().uid;
        let reply = |status: delete_response::Status, message: String| {
            Ok(Response::new(DataMovementDeleteResponse {
                status: status as i32,
                message,
            }))
        };
        if uid.is_empty() {
            return reply(delete_response::Status::Invalid, "uid is empty".into());
        }
        let agent = self.agent.clone();
        let name = uid.clone();
        let deleted = blocking(move || agent.delete(who.uid, &name)).await?;
        match deleted.map_err(|e| e.code()) {
            Ok(()) => reply(delete_response::Status::Success, String::new()),
            Err(libc::EBUSY) => reply(
                delete_response::Status::Active,
                format!("request '{uid}' is not completed: cancel it or wait for it"),
            ),
            Err(libc::ENOENT | libc::EACCES) => reply(
                delete_response::Status::NotFound,
                format!("request '{uid}' not found"),
            ),
            Err(code) => reply(
                delete_response::Status::Unknown,
                format!(
                    "cannot delete request '{uid}': {}",
                    io::Error::from_raw_os_error(code)
                ),
            ),
        }
    }

    async fn list(
        &self,
        request: GrpcRequest<DataMovementListRequest>,
    ) -> Result<Response<DataMovementListResponse>, GrpcStatus> {
        let who = requester(&request)?;
        let (workflow, namespace) = workflow_of(request.into_inner().workflow);
        let uids = self
            .agent
            .list(who.uid)
            .into_iter()
            .filter(|op| {
                workflow
                    .as_ref()
                    .is_none_or(|w| op.request.workflow.as_ref() == Some(w))
                    && namespace
                        .as_ref()
                        .is_none_or(|n| op.request.namespace.as_ref() == Some(n))
            })
            .map(|op| op.name.clone())
            .collect();
        Ok(Response::new(DataMovementListResponse { uids }))
    }

    async fn cancel(
        &self,
        request: GrpcRequest<DataMovementCancelRequest>,
    ) -> Result<Response<DataMovementCancelResponse>, GrpcStatus> {
        let who = requester(&request)?;
        let uid = request.into_inner().uid;
        let reply = |status: cancel_response::Status, message: String| {
            Ok(Response::new(DataMovementCancelResponse {
                status: status as i32,
                message,
            }))
        };
        if uid.is_empty() {
            return reply(cancel_response::Status::Invalid, "uid is empty".into());
        }
        let Some(op) = self.agent.lookup(who.uid, &uid) else {
            return reply(
                cancel_response::Status::NotFound,
                format!("request '{uid}' not found"),
            );
        };
        let agent = self.agent.clone();
        blocking(move || agent.cancel(&op)).await?;
        reply(cancel_response::Status::Success, String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_messages_map_to_requests() {
        let request = request_of(DataMovementCreateRequest {
            workflow: Some(DataMovementWorkflow {
                name: "wf".into(),
                namespace: String::new(),
            }),
            source: "/a".into(),
            destination: "/b c".into(),
            dryrun: true,
            dcp_options: "--x \"y\"".into(),
            log_stdout: true,
            store_stdout: false,
            slots: 0,
            max_slots: -1,
            profile: String::new(),
            mpirun_options: "-n 2".into(),
        });
        assert_eq!(request.workflow.as_deref(), Some("wf"));
        assert_eq!(request.namespace, None);
        assert_eq!(request.profile, None);
        assert_eq!((request.slots, request.max_slots), (0, -1));
        // What the door hands the parser reads back as the same request.
        assert_eq!(Request::parse(request.render().as_bytes()), Ok(request));
        let bare = request_of(DataMovementCreateRequest::default());
        assert_eq!((bare.workflow, bare.namespace), (None, None));
    }

    #[test]
    fn states_and_outcomes_follow_the_table_of_grpc_md() {
        use crate::op::Status;
        use status_response::{State as S, Status as O};
        let cases = [
            (
                State::Pending,
                Outcome::Unknown,
                S::Pending,
                O::UnknownStatus,
            ),
            (
                State::Starting,
                Outcome::Unknown,
                S::Starting,
                O::UnknownStatus,
            ),
            (
                State::Running,
                Outcome::Unknown,
                S::Running,
                O::UnknownStatus,
            ),
            (
                State::Cancelling,
                Outcome::Unknown,
                S::Cancelling,
                O::UnknownStatus,
            ),
            (State::Completed, Outcome::Success, S::Completed, O::Success),
            (State::Completed, Outcome::Failed, S::Completed, O::Failed),
            (
                State::Completed,
                Outcome::Cancelled,
                S::Completed,
                O::Cancelled,
            ),
            (State::Completed, Outcome::Invalid, S::Completed, O::Invalid),
        ];
        for (state, outcome, want_state, want_status) in cases {
            let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_608_000);
            let op = Operation::new(
                "op".into(),
                1000,
                1000,
                Request::default(),
                PathBuf::from("/t"),
                Status {
                    state,
                    outcome,
                    progress: 40,
                    start_time: Some(start),
                    end_time: (state == State::Completed)
                        .then_some(start + Duration::from_millis(62_500)),
                    ..Status::default()
                },
            );
            let r = status_response_of(&op);
            assert_eq!((r.state(), r.status()), (want_state, want_status));
            assert_eq!(r.start_time, "2026-11-25T12:00:00Z");
            let cs = r.command_status.unwrap();
            assert_eq!(cs.progress, 40);
            if state == State::Completed {
                assert_eq!(r.end_time, "2026-11-25T12:01:02Z");
                assert_eq!(cs.elapsed_time, "1m2.5s");
            } else {
                assert_eq!(r.end_time, "");
            }
        }
    }

    #[test]
    fn rejections_map_to_create_statuses() {
        use fuse_ctl::Errno;
        for (errno, status) in [
            (Errno::EINVAL, create_response::Status::Invalid),
            (Errno::ENOENT, create_response::Status::Invalid),
            (Errno::ENOSPC, create_response::Status::Invalid),
            (Errno::EEXIST, create_response::Status::Invalid),
            (Errno::EAGAIN, create_response::Status::Failed),
            (Errno::EIO, create_response::Status::Failed),
            (Errno::EPERM, create_response::Status::Failed),
        ] {
            assert_eq!(create_status(&Rejection::new(errno, "x"), false), status);
        }
        for (errno, status) in [
            (Errno::ENOENT, create_response::Status::Failed),
            (Errno::EINVAL, create_response::Status::Invalid),
            (Errno::EPERM, create_response::Status::Failed),
        ] {
            assert_eq!(create_status(&Rejection::new(errno, "x"), true), status);
        }
    }
}
