//! The Kubernetes side of the agent's tests: a kube-testserver seeded with
//! one workflow and its mounts, and an agent on its Kubernetes backend.

use kube_testserver::{TestServer, NNF_DM};
use serde_json::{json, Value};

use crate::Agent;

/// The compute node the agent runs on, and the Rabbit it reports to.
pub const NODE: &str = "compute-1";
pub const RABBIT: &str = "rabbit-1";

/// The file system of workflow `wf1`'s one mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wf1Mount {
    /// `/mnt/nnf/lus-0` on the node (directive 0, an NnfStorage).
    Lustre,
    /// `/mnt/nnf/gfs-1` on the node (directive 1, an NnfNodeBlockStorage).
    Gfs2,
}

impl Wf1Mount {
    /// (ClientMount name, directive index, node path, Rabbit path).
    fn layout(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Wf1Mount::Lustre => ("wf1-lus", "0", "/mnt/nnf/lus-0", "/rabbit/lus-0/compute-1"),
            Wf1Mount::Gfs2 => ("wf1-gfs", "1", "/mnt/nnf/gfs-1", "/rabbit/gfs-1/compute-1"),
        }
    }

    fn mount(self, path: &str) -> Value {
        let (fs, kind, storage) = match self {
            Wf1Mount::Lustre => ("lustre", "NnfStorage", "wf1-0"),
            Wf1Mount::Gfs2 => ("gfs2", "NnfNodeBlockStorage", "wf1-1"),
        };
        json!({
            "mountPath": path, "type": fs, "targetType": "directory",
            "options": "", "setPermissions": false,
            "device": {"type": "reference", "deviceReference": {
                "objectReference": {"kind": kind, "name": storage, "namespace": RABBIT},
                "data": 0,
            }},
        })
    }
}

/// Workflow `wf1` in PreRun/Completed with one mount on the compute node and
/// on the Rabbit, the global Lustre file system, and the default
/// NnfDataMovementProfile whose `data` is `profile`.
pub fn seed_wf1(server: &TestServer, mount: Wf1Mount, profile: Value) {
    server.put_object(json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7",
        "kind": "Workflow",
        "metadata": {"name": "wf1", "namespace": "default"},
        "spec": {"desiredState": "PreRun", "dwDirectives": [], "forceReady": false,
                 "groupID": 0, "userID": 0, "jobID": 1, "wlmID": "slurm"},
        "status": {"state": "PreRun", "status": "Completed", "ready": true},
    }));
    let (name, index, node_path, rabbit_path) = mount.layout();
    for (ns, path) in [(NODE, node_path), (RABBIT, rabbit_path)] {
        server.put_object(json!({
            "apiVersion": "dataworkflowservices.github.io/v1alpha7",
            "kind": "ClientMount",
            "metadata": {"name": name, "namespace": ns, "labels": {
                "dataworkflowservices.github.io/workflow.name": "wf1",
                "dataworkflowservices.github.io/workflow.namespace": "default",
                "nnf.cray.hpe.com/directive_index": index,
            }},
            "spec": {"node": ns, "desiredState": "mounted", "mounts": [mount.mount(path)]},
        }));
    }
    server.put_object(json!({
        "apiVersion": "lus.cray.hpe.com/v1beta1",
        "kind": "LustreFileSystem",
        "metadata": {"name": "global", "namespace": "lus-ns"},
        "spec": {"name": "global", "mgsNids": "10.0.0.1@tcp", "mountRoot": "/lus/global"},
    }));
    server.put_object(json!({
        "apiVersion": "nnf.cray.hpe.com/v1alpha11",
        "kind": "NnfDataMovementProfile",
        "metadata": {"name": "default", "namespace": "nnf-system"},
        "data": profile,
    }));
}

/// The flags of an agent on the Kubernetes backend of `server`, as nnf-dm's
/// service account on [`NODE`] for [`RABBIT`], then `extra`.
pub fn kube_args(server: &TestServer, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--backend",
        "kubernetes",
        "--kubernetes-service-host",
        "127.0.0.1",
        "--kubernetes-service-port",
        &server.port().to_string(),
        "--service-token-file",
        server
            .token_file(NNF_DM)
            .to_str()
            .expect("UTF-8 token path"),
        "--service-cert-file",
        server.ca_file().to_str().expect("UTF-8 CA path"),
        "--node-name",
        NODE,
        "--nnf-node-name",
        RABBIT,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The default NnfDataMovementProfile's `data` as NNF ships it.
pub fn upstream_default_profile() -> Value {
    json!({"default": true,
        "command": "ulimit -n 2048 && mpirun --allow-run-as-root --hostfile $HOSTFILE dcp --progress 1 --uid $UID --gid $GID $SRC $DEST",
        "createDestDir": true, "maxSlots": 0, "slots": 8,
        "mkdirCommand": "mpirun --allow-run-as-root -np 1 --hostfile $HOSTFILE -- $SETPRIV mkdir -p $PATH",
        "setprivCommand": "setpriv --euid $UID --egid $GID --clear-groups",
        "statCommand": "mpirun --allow-run-as-root -np 1 --hostfile $HOSTFILE -- $SETPRIV stat --cached never -c '%F' $PATH"})
}

/// An agent started with [`kube_args`].
pub fn kube_agent(server: &TestServer, extra: &[&str]) -> Agent {
    let args = kube_args(server, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(&refs)
}

/// Changes the NnfDataMovement `ns/name` as the Rabbit would, again after a
/// conflict with the agent's own writes; `None` once it is gone.
pub fn set_dm_status(
    server: &TestServer,
    ns: &str,
    name: &str,
    f: impl Fn(&mut Value),
) -> Option<Value> {
    for _ in 0..100 {
        match server.modify_object("NnfDataMovement", ns, name, &f) {
            None => return None,
            Some(Ok(obj)) => return Some(obj),
            Some(Err(_)) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    None
}

/// RFC 3339, whole seconds, as the Rabbit writes its times.
pub fn utc_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
