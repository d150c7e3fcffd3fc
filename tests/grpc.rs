//! The gRPC door: upstream's
//! `datamovement.DataMover` on the agent's Unix socket, over the same
//! operations as the control filesystem, through a client generated from the
//! same `.proto`.

#[path = "grpc_client.rs"]
mod grpc_client;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dm_proto::data_movement_cancel_response::Status as CancelStatus;
use dm_proto::data_movement_create_response::Status as CreateStatus;
use dm_proto::data_movement_delete_response::Status as DeleteStatus;
use dm_proto::data_movement_status_response::{State, Status as OpStatus};
use dm_proto::*;
use grpc_client::{copy, Client};
use integration_tests::*;

fn dryrun(source: &str, destination: &str) -> DataMovementCreateRequest {
    DataMovementCreateRequest {
        dryrun: true,
        ..copy(source, destination)
    }
}

fn with_profile(profile: &str) -> DataMovementCreateRequest {
    DataMovementCreateRequest {
        profile: profile.into(),
        ..copy("/etc/hostname", "/tmp/nnf-dm-grpc-unused")
    }
}

fn state(r: &DataMovementStatusResponse) -> State {
    State::try_from(r.state).unwrap()
}

fn op_status(r: &DataMovementStatusResponse) -> OpStatus {
    OpStatus::try_from(r.status).unwrap()
}

/// Creates `request` and insists on SUCCESS; the operation's name.
fn created(client: &mut Client, request: DataMovementCreateRequest) -> String {
    let response = client.create(request);
    assert_eq!(
        response.status(),
        CreateStatus::Success,
        "{}",
        response.message
    );
    assert!(response.message.is_empty(), "{response:?}");
    assert!(!response.uid.is_empty());
    response.uid
}

// ---- a client running as another user: the grpc-helper binary ----

/// The helper client as a command: `user` (or root when None) runs `action`.
fn helper_cmd(agent: &Agent, user: Option<&User>, action: &[&str]) -> Command {
    grpc_client::helper_command(&agent.socket(), user, action)
}

/// Runs `action` as `user` over gRPC; its `key=value` output.
fn as_user(agent: &Agent, user: &User, action: &[&str], env: &[(&str, &str)]) -> String {
    grpc_client::helper_as(&agent.socket(), user, action, env)
}

/// A small file every user may read, for copies by several users.
fn readable_source(agent: &Agent) -> String {
    let src = agent.dir.path().join("src.txt");
    std::fs::write(&src, b"data\n").unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
    src.to_str().unwrap().to_string()
}

