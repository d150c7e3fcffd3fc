//! The /run/nnf-dm contract on the Kubernetes backend: the real agent,
//! connected exactly as in production (`--service-token-file`,
//! `--service-cert-file`) to the in-process API server of `kube-testserver`
//! (real CRD schemas, real nnf-dm ClusterRole), with a simulated Rabbit.

#[path = "grpc_client.rs"]
mod grpc_client;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dm_proto::data_movement_status_response::{State, Status as OpStatus};
use dm_proto::DataMovementStatusResponse;
use grpc_client::Client;
use integration_tests::kube::{
    kube_agent, kube_args, set_dm_status, upstream_default_profile, utc_now, NODE, RABBIT,
};
use integration_tests::*;
use kube_testserver::{Config, EventType, TestServer, NNF_DM};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(30);
const WF_NS: &str = "default";
const DM: &str = "NnfDataMovement";

fn labels(workflow: &str, index: &str) -> Value {
    json!({
        "dataworkflowservices.github.io/workflow.name": workflow,
        "dataworkflowservices.github.io/workflow.namespace": WF_NS,
        "nnf.cray.hpe.com/directive_index": index,
    })
}

fn mount(path: &str, kind: &str, reference: Option<(&str, &str)>) -> Value {
    let mut device = json!({"type": if reference.is_some() { "reference" } else { "lustre" }});
    if let Some((kind, name)) = reference {
        device["deviceReference"] = json!({
            "objectReference": {"kind": kind, "name": name, "namespace": RABBIT},
            "data": 0,
        });
    } else {
        device["lustre"] = json!({"fileSystemName": "global", "mgsAddresses": "10.0.0.1@tcp"});
    }
    json!({
        "mountPath": path, "type": kind, "targetType": "directory",
        "options": "", "setPermissions": false, "device": device,
    })
}

fn client_mount(ns: &str, name: &str, workflow: &str, index: &str, mounts: Vec<Value>) -> Value {
    json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7",
        "kind": "ClientMount",
        "metadata": {"name": name, "namespace": ns, "labels": labels(workflow, index)},
        "spec": {"node": ns, "desiredState": "mounted", "mounts": mounts},
    })
}

fn workflow(name: &str, state: &str, status: &str) -> Value {
    json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7",
        "kind": "Workflow",
        "metadata": {"name": name, "namespace": WF_NS},
        "spec": {"desiredState": state, "dwDirectives": [], "forceReady": false,
                 "groupID": 0, "userID": 0, "jobID": 1, "wlmID": "slurm"},
        "status": {"state": state, "status": status, "ready": true},
    })
}

fn profile(name: &str, default: bool) -> Value {
    let mut data = upstream_default_profile();
    data["default"] = json!(default);
    json!({
        "apiVersion": "nnf.cray.hpe.com/v1alpha11",
        "kind": "NnfDataMovementProfile",
        "metadata": {"name": name, "namespace": "nnf-system"},
        "data": data,
    })
}

/// Workflow `wf1` (PreRun/Completed) with Lustre, GFS2, XFS and raw mounts on
/// the compute node and the matching Rabbit mounts; `wf-setup` in Setup.
fn seed(server: &TestServer) {
    server.put_object(workflow("wf1", "PreRun", "Completed"));
    server.put_object(workflow("wf-setup", "Setup", "Completed"));
    // (tag, directive index, path, file system, storage kind, storage name)
    #[rustfmt::skip]
    let compute = [
        ("lus", "0", "/mnt/nnf/lus-0", "lustre", "NnfStorage", "wf1-0"),
        ("gfs", "1", "/mnt/nnf/gfs-1", "gfs2", "NnfNodeBlockStorage", "wf1-1"),
        ("xfs", "2", "/mnt/nnf/xfs-2", "xfs", "NnfNodeBlockStorage", "wf1-2"),
        ("raw", "3", "/mnt/nnf/raw-3", "none", "NnfNodeBlockStorage", "wf1-3"),
        ("orphan", "4", "/mnt/nnf/orphan-4", "gfs2", "NnfNodeBlockStorage", "wf1-4"),
    ];
    #[rustfmt::skip]
    let rabbit = [
        ("lus", "0", "/rabbit/lus-0/compute-1", "lustre", "NnfStorage", "wf1-0"),
        ("gfs", "1", "/rabbit/gfs-1/compute-1/", "gfs2", "NnfNodeBlockStorage", "wf1-1"),
    ];
    for (ns, mounts) in [(NODE, &compute[..]), (RABBIT, &rabbit[..])] {
        for (tag, index, path, fs, kind, storage) in mounts {
            server.put_object(client_mount(
                ns,
                &format!("wf1-{tag}"),
                "wf1",
                index,
                vec![mount(path, fs, Some((kind, storage)))],
            ));
        }
    }
    server.put_object(json!({
        "apiVersion": "lus.cray.hpe.com/v1beta1",
        "kind": "LustreFileSystem",
        "metadata": {"name": "global", "namespace": "lus-ns"},
        "spec": {"name": "global", "mgsNids": "10.0.0.1@tcp", "mountRoot": "/lus/global"},
    }));
    server.put_object(profile("default", true));
    server.put_object(profile("fast", false));
}

/// The simulated Rabbit: runs every new NnfDataMovement of ours through
/// Starting → Running → Finished, as its destination says:
/// `.../hold*` stays Running until cancelled, `.../never*` never starts,
/// `.../fail*` fails, `.../invalid*` is Invalid; anything else succeeds.
/// The annotation that lets the simulated Rabbit finish a `gate-*` copy.
const RELEASE: &str = "test.nnf-dm/release";

fn rabbit(server: &Arc<TestServer>, step: Duration) {
    let weak = Arc::downgrade(server);
    server.on_change(DM, move |change| {
        if change.event_type != EventType::Added {
            return;
        }
        let weak = weak.clone();
        std::thread::spawn(move || {
            run_copy(weak, change.namespace, change.name, change.object, step)
        });
    });
}

fn run_copy(
    server: std::sync::Weak<TestServer>,
    ns: String,
    name: String,
    obj: Value,
    step: Duration,
) {
    let dest = obj["spec"]["destination"]["path"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let base = dest.rsplit('/').next().unwrap_or("").to_string();
    if base.starts_with("never") {
        return;
    }
    let cancelled = |s: &TestServer| {
        s.get_object(DM, &ns, &name)
            .is_some_and(|o| o["spec"]["cancel"] == true)
    };
    std::thread::sleep(step);
    let Some(s) = server.upgrade() else { return };
    if cancelled(&s) {
        // Cancelled before it started: the Rabbit never touches it.
        return;
    }
    let start = utc_now();
    set_dm_status(&s, &ns, &name, |o| {
        o["status"] = json!({"state": "Starting", "startTime": start, "restarts": 0});
    });
    drop(s);
    std::thread::sleep(step);
    let Some(s) = server.upgrade() else { return };
    set_dm_status(&s, &ns, &name, |o| {
        o["status"]["state"] = json!("Running");
        o["status"]["commandStatus"] = json!({
            "command": "mpirun dcp --progress 1 src dest", "progress": 50,
            "lastMessage": "Copied 1.000 GiB (50%)", "lastMessageTime": utc_now(),
            "items": 10, "directories": 2, "files": 7, "links": 1, "data": "1.000 GiB",
            "rate": "512.000 MiB/s", "elapsedTime": "2s",
        });
    });
    drop(s);
    let finish = |s: &TestServer, status: &str, message: &str| {
        set_dm_status(s, &ns, &name, |o| {
            o["status"]["state"] = json!("Finished");
            o["status"]["status"] = json!(status);
            o["status"]["endTime"] = json!(utc_now());
            o["status"]["message"] = json!(message);
            if status == "Success" {
                o["status"]["commandStatus"]["progress"] = json!(100);
            }
        });
    };
    if base.starts_with("hold") {
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let Some(s) = server.upgrade() else { return };
            if s.get_object(DM, &ns, &name).is_none() {
                return;
            }
            if cancelled(&s) {
                finish(&s, "Cancelled", "cancelled by request");
                return;
            }
        }
    }
    if base.starts_with("gate") {
        // Running until the test lets it finish (`Cluster::release`).
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let Some(s) = server.upgrade() else { return };
            let Some(dm) = s.get_object(DM, &ns, &name) else {
                return;
            };
            if dm["metadata"]["annotations"][RELEASE] == "true" {
                break;
            }
        }
    }
    std::thread::sleep(step);
    let Some(s) = server.upgrade() else { return };
    if cancelled(&s) {
        finish(&s, "Cancelled", "cancelled by request");
    } else if base.starts_with("fail") {
        finish(&s, "Failed", "dcp: permission denied\nexit status 1");
    } else if base.starts_with("invalid") {
        finish(&s, "Invalid", "source does not exist");
    } else {
        finish(&s, "Success", "");
    }
}

struct Cluster {
    server: Arc<TestServer>,
}

impl Cluster {
    fn new() -> Cluster {
        Self::with_step(Duration::from_millis(150))
    }

    /// Seeded, without the simulated Rabbit.
    fn bare() -> Cluster {
        let server = Arc::new(TestServer::start(Config::default()));
        seed(&server);
        Cluster { server }
    }

    fn with_step(step: Duration) -> Cluster {
        let server = Arc::new(TestServer::start(Config::default()));
        seed(&server);
        rabbit(&server, step);
        Cluster { server }
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        kube_args(&self.server, extra)
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        kube_agent(&self.server, extra)
    }

    fn dms(&self) -> Vec<Value> {
        self.server.objects(DM, None)
    }

    /// Lets the simulated Rabbit finish `op`'s `gate-*` copy.
    fn release(&self, op: &str) {
        let dm = self.dm_of(op);
        let ns = dm["metadata"]["namespace"].as_str().unwrap();
        set_dm_status(&self.server, ns, &resource_name(&dm), |o| {
            o["metadata"]["annotations"][RELEASE] = json!("true");
        })
        .expect("the resource exists");
    }

