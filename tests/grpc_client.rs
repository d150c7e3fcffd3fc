//! A blocking client of the agent's gRPC socket, generated from the same
//! `.proto` as the server (shared by tests/grpc.rs and the gRPC benchmark).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use dm_proto::data_mover_client::DataMoverClient;
use dm_proto::*;
use tonic::transport::{Channel, Endpoint, Uri};

/// One connection to the agent's socket and a runtime to drive it; every
/// call blocks until its answer.
pub struct Client {
    pub rt: tokio::runtime::Runtime,
    pub channel: Channel,
    inner: DataMoverClient<Channel>,
}

/// A channel to `socket`, connected at once.
pub async fn connect(socket: PathBuf) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://nnf-dm.sock")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

impl Client {
    pub fn connect(socket: &Path) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let channel = rt
            .block_on(connect(socket.to_path_buf()))
            .unwrap_or_else(|e| panic!("connect to {}: {e:?}", socket.display()));
        let inner = DataMoverClient::new(channel.clone());
        Client { rt, channel, inner }
    }

    pub fn version(&mut self) -> Result<DataMovementVersionResponse, tonic::Status> {
        let mut c = self.inner.clone();
        self.rt
            .block_on(c.version(()))
            .map(tonic::Response::into_inner)
    }

    pub fn try_create(
        &mut self,
        request: DataMovementCreateRequest,
    ) -> Result<DataMovementCreateResponse, tonic::Status> {
        let mut c = self.inner.clone();
        self.rt
            .block_on(c.create(request))
            .map(tonic::Response::into_inner)
    }

    pub fn create(&mut self, request: DataMovementCreateRequest) -> DataMovementCreateResponse {
        self.try_create(request).expect("Create")
    }

    pub fn status(&mut self, uid: &str, max_wait_time: i64) -> DataMovementStatusResponse {
        let mut c = self.inner.clone();
        self.rt
            .block_on(c.status(DataMovementStatusRequest {
                workflow: None,
                uid: uid.into(),
                max_wait_time,
            }))
            .expect("Status")
            .into_inner()
    }

    pub fn delete(&mut self, uid: &str) -> DataMovementDeleteResponse {
        let mut c = self.inner.clone();
        self.rt
            .block_on(c.delete(DataMovementDeleteRequest {
                workflow: None,
                uid: uid.into(),
            }))
            .expect("Delete")
            .into_inner()
    }

    pub fn cancel(&mut self, uid: &str) -> DataMovementCancelResponse {
        let mut c = self.inner.clone();
        self.rt
            .block_on(c.cancel(DataMovementCancelRequest {
                workflow: None,
                uid: uid.into(),
            }))
            .expect("Cancel")
            .into_inner()
    }

    pub fn list(&mut self, workflow: Option<DataMovementWorkflow>) -> Vec<String> {
        let mut c = self.inner.clone();
        self.rt
            .block_on(c.list(DataMovementListRequest { workflow }))
            .expect("List")
            .into_inner()
            .uids
    }
}

/// A copy request with the profile's slots (-1), as the Go client sends it.
pub fn copy(source: &str, destination: &str) -> DataMovementCreateRequest {
    DataMovementCreateRequest {
        source: source.into(),
        destination: destination.into(),
        slots: -1,
        max_slots: -1,
        ..Default::default()
    }
}