fn uids(output: &str) -> Vec<String> {
    field(output, "uids")
        .unwrap()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

// ---- the tests ----

#[test]
fn version_reports_the_build_and_api_1() {
    let agent = Agent::start(&[]);
    let version = Client::of(&agent).version().unwrap();
    assert_eq!(version.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_versions, ["1"]);
}

#[test]
fn every_rpc_on_one_operation_field_by_field() {
    let agent = Agent::start(&[]);
    let mut c = Client::of(&agent);
    let dest = agent.dir.path().join("dest");
    let uid = created(&mut c, dryrun("/etc/hostname", dest.to_str().unwrap()));
    assert!(
        uid.starts_with("dm-") && uid.len() == 11,
        "generated name: {uid}"
    );
    // The gRPC uid is the control-filesystem name.
    assert!(agent.path(&uid).is_dir());

    let done = c.status(&uid, 30);
    assert_eq!(state(&done), State::Completed, "{done:?}");
    assert_eq!(op_status(&done), OpStatus::Success, "{done:?}");
    // Field by field against the control files of the same operation.
    let status = agent.read(&format!("{uid}/status")).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&agent.read(&format!("{uid}/status.json")).unwrap()).unwrap();
    let message = agent.read(&format!("{uid}/message")).unwrap();
    assert_eq!(done.message, message.strip_suffix('\n').unwrap_or(&message));
    let cs = done.command_status.clone().expect("commandStatus");
    assert_eq!(cs.command, field(&status, "command").unwrap());
    assert_eq!(cs.progress.to_string(), field(&status, "progress").unwrap());
    assert_eq!(cs.elapsed_time, json["commandStatus"]["elapsedTime"]);
    assert!(
        cs.elapsed_time.ends_with('s') && !cs.elapsed_time.contains(' '),
        "Go-style duration: {}",
        cs.elapsed_time
    );
    assert_eq!(cs.last_message, field(&status, "last_message").unwrap());
    assert_eq!(
        cs.last_message_time,
        field(&status, "last_message_time").unwrap()
    );
    assert_eq!(done.start_time, field(&status, "start_time").unwrap());
    assert_eq!(done.end_time, field(&status, "end_time").unwrap());
    assert!(
        done.start_time.len() == 20 && done.start_time.ends_with('Z'),
        "RFC 3339: {}",
        done.start_time
    );
    assert!(!done.end_time.is_empty());

    assert!(c.list(None).contains(&uid));

    // Cancel on a completed operation: SUCCESS, nothing changes.
    let cancel = c.cancel(&uid);
    assert_eq!(cancel.status(), CancelStatus::Success);
    assert!(cancel.message.is_empty(), "{cancel:?}");
    let after = c.status(&uid, 0);
    assert_eq!(after, done, "a completed operation does not change");

    let delete = c.delete(&uid);
    assert_eq!(delete.status(), DeleteStatus::Success, "{delete:?}");
    assert!(delete.message.is_empty());
    assert!(!agent.path(&uid).exists(), "its directory is gone");
    assert!(!c.list(None).contains(&uid));

    // Gone: NOT_FOUND everywhere.
    let gone = c.status(&uid, 0);
    assert_eq!(state(&gone), State::UnknownState);
    assert_eq!(op_status(&gone), OpStatus::NotFound);
    assert!(gone.message.contains(&uid), "{gone:?}");
    assert_eq!(gone.command_status, None);
    assert_eq!((gone.start_time.as_str(), gone.end_time.as_str()), ("", ""));
    // A wait on what does not exist answers at once.
    let t0 = Instant::now();
    assert_eq!(op_status(&c.status(&uid, -1)), OpStatus::NotFound);
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(c.delete(&uid).status(), DeleteStatus::NotFound);
    assert_eq!(c.cancel(&uid).status(), CancelStatus::NotFound);

    // No uid at all: INVALID, with words.
    let empty = c.status("", 0);
    assert_eq!(
        (state(&empty), op_status(&empty)),
        (State::UnknownState, OpStatus::Invalid)
    );
    assert!(!empty.message.is_empty());
    assert_eq!(c.delete("").status(), DeleteStatus::Invalid);
    assert_eq!(c.cancel("").status(), CancelStatus::Invalid);
    assert!(agent.log().lines().all(|l| !l.contains("panicked")));
}

#[test]
fn rejected_creates_say_why_and_land_in_errors() {
    let agent = Agent::start(&[]);
    let mut c = Client::of(&agent);
    let missing = agent.dir.path().join("no-such-source");
    let cases: Vec<(DataMovementCreateRequest, &str, &str)> = vec![
        (
            copy("relative/src", "/tmp/x"),
            "not an absolute path",
            "EINVAL",
        ),
        (copy("", "/tmp/x"), "source is empty", "EINVAL"),
        (copy("/etc/hostname", ""), "destination is empty", "EINVAL"),
        (
            DataMovementCreateRequest {
                slots: -2,
                ..copy("/etc/hostname", "/tmp/x")
            },
            "slots: '-2' is not an integer >= -1",
            "EINVAL",
        ),
        (
            DataMovementCreateRequest {
                dcp_options: "a\0b".into(),
                ..copy("/etc/hostname", "/tmp/x")
            },
            "NUL",
            "EINVAL",
        ),
        (
            with_profile("no-such-profile"),
            "profile 'no-such-profile' does not exist",
            "ENOENT",
        ),
        (
            copy(missing.to_str().unwrap(), "/tmp/x"),
            "does not exist",
            "ENOENT",
        ),
    ];
    for (request, words, _) in &cases {
        let response = c.create(request.clone());
        assert_eq!(
            response.status(),
            CreateStatus::Invalid,
            "{request:?}: {response:?}"
        );
        assert_eq!(response.uid, "");
        assert!(
            response.message.contains(words),
            "{request:?}: {response:?}"
        );
    }
    // Each one has its line in the caller's (root's) errors file.
    let errors = agent.read("errors").unwrap();
    let lines: Vec<&str> = errors.lines().collect();
    assert_eq!(lines.len(), cases.len(), "{errors}");
    for (line, (_, words, errno)) in lines.iter().zip(&cases) {
        assert!(
            line.contains(&format!(" {errno} ")) && line.contains(words),
            "{line}"
        );
    }
    assert_eq!(c.list(None), Vec::<String>::new(), "nothing was created");
}

