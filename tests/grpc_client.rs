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
    /// A client as root (this process) of `agent`'s socket, once it answers.
    pub fn of(agent: &integration_tests::Agent) -> Client {
        Client::connect(&agent.answering_socket())
    }

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

    /// Polls `Status` (answering at once) until `cond` holds, for up to 30 s.
    pub fn status_until(
        &mut self,
        uid: &str,
        cond: impl Fn(&DataMovementStatusResponse) -> bool,
    ) -> DataMovementStatusResponse {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let response = self.status(uid, 0);
            if cond(&response) {
                return response;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out; last {response:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
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

// ---- a client running as another user: the grpc-helper binary ----
//
// A test that wants to connect as another user (SO_PEERCRED is the
// identity) runs the `grpc-helper` binary (bin/grpc_helper.rs, whose main
// is `helper_main`) with `helper_command`. The helper does one action and
// prints `key=value` lines.

/// The helper's action, socket and workflow come from these variables.
pub const HELPER_ACTION: &str = "NNF_DM_GRPC_HELPER";
pub const HELPER_SOCKET: &str = "NNF_DM_GRPC_SOCKET";
/// `name/namespace`: the `workflow` of the Create or List message.
pub const HELPER_WORKFLOW: &str = "NNF_DM_GRPC_WORKFLOW";

/// The body of the helper: does nothing unless `HELPER_ACTION` is set.
/// Actions (tab-separated): `create SRC DST dryrun|copy`, `status UID WAIT`,
/// `list`, `cancel UID`, `delete UID`.
pub fn helper_main() {
    let Ok(action) = std::env::var(HELPER_ACTION) else {
        return;
    };
    let socket = PathBuf::from(std::env::var(HELPER_SOCKET).unwrap());
    let args: Vec<&str> = action.split('\t').collect();
    let workflow = std::env::var(HELPER_WORKFLOW).ok().map(|w| {
        let (name, namespace) = w.split_once('/').unwrap();
        DataMovementWorkflow {
            name: name.into(),
            namespace: namespace.into(),
        }
    });
    let mut client = Client::connect(&socket);
    // Where a test re-ran its own binary, libtest has printed
    // `test <name> ... ` without a newline.
    println!();
    let escape = |s: &str| s.replace('\\', "\\\\").replace('\n', "\\n");
    match args[..] {
        ["create", source, destination, dry] => {
            let r = client.create(DataMovementCreateRequest {
                workflow,
                dryrun: dry == "dryrun",
                ..copy(source, destination)
            });
            println!("uid={}", r.uid);
            println!("status={}", r.status().as_str_name());
            println!("message={}", escape(&r.message));
        }
        ["status", uid, wait] => {
            let t0 = std::time::Instant::now();
            let r = client.status(uid, wait.parse().unwrap());
            println!("waited_ms={}", t0.elapsed().as_millis());
            println!("state={}", r.state().as_str_name());
            println!("status={}", r.status().as_str_name());
            println!("message={}", escape(&r.message));
            println!("command_status={}", r.command_status.is_some());
            let cs = r.command_status.unwrap_or_default();
            println!("command={}", escape(&cs.command));
            println!("progress={}", cs.progress);
            println!("elapsed_time={}", cs.elapsed_time);
            println!("last_message={}", escape(&cs.last_message));
            println!("last_message_time={}", cs.last_message_time);
            println!("start_time={}", r.start_time);
            println!("end_time={}", r.end_time);
        }
        ["list"] => println!("uids={}", client.list(workflow).join(",")),
        ["cancel", uid] => {
            let r = client.cancel(uid);
            println!("status={}", r.status().as_str_name());
            println!("message={}", escape(&r.message));
        }
        ["delete", uid] => {
            let r = client.delete(uid);
            println!("status={}", r.status().as_str_name());
            println!("message={}", escape(&r.message));
        }
        _ => panic!("unknown helper action {action:?}"),
    }
}

/// The grpc-helper binary as `user` (root when None), to do `action` on
/// `socket`. The caller's `DW_WORKFLOW_*` are not passed on; add them with
/// `envs` if wanted. `_test` names the test that used to be re-run for
/// this; it is ignored.
/// Runs `action` over gRPC as `user` with `env` in the helper process; its
/// `key=value` output.
pub fn helper_as(
    socket: &Path,
    user: &integration_tests::User,
    action: &[&str],
    env: &[(&str, &str)],
) -> String {
    use integration_tests::{stderr, stdout};
    let out = helper_command(socket, Some(user), action)
        .envs(env.iter().copied())
        .output()
        .expect("run the gRPC helper");
    assert!(
        out.status.success(),
        "helper {action:?} as {}: {}\n{}",
        user.name,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

pub fn helper_command(
    socket: &Path,
    user: Option<&integration_tests::User>,
    action: &[&str],
) -> std::process::Command {
    let exe = integration_tests::bin("grpc-helper");
    let exe = exe.to_str().expect("UTF-8 target directory");
    let mut cmd = match user {
        Some(user) => integration_tests::as_user_cmd(user, exe),
        None => std::process::Command::new(exe),
    };
    cmd.env(HELPER_ACTION, action.join("\t"))
        .env(HELPER_SOCKET, socket)
        .env_remove("DW_WORKFLOW_NAME")
        .env_remove("DW_WORKFLOW_NAMESPACE")
        .env_remove(HELPER_WORKFLOW);
    cmd
}
