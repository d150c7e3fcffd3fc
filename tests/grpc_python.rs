//! The gRPC socket under a gRPC C-core client: Python `grpcio` with its
//! default channel options, as upstream's own `client-py` connects
//! (`grpc.insecure_channel('unix://' + path)`). C-core sends the socket path
//! as `:authority`; every RPC must still be answered. Stubs are generated at
//! test time from `agent/proto` with `grpcio-tools`. Two users, each through
//! its own client process running as that user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::*;
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";

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
struct PythonClient {
    dir: tempfile::TempDir,
}

impl PythonClient {
    fn new() -> PythonClient {
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
    fn call(&self, socket: &Path, user: &User, action: &[&str]) -> Value {
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

fn socket_of(agent: &Agent) -> PathBuf {
    let sock = agent.dir.path().join("nnf-dm.sock");
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        }),
        "no gRPC socket; log:\n{}",
        agent.log()
    );
    sock
}

/// A source file and a destination directory owned by `user`.
fn files_of(dir: &Path, user: &User, tag: &str) -> (String, String) {
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

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

#[test]
fn every_rpc_from_a_c_core_client_as_two_users() {
    let python = PythonClient::new();
    let dir = scratch();
    let profiles = dir.path().join("profiles.json");
    std::fs::write(&profiles, r#"[{"name":"slow","command":"sleep 60"}]"#).unwrap();
    let agent = Agent::start(&["--profiles", profiles.to_str().unwrap()]);
    let sock = socket_of(&agent);
    let users = [user("nnfdmt1"), user("nnfdmt2")];

    let mut mine = Vec::new();
    for u in &users {
        let version = python.call(&sock, u, &["version"]);
        let grpcio = s(&version, "grpcio");
        let minor: u32 = grpcio.split('.').nth(1).unwrap().parse().unwrap();
        assert!(
            grpcio.starts_with("1.") && minor >= 57,
            "grpcio {grpcio}: the test needs a C-core that sends the socket path as :authority"
        );
        assert_eq!(
            version["apiVersions"],
            serde_json::json!(["1"]),
            "{version}"
        );
        assert!(!s(&version, "version").is_empty(), "{version}");

        // Create, then Status waiting for the end: the copy landed.
        let (src, dst) = files_of(dir.path(), u, u.name);
        let created = python.call(&sock, u, &["create", &src, &dst, ""]);
        assert_eq!(s(&created, "status"), "SUCCESS", "{created}");
        let uid = s(&created, "uid");
        let done = python.call(&sock, u, &["status", &uid, "30"]);
        assert_eq!(
            (s(&done, "state").as_str(), s(&done, "status").as_str()),
            ("COMPLETED", "SUCCESS"),
            "{done}\nlog:\n{}",
            agent.log()
        );
        assert!(!s(&done, "endTime").is_empty(), "{done}");
        assert_eq!(
            std::fs::read_to_string(&dst).unwrap(),
            format!("payload of {}", u.name)
        );
        let meta = std::fs::metadata(&dst).unwrap();
        assert_eq!(
            (std::os::unix::fs::MetadataExt::uid(&meta)),
            u.uid,
            "the copy ran as its user"
        );

        // Cancel a running one.
        let slow = python.call(&sock, u, &["create", &src, &format!("{dst}-slow"), "slow"]);
        assert_eq!(s(&slow, "status"), "SUCCESS", "{slow}");
        let slow_uid = s(&slow, "uid");
        let cancelled = python.call(&sock, u, &["cancel", &slow_uid]);
        assert_eq!(s(&cancelled, "status"), "SUCCESS", "{cancelled}");
        let after = python.call(&sock, u, &["status", &slow_uid, "30"]);
        assert_eq!(
            (s(&after, "state").as_str(), s(&after, "status").as_str()),
            ("COMPLETED", "CANCELLED"),
            "{after}"
        );
        // A refusal reads as upstream's: INVALID with the reason.
        let refused = python.call(&sock, u, &["create", "relative", &dst, ""]);
        assert_eq!(s(&refused, "status"), "INVALID", "{refused}");
        assert!(s(&refused, "message").contains("absolute"), "{refused}");
        mine.push((uid, slow_uid));
    }

    // Each user lists, reads, cancels and deletes only its own.
    for (i, u) in users.iter().enumerate() {
        let (uid, slow_uid) = &mine[i];
        let (other, _) = &mine[1 - i];
        let mut listed: Vec<String> = python.call(&sock, u, &["list"])["uids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        listed.sort();
        let mut want = vec![uid.clone(), slow_uid.clone()];
        want.sort();
        assert_eq!(listed, want, "{}", u.name);
        let peek = python.call(&sock, u, &["status", other, "0"]);
        assert_eq!(s(&peek, "status"), "NOT_FOUND", "{peek}");
        let cancel = python.call(&sock, u, &["cancel", other]);
        assert_eq!(s(&cancel, "status"), "NOT_FOUND", "{cancel}");
        let delete = python.call(&sock, u, &["delete", other]);
        assert_eq!(s(&delete, "status"), "NOT_FOUND", "{delete}");
    }
    for (i, u) in users.iter().enumerate() {
        for uid in [&mine[i].0, &mine[i].1] {
            let deleted = python.call(&sock, u, &["delete", uid]);
            assert_eq!(s(&deleted, "status"), "SUCCESS", "{deleted}");
            let gone = python.call(&sock, u, &["status", uid, "0"]);
            assert_eq!(s(&gone, "status"), "NOT_FOUND", "{gone}");
        }
        let listed = python.call(&sock, u, &["list"]);
        assert_eq!(listed["uids"], serde_json::json!([]), "{listed}");
    }
}