    /// The resource of control-fs operation `op`.
    fn dm_of(&self, op: &str) -> Value {
        self.dms()
            .into_iter()
            .find(|o| {
                o["metadata"]["annotations"]["dm.cray.hpe.com/nnf-dm-operation"]
                    .as_str()
                    .and_then(|a| serde_json::from_str::<Value>(a).ok())
                    .is_some_and(|a| a["name"] == op)
            })
            .unwrap_or_else(|| panic!("no NnfDataMovement for {op}"))
    }
}

/// One write(2) of `request` to the request file as `user` (root if None):
/// "ok" or the errno's name.
fn write_as(agent: &Agent, user: Option<&User>, request: &str) -> String {
    let script = format!(
        "import os, errno\nfd = os.open({:?}, os.O_WRONLY)\ntry:\n    os.write(fd, {:?}.encode())\n    print('ok')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n",
        agent.path("request").to_str().unwrap(),
        request
    );
    let out = match user {
        Some(u) => as_user_cmd(u, "/usr/bin/python3")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap(),
        None => python(&script),
    };
    stdout(&out).trim().to_string()
}

fn errors_of(agent: &Agent, user: Option<&User>) -> String {
    let path = agent.path("errors");
    match user {
        Some(u) => stdout(&sh_as(u, &format!("cat {}", path.display()))),
        None => std::fs::read_to_string(path).unwrap(),
    }
}

