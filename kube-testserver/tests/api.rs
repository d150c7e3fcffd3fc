//! Request/response semantics through kube-rs, as the daemons will see them.

mod common;

use common::*;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Error;
use kube_testserver::{Config, TestServer, ADMIN, CLIENTMOUNT, NNF_DM};
use serde_json::json;

fn api_err(e: Error) -> Box<kube::core::Status> {
    match e {
        Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_with_generate_name_sets_server_fields_prunes_and_defaults() {
    let s = TestServer::start(Config::default());
    let c = client(&s, NNF_DM);
    let mut v = data_movement("node1");
    v["spec"]["bogusField"] = json!(1);
    v["status"] = json!({"state": "Finished"});
    let created = dms(&c, "nnf-dm-system")
        .create(&PostParams::default(), &dyn_obj(v))
        .await
        .unwrap();
    let name = created.metadata.name.clone().unwrap();
    assert!(
        name.starts_with("nnf-dm-") && name.len() == "nnf-dm-".len() + 5,
        "{name}"
    );
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert!(created.metadata.resource_version.is_some());
    // Unknown fields pruned, schema defaults applied, status reset on create
    // (status subresource).
    assert!(created.data["spec"].get("bogusField").is_none());
    assert_eq!(created.data["spec"]["cancel"], false);
    assert_eq!(created.data["spec"]["userConfig"]["dryrun"], false);
    assert_eq!(created.data["spec"]["userConfig"]["slots"], 4);
    assert!(created.data.get("status").is_none());
    let stored = s
        .get_object("NnfDataMovement", "nnf-dm-system", &name)
        .unwrap();
    assert_eq!(stored["metadata"]["uid"], json!(created.metadata.uid));

    // The same explicit name twice: 409 AlreadyExists.
    let mut named = data_movement("node1");
    named["metadata"]["name"] = json!(name);
    let e = api_err(
        dms(&c, "nnf-dm-system")
            .create(&PostParams::default(), &dyn_obj(named))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));

    let got = dms(&c, "nnf-dm-system").get(&name).await.unwrap();
    assert_eq!(got.metadata.uid, created.metadata.uid);
    let e = api_err(dms(&c, "nnf-dm-system").get("nope").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
    assert_eq!(
        e.message,
        "nnfdatamovements.nnf.cray.hpe.com \"nope\" not found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_violations_are_422_with_causes() {
    let s = TestServer::start(Config::default());
    let c = client(&s, ADMIN);
    let mut v = client_mount("node1", "bad");
    v["spec"]["desiredState"] = json!("Mounted");
    v["spec"].as_object_mut().unwrap().remove("node");
    v["spec"]["mounts"][0]["userID"] = json!("1001");
    let e = api_err(
        cms(&c, "node1")
            .create(&PostParams::default(), &dyn_obj(v))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message
            .starts_with("ClientMount.dataworkflowservices.github.io \"bad\" is invalid: ["),
        "{}",
        e.message
    );
    let causes = e.details.unwrap().causes;
    let fields: Vec<(&str, &str)> = causes
        .iter()
        .map(|c| (c.field.as_str(), c.reason.as_str()))
        .collect();
    assert!(
        fields.contains(&("spec.node", "FieldValueRequired")),
        "{fields:?}"
    );
    assert!(
        fields.contains(&("spec.desiredState", "FieldValueNotSupported")),
        "{fields:?}"
    );
    assert!(
        fields.contains(&("spec.mounts[0].userID", "FieldValueTypeInvalid")),
        "{fields:?}"
    );
    assert!(s.objects("ClientMount", None).is_empty());

    // Invalid label values are rejected like the real ObjectMeta validation.
    let mut v = client_mount("node1", "badlabel");
    v["metadata"]["labels"]["x"] = json!("not/valid");
    let e = api_err(
        cms(&c, "node1")
            .create(&PostParams::default(), &dyn_obj(v))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_forbids_what_the_cluster_role_lacks() {
    let s = TestServer::start(Config::default());
    s.put_object(client_mount("node1", "cm"));
    let c = client(&s, CLIENTMOUNT);
    // Allowed: get, list, watch, update, patch, status.
    cms(&c, "node1").get("cm").await.unwrap();
    // Not allowed: delete, create.
    let e = api_err(
        cms(&c, "node1")
            .delete("cm", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        e.message,
        "clientmounts.dataworkflowservices.github.io \"cm\" is forbidden: User \"system:serviceaccount:nnf-system:nnf-clientmount\" cannot delete resource \"clientmounts\" in API group \"dataworkflowservices.github.io\" in the namespace \"node1\""
    );
    let e = api_err(
        cms(&c, "node1")
            .create(&PostParams::default(), &dyn_obj(client_mount("node1", "x")))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 403);
    // nnf-dm may list ClientMounts but not watch them, nor touch their status.
    let dm = client(&s, NNF_DM);
    cms(&dm, "node1")
        .list(&ListParams::default())
        .await
        .unwrap();
    let e = api_err(
        cms(&dm, "node1")
            .patch_status(
                "cm",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"allReady": true, "mounts": []}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 403);
    assert!(
        e.message
            .contains("cannot patch resource \"clientmounts/status\""),
        "{}",
        e.message
    );
    // Storage profiles are not readable by nnf-dm at all.
    let sp = kube::api::Api::<kube::api::DynamicObject>::namespaced_with(
        dm.clone(),
        "nnf-system",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("nnf.cray.hpe.com", "v1alpha11", "NnfStorageProfile"),
            "nnfstorageprofiles",
        ),
    );
    let e = api_err(sp.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(e.code, 403);
    let forbidden: Vec<_> = s
        .requests()
        .into_iter()
        .filter(|r| r.status == 403)
        .collect();
    assert_eq!(forbidden.len(), 4);
    assert_eq!(forbidden[0].account.as_deref(), Some(CLIENTMOUNT));
    assert_eq!(forbidden[0].verb.as_deref(), Some("delete"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_missing_token_is_401() {
    let s = TestServer::start(Config::default());
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.token");
    std::fs::write(&bad, "not-a-token").unwrap();
    let c = client_with_token_file(&s, &bad);
    let e = api_err(cms(&c, "node1").get("x").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));
    assert_eq!(s.requests().last().unwrap().status, 401);
    assert_eq!(s.requests().last().unwrap().account, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_label_selector_and_namespace() {
    let s = TestServer::start(Config::default());
    for (ns, name, wf) in [
        ("node1", "a", "wf"),
        ("node1", "b", "other"),
        ("rabbit1", "c", "wf"),
    ] {
        let mut v = client_mount(ns, name);
        v["metadata"]["labels"]["dataworkflowservices.github.io/workflow.name"] = json!(wf);
        s.put_object(v);
    }
    let c = client(&s, NNF_DM);
    let names = |l: kube::api::ObjectList<kube::api::DynamicObject>| {
        l.items
            .into_iter()
            .map(|o| o.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    let sel = "dataworkflowservices.github.io/workflow.name=wf,dataworkflowservices.github.io/workflow.namespace=default";
    let l = cms(&c, "node1")
        .list(&ListParams::default().labels(sel))
        .await
        .unwrap();
    assert!(l.metadata.resource_version.is_some());
    assert_eq!(names(l), vec!["a"]);
    let all = kube::api::Api::<kube::api::DynamicObject>::all_with(c.clone(), &cm_ar());
    assert_eq!(
        names(all.list(&ListParams::default().labels(sel)).await.unwrap()),
        vec!["a", "c"]
    );
    assert_eq!(
        names(
            all.list(
                &ListParams::default()
                    .labels("dataworkflowservices.github.io/workflow.name in (other, x)")
            )
            .await
            .unwrap()
        ),
        vec!["b"]
    );
    assert_eq!(
        names(
            all.list(
                &ListParams::default().labels("dataworkflowservices.github.io/workflow.name!=wf")
            )
            .await
            .unwrap()
        ),
        vec!["b"]
    );
    assert!(names(
        all.list(&ListParams::default().labels("!dataworkflowservices.github.io/workflow.name"))
            .await
            .unwrap()
    )
    .is_empty());
    // Pagination as the watcher does it.
    let p1 = all.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(p1.items.len(), 2);
    let tok = p1.metadata.continue_.clone().unwrap();
    let p2 = all
        .list(&ListParams::default().limit(2).continue_token(&tok))
        .await
        .unwrap();
    assert_eq!(names(p2), vec!["c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_with_stale_resource_version_is_409() {
    let s = TestServer::start(Config::default());
    s.put_object(client_mount("node1", "cm"));
    let c = client(&s, CLIENTMOUNT);
    let api = cms(&c, "node1");
    let mut first = api.get("cm").await.unwrap();
    let mut second = first.clone();
    first.data["spec"]["desiredState"] = json!("unmounted");
    let updated = api
        .replace("cm", &PostParams::default(), &first)
        .await
        .unwrap();
    assert_eq!(updated.metadata.generation, Some(2));
    second.data["spec"]["desiredState"] = json!("unmounted");
    let e = api_err(
        api.replace("cm", &PostParams::default(), &second)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        e.message,
        "Operation cannot be fulfilled on clientmounts.dataworkflowservices.github.io \"cm\": the object has been modified; please apply your changes to the latest version and try again"
    );
    // A metadata-only change does not bump the generation; a no-op write
    // does not even bump the resourceVersion.
    let mut cur = api.get("cm").await.unwrap();
    cur.metadata.finalizers = Some(vec!["nnf.cray.hpe.com/nnf_clientmount".into()]);
    let withfin = api
        .replace("cm", &PostParams::default(), &cur)
        .await
        .unwrap();
    assert_eq!(withfin.metadata.generation, Some(2));
    let again = api
        .replace("cm", &PostParams::default(), &withfin)
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        withfin.metadata.resource_version
    );
    // Injected 409 storm on updates.
    s.fail_next_matching(Some("update"), None, 409, 2);
    for _ in 0..2 {
        let e = api_err(
            api.replace("cm", &PostParams::default(), &again)
                .await
                .unwrap_err(),
        );
        assert_eq!(e.code, 409);
    }
    api.get("cm").await.unwrap();
    api.replace("cm", &PostParams::default(), &again)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_and_status_subresource_semantics() {
    let s = TestServer::start(Config::default());
    s.put_object(client_mount("node1", "cm"));
    let c = client(&s, CLIENTMOUNT);
    let api = cms(&c, "node1");
    // Main resource: a status change is ignored (status subresource).
    let p = api
        .patch(
            "cm",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["nnf.cray.hpe.com/nnf_clientmount"]}, "status": {"allReady": true, "mounts": []}})),
        )
        .await
        .unwrap();
    assert_eq!(
        p.metadata.finalizers.as_deref(),
        Some(&["nnf.cray.hpe.com/nnf_clientmount".to_string()][..])
    );
    assert!(p.data.get("status").is_none());
    assert_eq!(p.metadata.generation, Some(1));
    // /status: only status is taken.
    let st = api
        .patch_status(
            "cm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"desiredState": "unmounted"}, "metadata": {"labels": {"x": "y"}}, "status": {"allReady": false, "mounts": [{"state": "mounted", "ready": false}]}})),
        )
        .await
        .unwrap();
    assert_eq!(st.data["spec"]["desiredState"], "mounted");
    assert!(!st.metadata.labels.unwrap().contains_key("x"));
    assert_eq!(st.data["status"]["mounts"][0]["state"], "mounted");
    assert_eq!(st.metadata.generation, Some(1));
    // Status is schema-checked too.
    let e = api_err(
        api.patch_status(
            "cm",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"mounts": [{"state": "Mounted", "ready": true}]}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    // JSON patch with a test op; a failing test is 422.
    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/desiredState", "value": "mounted"},
        {"op": "replace", "path": "/spec/desiredState", "value": "unmounted"}
    ]))
    .unwrap();
    let r = api
        .patch(
            "cm",
            &PatchParams::default(),
            &Patch::<()>::Json(jp.clone()),
        )
        .await
        .unwrap();
    assert_eq!(r.data["spec"]["desiredState"], "unmounted");
    assert_eq!(r.metadata.generation, Some(2));
    let e = api_err(
        api.patch("cm", &PatchParams::default(), &Patch::<()>::Json(jp))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    // Strategic merge on a custom resource: 415, like the real server.
    let e = api_err(
        api.patch(
            "cm",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"desiredState": "mounted"}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (415, "UnsupportedMediaType"));
    // A merge patch pinning an old resourceVersion conflicts.
    let e = api_err(
        api.patch(
            "cm",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"resourceVersion": "1"}, "spec": {"desiredState": "mounted"}}),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_without_status_subresource_keeps_status_in_main_object() {
    let s = TestServer::start(Config::default());
    let wf = json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7",
        "kind": "Workflow",
        "metadata": {"name": "wf", "namespace": "default"},
        "spec": {"desiredState": "Proposal", "dwDirectives": [], "jobID": 1, "userID": 1001, "groupID": 1001, "wlmID": "flux"},
    });
    let created = s.put_object(wf);
    let api = kube::api::Api::<kube::api::DynamicObject>::namespaced_with(
        client(&s, ADMIN),
        "default",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk(
                "dataworkflowservices.github.io",
                "v1alpha7",
                "Workflow",
            ),
            "workflows",
        ),
    );
    let p = api
        .patch(
            "wf",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"state": "PreRun", "status": "Completed", "ready": true}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(p.data["status"]["state"], "PreRun");
    // Without a status subresource a status change is a spec-level change.
    assert_eq!(
        p.metadata.generation,
        Some(created["metadata"]["generation"].as_i64().unwrap() + 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_with_finalizers_waits_for_the_last_one() {
    let s = TestServer::start(Config::default());
    let mut v = client_mount("node1", "cm");
    v["metadata"]["finalizers"] = json!(["nnf.cray.hpe.com/nnf_clientmount"]);
    s.put_object(v);
    let admin = cms(&client(&s, ADMIN), "node1");
    let r = admin.delete("cm", &DeleteParams::default()).await.unwrap();
    let obj = r.left().expect("still present while finalized");
    assert!(obj.metadata.deletion_timestamp.is_some());
    // The daemon can still write status while it unmounts, but cannot add
    // finalizers.
    let cm = cms(&client(&s, CLIENTMOUNT), "node1");
    cm.patch_status("cm", &PatchParams::default(), &Patch::Merge(json!({"status": {"allReady": false, "mounts": [{"state": "unmounted", "ready": true}]}})))
        .await
        .unwrap();
    let e = api_err(
        cm.patch("cm", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": ["nnf.cray.hpe.com/nnf_clientmount", "other.io/x"]}})))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(s.get_object("ClientMount", "node1", "cm").is_some());
    let last = cm
        .patch(
            "cm",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert!(last.metadata.finalizers.unwrap_or_default().is_empty());
    assert!(s.get_object("ClientMount", "node1", "cm").is_none());
    assert!(cm.get_opt("cm").await.unwrap().is_none());
    // Without finalizers: gone at once, answered with a Status.
    s.put_object(client_mount("node1", "plain"));
    let r = admin
        .delete("plain", &DeleteParams::default())
        .await
        .unwrap();
    assert!(r.is_right());
    assert!(s.get_object("ClientMount", "node1", "plain").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_version_are_served() {
    let s = TestServer::start(Config::default());
    let c = client(&s, NNF_DM);
    let v = c.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
    let groups = c.list_api_groups().await.unwrap();
    assert!(groups.groups.iter().any(|g| g.name == "nnf.cray.hpe.com"
        && g.preferred_version.as_ref().unwrap().version == "v1alpha11"));
    let rl = c
        .list_api_group_resources("dataworkflowservices.github.io/v1alpha7")
        .await
        .unwrap();
    assert!(rl.resources.iter().any(|r| r.name == "clientmounts/status"));
    assert!(!rl.resources.iter().any(|r| r.name == "workflows/status"));
}

#[test]
fn hooks_wait_for_and_on_change_let_a_test_play_the_rabbit() {
    let s = std::sync::Arc::new(TestServer::start(Config::default()));
    // Weak: a strong reference in the callback would keep the server (and
    // its temporary directory) alive past the test.
    let rabbit = std::sync::Arc::downgrade(&s);
    // A Rabbit that finishes every data movement it sees created.
    s.on_change("NnfDataMovement", move |c| {
        let Some(rabbit) = rabbit.upgrade() else {
            return;
        };
        if c.event_type == kube_testserver::EventType::Added {
            rabbit
                .modify_object("NnfDataMovement", &c.namespace, &c.name, |o| {
                    o["status"] = json!({"state": "Finished", "status": "Success", "startTime": "2025-01-01T00:00:00Z"});
                })
                .unwrap()
                .unwrap();
        }
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let name = rt.block_on(async {
        let c = client(&s, NNF_DM);
        dms(&c, "nnf-dm-system")
            .create(&PostParams::default(), &dyn_obj(data_movement("n1")))
            .await
            .unwrap()
            .metadata
            .name
            .unwrap()
    });
    let done = s
        .wait_for(
            "nnfdatamovements",
            Some("nnf-dm-system"),
            std::time::Duration::from_secs(10),
            |o| o["status"]["state"] == "Finished",
        )
        .expect("the simulated Rabbit finished it");
    assert_eq!(done["metadata"]["name"], json!(name));
    // Seeding invalid objects is refused.
    let mut bad = client_mount("n1", "x");
    bad["spec"]["desiredState"] = json!("up");
    assert_eq!(s.try_put_object(bad).unwrap_err().code, 422);
}

#[test]
fn cel_rules_of_the_profiles_are_enforced() {
    let s = TestServer::start(Config::default());
    let profile = |command: &str| {
        json!({
            "apiVersion": "nnf.cray.hpe.com/v1alpha11",
            "kind": "NnfDataMovementProfile",
            "metadata": {"name": "default", "namespace": "nnf-system"},
            "data": {"command": command, "default": true},
        })
    };
    let ok = s.put_object(profile(
        "mpirun --hostfile $HOSTFILE dcp --uid $UID --gid $GID $SRC $DEST",
    ));
    // Defaults of the other required fields were applied.
    assert_eq!(ok["data"]["slots"], 8);
    assert_eq!(ok["data"]["createDestDir"], true);
    let e = s
        .try_put_object(profile("mpirun dcp $SRC $DEST"))
        .unwrap_err();
    assert_eq!(e.code, 422);
    assert!(
        e.status["message"]
            .as_str()
            .unwrap()
            .contains("data.command"),
        "{}",
        e.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_versions_are_not_found() {
    let s = TestServer::start(Config::default());
    let old = kube::api::Api::<kube::api::DynamicObject>::namespaced_with(
        client(&s, ADMIN),
        "node1",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk(
                "dataworkflowservices.github.io",
                "v1alpha4",
                "ClientMount",
            ),
            "clientmounts",
        ),
    );
    let e = api_err(old.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(e.code, 404);
    // A served older version reads the same object.
    s.put_object(client_mount("node1", "cm"));
    let v6 = kube::api::Api::<kube::api::DynamicObject>::namespaced_with(
        client(&s, ADMIN),
        "node1",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk(
                "dataworkflowservices.github.io",
                "v1alpha6",
                "ClientMount",
            ),
            "clientmounts",
        ),
    );
    let o = v6.get("cm").await.unwrap();
    assert_eq!(
        o.types.unwrap().api_version,
        "dataworkflowservices.github.io/v1alpha6"
    );
}
