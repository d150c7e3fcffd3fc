//! A gRPC C-core client for the tests: Python `grpcio` with its default
//! channel options, as upstream's own `client-py` connects
//! (`grpc.insecure_channel('unix://' + path)`). Stubs are generated at test
//! time from `agent/proto` with `grpcio-tools`; each call runs as a user.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::{as_user_cmd, scratch, sh, shell_quote, stderr, stdout, User};

pub const PYTHON: &str = "/usr/bin/python3";

/// The client: one action per run, its results as one JSON object.
const CLIENT: &str = r#"
import json, sys, time
sys.path.insert(0, sys.argv[1])
import grpc
from google.protobuf import empty_pb2
import datamovement_pb2 as pb
import datamovement_pb2_grpc as pb_grpc

socket, action, args = sys.argv[2], sys.argv[3], sys.argv[4:]
out = {"grpcio": grpc.__version__}
CreateStatus = pb.DataMovementCreateResponse.Status
State = pb.DataMovementStatusResponse.State
Status = pb.DataMovementStatusResponse.Status
DeleteStatus = pb.DataMovementDeleteResponse.Status
CancelStatus = pb.DataMovementCancelResponse.Status

def status(stub, uid, wait=0):
    r = stub.Status(pb.DataMovementStatusRequest(uid=uid, maxWaitTime=wait))
    return {"state": State.Name(r.state), "status": Status.Name(r.status),
            "message": r.message, "command": r.commandStatus.command,
            "progress": r.commandStatus.progress, "startTime": r.startTime,
            "endTime": r.endTime}

with grpc.insecure_channel("unix://" + socket) as channel:
    stub = pb_grpc.DataMoverStub(channel)
    if action == "version":
        r = stub.Version(empty_pb2.Empty())
        out.update(version=r.version, apiVersions=list(r.apiVersions))
    elif action == "create":
        source, destination, profile = args
        r = stub.Create(pb.DataMovementCreateRequest(
            source=source, destination=destination, profile=profile,
            slots=-1, maxSlots=-1))
        out.update(uid=r.uid, status=CreateStatus.Name(r.status), message=r.message)
    elif action == "status":
        out.update(status(stub, args[0], int(args[1])))
    elif action == "list":
        out.update(uids=list(stub.List(pb.DataMovementListRequest()).uids))
    elif action == "cancel":
        r = stub.Cancel(pb.DataMovementCancelRequest(uid=args[0]))
        out.update(status=CancelStatus.Name(r.status), message=r.message)
    elif action == "delete":
        r = stub.Delete(pb.DataMovementDeleteRequest(uid=args[0]))
        out.update(status=DeleteStatus.Name(r.status), message=r.message)
    else:
        raise SystemExit("unknown action " + action)
print(json.dumps(out))
"#;

/// Generated stubs and the client script, in a directory every user can read.
pub struct PythonClient {
    dir: tempfile::TempDir,
}

impl PythonClient {
    pub fn new() -> PythonClient {
        let dir = scratch();
        let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/proto");
        let out = Command::new(PYTHON)
            .args(["-m", "grpc_tools.protoc"])
            .arg(format!("-I{}", proto.display()))
            .arg(format!("--python_out={}", dir.path().display()))
            .arg(format!("--grpc_python_out={}", dir.path().display()))
            .arg(proto.join("datamovement.proto"))
            .output()
            .expect("python3 is needed for the gRPC C-core client");
        assert!(
            out.status.success(),
            "generating the Python stubs needs grpcio-tools (pip install grpcio grpcio-tools): {}",
            stderr(&out)
        );
        std::fs::write(dir.path().join("client.py"), CLIENT).unwrap();
        sh(&format!(
            "chmod -R a+rX {}",
            shell_quote(dir.path().to_str().unwrap())
        ));
        PythonClient { dir }
    }

    /// Runs `action` as `user`; its JSON answer.
    pub fn call(&self, socket: &Path, user: &User, action: &[&str]) -> Value {
        let out = as_user_cmd(user, PYTHON)
            .arg(self.dir.path().join("client.py"))
            .arg(self.dir.path())
            .arg(socket)
            .args(action)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{action:?} as {}: {}{}",
            user.name,
            stdout(&out),
            stderr(&out)
        );
        serde_json::from_str(stdout(&out).trim())
            .unwrap_or_else(|e| panic!("{action:?}: {e}: {}", stdout(&out)))
    }
}

/// A source file and a destination directory owned by `user`.
pub fn files_of(dir: &Path, user: &User, tag: &str) -> (String, String) {
    let home = dir.join(tag);
    std::fs::create_dir(&home).unwrap();
    let src = home.join("data");
    std::fs::write(&src, format!("payload of {}", user.name)).unwrap();
    let out = sh(&format!(
        "chown -R {}:{} {}",
        user.uid,
        user.gid,
        shell_quote(home.to_str().unwrap())
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    (
        src.to_str().unwrap().to_string(),
        home.join("copy").to_str().unwrap().to_string(),
    )
}

impl Default for PythonClient {
    fn default() -> Self {
        PythonClient::new()
    }
}