fn last_error(agent: &Agent, user: Option<&User>) -> String {
    errors_of(agent, user)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

fn status_of(agent: &Agent, name: &str) -> String {
    agent.read(&format!("{name}/status")).unwrap_or_default()
}

fn wait_state(agent: &Agent, name: &str, state: &str, timeout: Duration) -> String {
    let ok = wait_until(timeout, || {
        field(&status_of(agent, name), "state").as_deref() == Some(state)
    });
    let status = status_of(agent, name);
    assert!(
        ok,
        "{name} never reached {state}; status:\n{status}\nlog:\n{}",
        agent.log()
    );
    status
}

const LUS_REQ: &str = "workflow=wf1 namespace=default source=/mnt/nnf/lus-0/ckpt/step10 destination=/lus/global/me/step10";

#[test]
fn lustre_request_makes_the_expected_resource_and_status_flows_back() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&[]);
    assert_eq!(
        field(&agent.read("version").unwrap(), "backend").unwrap(),
        "kubernetes"
    );
    let u = user("nnfdmt1");
    let out = agent.request_as(
        &u,
        // `gate-*`: the simulated Rabbit holds it running until released.
        "name=lus1 workflow=wf1 namespace=default source=/mnt/nnf/lus-0/ckpt/step10 destination=/lus/global/me/gate-step10 dryrun=true slots=4 dcp_options=\"--chunksize 1MB\"",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Created before write returned: the directory and status are there.
    let status = agent.read("lus1/status");
    assert!(status.is_ok(), "status readable right after echo");

    let dm = cluster.dm_of("lus1");
    let wf_uid =
        cluster.server.get_object("Workflow", WF_NS, "wf1").unwrap()["metadata"]["uid"].clone();
    assert_eq!(dm["metadata"]["namespace"], "nnf-dm-system");
    assert!(dm["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with("nnf-dm-"));
    assert_eq!(dm["metadata"]["generateName"], "nnf-dm-");
    let labels = &dm["metadata"]["labels"];
    assert_eq!(
        labels,
        &json!({
            "dm.cray.hpe.com/initiator": NODE,
            "nnf.cray.hpe.com/directive_index": "0",
            "dataworkflowservices.github.io/workflow.name": "wf1",
            "dataworkflowservices.github.io/workflow.namespace": WF_NS,
            "dataworkflowservices.github.io/workflow.uid": wf_uid,
            "dataworkflowservices.github.io/owner.kind": "Workflow",
            "dataworkflowservices.github.io/owner.name": "wf1",
            "dataworkflowservices.github.io/owner.namespace": WF_NS,
            "dataworkflowservices.github.io/owner.uid": wf_uid,
            "nnf.cray.hpe.com/teardown_state": "PostRun",
        })
    );
    let spec = &dm["spec"];
    assert_eq!(
        spec,
        &json!({
            "cancel": false,
            "source": {"path": "/rabbit/lus-0/compute-1/ckpt/step10",
                       "storageReference": {"kind": "NnfStorage", "name": "wf1-0", "namespace": RABBIT}},
            "destination": {"path": "/lus/global/me/gate-step10",
                            "storageReference": {"kind": "LustreFileSystem", "name": "global", "namespace": "lus-ns"}},
            "userId": u.uid,
            "groupId": u.gid,
            "profileReference": {"kind": "NnfDataMovementProfile", "name": "default", "namespace": "nnf-system"},
            "userConfig": {"dryrun": true, "mpirunOptions": "", "dcpOptions": "--chunksize 1MB",
                           "logStdout": false, "storeStdout": false, "slots": 4},
        })
    );
    // The Rabbit runs it; status flows back through the watch.
    let running = wait_state(&agent, "lus1", "running", LONG);
    cluster.release("lus1");
    let status = wait_state(&agent, "lus1", "completed", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    assert_eq!(field(&status, "progress").unwrap(), "100");
    assert_eq!(field(&status, "items").unwrap(), "10");
    assert_eq!(field(&status, "files").unwrap(), "7");
    assert_eq!(field(&status, "bytes").unwrap(), "1073741824");
    assert_eq!(
        field(&status, "rate_bytes_per_second").unwrap(),
        "536870912"
    );
    assert_eq!(
        field(&status, "command").unwrap(),
        "mpirun dcp --progress 1 src dest"
    );
    assert!(!field(&status, "start_time").unwrap().is_empty());
    assert!(!field(&status, "end_time").unwrap().is_empty());
    let _ = running;
    let json: Value = serde_json::from_str(&agent.read("lus1/status.json").unwrap()).unwrap();
    assert_eq!(json["status"], "success");
    // The request file is the normalised request with the profile resolved.
    let req = agent.read("lus1/request").unwrap();
    assert!(req.contains("profile=default"), "{req}");
    assert!(req.contains("workflow=wf1"), "{req}");
}

#[test]
fn gfs2_request_goes_to_the_rabbit_namespace_and_wait_blocks_until_done() {
    let cluster = Cluster::with_step(Duration::from_millis(400));
    let agent = cluster.agent(&[]);
    // workflow/namespace from the writer's environment.
    let out = sh(&format!(
        "DW_WORKFLOW_NAME=wf1 DW_WORKFLOW_NAMESPACE=default bash -c 'echo \"name=g1 source=/mnt/nnf/gfs-1/a/b destination=/home/me/never-out profile=fast max_slots=2\" > {}'",
        agent.path("request").display()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let dm = cluster.dm_of("g1");
    assert_eq!(dm["metadata"]["namespace"], RABBIT);
    assert!(dm["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with("nnf-dm-node-"));
    assert_eq!(dm["metadata"]["generateName"], "nnf-dm-node-");
    assert!(dm["metadata"]["labels"]
        .get("nnf.cray.hpe.com/directive_index")
        .is_none());
    assert_eq!(dm["metadata"]["labels"]["dm.cray.hpe.com/initiator"], NODE);
    assert_eq!(dm["spec"]["source"]["path"], "/rabbit/gfs-1/compute-1/a/b");
    assert_eq!(dm["spec"]["source"]["storageReference"]["name"], "wf1-1");
    assert_eq!(
        dm["spec"]["destination"],
        json!({"path": "/home/me/never-out"})
    );
    assert_eq!(dm["spec"]["profileReference"]["name"], "fast");
    assert_eq!(dm["spec"]["userConfig"]["maxSlots"], 2);
    assert!(dm["spec"]["userConfig"].get("slots").is_none());
    assert_eq!(dm["spec"]["userId"], 0);
    assert_eq!(field(&status_of(&agent, "g1"), "state").unwrap(), "pending");

    // A blocked `wait` returns once the watch reports completion. The
    // simulated Rabbit leaves `never-*` alone: the test finishes the copy
    // once the reader sleeps in the kernel, so the wait has blocked
    // however loaded the machine is.
    let cat = agent.blocked_cat("g1/wait");
    let resource = dm["metadata"]["name"].as_str().unwrap();
    set_dm_status(&cluster.server, RABBIT, resource, |o| {
        o["status"] = json!({
            "state": "Finished", "status": "Success", "startTime": utc_now(),
            "endTime": utc_now(), "restarts": 0,
            "commandStatus": {"command": "mpirun dcp src dest", "progress": 100},
        });
    })
    .expect("g1's NnfDataMovement");
    let out = cat.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let waited = stdout(&out);
    assert_eq!(field(&waited, "state").unwrap(), "completed");
    assert_eq!(field(&waited, "status").unwrap(), "success");

    // poll() wakes on a change of state.
    let out = sh(&format!(
        "echo 'name=g2 workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/x destination=/home/me/x' > {}",
        agent.path("request").display()
    ));
    assert!(out.status.success());
    let script = format!(
        "import os, select\nfd = os.open({:?}, os.O_RDONLY)\nos.read(fd, 4096)\np = select.poll()\np.register(fd, select.POLLPRI | select.POLLIN)\nprint(len(p.poll(20000)))\n",
        agent.path("g2/state").to_str().unwrap()
    );
    let out = python(&script);
    assert_eq!(stdout(&out).trim(), "1", "{}", stderr(&out));
}

#[test]
fn every_rejection_has_its_errno_and_reason() {
    let cluster = Cluster::new();
    // Two default profiles would be an error: keep one (seeded).
    let agent = cluster.agent(&[]);
    let u = user("nnfdmt1");
    let cases: &[(&str, &str, &str)] = &[
        ("source=/mnt/nnf/lus-0/a destination=/lus/global/x", "EINVAL", "no workflow"),
        ("workflow=nope namespace=default source=/mnt/nnf/lus-0/a destination=/lus/global/x", "ENOENT", "workflow default/nope not found"),
        ("workflow=wf-setup namespace=default source=/mnt/nnf/lus-0/a destination=/lus/global/x", "EPERM", "PreRun/Completed"),
        ("workflow=wf1 namespace=default source=/mnt/nnf/lus-00/a destination=/lus/global/x", "ENOENT", "holds /mnt/nnf/lus-00/a"),
        ("workflow=wf1 namespace=default source=/mnt/nnf/xfs-2/a destination=/lus/global/x", "EINVAL", "filesystem not supported: 'xfs'"),
        ("workflow=wf1 namespace=default source=/mnt/nnf/raw-3/a destination=/lus/global/x", "EINVAL", "filesystem not supported: 'none'"),
        ("workflow=wf1 namespace=default source=/mnt/nnf/orphan-4/a destination=/x", "ENOENT", "on Rabbit rabbit-1"),
        ("workflow=wf1 namespace=default source=/mnt/nnf/lus-0/a destination=/lus/globalx/y", "ENOENT", "LustreFileSystem"),
        ("workflow=wf1 namespace=default source=/mnt/nnf/lus-0/a destination=/lus/global/x profile=nope", "ENOENT", "profile 'nope' not found"),
        ("workflow=wf1 namespace=default source=relative destination=/x", "EINVAL", ""),
    ];
    for (request, errno, reason) in cases {
        let got = write_as(&agent, Some(&u), request);
        assert_eq!(&got, errno, "{request}");
        let line = last_error(&agent, Some(&u));
        assert!(
            line.contains(errno) && line.contains(reason),
            "{request}: errors line {line:?}"
        );
    }
    // EEXIST on a name in use.
    assert_eq!(
        write_as(&agent, Some(&u), &format!("name=dup {LUS_REQ}")),
        "ok"
    );
    assert_eq!(
        write_as(&agent, Some(&u), &format!("name=dup {LUS_REQ}")),
        "EEXIST"
    );
    // Nothing was created for any rejection.
    assert_eq!(cluster.dms().len(), 1);
    // The root user's errors are its own.
    assert!(!errors_of(&agent, None).contains("no workflow"));
    // A generated name reads back on the same descriptor.
    let out = sh(&format!(
        "exec 3<>{}; echo '{LUS_REQ}' >&3; read -r n <&3; echo $n",
        agent.path("request").display()
    ));
    let name = stdout(&out).trim().to_string();
    assert!(name.starts_with("dm-"), "{name:?} {}", stderr(&out));
    assert!(agent.path(&name).is_dir());
}

#[test]
fn cancel_rmdir_and_deletion_by_others() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&[]);
    let req = |name: &str, dest: &str| {
        format!("name={name} workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/home/me/{dest}")
    };
    // Running copy: rmdir is EBUSY, cancel → cancelling → completed/cancelled.
    assert!(agent.request(&req("c1", "hold1")).status.success());
    wait_state(&agent, "c1", "running", LONG);
    let rm = python(&format!(
        "import os, errno\ntry:\n    os.rmdir({:?})\n    print('ok')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])",
        agent.path("c1").to_str().unwrap()
    ));
    assert_eq!(stdout(&rm).trim(), "EBUSY");
    assert!(
        sh(&format!("echo 1 > {}", agent.path("c1/cancel").display()))
            .status
            .success()
    );
    let status = wait_state(&agent, "c1", "completed", LONG);
    assert_eq!(field(&status, "status").unwrap(), "cancelled");
    assert_eq!(cluster.dm_of("c1")["spec"]["cancel"], true);
    let res = cluster.dm_of("c1")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(sh(&format!("rmdir {}", agent.path("c1").display()))
        .status
        .success());
    assert!(!agent.path("c1").exists());
    assert!(
        cluster.server.wait_gone(DM, RABBIT, &res, LONG),
        "resource deleted"
    );

    // Cancelled before it ever started: completed/cancelled, and deletable.
    assert!(agent.request(&req("c2", "never1")).status.success());
    assert!(
        sh(&format!("echo 1 > {}", agent.path("c2/cancel").display()))
            .status
            .success()
    );
    let status = wait_state(&agent, "c2", "completed", LONG);
    assert_eq!(field(&status, "status").unwrap(), "cancelled");
    let res = cluster.dm_of("c2")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(sh(&format!("rmdir {}", agent.path("c2").display()))
        .status
        .success());
    assert!(cluster.server.wait_gone(DM, RABBIT, &res, LONG));

    // Cancel of a completed operation: nothing happens.
    assert!(agent.request(&req("c3", "ok")).status.success());
    let status = wait_state(&agent, "c3", "completed", LONG);
    assert!(
        sh(&format!("echo 1 > {}", agent.path("c3/cancel").display()))
            .status
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        field(&status_of(&agent, "c3"), "status").unwrap(),
        field(&status, "status").unwrap()
    );
    assert_eq!(cluster.dm_of("c3")["spec"]["cancel"], false);

    // Failed and invalid copies say so.
    assert!(agent.request(&req("f1", "fail1")).status.success());
    let status = wait_state(&agent, "f1", "completed", LONG);
    assert_eq!(field(&status, "status").unwrap(), "failed");
    assert_eq!(
        field(&status, "message").unwrap(),
        "dcp: permission denied\\nexit status 1"
    );
    assert_eq!(
        agent.read("f1/message").unwrap(),
        "dcp: permission denied\nexit status 1\n"
    );
    assert!(agent.request(&req("i1", "invalid1")).status.success());
    assert_eq!(
        field(&wait_state(&agent, "i1", "completed", LONG), "status").unwrap(),
        "invalid"
    );

    // Workflow teardown deletes the resource: the operation disappears.
    let res = cluster.dm_of("c3")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.server.delete_object(DM, RABBIT, &res).unwrap();
    assert!(
        wait_until(LONG, || !agent.path("c3").exists()),
        "c3 gone after deletion"
    );
    // A deletionTimestamp (Rabbit finalizer still on) counts as gone too.
    let res = cluster.dm_of("f1")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    cluster
        .server
        .modify_object(DM, RABBIT, &res, |o| {
            o["metadata"]["finalizers"] = json!(["nnf.cray.hpe.com/rabbit"])
        })
        .unwrap()
        .unwrap();
    cluster.server.delete_object(DM, RABBIT, &res).unwrap();
    assert!(
        wait_until(LONG, || !agent.path("f1").exists()),
        "f1 gone while being deleted"
    );
}

#[test]
fn a_restarted_agent_lists_every_operation_with_owner_and_status() {
    let cluster = Cluster::new();
    let mut agent = cluster.agent(&[]);
    let u1 = user("nnfdmt1");
    let u2 = user("nnfdmt2");
    assert_eq!(
        write_as(&agent, Some(&u1), &format!("name=r1 {LUS_REQ}")),
        "ok"
    );
    assert_eq!(
        write_as(&agent, Some(&u2), "name=r2 workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/home/x/hold"),
        "ok"
    );
    wait_state(&agent, "r1", "completed", LONG);
    wait_state(&agent, "r2", "running", LONG);
    let before_r1 = status_of(&agent, "r1");
    assert_eq!(agent.stop().code(), Some(0));
    agent.restart();
    // Listed again at once, with owners, status and request.
    use std::os::unix::fs::MetadataExt;
    let m1 = std::fs::metadata(agent.path("r1")).unwrap();
    assert_eq!((m1.uid(), m1.gid()), (u1.uid, u1.gid));
    let m2 = std::fs::metadata(agent.path("r2")).unwrap();
    assert_eq!((m2.uid(), m2.gid()), (u2.uid, u2.gid));
    let after_r1 = status_of(&agent, "r1");
    for key in [
        "state",
        "status",
        "start_time",
        "end_time",
        "progress",
        "items",
    ] {
        assert_eq!(field(&after_r1, key), field(&before_r1, key), "{key}");
    }
    assert_eq!(field(&status_of(&agent, "r2"), "state").unwrap(), "running");
    assert!(agent
        .read("r1/request")
        .unwrap()
        .contains("source=/mnt/nnf/lus-0/ckpt/step10"));
    // Still controllable after the restart.
    assert!(sh_as(
        &u2,
        &format!("echo 1 > {}", agent.path("r2/cancel").display())
    )
    .status
    .success());
    wait_state(&agent, "r2", "completed", LONG);
    // Each user sees only their own.
    let ls = stdout(&sh_as(&u1, &format!("ls {}", agent.mnt.display())));
    assert!(ls.contains("r1") && !ls.contains("r2"), "{ls}");
}

#[test]
fn ownership_between_two_users() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&[]);
    let u1 = user("nnfdmt1");
    let u2 = user("nnfdmt2");
    assert_eq!(
        write_as(&agent, Some(&u1), "name=own1 workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/home/x/hold"),
        "ok"
    );
    let dm = cluster.dm_of("own1");
    assert_eq!(dm["spec"]["userId"], u1.uid);
    assert_eq!(dm["spec"]["groupId"], u1.gid);
    wait_state(&agent, "own1", "running", LONG);
    // u2 can neither read, nor cancel, nor remove it.
    let out = sh_as(&u2, &format!("cat {}", agent.path("own1/status").display()));
    assert!(!out.status.success());
    let out = sh_as(
        &u2,
        &format!("echo 1 > {}", agent.path("own1/cancel").display()),
    );
    assert!(!out.status.success());
    let out = sh_as(&u2, &format!("rmdir {}", agent.path("own1").display()));
    assert!(!out.status.success());
    let ls = stdout(&sh_as(&u2, &format!("ls {}", agent.mnt.display())));
    assert!(!ls.contains("own1"), "{ls}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        cluster.dm_of("own1")["spec"]["cancel"],
        false,
        "u2's cancel did nothing"
    );
    // u2 taking the same name: EEXIST.
    assert_eq!(
        write_as(&agent, Some(&u2), "name=own1 workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/home/x/y"),
        "EEXIST"
    );
    // The owner can.
    assert!(sh_as(
        &u1,
        &format!("echo 1 > {}", agent.path("own1/cancel").display())
    )
    .status
    .success());
    wait_state(&agent, "own1", "completed", LONG);
    assert!(
        sh_as(&u1, &format!("rmdir {}", agent.path("own1").display()))
            .status
            .success()
    );
}

#[test]
fn startup_checks_and_api_down_at_start() {
    let cluster = Cluster::new();
    let dir = scratch();
    let run = |args: &[String]| {
        std::process::Command::new(bin("nnf-dm"))
            .arg("--mountpoint")
            .arg(dir.path().join("mnt"))
            .arg("--socket")
            .arg("")
            .args(args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("KUBECONFIG")
            .env_remove("NNF_DATA_MOVEMENT_SERVICE_TOKEN_FILE")
            .env_remove("NNF_DATA_MOVEMENT_SERVICE_CERT_FILE")
            .output()
            .unwrap()
    };
    let port = cluster.server.port().to_string();
    let token = cluster
        .server
        .token_file(NNF_DM)
        .to_str()
        .unwrap()
        .to_string();
    let ca = cluster.server.ca_file().to_str().unwrap().to_string();
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases = [
        (
            s(&["--kubernetes-service-port", &port]),
            "--kubernetes-service-host",
        ),
        (
            s(&[
                "--kubernetes-service-host",
                "127.0.0.1",
                "--kubernetes-service-port",
                &port,
            ]),
            "--service-token-file not given",
        ),
        (
            s(&[
                "--kubernetes-service-host",
                "127.0.0.1",
                "--kubernetes-service-port",
                &port,
                "--service-token-file",
                "/nonexistent",
            ]),
            "cannot read",
        ),
        (
            s(&[
                "--kubernetes-service-host",
                "127.0.0.1",
                "--kubernetes-service-port",
                &port,
                "--service-token-file",
                &token,
            ]),
            "--service-cert-file not given",
        ),
        (
            s(&[
                "--kubernetes-service-host",
                "127.0.0.1",
                "--kubernetes-service-port",
                &port,
                "--service-token-file",
                &token,
                "--service-cert-file",
                &token,
            ]),
            "not a valid PEM",
        ),
    ];
    for (args, message) in cases {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
    // No --nnf-node-name: the Rabbit comes from the SystemConfiguration.
    // API down: that lookup fails at once, with a message, exit 1.
    cluster.server.set_down(true);
    let base = s(&[
        "--backend",
        "kubernetes",
        "--kubernetes-service-host",
        "127.0.0.1",
        "--kubernetes-service-port",
        &port,
        "--service-token-file",
        &token,
        "--service-cert-file",
        &ca,
        "--node-name",
        NODE,
        "--kubernetes-timeout",
        "2s",
    ]);
    let started = Instant::now();
    let out = run(&base);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("SystemConfiguration default/default"),
        "{}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    cluster.server.set_down(false);
    // Up, but this node in no storage node: a clear message.
    cluster.server.put_object(json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7", "kind": "SystemConfiguration",
        "metadata": {"name": "default", "namespace": "default"},
        "spec": {"portsCooldownInSeconds": 60, "storageNodes": [
            {"name": RABBIT, "type": "Rabbit", "computesAccess": [{"name": "other", "index": 0}]}]},
    }));
    let out = run(&base);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no storage node lists compute-1"),
        "{}",
        stderr(&out)
    );
    // Listed: found, and used as the namespace of GFS2 copies.
    cluster
        .server
        .modify_object("SystemConfiguration", "default", "default", |o| {
            o["spec"]["storageNodes"][0]["computesAccess"][0]["name"] = json!(NODE);
        })
        .unwrap()
        .unwrap();
    let args: Vec<String> = base.iter().filter(|a| !a.is_empty()).cloned().collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&refs);
    assert!(agent
        .request("name=s1 workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x")
        .status
        .success());
    assert_eq!(cluster.dm_of("s1")["metadata"]["namespace"], RABBIT);
    // Kept current: the node moved to another Rabbit, new copies go there
    // (which has no mount of the workflow yet: ENOENT names it).
    cluster
        .server
        .modify_object("SystemConfiguration", "default", "default", |o| {
            o["spec"]["storageNodes"] = json!([
                {"name": RABBIT, "type": "Rabbit", "computesAccess": []},
                {"name": "rabbit-2", "type": "Rabbit", "computesAccess": [{"name": NODE, "index": 0}]},
            ]);
        })
        .unwrap()
        .unwrap();
    assert!(
        wait_until(LONG, || write_as(
            &agent,
            None,
            "workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x"
        ) == "ENOENT"
            && last_error(&agent, None).contains("on Rabbit rabbit-2")),
        "{}\n{}",
        errors_of(&agent, None),
        agent.log()
    );
    assert!(agent.log().contains("moved this node to another Rabbit"));
    drop(agent);

    // With --nnf-node-name and the API down: the agent serves anyway,
    // requests fail with EAGAIN, and operations appear once it is back.
    cluster.server.set_down(true);
    let agent = cluster.agent(&["--kubernetes-timeout", "2s"]);
    let started = Instant::now();
    assert_eq!(
        write_as(&agent, None, &format!("name=d1 {LUS_REQ}")),
        "EAGAIN"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(last_error(&agent, None).contains("EAGAIN"));
    cluster.server.set_down(false);
    assert!(
        wait_until(LONG, || agent.path("s1").exists()),
        "listed once the API is back"
    );
    assert!(wait_until(LONG, || write_as(
        &agent,
        None,
        &format!("name=d1 {LUS_REQ}")
    ) == "ok"));
}

#[test]
fn api_down_mid_watch_reads_answer_stale_then_recover() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&["--kubernetes-timeout", "2s"]);
    assert!(agent
        .request(
            "name=w1 workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x/hold"
        )
        .status
        .success());
    wait_state(&agent, "w1", "running", LONG);
    cluster.server.set_down(true);
    // Reads keep answering, and the message says the data may be stale.
    assert!(
        wait_until(LONG, || agent
            .read("w1/message")
            .unwrap_or_default()
            .contains("may be stale")),
        "stale note; log:\n{}",
        agent.log()
    );
    let t = Instant::now();
    let status = status_of(&agent, "w1");
    // One that asked the API server would wait out the 2 s timeout.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(field(&status, "state").unwrap(), "running");
    // A request fails with EAGAIN after the timeout; no caller hangs.
    let t = Instant::now();
    assert_eq!(
        write_as(&agent, None, &format!("name=w2 {LUS_REQ}")),
        "EAGAIN"
    );
    assert!(t.elapsed() < Duration::from_secs(6));
    // A cancel made while down is delivered once the server is back.
    assert!(
        sh(&format!("echo 1 > {}", agent.path("w1/cancel").display()))
            .status
            .success()
    );
    std::thread::sleep(Duration::from_millis(500));
    cluster.server.set_down(false);
    let status = wait_state(&agent, "w1", "completed", LONG);
    assert_eq!(field(&status, "status").unwrap(), "cancelled");
    assert!(!agent.read("w1/message").unwrap().contains("stale"));
    // Nothing lost: the watch resumed.
    assert_eq!(write_as(&agent, None, &format!("name=w2 {LUS_REQ}")), "ok");
    wait_state(&agent, "w2", "completed", LONG);
}