#[test]
fn limits_are_invalid_and_backend_failures_are_failed() {
    let mut agent = Agent::start(&["--max-ops-per-user", "2"]);
    let mut c = Client::of(&agent);
    let dest = agent.dir.path().join("d");
    let dest = dest.to_str().unwrap();
    let a = created(&mut c, dryrun("/etc/hostname", dest));
    let b = created(&mut c, dryrun("/etc/hostname", dest));
    let full = c.create(dryrun("/etc/hostname", dest));
    assert_eq!(full.status(), CreateStatus::Invalid, "{full:?}");
    assert!(full.message.contains("the limit is 2"), "{full:?}");
    assert!(agent.read("errors").unwrap().contains(" ENOSPC "));
    assert_eq!(op_status(&c.status(&b, 30)), OpStatus::Success);
    assert_eq!(c.delete(&b).status(), DeleteStatus::Success);
    assert_eq!(op_status(&c.status(&a, 30)), OpStatus::Success);

    // The state directory becomes unusable: the backend refuses (EIO).
    let state = agent.state.clone();
    std::fs::rename(&state, state.with_extension("gone")).unwrap();
    std::fs::write(&state, b"not a directory").unwrap();
    let failed = c.create(dryrun("/etc/hostname", dest));
    assert_eq!(failed.status(), CreateStatus::Failed, "{failed:?}");
    assert_eq!(failed.uid, "");
    assert!(failed.message.contains("state directory"), "{failed:?}");
    assert!(agent.read("errors").unwrap().contains(" EIO "));
    // Nor can a record be deleted: UNKNOWN, and the operation stays.
    let stuck = c.delete(&a);
    assert_eq!(stuck.status(), DeleteStatus::Unknown, "{stuck:?}");
    assert!(stuck.message.contains(&a), "{stuck:?}");
    assert!(c.list(None).contains(&a));
    std::fs::remove_file(&state).unwrap();
    std::fs::rename(state.with_extension("gone"), &state).unwrap();
    assert_eq!(c.delete(&a).status(), DeleteStatus::Success);
    assert_eq!(agent.stop().code(), Some(0));
}

#[test]
fn states_and_outcomes_read_as_upstream_while_going_and_done() {
    let dir = scratch();
    let profiles = profiles_file(
        dir.path(),
        r#"[{"name":"stubborn","command":"trap '' TERM; echo 'Copied 1 of 4 items (25%)'; sleep 5"},
            {"name":"fail","command":"echo oops; exit 3"},
            {"name":"slow","command":"sleep 3"}]"#,
    );
    let agent = Agent::start(&["--profiles", &profiles, "--max-active", "1"]);
    let mut c = Client::of(&agent);

    let a = created(&mut c, with_profile("stubborn"));
    let running = c.status_until(&a, |r| {
        state(r) == State::Running && r.command_status.as_ref().is_some_and(|s| s.progress == 25)
    });
    // Never INVALID (the zero value) while going.
    assert_eq!(op_status(&running), OpStatus::UnknownStatus);
    let cs = running.command_status.clone().unwrap();
    assert!(cs.command.contains("sleep 5"), "{cs:?}");
    assert_eq!(cs.last_message, "Copied 1 of 4 items (25%)");
    assert!(!cs.last_message_time.is_empty());
    assert!(!cs.elapsed_time.is_empty());
    assert!(!running.start_time.is_empty());
    assert_eq!(running.end_time, "");
    let files = agent.read(&format!("{a}/status")).unwrap();
    assert_eq!(field(&files, "state").unwrap(), "running");
    assert_eq!(field(&files, "status").unwrap(), "unknown");

    // Only one copy at a time: the next one waits as PENDING.
    let b = created(&mut c, with_profile("fail"));
    let pending = c.status(&b, 0);
    assert_eq!(
        (state(&pending), op_status(&pending)),
        (State::Pending, OpStatus::UnknownStatus)
    );
    assert_eq!(pending.start_time, "");
    assert_eq!(agent.read(&format!("{b}/state")).unwrap(), "pending\n");

    // Not completed: Delete is ACTIVE, as rmdir is EBUSY.
    for uid in [&a, &b] {
        let active = c.delete(uid);
        assert_eq!(active.status(), DeleteStatus::Active, "{active:?}");
        assert!(!active.message.is_empty());
        assert!(agent.path(uid).is_dir());
    }

    // Cancel: CANCELLING while the copy ignores SIGTERM, then CANCELLED.
    assert_eq!(c.cancel(&a).status(), CancelStatus::Success);
    let cancelling = c.status(&a, 0);
    assert_eq!(
        (state(&cancelling), op_status(&cancelling)),
        (State::Cancelling, OpStatus::UnknownStatus)
    );
    assert_eq!(agent.read(&format!("{a}/state")).unwrap(), "cancelling\n");
    let cancelled = c.status(&a, 30);
    assert_eq!(
        (state(&cancelled), op_status(&cancelled)),
        (State::Completed, OpStatus::Cancelled)
    );
    assert!(!cancelled.end_time.is_empty());

    let failed = c.status(&b, 30);
    assert_eq!(
        (state(&failed), op_status(&failed)),
        (State::Completed, OpStatus::Failed)
    );
    assert!(failed.message.contains("oops"), "{failed:?}");
    assert_eq!(
        failed.message,
        agent
            .read(&format!("{b}/message"))
            .unwrap()
            .trim_end_matches('\n')
    );

    // A bounded wait on a copy that outlasts it answers when it runs out.
    let s = created(&mut c, with_profile("slow"));
    let t0 = Instant::now();
    let still = c.status(&s, 1);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_ne!(state(&still), State::Completed, "{still:?}");
    assert_eq!(op_status(&still), OpStatus::UnknownStatus);
    assert_eq!(op_status(&c.status(&s, 30)), OpStatus::Success);

    for uid in [&a, &b, &s] {
        assert_eq!(c.delete(uid).status(), DeleteStatus::Success);
    }
    assert_eq!(c.list(None), Vec::<String>::new());
}

