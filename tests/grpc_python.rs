//! The gRPC socket under a gRPC C-core client: Python `grpcio` with its
//! default channel options, as upstream's own `client-py` connects
//! (`grpc.insecure_channel('unix://' + path)`). C-core sends the socket path
//! as `:authority`; every RPC must still be answered. Stubs are generated at
//! test time from `agent/proto` with `grpcio-tools`. Two users, each through
//! its own client process running as that user.

use integration_tests::python_grpc::{files_of, PythonClient};
use integration_tests::*;
use serde_json::Value;

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
    let sock = agent.answering_socket();
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
