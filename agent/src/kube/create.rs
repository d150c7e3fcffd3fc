//! Creation: the Rabbit lookup at startup and the checks, lookups and
//! resource body of one request (steps 1–9 of the mapping).

use std::collections::BTreeMap;
use std::sync::Arc;

use fuse_ctl::Errno;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ListParams;
use kube::runtime::reflector::Store;
use nnf_api::{
    NnfDataMovement, NnfDataMovementSpec, NnfDataMovementSpecSourceDest, ObjectReference,
};
use serde_json::Value;

use crate::agent::{Rejection, Requester};
use crate::request::Request;

use super::api::*;
use super::mapping::*;

/// A request checked by `prepare`, created by `accept`.
pub(super) struct Pending {
    pub(super) namespace: String,
    pub(super) body: NnfDataMovement,
}

/// The objects of a watched kind, once its watch listed them (waiting for
/// that is bounded by the caller's timeout).
async fn synced<K>(store: &Store<K>, what: &str) -> Result<Vec<Arc<K>>, Rejection>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .wait_until_ready()
        .await
        .map_err(|_| Rejection::new(Errno::EIO, format!("the watch of the {what} ended")))?;
    Ok(store.state())
}

/// Steps 2–9 of the mapping: the checks and lookups, and the resource body.
pub(super) async fn build(
    ctx: Arc<Ctx>,
    who: Requester,
    name: String,
    mut request: Request,
) -> Result<(Request, Pending), Rejection> {
    let (Some(workflow), Some(wf_ns)) = (request.workflow.clone(), request.namespace.clone())
    else {
        return Err(Rejection::new(
            Errno::EINVAL,
            "no workflow: give workflow= and namespace= (or run with DW_WORKFLOW_NAME and DW_WORKFLOW_NAMESPACE set)",
        ));
    };
    request.name = Some(name.clone());
    // One Rabbit for the whole request, should the SystemConfiguration change.
    let rabbit = ctx.rabbit();
    // Before any API call: the Rabbit's worker pastes these into bash as root.
    crate::shellword::for_rabbit(&mut request).map_err(|e| Rejection::new(Errno::EINVAL, e))?;

    // 2. The workflow, in a state that allows copies.
    // Shared with concurrent creates and kept for WORKFLOW_TTL: a copy is
    // refused at most that long after its workflow left PreRun.
    let wf = ctx
        .workflows
        .get((wf_ns.clone(), workflow.clone()), || {
            let workflows = ctx.workflows(&wf_ns);
            let (wf_ns, workflow) = (wf_ns.clone(), workflow.clone());
            async move {
                match workflows.get(&workflow).await {
                    Ok(wf) => Ok(Arc::new(wf)),
                    Err(e) if not_found(&e) => Err(Rejection::new(
                        Errno::ENOENT,
                        format!("workflow {wf_ns}/{workflow} not found"),
                    )),
                    Err(e) => Err(api_rejection(
                        &format!("reading workflow {wf_ns}/{workflow}"),
                        &e,
                    )),
                }
            }
        })
        .await?;
    let wf_status = wf.status.clone().unwrap_or_default();
    let state = wf_status.state.as_deref().unwrap_or("");
    let status = wf_status.status.as_deref().unwrap_or("");
    if state != "PreRun" || status != "Completed" {
        return Err(Rejection::new(
            Errno::EPERM,
            format!(
                "workflow {wf_ns}/{workflow} is in state {}/{}: copies are allowed only in PreRun/Completed",
                if state.is_empty() { "-" } else { state },
                if status.is_empty() { "-" } else { status }
            ),
        ));
    }
    let wf_uid = wf.metadata.uid.clone().unwrap_or_default();

    // 3. The compute mount holding the source.
    let cm_resource = resource(DWS, DWS_VERSION, "ClientMount", "clientmounts");
    let selector = format!("{WORKFLOW_NAME_LABEL}={workflow},{WORKFLOW_NAMESPACE_LABEL}={wf_ns}");
    // Shared and kept for MOUNTS_TTL, by workflow uid: ClientMounts change
    // only at the workflow's Setup and Teardown, outside PreRun.
    let list_mounts = |ns: String| {
        let api = ctx.api(&cm_resource, Some(&ns));
        let lp = ListParams::default().labels(&selector);
        let key = (ns.clone(), wf_ns.clone(), workflow.clone(), wf_uid.clone());
        ctx.mounts.get(key, move || async move {
            let list = api.list(&lp).await.map_err(|e| {
                api_rejection(&format!("listing the ClientMounts in namespace {ns}"), &e)
            })?;
            // Listed untyped and parsed one by one, unlike the other kinds:
            // a typed list fails whole on one object it cannot read, and a
            // ClientMount of another directive that does not parse must not
            // stop this copy.
            let mut mounts = Vec::new();
            for item in list.items {
                let value = serde_json::to_value(&item).unwrap_or(Value::Null);
                match serde_json::from_value::<nnf_api::ClientMount>(value) {
                    Ok(cm) => mounts.push(cm),
                    Err(e) => tracing::warn!(
                        "ignoring ClientMount {ns}/{}: {e}",
                        item.metadata.name.unwrap_or_default()
                    ),
                }
            }
            Ok::<_, Rejection>(Arc::new(mounts))
        })
    };
    let compute_mounts = list_mounts(ctx.node.clone()).await?;
    let Some((compute_cm, compute, rest)) = compute_mount(&compute_mounts, &request.source) else {
        return Err(Rejection::new(
            Errno::ENOENT,
            format!(
                "no mount of workflow {wf_ns}/{workflow} on node {} holds {}",
                ctx.node, request.source
            ),
        ));
    };
    let mount_type = compute.mount_type;
    let lustre = match mount_type {
        nnf_api::ClientMountType::Lustre => true,
        nnf_api::ClientMountType::Gfs2 => false,
        other => {
            return Err(Rejection::new(
                Errno::EINVAL,
                format!(
                    "filesystem not supported: '{}' ({} is on {})",
                    other.as_str(),
                    request.source,
                    compute.mount_path
                ),
            ))
        }
    };
    let device_ref = compute.device.device_reference.clone();
    if device_ref.is_none() && !lustre {
        return Err(Rejection::new(
            Errno::EIO,
            format!(
                "ClientMount {}: the mount {} has no device.deviceReference",
                compute_cm.metadata.key(),
                compute.mount_path
            ),
        ));
    }
    let directive_index = compute_cm
        .metadata
        .label(DIRECTIVE_INDEX_LABEL)
        .map(str::to_string);
    let compute_key = compute_cm.metadata.key();
    let rest = rest.to_string();

    // 4. The same storage as the Rabbit mounts it.
    let rabbit_source = match &device_ref {
        Some(reference) => {
            let rabbit_mounts = list_mounts(rabbit.clone()).await?;
            let found = rabbit_mounts
                .iter()
                .flat_map(|cm| cm.spec.mounts.iter())
                .find(|m| m.device.device_reference.as_ref() == Some(reference));
            match found {
                Some(m) => rabbit_path(&m.mount_path, &rest),
                None => {
                    return Err(Rejection::new(
                        Errno::ENOENT,
                        format!(
                            "no mount of workflow {wf_ns}/{workflow} on Rabbit {} matches the device of {}",
                            rabbit, compute.mount_path
                        ),
                    ))
                }
            }
        }
        // A Lustre mount without a reference: the same global namespace.
        None => request.source.clone(),
    };
    let source = NnfDataMovementSpecSourceDest {
        path: rabbit_source,
        storage_reference: device_ref.as_ref().map(|r| r.object_reference.clone()),
    };

    // 5. By mount type.
    let mut labels = BTreeMap::new();
    labels.insert(INITIATOR_LABEL.to_string(), ctx.node.clone());
    let mut destination = NnfDataMovementSpecSourceDest {
        path: request.destination.clone(),
        storage_reference: None,
    };
    let (namespace, generate_name) = if lustre {
        let Some(index) = directive_index else {
            return Err(Rejection::new(
                Errno::EIO,
                format!("ClientMount {compute_key} has no label {DIRECTIVE_INDEX_LABEL}"),
            ));
        };
        labels.insert(DIRECTIVE_INDEX_LABEL.to_string(), index);
        let list = synced(&ctx.lustre, "LustreFileSystems").await?;
        let fs = list.iter().find(|fs| {
            fs.spec
                .mount_root
                .as_deref()
                .is_some_and(|root| below(root, &request.destination).is_some())
        });
        let Some(fs) = fs else {
            return Err(Rejection::new(
                Errno::ENOENT,
                format!(
                    "no LustreFileSystem's mountRoot holds the destination {}",
                    request.destination
                ),
            ));
        };
        destination.storage_reference = Some(ObjectReference {
            kind: Some("LustreFileSystem".into()),
            namespace: Some(fs.metadata.namespace.clone().unwrap_or_default()),
            name: Some(fs.metadata.name.clone().unwrap_or_default()),
            ..Default::default()
        });
        (DM_NAMESPACE.to_string(), "nnf-dm-")
    } else {
        (rabbit.clone(), "nnf-dm-node-")
    };

    // 6. The profile.
    let profiles = synced(&ctx.profiles, "NnfDataMovementProfiles").await?;
    let profile = match &request.profile {
        Some(wanted) => match profiles
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(wanted.as_str()))
        {
            Some(_) => wanted.clone(),
            None => {
                return Err(Rejection::new(
                    Errno::ENOENT,
                    format!("data-movement profile '{wanted}' not found in {PROFILE_NAMESPACE}"),
                ))
            }
        },
        None => {
            let defaults: Vec<String> = profiles
                .iter()
                .filter(|p| p.data.default)
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            match defaults.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(Rejection::new(
                        Errno::EIO,
                        format!("no default NnfDataMovementProfile in {PROFILE_NAMESPACE}: name one with profile="),
                    ))
                }
                several => {
                    return Err(Rejection::new(
                        Errno::EIO,
                        format!(
                            "several default NnfDataMovementProfiles in {PROFILE_NAMESPACE} ({}): name one with profile=",
                            several.join(", ")
                        ),
                    ))
                }
            }
        }
    };
    request.profile = Some(profile.clone());

    // 8. Labels for teardown.
    for (key, value) in [
        (WORKFLOW_NAME_LABEL, workflow.as_str()),
        (WORKFLOW_NAMESPACE_LABEL, wf_ns.as_str()),
        (WORKFLOW_UID_LABEL, wf_uid.as_str()),
        (OWNER_KIND_LABEL, "Workflow"),
        (OWNER_NAME_LABEL, workflow.as_str()),
        (OWNER_NAMESPACE_LABEL, wf_ns.as_str()),
        (OWNER_UID_LABEL, wf_uid.as_str()),
        (TEARDOWN_LABEL, "PostRun"),
    ] {
        labels.insert(key.to_string(), value.to_string());
    }
    let note = OperationNote {
        name,
        uid: who.uid,
        gid: who.gid,
        request: request.clone(),
    };
    let metadata = ObjectMeta {
        generate_name: Some(generate_name.into()),
        namespace: Some(namespace.clone()),
        labels: Some(labels),
        annotations: Some(
            [(
                OPERATION_ANNOTATION.to_string(),
                serde_json::to_string(&note).unwrap_or_default(),
            )]
            .into(),
        ),
        ..Default::default()
    };
    let spec = NnfDataMovementSpec {
        source: Some(source),
        destination: Some(destination),
        // 7. Identity.
        user_id: i64::from(who.uid),
        group_id: i64::from(who.gid),
        cancel: false,
        profile_reference: Some(ObjectReference {
            kind: Some("NnfDataMovementProfile".into()),
            name: Some(profile),
            namespace: Some(PROFILE_NAMESPACE.into()),
            ..Default::default()
        }),
        // 9. User options.
        user_config: Some(user_config(&request)),
    };
    let body = NnfDataMovement::new(metadata, spec);
    Ok((request, Pending { namespace, body }))
}