#[test]
fn status_with_max_wait_time_wakes_at_completion() {
    let dir = scratch();
    let gates = [
        Gate::new(dir.path(), "slow-60"),
        Gate::new(dir.path(), "slow-1"),
    ];
    let profiles = profiles_file(
        dir.path(),
        &format!("[{},{}]", gates[0].profile(), gates[1].profile()),
    );
    let agent = Agent::start(&["--profiles", &profiles]);
    let mut c = Client::of(&agent);
    for (wait, gate) in [60, -1].into_iter().zip(&gates) {
        let uid = created(&mut c, with_profile(&gate.name));
        // The copy completes only once the wait has begun.
        let waits_before = agent.status_waits();
        let t0 = Instant::now();
        let done = std::thread::scope(|scope| {
            let call = scope.spawn(|| c.status(&uid, wait));
            assert!(
                wait_until(Duration::from_secs(10), || agent.status_waits()
                    > waits_before),
                "the Status wait never began: {}",
                agent.log()
            );
            gate.open();
            call.join().unwrap()
        });
        let waited = t0.elapsed();
        assert_eq!(
            (state(&done), op_status(&done)),
            (State::Completed, OpStatus::Success),
            "maxWaitTime {wait}: {done:?}"
        );
        assert!(
            waited < Duration::from_secs(10),
            "maxWaitTime {wait} answered after {waited:?}"
        );
        // Once completed, a wait answers at once.
        let t0 = Instant::now();
        assert_eq!(c.status(&uid, -1), done);
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert_eq!(c.delete(&uid).status(), DeleteStatus::Success);
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn a_client_gone_mid_wait_leaves_nothing_behind() {
    let dir = scratch();
    let profiles = profiles_file(dir.path(), r#"[{"name":"slow","command":"sleep 3"}]"#);
    let agent = Agent::start(&["--profiles", &profiles]);
    let mut c = Client::of(&agent);
    c.version().unwrap();
    let baseline = open_fds(agent.pid());
    let uid = created(&mut c, with_profile("slow"));

    // 1. The call is abandoned (the stream is reset, the connection stays).
    let abandoned = c.rt.block_on(async {
        let mut raw = dm_proto::data_mover_client::DataMoverClient::new(c.channel.clone());
        let call = tokio::time::timeout(
            Duration::from_millis(500),
            raw.status(DataMovementStatusRequest {
                workflow: None,
                uid: uid.clone(),
                max_wait_time: -1,
            }),
        )
        .await;
        // Let the connection task send the stream's reset.
        tokio::time::sleep(Duration::from_millis(100)).await;
        call
    });
    assert!(abandoned.is_err(), "the wait did not block: {abandoned:?}");
    let gone = "Status wait ended: the client went away";
    assert!(
        wait_until(Duration::from_secs(2), || agent.log().matches(gone).count()
            == 1),
        "{}",
        agent.log()
    );

    // 2. A client process waiting for ever is killed (its connection closes).
    let mut waiter = helper_cmd(&agent, None, &["status", &uid, "-1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let agent_pid = agent.pid();
    assert!(
        wait_until(Duration::from_secs(5), || open_fds(agent_pid) > baseline),
        "the waiter never connected"
    );
    assert!(
        wait_until(Duration::from_secs(5), || agent.status_waits() == 2),
        "the waiter's Status never arrived: {}",
        agent.log()
    );
    waiter.kill().unwrap();
    waiter.wait().unwrap();
    // Both waits ended with their clients, before the copy did.
    assert!(
        wait_until(Duration::from_secs(2), || agent.log().matches(gone).count()
            == 2),
        "{}",
        agent.log()
    );
    assert_ne!(
        state(&c.status(&uid, 0)),
        State::Completed,
        "too late to tell"
    );

    // The operation goes on and completes; the agent answers and holds no
    // descriptor of the gone client.
    let done = c.status(&uid, 30);
    assert_eq!(
        (state(&done), op_status(&done)),
        (State::Completed, OpStatus::Success)
    );
    assert!(
        wait_until(Duration::from_secs(5), || open_fds(agent_pid) <= baseline),
        "{} descriptors open, {baseline} before",
        open_fds(agent_pid)
    );
    assert_eq!(c.delete(&uid).status(), DeleteStatus::Success);
    assert_eq!(c.version().unwrap().api_versions, ["1"]);
    assert!(agent.log().lines().all(|l| !l.contains("panicked")));
}

/// A message of our own making sent to a DataMover method.
#[derive(Clone, PartialEq, prost::Message)]
struct Raw {
    /// Field 2 (`source`, a string) as bytes: may be invalid UTF-8.
    #[prost(bytes = "vec", tag = "2")]
    source: Vec<u8>,
    /// Field 3 (`destination`, a string) sent as a varint: wrong wire type.
    #[prost(uint64, optional, tag = "3")]
    destination: Option<u64>,
}

fn raw_call(c: &mut Client, path: &'static str, message: Raw) -> Result<(), tonic::Status> {
    let channel = c.channel.clone();
    c.rt.block_on(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unknown(e.to_string()))?;
        let codec: tonic_prost::ProstCodec<Raw, DataMovementCreateResponse> = Default::default();
        grpc.unary(
            tonic::Request::new(message),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await
        .map(|_| ())
    })
}

/// Sends `bytes` on a fresh connection; whether the agent closed it.
fn closes_after(socket: &Path, bytes: &[u8]) -> bool {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let mut sink = Vec::new();
    // EOF or a reset: the agent hung up. A timeout: it did not.
    match stream.read_to_end(&mut sink) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[test]
fn malformed_and_oversized_messages_get_grpc_errors() {
    let agent = Agent::start(&[]);
    let mut c = Client::of(&agent);
    let path = "/datamovement.DataMover/Create";

    // Not protobuf as the message says: wrong wire type, invalid UTF-8.
    let wrong_type = raw_call(
        &mut c,
        path,
        Raw {
            source: b"/etc/hostname".to_vec(),
            destination: Some(7),
        },
    )
    .unwrap_err();
    assert_eq!(wrong_type.code(), tonic::Code::Internal, "{wrong_type:?}");
    let not_utf8 = raw_call(
        &mut c,
        path,
        Raw {
            source: vec![b'/', 0xff, 0xfe],
            destination: None,
        },
    )
    .unwrap_err();
    assert_eq!(not_utf8.code(), tonic::Code::Internal, "{not_utf8:?}");

    // Over the size limit (a request is at most 64 KiB, as on the control fs).
    let huge = c
        .try_create(DataMovementCreateRequest {
            dcp_options: "x".repeat(100 * 1024),
            ..copy("/etc/hostname", "/tmp/x")
        })
        .unwrap_err();
    assert!(
        matches!(
            huge.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{huge:?}"
    );
    // Just under it, the request itself is checked: INVALID, not an error.
    let big = c.create(DataMovementCreateRequest {
        dcp_options: "x".repeat(64 * 1024),
        ..copy("/etc/hostname", "/tmp/x")
    });
    assert_eq!(big.status(), CreateStatus::Invalid, "{:?}", big.message);
    assert!(big.message.contains("limit"), "{}", big.message);

    // A method that does not exist.
    let unknown = raw_call(&mut c, "/datamovement.DataMover/Destroy", Raw::default()).unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::Unimplemented, "{unknown:?}");

    // Not even HTTP/2: the connection is closed, nothing else happens.
    let sock = agent.socket();
    assert!(closes_after(&sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(closes_after(&sock, &garbage));
    let mut preface_then_garbage = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface_then_garbage.extend_from_slice(&garbage);
    assert!(closes_after(&sock, &preface_then_garbage));
    // A client that connects and sends nothing, then goes.
    drop(std::os::unix::net::UnixStream::connect(&sock).unwrap());

    // The agent is unharmed, and so is the first connection.
    assert_eq!(c.version().unwrap().api_versions, ["1"]);
    let mut fresh = Client::of(&agent);
    let uid = created(&mut fresh, dryrun("/etc/hostname", "/tmp/x"));
    assert_eq!(op_status(&fresh.status(&uid, 30)), OpStatus::Success);
    assert!(agent.log().lines().all(|l| !l.contains("panicked")));
}

#[test]
fn socket_mode_and_stale_socket_cleanup() {
    let mut agent = Agent::start(&[]);
    let sock = agent.socket();
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o766, "as upstream");

    // A crash leaves the socket behind; the next start replaces it.
    agent.crash();
    assert!(std::fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_socket());
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_err());
    agent.restart();
    assert_eq!(Client::of(&agent).version().unwrap().api_versions, ["1"]);
    assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o7777, 0o766);
    assert!(agent.log().contains("removed a stale gRPC socket"));

    // A clean stop removes it.
    assert_eq!(agent.stop().code(), Some(0));
    assert!(!sock.exists(), "socket left after SIGTERM");

    // Whatever file is in the way is replaced too.
    std::fs::write(&sock, b"stale").unwrap();
    agent.restart();
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o766);
    assert_eq!(Client::of(&agent).version().unwrap().api_versions, ["1"]);

    // But a live server's socket is not taken over.
    let dir = scratch();
    let busy = dir.path().join("busy.sock");
    let _live = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    let out = nnf_dm_local(dir.path())
        .arg("--socket")
        .arg(&busy)
        .output()
        .unwrap();
    let _ = Command::new("umount")
        .arg("-l")
        .arg(dir.path().join("mnt"))
        .output();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("another server is listening"),
        "{}",
        stderr(&out)
    );
    assert!(std::fs::symlink_metadata(&busy)
        .unwrap()
        .file_type()
        .is_socket());
}

#[test]
fn one_set_of_operations_each_seen_by_its_owner_only() {
    let agent = Agent::start(&[]);
    let mut root = Client::of(&agent);
    let (u1, u2) = (user("nnfdmt1"), user("nnfdmt2"));
    let src = readable_source(&agent);
    let src = src.as_str();

    // u1 over gRPC; the workflow comes from u1's environment.
    let out = as_user(
        &agent,
        &u1,
        &["create", src, "/tmp/nnf-dm-grpc-u1", "dryrun"],
        &[
            ("DW_WORKFLOW_NAME", "wf-a"),
            ("DW_WORKFLOW_NAMESPACE", "ns-a"),
        ],
    );
    assert_eq!(field(&out, "status").unwrap(), "SUCCESS", "{out}");
    let a = field(&out, "uid").unwrap();

    // ... is a directory of the control filesystem, owned by u1.
    let meta = std::fs::metadata(agent.path(&a)).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (u1.uid, u1.gid));
    let request = agent.read(&format!("{a}/request")).unwrap();
    assert_eq!(field(&request, "name").unwrap(), a);
    assert_eq!(field(&request, "source").unwrap(), src);
    assert_eq!(field(&request, "workflow").unwrap(), "wf-a");
    assert_eq!(field(&request, "namespace").unwrap(), "ns-a");
    assert_eq!(field(&request, "dryrun").unwrap(), "true");
    let status = sh_as(&u1, &format!("cat {}/{a}/status", agent.mnt.display()));
    assert!(status.status.success(), "{}", stderr(&status));
    assert_eq!(field(&stdout(&status), "name").unwrap(), a);
    let wait = sh_as(&u1, &format!("cat {}/{a}/wait", agent.mnt.display()));
    assert_eq!(field(&stdout(&wait), "status").unwrap(), "success");
    assert!(
        !sh_as(&u2, &format!("cat {}/{a}/status", agent.mnt.display()))
            .status
            .success()
    );

    // u2 writes a request with echo; u2 sees it over gRPC.
    let out = agent.request_as(
        &u2,
        &format!("name=b-echo source={src} destination=/tmp/nnf-dm-grpc-u2 dryrun=true"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let s = as_user(&agent, &u2, &["status", "b-echo", "30"], &[]);
    assert_eq!(field(&s, "state").unwrap(), "COMPLETED", "{s}");
    assert_eq!(field(&s, "status").unwrap(), "SUCCESS", "{s}");
    assert_eq!(
        uids(&as_user(&agent, &u2, &["list"], &[])),
        ["b-echo"],
        "u2 lists its own only"
    );
    assert_eq!(uids(&as_user(&agent, &u1, &["list"], &[])), vec![a.clone()]);

    // Another's operation does not exist: NOT_FOUND for every call.
    for (who, other) in [(&u2, a.as_str()), (&u1, "b-echo")] {
        let s = as_user(&agent, who, &["status", other, "-1"], &[]);
        assert_eq!(field(&s, "state").unwrap(), "UNKNOWN_STATE", "{s}");
        assert_eq!(field(&s, "status").unwrap(), "NOT_FOUND", "{s}");
        assert_eq!(field(&s, "command_status").unwrap(), "false");
        let s = as_user(&agent, who, &["cancel", other], &[]);
        assert_eq!(field(&s, "status").unwrap(), "NOT_FOUND", "{s}");
        let s = as_user(&agent, who, &["delete", other], &[]);
        assert_eq!(field(&s, "status").unwrap(), "NOT_FOUND", "{s}");
    }
    assert!(agent.path(&a).is_dir() && agent.path("b-echo").is_dir());

    // Root sees all, as on the control filesystem.
    let mut all = root.list(None);
    all.sort();
    let mut expected = vec![a.clone(), "b-echo".to_string()];
    expected.sort();
    assert_eq!(all, expected);
    assert_eq!(op_status(&root.status(&a, 0)), OpStatus::Success);

    // List by workflow: the message's workflow wins over the environment.
    let out = as_user(
        &agent,
        &u1,
        &["create", src, "/tmp/nnf-dm-grpc-u1b", "dryrun"],
        &[
            ("DW_WORKFLOW_NAME", "wf-a"),
            ("NNF_DM_GRPC_WORKFLOW", "wf-b/ns-b"),
        ],
    );
    let b = field(&out, "uid").unwrap();
    let request = agent.read(&format!("{b}/request")).unwrap();
    assert_eq!(field(&request, "workflow").unwrap(), "wf-b");
    assert_eq!(field(&request, "namespace").unwrap(), "ns-b");
    let list_of = |wf: &str| {
        uids(&as_user(
            &agent,
            &u1,
            &["list"],
            &[("NNF_DM_GRPC_WORKFLOW", wf)],
        ))
    };
    assert_eq!(list_of("wf-a/ns-a"), vec![a.clone()]);
    assert_eq!(list_of("wf-b/"), vec![b.clone()]);
    assert_eq!(list_of("wf-c/ns-a"), Vec::<String>::new());
    assert_eq!(uids(&as_user(&agent, &u1, &["list"], &[])).len(), 2);

    // Owners delete their own, through either door.
    for (who, uid) in [(&u1, a.as_str()), (&u1, b.as_str()), (&u2, "b-echo")] {
        let s = as_user(&agent, who, &["status", uid, "30"], &[]);
        assert_eq!(field(&s, "status").unwrap(), "SUCCESS", "{s}");
        let s = as_user(&agent, who, &["delete", uid], &[]);
        assert_eq!(field(&s, "status").unwrap(), "SUCCESS", "{s}");
        assert!(!agent.path(uid).exists());
    }
}

#[test]
fn create_fields_reach_the_copy_as_on_the_control_filesystem() {
    let dir = scratch();
    let profiles = profiles_file(
        dir.path(),
        r#"[{"name":"rec","command":"echo SRC=$SRC DEST=$DEST; cat $HOSTFILE; echo mpirun dcp; echo 'Copied 3 of 4 items (75%)'","slots":3,"maxSlots":5}]"#,
    );
    let agent = Agent::start(&["--profiles", &profiles]);
    let mut c = Client::of(&agent);
    // As the AXL/SCR shim sends it: slots and maxSlots 0 (disabled).
    let uid = created(
        &mut c,
        DataMovementCreateRequest {
            workflow: Some(DataMovementWorkflow {
                name: "wf".into(),
                namespace: "ns".into(),
            }),
            source: "/etc/hostname".into(),
            destination: "/tmp/d e".into(),
            dryrun: false,
            dcp_options: "--quiet".into(),
            log_stdout: true,
            store_stdout: true,
            slots: 0,
            max_slots: 0,
            profile: "rec".into(),
            mpirun_options: "-x Y".into(),
        },
    );
    let request = agent.read(&format!("{uid}/request")).unwrap();
    for (key, value) in [
        ("source", "/etc/hostname"),
        ("destination", "\"/tmp/d e\""),
        ("workflow", "wf"),
        ("namespace", "ns"),
        ("profile", "rec"),
        ("dryrun", "false"),
        ("slots", "0"),
        ("max_slots", "0"),
        ("dcp_options", "--quiet"),
        ("mpirun_options", "\"-x Y\""),
        ("log_stdout", "true"),
        ("store_stdout", "true"),
    ] {
        assert_eq!(field(&request, key).unwrap(), value, "{key}:\n{request}");
    }
    let done = c.status(&uid, 30);
    assert_eq!(op_status(&done), OpStatus::Success, "{done:?}");
    assert!(
        done.message
            .contains("SRC=/etc/hostname DEST=/tmp/d e\nlocalhost\n"),
        "slots 0 leave slots= out: {}",
        done.message
    );
    let cs = done.command_status.unwrap();
    assert!(
        cs.command.contains("echo mpirun -x Y dcp --quiet"),
        "{cs:?}"
    );
    let status = agent.read(&format!("{uid}/status")).unwrap();
    assert_eq!(cs.progress.to_string(), field(&status, "progress").unwrap());
    assert_eq!(cs.last_message, "Copied 3 of 4 items (75%)");

    // -1 defers to the profile.
    let uid = created(
        &mut c,
        DataMovementCreateRequest {
            store_stdout: true,
            ..with_profile("rec")
        },
    );
    let done = c.status(&uid, 30);
    assert!(
        done.message.contains("localhost slots=3 max_slots=5\n"),
        "{}",
        done.message
    );
}

#[test]
fn many_clients_of_several_users_at_once_lose_nothing() {
    let agent = Agent::start(&[]);
    let mut root = Client::of(&agent);
    let (u1, u2) = (user("nnfdmt1"), user("nnfdmt2"));
    let src = readable_source(&agent);
    // Users: one client process each, all at once (upstream's Go client).
    let children: Vec<_> = (0..8)
        .flat_map(|i| [(u1, i), (u2, i)])
        .map(|(u, i)| {
            let dest = format!("/tmp/nnf-dm-grpc-many-{i}");
            let child = helper_cmd(&agent, Some(&u), &["create", &src, &dest, "dryrun"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (u, child)
        })
        .collect();
    // Root: 40 concurrent calls on one connection meanwhile.
    let c = &mut root;
    let channel = c.channel.clone();
    let source = src.clone();
    let mine: Vec<String> = c.rt.block_on(async move {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..40 {
            let mut raw = dm_proto::data_mover_client::DataMoverClient::new(channel.clone());
            let request = dryrun(&source, "/tmp/nnf-dm-grpc-many-root");
            calls.spawn(async move {
                let uid = raw.create(request).await.unwrap().into_inner().uid;
                let done = raw
                    .status(DataMovementStatusRequest {
                        workflow: None,
                        uid: uid.clone(),
                        max_wait_time: 30,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(op_status(&done), OpStatus::Success, "{done:?}");
                uid
            });
        }
        calls.join_all().await
    });
    let mut by_user: std::collections::HashMap<u32, Vec<String>> = Default::default();
    for (u, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let out = stdout(&out);
        assert_eq!(field(&out, "status").unwrap(), "SUCCESS", "{out}");
        by_user
            .entry(u.uid)
            .or_default()
            .push(field(&out, "uid").unwrap());
    }
    for u in [&u1, &u2] {
        let mut expected = by_user[&u.uid].clone();
        expected.sort();
        assert_eq!(expected.len(), 8);
        assert_eq!(uids(&as_user(&agent, u, &["list"], &[])), expected);
    }
    let mut all = c.list(None);
    all.sort();
    let mut expected: Vec<String> = mine
        .into_iter()
        .chain(by_user.into_values().flatten())
        .collect();
    expected.sort();
    expected.dedup();
    assert_eq!(expected.len(), 56, "every name is unique");
    assert_eq!(all, expected, "nothing lost");
    for uid in &all {
        assert_eq!(op_status(&c.status(uid, 30)), OpStatus::Success);
        assert_eq!(c.delete(uid).status(), DeleteStatus::Success);
    }
    assert_eq!(
        std::fs::read_dir(&agent.mnt).unwrap().count(),
        5,
        "only the fixed files left"
    );
}