#[test]
fn slow_api_server_gives_eagain_after_the_timeout_and_leaves_nothing_behind() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&["--kubernetes-timeout", "1s"]);
    // Longer than the four writers' timeouts end to end (the kernel lets
    // one write(2) of `request` in at a time): only the agent's timeout can
    // answer them.
    let latency = Duration::from_secs(10);
    let since = Instant::now();
    cluster.server.set_latency(latency);
    // Several writers at once: each answered EAGAIN after the timeout.
    let t = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let path = agent.path("request");
            std::thread::spawn(move || {
                let out = python(&format!(
                    "import os, errno\nfd = os.open({:?}, os.O_WRONLY)\ntry:\n    os.write(fd, b'name=slow{i} {LUS_REQ}')\n    print('ok')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n",
                    path.to_str().unwrap()
                ));
                stdout(&out).trim().to_string()
            })
        })
        .collect();
    // Reads meanwhile are not held up: answered while the writers wait.
    assert!(agent.read("version").is_ok());
    assert!(
        handles.iter().any(|h| !h.is_finished()),
        "the read waited for the writers"
    );
    for h in handles {
        assert_eq!(h.join().unwrap(), "EAGAIN");
    }
    // Answered by the agent's timeout, not by the API server.
    assert!(t.elapsed() < latency, "{:?}", t.elapsed());
    assert!(last_error(&agent, None).contains("within 1s"));
    cluster.server.set_latency(Duration::ZERO);
    // None of them exists, here or (after late creations are cleaned up) there.
    assert!(!agent.path("slow0").exists());
    // What the writers' checks had sent is answered before we look.
    assert!(wait_until(LONG, || cluster.server.requests().iter().any(
        |r| r.at >= since && r.resource.as_deref() == Some("workflows")
    )));
    assert!(
        wait_until(LONG, || cluster.dms().is_empty()),
        "late creations deleted: {:?}",
        cluster
            .dms()
            .iter()
            .map(|o| o["metadata"]["name"].clone())
            .collect::<Vec<_>>()
    );
    assert!(wait_until(LONG, || write_as(
        &agent,
        None,
        &format!("name=slow0 {LUS_REQ}")
    ) == "ok"));
}

