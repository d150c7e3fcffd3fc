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

/// An agent on the Kubernetes backend of `server`, as nnf-dm's service
/// account on [`NODE`] for [`RABBIT`], with `extra` flags.
pub fn kube_agent(server: &TestServer, extra: &[&str]) -> Agent {
    let port = server.port().to_string();
    let token = server.token_file(NNF_DM);
    let ca = server.ca_file();
    let mut args = vec![
        "--backend",
        "kubernetes",
        "--kubernetes-service-host",
        "127.0.0.1",
        "--kubernetes-service-port",
        &port,
        "--service-token-file",
        token.to_str().expect("UTF-8 token path"),
        "--service-cert-file",
        ca.to_str().expect("UTF-8 CA path"),
        "--node-name",
        NODE,
        "--nnf-node-name",
        RABBIT,
    ];
    args.extend_from_slice(extra);
    Agent::start(&args)
}
