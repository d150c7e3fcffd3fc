//! Between upstream's messages and the core's requests and statuses, read
//! as upstream's server answers them (nnf-dm
//! `daemons/compute/server/servers/server_default.go`).

use std::time::SystemTime;

use dm_proto::{
    data_movement_create_response as create_response,
    data_movement_status_response as status_response, DataMovementCommandStatus,
    DataMovementCreateRequest, DataMovementStatusResponse, DataMovementWorkflow,
};

use crate::agent::Rejection;
use crate::op::{Operation, Outcome, State};
use crate::request::Request;
use crate::timefmt::{go_duration, rfc3339};

pub(super) fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

/// The workflow name and namespace the message gives, each `None` if empty.
pub(super) fn workflow_of(
    workflow: Option<DataMovementWorkflow>,
) -> (Option<String>, Option<String>) {
    match workflow {
        Some(w) => (non_empty(w.name), non_empty(w.namespace)),
        None => (None, None),
    }
}

/// The control-filesystem request a `Create` message stands for.
pub(super) fn request_of(message: DataMovementCreateRequest) -> Request {
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
pub(super) fn create_status(rejection: &Rejection, kubernetes: bool) -> create_response::Status {
    match rejection.errno.code() {
        libc::ENOENT if kubernetes => create_response::Status::Failed,
        libc::EINVAL | libc::ENOENT | libc::ENOSPC | libc::EEXIST => {
            create_response::Status::Invalid
        }
        _ => create_response::Status::Failed,
    }
}

pub(super) fn opt_time(t: Option<SystemTime>) -> String {
    t.map(rfc3339).unwrap_or_default()
}

/// The table of grpc.md: never INVALID (status' zero value) while going.
pub(super) fn status_response_of(op: &Operation) -> DataMovementStatusResponse {
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

pub(super) fn status_not_found(uid: &str) -> DataMovementStatusResponse {
    DataMovementStatusResponse {
        state: status_response::State::UnknownState as i32,
        status: status_response::Status::NotFound as i32,
        message: format!("request '{uid}' not found"),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

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