/// A writer waiting while its NnfDataMovement's create is in flight ends at
/// once on SIGINT or SIGKILL; the create it abandoned is deleted, its name
/// is free again, and `errors` has no line for it.
#[test]
fn writer_interrupted_while_the_create_is_in_flight_ends_at_once_and_leaves_nothing() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&["--kubernetes-timeout", "30s"]);
    // Warm: the checks' lookups answer from the caches and watches.
    assert_eq!(
        write_as(&agent, None, &format!("name=warm {LUS_REQ}")),
        "ok"
    );
    wait_state(&agent, "warm", "completed", LONG);
    let creates = || cluster.server.request_count("create", "nnfdatamovements");
    let before = creates();
    // Far longer than the writers may take to end.
    let latency = Duration::from_secs(12);
    cluster.server.set_create_latency(latency);
    // One at a time: the kernel lets one write(2) of `request` in at once.
    for (i, signal) in [libc::SIGINT, libc::SIGKILL].into_iter().enumerate() {
        let mut child = std::process::Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(format!(
                "import os\nfd = os.open({:?}, os.O_WRONLY)\nos.write(fd, b'name=intr{i} {LUS_REQ}')\n",
                agent.path("request").to_str().unwrap()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Its create reaches the API server, where it waits.
        assert!(
            wait_until(LONG, || cluster.server.creates_waiting() == i + 1),
            "the create of intr{i} never started; log:\n{}",
            agent.log()
        );
        let signalled = Instant::now();
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        assert!(
            wait_until(LONG, || child.try_wait().unwrap().is_some()),
            "writer intr{i} never ended"
        );
        // Long before the API server answers its create.
        assert!(
            signalled.elapsed() < latency / 2,
            "writer intr{i} ended after {:?}",
            signalled.elapsed()
        );
    }
    assert_eq!(
        creates(),
        before,
        "a create was answered before its writer ended"
    );
    assert!(!agent.path("intr0").exists() && !agent.path("intr1").exists());
    cluster.server.set_create_latency(Duration::ZERO);
    // The creates complete, and what they made is deleted.
    assert!(wait_until(LONG, || creates() >= before + 2));
    assert!(
        wait_until(LONG, || cluster.dms().len() == 1),
        "abandoned creates deleted: {:?}",
        cluster
            .dms()
            .iter()
            .map(|o| o["metadata"]["name"].clone())
            .collect::<Vec<_>>()
    );
    assert!(!agent.path("intr0").exists() && !agent.path("intr1").exists());
    assert!(!errors_of(&agent, None).contains("intr"));
    // The names are free again.
    assert!(wait_until(LONG, || write_as(
        &agent,
        None,
        &format!("name=intr0 {LUS_REQ}")
    ) == "ok"));
    wait_state(&agent, "intr0", "completed", LONG);
}

#[test]
fn conflict_storm_on_cancel_and_410_on_watch() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&[]);
    assert!(agent
        .request(
            "name=k1 workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x/hold"
        )
        .status
        .success());
    wait_state(&agent, "k1", "running", LONG);
    cluster
        .server
        .fail_next_matching(Some("patch"), Some("nnfdatamovements"), 409, 8);
    assert!(
        sh(&format!("echo 1 > {}", agent.path("k1/cancel").display()))
            .status
            .success()
    );
    let status = wait_state(&agent, "k1", "completed", LONG);
    assert_eq!(field(&status, "status").unwrap(), "cancelled");
    let conflicts = cluster
        .server
        .requests()
        .iter()
        .filter(|r| r.verb.as_deref() == Some("patch") && r.status == 409)
        .count();
    assert_eq!(conflicts, 8);

    // 410 Gone: the watch lists again; changes made meanwhile arrive.
    assert!(agent
        .request(
            "name=k2 workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x/hold2"
        )
        .status
        .success());
    wait_state(&agent, "k2", "running", LONG);
    cluster.server.expire_watches();
    let res = cluster.dm_of("k2")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    set_dm_status(&cluster.server, RABBIT, &res, |o| {
        o["spec"]["cancel"] = json!(true)
    });
    let status = wait_state(&agent, "k2", "completed", LONG);
    assert_eq!(field(&status, "status").unwrap(), "cancelled");
    let lists = cluster
        .server
        .requests()
        .iter()
        .filter(|r| {
            r.verb.as_deref() == Some("list") && r.resource.as_deref() == Some("nnfdatamovements")
        })
        .count();
    assert!(lists >= 3, "re-listed after 410 ({lists} lists)");
    // Deleted while the watch was gone: noticed on the re-list.
    cluster.server.set_down(true);
    std::thread::sleep(Duration::from_millis(300));
    let res1 = cluster.dm_of("k1")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.server.delete_object(DM, RABBIT, &res1).unwrap();
    cluster.server.expire_watches();
    cluster.server.set_down(false);
    assert!(
        wait_until(LONG, || !agent.path("k1").exists()),
        "k1 gone after re-list"
    );
}

