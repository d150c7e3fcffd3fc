//! The DataMover service: each call as the core answers it.

use std::io;
use std::sync::Arc;

use dm_proto::data_mover_server::DataMover;
use dm_proto::{
    data_movement_cancel_response as cancel_response,
    data_movement_create_response as create_response,
    data_movement_delete_response as delete_response,
    data_movement_status_response as status_response, DataMovementCancelRequest,
    DataMovementCancelResponse, DataMovementCreateRequest, DataMovementCreateResponse,
    DataMovementDeleteRequest, DataMovementDeleteResponse, DataMovementListRequest,
    DataMovementListResponse, DataMovementStatusRequest, DataMovementStatusResponse,
    DataMovementVersionResponse,
};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request as GrpcRequest, Response, Status as GrpcStatus};

use crate::agent::{abandoned, Agent, Input, Rejection, Reply, Requester};

use super::convert::*;
use super::waiters::Waiters;

/// The DataMover service over the agent.
pub(super) struct Door {
    pub(super) agent: Arc<Agent>,
    /// Not-found answers of the Kubernetes backend are FAILED (upstream).
    pub(super) kubernetes: bool,
    pub(super) waiters: Arc<Waiters>,
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

/// The answer to one `Create`, sent to its handler.
struct Channel(tokio::sync::oneshot::Sender<Result<String, Rejection>>);

impl Reply for Channel {
    fn claim(&self) -> bool {
        !self.0.is_closed()
    }

    fn is_gone(&self) -> bool {
        self.0.is_closed()
    }

    fn finish(self: Box<Self>, result: Result<String, Rejection>) {
        let _ = self.0.send(result);
    }
}

impl Door {
    /// Creates an operation and waits for the answer. The request is
    /// abandoned if the caller stops waiting (tonic drops this future).
    async fn create_op(&self, who: Requester, input: Input) -> Result<String, Rejection> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.agent.start_create(who, input, Box::new(Channel(tx)));
        rx.await.unwrap_or_else(|_| Err(abandoned()))
    }
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
        // Checked by the core with `Request::check`: the same rules and
        // words as a write to `request`, with its line in `errors`.
        let input = Input::Parsed(request);
        // Checked on the core's workers; dropped (the client went away), the
        // request is abandoned before anything is created.
        let created = self.create_op(who, input).await;
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
        self.waiters
            .wait_completed(&op, message.max_wait_time)
            .await;
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
