//! Shared fixtures: a kube-rs client configured the way the daemons
//! configure theirs, and valid objects of the kinds the daemons use.

#![allow(dead_code)]

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, Config};
use kube_testserver::TestServer;
use serde_json::{json, Value};
use std::path::Path;

/// Exactly the production connection: URL from host and port, CA file and
/// token file.
pub fn client(s: &TestServer, account: &str) -> Client {
    client_with_token_file(s, &s.token_file(account))
}

pub fn client_with_token_file(s: &TestServer, token_file: &Path) -> Client {
    let url = format!("https://{}:{}", s.host(), s.port());
    let mut cfg = Config::new(url.parse().expect("valid URL"));
    cfg.root_cert_file = Some(s.ca_file());
    cfg.auth_info.token_file = Some(token_file.display().to_string());
    Client::try_from(cfg).expect("client")
}

pub fn dm_ar() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("nnf.cray.hpe.com", "v1alpha11", "NnfDataMovement"),
        "nnfdatamovements",
    )
}

pub fn cm_ar() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("dataworkflowservices.github.io", "v1alpha7", "ClientMount"),
        "clientmounts",
    )
}

pub fn dms(c: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(c.clone(), ns, &dm_ar())
}

pub fn cms(c: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(c.clone(), ns, &cm_ar())
}

pub fn dyn_obj(v: Value) -> DynamicObject {
    serde_json::from_value(v).expect("a DynamicObject")
}

pub fn data_movement(initiator: &str) -> Value {
    json!({
        "apiVersion": "nnf.cray.hpe.com/v1alpha11",
        "kind": "NnfDataMovement",
        "metadata": {
            "generateName": "nnf-dm-",
            "namespace": "nnf-dm-system",
            "labels": {"dm.cray.hpe.com/initiator": initiator},
        },
        "spec": {
            "source": {"path": "/mnt/nnf/job/file", "storageReference": {"kind": "NnfStorage", "name": "s", "namespace": "default"}},
            "destination": {"path": "/lus/global/user/file", "storageReference": {"kind": "LustreFileSystem", "name": "lus", "namespace": "default"}},
            "userId": 1001,
            "groupId": 1001,
            "profileReference": {"kind": "NnfDataMovementProfile", "name": "default", "namespace": "nnf-system"},
            "userConfig": {"dcpOptions": "", "slots": 4},
        },
    })
}

pub fn client_mount(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7",
        "kind": "ClientMount",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "dataworkflowservices.github.io/workflow.name": "wf",
                "dataworkflowservices.github.io/workflow.namespace": "default",
            },
        },
        "spec": {
            "node": ns,
            "desiredState": "mounted",
            "mounts": [{
                "type": "xfs",
                "mountPath": "/mnt/nnf/a",
                "options": "",
                "setPermissions": false,
                "targetType": "directory",
                "device": {"type": "lvm", "lvm": {"deviceType": "nvme", "volumeGroup": "vg", "logicalVolume": "lv"}},
            }],
        },
    })
}

/// Runs a blocking closure (a server hook that waits) off the async runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}