#[test]
fn only_the_nnf_dm_clusterrole_is_needed_and_qps_is_limited() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&["--kubernetes-qps", "5", "--kubernetes-burst", "5"]);
    // Let the buckets fill again after the startup lists and watches.
    assert_eq!(
        write_as(
            &agent,
            None,
            "name=q-warm workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x/qw"
        ),
        "ok"
    );
    std::thread::sleep(Duration::from_millis(1500));
    cluster.server.clear_requests();
    let t = Instant::now();
    let creates = 12;
    let handles: Vec<_> = (0..creates)
        .map(|i| {
            let path = agent.path("request");
            std::thread::spawn(move || {
                sh(&format!(
                    "echo 'name=q{i} workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x/q{i}' > {}",
                    path.display()
                ))
                .status
                .success()
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap());
    }
    let elapsed = t.elapsed();
    let requests = cluster.server.requests();
    let creates_seen: Vec<_> = requests
        .iter()
        .filter(|r| {
            r.account.as_deref() == Some(NNF_DM)
                && r.verb.as_deref() == Some("create")
                && r.resource.as_deref() == Some("nnfdatamovements")
        })
        .collect();
    assert_eq!(creates_seen.len(), creates);
    // The limit is per kind (as upstream's controller-runtime client): 5
    // NnfDataMovement creates at once, then 5/s: at least (12 - 5) / 5 s.
    assert!(
        elapsed >= Duration::from_secs(1),
        "{elapsed:?} for {creates} creates at qps 5 burst 5"
    );
    let mut per_second: HashMap<u64, usize> = HashMap::new();
    let first = creates_seen[0].at;
    for r in &creates_seen {
        *per_second
            .entry(r.at.duration_since(first).as_secs())
            .or_default() += 1;
    }
    let max = per_second.values().copied().max().unwrap();
    assert!(
        max <= 11,
        "at most burst + qps creates in any second: {per_second:?}"
    );
    // No request was refused by RBAC; no watch on Workflows or ClientMounts,
    // no cluster-wide NnfDataMovement list.
    let all = cluster.server.requests();
    assert!(
        all.iter().all(|r| r.status != 403),
        "403s: {:?}",
        all.iter().filter(|r| r.status == 403).collect::<Vec<_>>()
    );
    for r in &all {
        if r.verb.as_deref() == Some("watch") {
            assert!(
                matches!(
                    r.resource.as_deref(),
                    Some("nnfdatamovements" | "lustrefilesystems" | "nnfdatamovementprofiles")
                ),
                "{r:?}"
            );
        }
        if r.resource.as_deref() == Some("nnfdatamovements") {
            assert!(r.namespace.is_some(), "{r:?}");
        }
    }
}

// ---- the gRPC door over this backend ----

/// Runs `action` over gRPC as `user` with `env`; its `key=value` output.
fn grpc_as(agent: &Agent, user: &User, action: &[&str], env: &[(&str, &str)]) -> String {
    grpc_client::helper_as(&agent.socket(), user, action, env)
}

/// A gRPC `Status` of `uid` waiting up to `max_wait` seconds, with
/// `finish` run once the agent says the wait has begun: the answer then
/// comes from a wait that blocked, however loaded the machine is.
fn grpc_wait_across(
    agent: &Agent,
    user: &User,
    uid: &str,
    max_wait: &str,
    finish: impl FnOnce(),
) -> String {
    let waits_before = agent.status_waits();
    std::thread::scope(|scope| {
        let wait = scope.spawn(|| grpc_as(agent, user, &["status", uid, max_wait], &[]));
        assert!(
            wait_until(LONG, || agent.status_waits() > waits_before),
            "the Status wait never began: {}",
            agent.log()
        );
        finish();
        wait.join().unwrap()
    })
}

fn grpc_list(agent: &Agent, user: &User) -> Vec<String> {
    field(&grpc_as(agent, user, &["list"], &[]), "uids")
        .unwrap()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Creates a copy as `user` with the workflow `wf1/default` in the message;
/// insists on SUCCESS and returns the operation's name.
fn grpc_created(agent: &Agent, user: &User, source: &str, destination: &str) -> String {
    let out = grpc_as(
        agent,
        user,
        &["create", source, destination, "copy"],
        &[(grpc_client::HELPER_WORKFLOW, "wf1/default")],
    );
    assert_eq!(field(&out, "status").unwrap(), "SUCCESS", "{out}");
    assert_eq!(field(&out, "message").unwrap(), "", "{out}");
    field(&out, "uid").unwrap()
}

fn resource_name(dm: &Value) -> String {
    dm["metadata"]["name"].as_str().unwrap().to_string()
}

fn grpc_state(r: &DataMovementStatusResponse) -> (State, OpStatus) {
    (
        State::try_from(r.state).unwrap(),
        OpStatus::try_from(r.status).unwrap(),
    )
}

#[test]
fn grpc_create_makes_the_resource_and_a_status_wait_wakes_when_the_rabbit_finishes() {
    let cluster = Cluster::with_step(Duration::from_millis(400));
    let agent = cluster.agent(&[]);
    let (u1, u2) = (user("nnfdmt1"), user("nnfdmt2"));
    let uid = grpc_created(&agent, &u1, "/mnt/nnf/gfs-1/a/b", "/home/me/gate-out");
    assert!(uid.starts_with("dm-"), "generated name: {uid}");

    // The resource, as for a write to `request`, with the caller's identity
    // taken from the connection's peer credentials.
    let dm = cluster.dm_of(&uid);
    let wf_uid =
        cluster.server.get_object("Workflow", WF_NS, "wf1").unwrap()["metadata"]["uid"].clone();
    assert_eq!(dm["metadata"]["namespace"], RABBIT);
    assert_eq!(dm["metadata"]["generateName"], "nnf-dm-node-");
    assert!(resource_name(&dm).starts_with("nnf-dm-node-"));
    assert_eq!(
        dm["metadata"]["labels"],
        json!({
            "dm.cray.hpe.com/initiator": NODE,
            "dataworkflowservices.github.io/workflow.name": "wf1",
            "dataworkflowservices.github.io/workflow.namespace": WF_NS,
            "dataworkflowservices.github.io/workflow.uid": wf_uid,
            "dataworkflowservices.github.io/owner.kind": "Workflow",
            "dataworkflowservices.github.io/owner.name": "wf1",
            "dataworkflowservices.github.io/owner.namespace": WF_NS,
            "dataworkflowservices.github.io/owner.uid": wf_uid,
            "nnf.cray.hpe.com/teardown_state": "PostRun",
        })
    );
    assert_eq!(
        dm["spec"],
        json!({
            "cancel": false,
            "source": {"path": "/rabbit/gfs-1/compute-1/a/b",
                       "storageReference": {"kind": "NnfNodeBlockStorage", "name": "wf1-1", "namespace": RABBIT}},
            "destination": {"path": "/home/me/gate-out"},
            "userId": u1.uid,
            "groupId": u1.gid,
            "profileReference": {"kind": "NnfDataMovementProfile", "name": "default", "namespace": "nnf-system"},
            "userConfig": {"dryrun": false, "mpirunOptions": "", "dcpOptions": "",
                           "logStdout": false, "storeStdout": false},
        })
    );
    let note: Value = serde_json::from_str(
        dm["metadata"]["annotations"]["dm.cray.hpe.com/nnf-dm-operation"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (note["uid"].clone(), note["gid"].clone()),
        (json!(u1.uid), json!(u1.gid))
    );

    // The same operation through the control files, owned by the caller.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(agent.path(&uid)).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (u1.uid, u1.gid));
    let request = agent.read(&format!("{uid}/request")).unwrap();
    assert_eq!(field(&request, "workflow").unwrap(), "wf1");
    assert_eq!(field(&request, "namespace").unwrap(), "default");
    assert_eq!(field(&request, "profile").unwrap(), "default");

    // Still going: never INVALID (the zero value).
    let now = grpc_as(&agent, &u1, &["status", &uid, "0"], &[]);
    assert_ne!(field(&now, "state").unwrap(), "COMPLETED", "{now}");
    assert_eq!(field(&now, "status").unwrap(), "UNKNOWN_STATUS", "{now}");

    // A wait wakes when the Rabbit finishes, which it does only once the
    // wait has begun.
    let done = grpc_wait_across(&agent, &u1, &uid, "30", || cluster.release(&uid));
    let waited: u64 = field(&done, "waited_ms").unwrap().parse().unwrap();
    assert!(waited < 10_000, "answered after {waited} ms: {done}");
    assert_eq!(field(&done, "state").unwrap(), "COMPLETED", "{done}");
    assert_eq!(field(&done, "status").unwrap(), "SUCCESS", "{done}");
    assert_eq!(field(&done, "message").unwrap(), "");
    assert_eq!(field(&done, "command_status").unwrap(), "true");
    assert_eq!(
        field(&done, "command").unwrap(),
        "mpirun dcp --progress 1 src dest"
    );
    assert_eq!(field(&done, "progress").unwrap(), "100");
    assert_eq!(
        field(&done, "last_message").unwrap(),
        "Copied 1.000 GiB (50%)"
    );
    let elapsed = field(&done, "elapsed_time").unwrap();
    assert!(
        elapsed.ends_with('s') && !elapsed.contains(' '),
        "Go-style duration: {elapsed}"
    );
    for key in ["start_time", "end_time", "last_message_time"] {
        let t = field(&done, key).unwrap();
        assert!(t.len() == 20 && t.ends_with('Z'), "{key}: {t:?}");
    }
    // Field by field against the control files of the same operation (read
    // by its owner).
    let status = stdout(&sh_as(
        &u1,
        &format!("cat {}", agent.path(&format!("{uid}/status")).display()),
    ));
    assert_eq!(field(&status, "state").unwrap(), "completed", "{status}");
    assert_eq!(field(&status, "status").unwrap(), "success");
    for (grpc, fs) in [
        ("command", "command"),
        ("progress", "progress"),
        ("last_message", "last_message"),
        ("last_message_time", "last_message_time"),
        ("start_time", "start_time"),
        ("end_time", "end_time"),
    ] {
        assert_eq!(field(&done, grpc), field(&status, fs), "{grpc}");
    }
    let json: Value =
        serde_json::from_str(&agent.read(&format!("{uid}/status.json")).unwrap()).unwrap();
    assert_eq!(json["commandStatus"]["elapsedTime"], json!(elapsed));
    // Once completed, a wait answers at once.
    let again = grpc_as(&agent, &u1, &["status", &uid, "-1"], &[]);
    assert_eq!(field(&again, "status").unwrap(), "SUCCESS");
    assert!(field(&again, "waited_ms").unwrap().parse::<u64>().unwrap() < 2000);

    // One written by `echo` is seen over gRPC too.
    let out = agent.request_as(
        &u1,
        "name=e1 workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/e destination=/home/me/e",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut mine = grpc_list(&agent, &u1);
    mine.sort();
    let mut expected = vec!["e1".to_string(), uid.clone()];
    expected.sort();
    assert_eq!(mine, expected);
    let e1 = grpc_as(&agent, &u1, &["status", "e1", "30"], &[]);
    assert_eq!(field(&e1, "status").unwrap(), "SUCCESS", "{e1}");

    // Another user: none of it exists.
    assert_eq!(grpc_list(&agent, &u2), Vec::<String>::new());
    for other in [uid.as_str(), "e1"] {
        let s = grpc_as(&agent, &u2, &["status", other, "-1"], &[]);
        assert_eq!(field(&s, "state").unwrap(), "UNKNOWN_STATE", "{s}");
        assert_eq!(field(&s, "status").unwrap(), "NOT_FOUND", "{s}");
        assert_eq!(field(&s, "command_status").unwrap(), "false");
        let s = grpc_as(&agent, &u2, &["cancel", other], &[]);
        assert_eq!(field(&s, "status").unwrap(), "NOT_FOUND", "{s}");
        let s = grpc_as(&agent, &u2, &["delete", other], &[]);
        assert_eq!(field(&s, "status").unwrap(), "NOT_FOUND", "{s}");
    }
    assert_eq!(cluster.dm_of(&uid)["spec"]["cancel"], false);
    assert!(agent.path(&uid).is_dir() && agent.path("e1").is_dir());

    // The owner deletes: the resource goes too.
    let res = resource_name(&cluster.dm_of(&uid));
    let s = grpc_as(&agent, &u1, &["delete", &uid], &[]);
    assert_eq!(field(&s, "status").unwrap(), "SUCCESS", "{s}");
    assert_eq!(field(&s, "message").unwrap(), "");
    assert!(!agent.path(&uid).exists());
    assert!(
        cluster.server.wait_gone(DM, RABBIT, &res, LONG),
        "resource deleted"
    );
    assert_eq!(grpc_list(&agent, &u1), ["e1"]);
    let gone = grpc_as(&agent, &u1, &["status", &uid, "0"], &[]);
    assert_eq!(field(&gone, "status").unwrap(), "NOT_FOUND", "{gone}");
    assert!(agent.log().lines().all(|l| !l.contains("panicked")));
}

#[test]
fn grpc_create_without_a_workflow_or_in_the_wrong_state_is_refused() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&[]);
    let u = user("nnfdmt1");
    let create = |env: &[(&str, &str)]| {
        grpc_as(
            &agent,
            &u,
            &["create", "/mnt/nnf/gfs-1/a", "/home/me/x", "copy"],
            env,
        )
    };
    // No workflow in the message, none in the caller's environment.
    let out = create(&[]);
    assert_eq!(field(&out, "status").unwrap(), "INVALID", "{out}");
    assert_eq!(field(&out, "uid").unwrap(), "");
    let message = field(&out, "message").unwrap();
    assert!(message.contains("no workflow"), "{out}");
    let line = last_error(&agent, Some(&u));
    assert!(
        line.contains(" EINVAL ") && line.contains(&message),
        "errors line {line:?}"
    );
    // A workflow that does not exist: FAILED, as upstream (ENOENT in the
    // errors file).
    let out = create(&[(grpc_client::HELPER_WORKFLOW, "nope/default")]);
    assert_eq!(field(&out, "status").unwrap(), "FAILED", "{out}");
    assert!(
        field(&out, "message")
            .unwrap()
            .contains("workflow default/nope not found"),
        "{out}"
    );
    assert!(last_error(&agent, Some(&u)).contains(" ENOENT "));
    // A workflow in the wrong state: the backend refuses, FAILED.
    for env in [
        &[(grpc_client::HELPER_WORKFLOW, "wf-setup/default")][..],
        &[
            ("DW_WORKFLOW_NAME", "wf-setup"),
            ("DW_WORKFLOW_NAMESPACE", "default"),
        ][..],
    ] {
        let out = create(env);
        assert_eq!(field(&out, "status").unwrap(), "FAILED", "{env:?}: {out}");
        assert_eq!(field(&out, "uid").unwrap(), "");
        assert!(
            field(&out, "message")
                .unwrap()
                .contains("is in state Setup/Completed"),
            "{out}"
        );
        let line = last_error(&agent, Some(&u));
        assert!(
            line.contains(" EPERM ") && line.contains("PreRun/Completed"),
            "errors line {line:?}"
        );
    }
    assert!(cluster.dms().is_empty(), "nothing created for a refusal");
    assert_eq!(grpc_list(&agent, &u), Vec::<String>::new());

    // The workflow from the caller's environment when the message has none.
    let out = create(&[
        ("DW_WORKFLOW_NAME", "wf1"),
        ("DW_WORKFLOW_NAMESPACE", "default"),
    ]);
    assert_eq!(field(&out, "status").unwrap(), "SUCCESS", "{out}");
    let uid = field(&out, "uid").unwrap();
    let dm = cluster.dm_of(&uid);
    assert_eq!(
        dm["metadata"]["labels"]["dataworkflowservices.github.io/workflow.name"],
        "wf1"
    );
    assert_eq!(dm["spec"]["userId"], u.uid);
    // ... and the message's workflow wins over the environment.
    let out = create(&[
        ("DW_WORKFLOW_NAME", "wf-setup"),
        ("DW_WORKFLOW_NAMESPACE", "default"),
        (grpc_client::HELPER_WORKFLOW, "wf1/default"),
    ]);
    assert_eq!(field(&out, "status").unwrap(), "SUCCESS", "{out}");
    assert_eq!(cluster.dms().len(), 2);
}

#[test]
fn grpc_cancel_and_delete_follow_the_resource() {
    // No simulated Rabbit: the test moves the resource's status itself, so
    // that each state is seen.
    let cluster = Cluster::bare();
    let agent = cluster.agent(&[]);
    let mut root = Client::of(&agent);
    let u = user("nnfdmt1");
    let uid = grpc_created(&agent, &u, "/mnt/nnf/gfs-1/a", "/home/me/hold");
    let res = resource_name(&cluster.dm_of(&uid));
    let r = root.status_until(&uid, |r| {
        grpc_state(r) == (State::Pending, OpStatus::UnknownStatus)
    });
    assert_eq!(r.start_time, "");
    let start = utc_now();
    set_dm_status(&cluster.server, RABBIT, &res, |o| {
        o["status"] = json!({"state": "Running", "startTime": start, "restarts": 0,
            "commandStatus": {"command": "mpirun dcp", "progress": 30,
                              "lastMessage": "Copied 3 of 10 items (30%)", "lastMessageTime": start}});
    })
    .unwrap();
    let running = root.status_until(&uid, |r| {
        grpc_state(r) == (State::Running, OpStatus::UnknownStatus)
    });
    assert_eq!(running.command_status.clone().unwrap().progress, 30);
    assert_eq!(running.start_time, start);

    // Running: Delete is ACTIVE and changes nothing.
    let s = grpc_as(&agent, &u, &["delete", &uid], &[]);
    assert_eq!(field(&s, "status").unwrap(), "ACTIVE", "{s}");
    assert!(field(&s, "message").unwrap().contains(&uid), "{s}");
    assert!(agent.path(&uid).is_dir());
    assert!(cluster.server.get_object(DM, RABBIT, &res).is_some());

    // Cancel: spec.cancel on the resource, CANCELLING until the Rabbit ends it.
    let s = grpc_as(&agent, &u, &["cancel", &uid], &[]);
    assert_eq!(field(&s, "status").unwrap(), "SUCCESS", "{s}");
    assert_eq!(field(&s, "message").unwrap(), "");
    assert!(
        wait_until(LONG, || cluster
            .server
            .get_object(DM, RABBIT, &res)
            .is_some_and(|o| o["spec"]["cancel"] == true)),
        "spec.cancel set; log:\n{}",
        agent.log()
    );
    root.status_until(&uid, |r| {
        grpc_state(r) == (State::Cancelling, OpStatus::UnknownStatus)
    });
    assert_eq!(
        field(&status_of(&agent, &uid), "state").unwrap(),
        "cancelling"
    );
    let s = grpc_as(&agent, &u, &["delete", &uid], &[]);
    assert_eq!(field(&s, "status").unwrap(), "ACTIVE", "{s}");

    // The owner's wait wakes when the Rabbit reports it cancelled, which it
    // does once the wait has begun.
    let done = grpc_wait_across(&agent, &u, &uid, "-1", || {
        set_dm_status(&cluster.server, RABBIT, &res, |o| {
            o["status"]["state"] = json!("Finished");
            o["status"]["status"] = json!("Cancelled");
            o["status"]["endTime"] = json!(utc_now());
            o["status"]["message"] = json!("cancelled by request");
        })
        .unwrap();
    });
    assert_eq!(field(&done, "state").unwrap(), "COMPLETED", "{done}");
    assert_eq!(field(&done, "status").unwrap(), "CANCELLED", "{done}");
    assert_eq!(field(&done, "message").unwrap(), "cancelled by request");
    assert_eq!(field(&done, "start_time").unwrap(), start);
    assert!(!field(&done, "end_time").unwrap().is_empty());
    let status = status_of(&agent, &uid);
    assert_eq!(field(&status, "status").unwrap(), "cancelled");
    // Cancel again on the completed operation: SUCCESS, nothing changes.
    let s = grpc_as(&agent, &u, &["cancel", &uid], &[]);
    assert_eq!(field(&s, "status").unwrap(), "SUCCESS", "{s}");

    // Finished: Delete succeeds, and the resource is deleted.
    let s = grpc_as(&agent, &u, &["delete", &uid], &[]);
    assert_eq!(field(&s, "status").unwrap(), "SUCCESS", "{s}");
    assert!(!agent.path(&uid).exists());
    assert!(
        cluster.server.wait_gone(DM, RABBIT, &res, LONG),
        "resource deleted"
    );
    let s = grpc_as(&agent, &u, &["delete", &uid], &[]);
    assert_eq!(field(&s, "status").unwrap(), "NOT_FOUND", "{s}");

    // Cancelled before the Rabbit ever started it: COMPLETED/CANCELLED at
    // once, and deletable.
    let uid = grpc_created(&agent, &u, "/mnt/nnf/gfs-1/a", "/home/me/never");
    let res = resource_name(&cluster.dm_of(&uid));
    let s = grpc_as(&agent, &u, &["cancel", &uid], &[]);
    assert_eq!(field(&s, "status").unwrap(), "SUCCESS", "{s}");
    let done = grpc_as(&agent, &u, &["status", &uid, "30"], &[]);
    assert_eq!(field(&done, "state").unwrap(), "COMPLETED", "{done}");
    assert_eq!(field(&done, "status").unwrap(), "CANCELLED", "{done}");
    assert_eq!(
        cluster.server.get_object(DM, RABBIT, &res).unwrap()["spec"]["cancel"],
        true
    );
    let s = grpc_as(&agent, &u, &["delete", &uid], &[]);
    assert_eq!(field(&s, "status").unwrap(), "SUCCESS", "{s}");
    assert!(cluster.server.wait_gone(DM, RABBIT, &res, LONG));
    assert_eq!(grpc_list(&agent, &u), Vec::<String>::new());
}

/// Benchmark (not in the normal run):
/// `cargo test -p integration-tests --test kube_backend --release -- --ignored bench --nocapture`
#[test]
#[ignore]
fn bench_tracking_and_creating() {
    let mut report = String::new();
    for n in [1_000usize, 10_000] {
        let cluster = Cluster::bare();
        // n operations the agent created earlier (as a restart finds them).
        for i in 0..n {
            let note = json!({"name": format!("b{i}"), "uid": 0, "gid": 0,
                "request": {"name": format!("b{i}"), "source": "/mnt/nnf/gfs-1/a", "destination": "/x",
                  "workflow": "wf1", "namespace": "default", "profile": "default", "dryrun": false,
                  "slots": -1, "max_slots": -1, "dcp_options": "", "mpirun_options": "",
                  "log_stdout": false, "store_stdout": false}});
            cluster.server.put_object(json!({
                "apiVersion": "nnf.cray.hpe.com/v1alpha11", "kind": DM,
                "metadata": {"name": format!("nnf-dm-node-b{i}"), "namespace": RABBIT,
                    "labels": {"dm.cray.hpe.com/initiator": NODE},
                    "annotations": {"dm.cray.hpe.com/nnf-dm-operation": note.to_string()}},
                "spec": {"source": {"path": "/a"}, "destination": {"path": "/x"}, "userId": 0, "groupId": 0},
                "status": {"state": "Running", "startTime": "2024-01-01T00:00:00Z",
                    "commandStatus": {"progress": 40, "lastMessage": "x"}},
            }));
        }
        let t = Instant::now();
        let agent = cluster.agent(&[
            "--kubernetes-timeout",
            "60s",
            "--max-ops-per-user",
            "100000",
        ]);
        assert!(wait_until(Duration::from_secs(120), || agent
            .path(&format!("b{}", n - 1))
            .exists()));
        let listed = t.elapsed();
        let mut lat: Vec<Duration> = Vec::new();
        for i in 0..2000 {
            let p = agent.path(&format!("b{}/status", (i * 7919) % n));
            let t = Instant::now();
            let s = std::fs::read_to_string(&p).unwrap();
            lat.push(t.elapsed());
            assert!(s.contains("state=running"));
        }
        lat.sort();
        let p50 = lat[lat.len() / 2];
        let p99 = lat[lat.len() * 99 / 100];
        let rss = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap()
            .to_string();
        // Creates under the default QPS/burst (50/100).
        cluster.server.clear_requests();
        let creates = 200;
        let t = Instant::now();
        let handles: Vec<_> = (0..8)
            .map(|w| {
                let path = agent.path("request");
                std::thread::spawn(move || {
                    let mut script = String::from("import os\n");
                    for i in (w..creates).step_by(8) {
                        script.push_str(&format!(
                            "fd = os.open({:?}, os.O_WRONLY)\nos.write(fd, b'name=n{i} workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x/never{i}')\nos.close(fd)\n",
                            path.to_str().unwrap()
                        ));
                    }
                    assert!(python(&script).status.success());
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let create_time = t.elapsed();
        let reqs = cluster
            .server
            .requests()
            .iter()
            .filter(|r| r.account.as_deref() == Some(NNF_DM) && r.verb.as_deref() != Some("watch"))
            .count();
        let line = format!(
            "| {n} | {listed:.2?} | {p50:.1?} | {p99:.1?} | {} | {:.2} | {:.1} |\n",
            rss.split_whitespace().nth(1).unwrap_or("?").to_string() + " kB",
            reqs as f64 / creates as f64,
            creates as f64 / create_time.as_secs_f64(),
        );
        eprint!("{line}");
        report.push_str(&line);
    }
    eprintln!(
        "| tracked | listed at start in | status read p50 | p99 | agent RSS | API requests / create | creates/s |\n{report}"
    );
}

// ---- what a create costs, and upstream fidelity on its path ----

/// Requests of the agent's account, by (verb, resource), watches left out.
fn agent_requests(server: &TestServer) -> Vec<((String, String), usize)> {
    let mut counts: HashMap<(String, String), usize> = HashMap::new();
    for r in server.requests() {
        if r.account.as_deref() != Some(NNF_DM) || r.verb.as_deref() == Some("watch") {
            continue;
        }
        let key = (r.verb.unwrap_or_default(), r.resource.unwrap_or_default());
        *counts.entry(key).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort();
    v
}

/// The request budget: in steady state a create costs its CREATE plus at
/// most one read (the Workflow and ClientMount reads are shared between
/// concurrent creates and kept briefly; LustreFileSystems and profiles come
/// from watches, never read per request). Through the control filesystem
/// (Lustre and GFS2) and the gRPC door, sequential and concurrent.
#[test]
fn a_create_costs_at_most_two_api_requests() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&[]);
    let mut grpc = Client::of(&agent);
    let gfs = |name: &str| {
        format!("name={name} workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x/{name}")
    };
    // Steady state: the watches have listed, the first reads are done.
    assert_eq!(write_as(&agent, None, &gfs("warm-g")), "ok");
    assert_eq!(
        write_as(&agent, None, &format!("name=warm-l {LUS_REQ}")),
        "ok"
    );
    cluster.server.clear_requests();

    let mut made = 0;
    for i in 0..10 {
        assert_eq!(write_as(&agent, None, &gfs(&format!("s{i}"))), "ok");
        assert_eq!(
            write_as(&agent, None, &format!("name=l{i} {LUS_REQ}")),
            "ok"
        );
        made += 2;
    }
    // Eight writers at once.
    let handles: Vec<_> = (0..8)
        .map(|w| {
            let path = agent.path("request");
            std::thread::spawn(move || {
                let mut script = String::from("import os\n");
                for i in 0..4 {
                    script.push_str(&format!(
                        "fd = os.open({:?}, os.O_WRONLY)\nos.write(fd, b'name=c{w}-{i} workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x/c{w}-{i}')\nos.close(fd)\n",
                        path.to_str().unwrap()
                    ));
                }
                assert!(python(&script).status.success());
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    made += 32;
    // And over gRPC.
    for i in 0..10 {
        let r = grpc.create(dm_proto::DataMovementCreateRequest {
            workflow: Some(dm_proto::DataMovementWorkflow {
                name: "wf1".into(),
                namespace: "default".into(),
            }),
            source: "/mnt/nnf/gfs-1/a".into(),
            destination: format!("/x/g{i}"),
            ..Default::default()
        });
        assert_eq!(
            r.status(),
            dm_proto::data_movement_create_response::Status::Success,
            "{r:?}"
        );
        made += 1;
    }
    let counts = agent_requests(&cluster.server);
    eprintln!("{made} creates: {counts:?}");
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    let of = |verb: &str, res: &str| {
        counts
            .iter()
            .find(|((v, r), _)| v == verb && r == res)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(of("create", "nnfdatamovements"), made, "{counts:?}");
    assert!(
        total <= 2 * made,
        "{total} requests for {made} creates: {counts:?}"
    );
    for kind in [
        "lustrefilesystems",
        "nnfdatamovementprofiles",
        "systemconfigurations",
    ] {
        assert_eq!(
            of("get", kind) + of("list", kind),
            0,
            "{kind} read per request: {counts:?}"
        );
    }
    // Every read a create may make, and nothing else.
    for ((verb, res), _) in &counts {
        assert!(
            matches!(
                (verb.as_str(), res.as_str()),
                ("create", "nnfdatamovements") | ("get", "workflows") | ("list", "clientmounts")
            ),
            "unexpected {verb} {res}: {counts:?}"
        );
    }
}

/// The Workflow read is kept at most a second: once the workflow left
/// PreRun, creates are refused (EPERM) within that bound.
#[test]
fn a_workflow_leaving_prerun_stops_copies_within_the_cache_bound() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&[]);
    let req = |name: &str| {
        format!("name={name} workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/a destination=/x/{name}")
    };
    assert_eq!(write_as(&agent, None, &req("before")), "ok");
    cluster
        .server
        .modify_object("Workflow", WF_NS, "wf1", |w| {
            w["spec"]["desiredState"] = json!("PostRun");
            w["status"]["state"] = json!("PostRun");
        })
        .expect("workflow exists")
        .expect("modified");
    let changed = Instant::now();
    let mut i = 0;
    let refused = wait_until(Duration::from_secs(10), || {
        i += 1;
        write_as(&agent, None, &req(&format!("after{i}"))) == "EPERM"
    });
    assert!(
        refused,
        "creates still accepted after the workflow left PreRun"
    );
    // The bound is one second; allow for a loaded machine, not for more.
    assert!(
        changed.elapsed() < Duration::from_secs(5),
        "{:?}",
        changed.elapsed()
    );
    assert!(last_error(&agent, None).contains("is in state PostRun"));
    // And it stays refused.
    assert_eq!(write_as(&agent, None, &req("later")), "EPERM");
}

/// A generateName collision (409 AlreadyExists, "not able to generate a
/// unique name") is created again with a new name, never failed.
#[test]
fn a_generate_name_collision_is_retried_with_a_new_name() {
    let cluster = Cluster::new();
    let agent = cluster.agent(&[]);
    cluster.server.clear_requests();
    cluster.server.collide_next_generated_names(1);
    assert_eq!(
        write_as(&agent, None, &format!("name=coll {LUS_REQ}")),
        "ok"
    );
    assert_eq!(
        cluster.server.request_count("create", "nnfdatamovements"),
        2,
        "{:?}",
        cluster.server.request_counts()
    );
    let dm = cluster.dm_of("coll");
    assert!(resource_name(&dm).starts_with("nnf-dm-"));
    assert_eq!(cluster.dms().len(), 1);
    wait_state(&agent, "coll", "completed", LONG);
    assert!(agent.log().contains("generated name taken"));
}

/// A trailing slash on source or destination is kept, as upstream sends it
/// (the Rabbit's copy lays out its destination by it); without it, none.
#[test]
fn trailing_slashes_of_source_and_destination_are_kept() {
    let cluster = Cluster::bare();
    let agent = cluster.agent(&[]);
    for (name, source, destination, rabbit_source) in [
        (
            "sl1",
            "/mnt/nnf/gfs-1/a/",
            "/x/d/",
            "/rabbit/gfs-1/compute-1/a/",
        ),
        (
            "sl2",
            "/mnt/nnf/gfs-1/a",
            "/x/d",
            "/rabbit/gfs-1/compute-1/a",
        ),
        (
            "sl3",
            "/mnt/nnf/gfs-1/",
            "/x/e/",
            "/rabbit/gfs-1/compute-1/",
        ),
        (
            "sl4",
            "/mnt/nnf/lus-0/ckpt/",
            "/lus/global/me/",
            "/rabbit/lus-0/compute-1/ckpt/",
        ),
    ] {
        assert_eq!(
            write_as(
                &agent,
                None,
                &format!("name={name} workflow=wf1 namespace=default source={source} destination={destination}")
            ),
            "ok",
            "{name}: {}",
            last_error(&agent, None)
        );
        let dm = cluster.dm_of(name);
        assert_eq!(dm["spec"]["source"]["path"], rabbit_source, "{name}");
        assert_eq!(dm["spec"]["destination"]["path"], destination, "{name}");
    }
}

/// Over gRPC, what the request names but cannot be found is FAILED with the
/// reason, as upstream: the ClientMount holding source, the
/// LustreFileSystem, the profile.
#[test]
fn grpc_create_answers_failed_when_something_named_is_not_found() {
    let cluster = Cluster::bare();
    let agent = cluster.agent(&[]);
    let mut grpc = Client::of(&agent);
    for (source, destination, profile, words) in [
        ("/mnt/nnf/nowhere/a", "/x/y", "", "holds /mnt/nnf/nowhere/a"),
        (
            "/mnt/nnf/lus-0/a",
            "/elsewhere/y",
            "",
            "no LustreFileSystem",
        ),
        (
            "/mnt/nnf/gfs-1/a",
            "/x/y",
            "nope",
            "profile 'nope' not found",
        ),
        (
            "/mnt/nnf/gfs-1/a",
            "/x/y",
            "",
            "workflow default/gone not found",
        ),
    ] {
        let workflow = if words.contains("gone") {
            "gone"
        } else {
            "wf1"
        };
        let r = grpc.create(dm_proto::DataMovementCreateRequest {
            workflow: Some(dm_proto::DataMovementWorkflow {
                name: workflow.into(),
                namespace: "default".into(),
            }),
            source: source.into(),
            destination: destination.into(),
            profile: profile.into(),
            ..Default::default()
        });
        assert_eq!(
            r.status(),
            dm_proto::data_movement_create_response::Status::Failed,
            "{source}: {r:?}"
        );
        assert!(r.message.contains(words), "{r:?}");
        assert!(last_error(&agent, None).contains(" ENOENT "));
    }
    assert!(cluster.dms().is_empty());
}

/// A service token written with a trailing newline works (trimmed as
/// client-go does), and a rotated token is used without a restart.
#[test]
fn a_newline_terminated_token_works_and_is_read_again_as_it_rotates() {
    let cluster = Cluster::new();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("service.token");
    std::fs::write(&token, format!("{}\n", cluster.server.token(NNF_DM))).unwrap();
    let mut args = cluster.args(&[]);
    let at = args
        .iter()
        .position(|a| a == "--service-token-file")
        .unwrap();
    args[at + 1] = token.to_str().unwrap().to_string();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&refs);
    assert_eq!(
        write_as(&agent, None, &format!("name=tok1 {LUS_REQ}")),
        "ok"
    );
    // Rotated to a token the server refuses: the next create sees it.
    let new = dir.path().join("service.token.new");
    std::fs::write(&new, "revoked\n").unwrap();
    std::fs::rename(&new, &token).unwrap();
    assert_eq!(
        write_as(&agent, None, &format!("name=tok2 {LUS_REQ}")),
        "EIO"
    );
    assert!(
        last_error(&agent, None).contains("401"),
        "{}",
        last_error(&agent, None)
    );
    // Rotated back: works again, no restart.
    std::fs::write(&new, format!("{}\n", cluster.server.token(NNF_DM))).unwrap();
    std::fs::rename(&new, &token).unwrap();
    assert_eq!(
        write_as(&agent, None, &format!("name=tok3 {LUS_REQ}")),
        "ok"
    );
}
