//! Turning one `spec.mounts[i]` entry plus the pinned profile into the exact
//! command lines and checks that mount or unmount it. Pure: no I/O, so the
//! command lines a profile produces can be unit-tested.

use std::path::{Component, Path, PathBuf};

use nnf_api::{
    labels, ClientMount, ClientMountInfo, ClientMountTargetType, ClientMountType,
    NnfStorageProfile, NnfStorageProfileSharedData, ResourceError, ResourceErrorSeverity,
    ResourceErrorType,
};

use crate::vars::{substitute, Vars};

/// What must be mounted at the path for it to count as "ours".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// A block device (`/dev/mapper/<vg>-<lv>` or its stand-in): compare
    /// mountinfo's `major:minor` (or, for a raw bind mount, the bound
    /// node's `st_rdev`) with the resolved device's `st_rdev`.
    Block { device: PathBuf },
    /// Lustre: compare mountinfo's source with `<mgsnid>:/<fsname>`.
    Lustre { source: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPlan {
    pub index: usize,
    pub mount_type: ClientMountType,
    pub mount_path: PathBuf,
    pub target_file: bool,
    /// `-t` of mount and the type mountinfo must show (raw: not compared).
    pub fstype: String,
    pub expected: Expected,
    pub pre_activate: Vec<String>,
    pub vg_lock_start: Option<String>,
    pub lv_activate: Option<String>,
    pub post_activate: Vec<String>,
    pub pre_mount: Vec<String>,
    pub mount: Option<String>,
    pub post_mount: Vec<String>,
    pub pre_unmount: Vec<String>,
    pub unmount: Option<String>,
    pub post_unmount: Vec<String>,
    pub pre_deactivate: Vec<String>,
    pub lv_deactivate: Option<String>,
    pub vg_lock_stop: Option<String>,
    pub post_deactivate: Vec<String>,
    /// `userID:groupID` to chown the mount root to.
    pub owner: Option<(u32, u32)>,
    /// Lustre with `setPermissions`: write `.nnf-servers.json`.
    pub write_servers: bool,
}

pub fn user_error(msg: impl Into<String>) -> ResourceError {
    let msg = msg.into();
    ResourceError {
        error_type: ResourceErrorType::User,
        severity: ResourceErrorSeverity::Fatal,
        user_message: Some(msg.clone()),
        debug_message: msg,
    }
}

pub fn internal_error(user: impl Into<String>, debug: impl Into<String>) -> ResourceError {
    ResourceError {
        error_type: ResourceErrorType::Internal,
        severity: ResourceErrorSeverity::Major,
        user_message: Some(user.into()),
        debug_message: debug.into(),
    }
}

/// The pinned profile named by the ClientMount's labels, out of `profiles`.
/// Missing is Major (it may still be created); not pinned is Fatal.
pub fn find_profile<'a>(
    cm: &ClientMount,
    profiles: &'a [NnfStorageProfile],
) -> Result<&'a NnfStorageProfile, ResourceError> {
    let Some(name) = cm.metadata.label(labels::PINNED_PROFILE_NAME) else {
        return Err(user_error(format!(
            "label {} is missing: no pinned storage profile",
            labels::PINNED_PROFILE_NAME
        )));
    };
    let namespace = cm.metadata.label(labels::PINNED_PROFILE_NAMESPACE);
    let found = profiles.iter().find(|p| {
        p.metadata.name.as_deref() == Some(name)
            && (namespace.is_none() || p.metadata.namespace.as_deref() == namespace)
    });
    let key = format!("{}/{}", namespace.unwrap_or(""), name);
    match found {
        None => Err(internal_error(
            "unable to find pinned storage profile",
            format!("unable to find pinned storage profile {key}"),
        )),
        Some(p) if !p.data.pinned => Err(ResourceError {
            severity: ResourceErrorSeverity::Fatal,
            ..internal_error(
                "storage profile is not pinned",
                format!("storage profile {key} does not have data.pinned: true"),
            )
        }),
        Some(p) => Ok(p),
    }
}

/// `/dev/mapper` spelling of an LVM name: device-mapper joins VG and LV with
/// a single `-`, so hyphens inside the names are doubled.
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// Lexically clean an absolute path (drop `.`, repeated and trailing `/`).
fn clean(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    Some(out)
}

fn command(prefix: &str, value: &Option<String>, vars: &Vars) -> Option<String> {
    let value = value.as_deref().map(str::trim).filter(|v| !v.is_empty())?;
    Some(format!("{prefix} {}", substitute(value, vars)))
}

fn lines(list: &[String], vars: &Vars) -> Vec<String> {
    list.iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(|l| substitute(l, vars))
        .collect()
}

/// Build the plan of entry `index` of `cm`.
pub fn build(
    cm: &ClientMount,
    index: usize,
    profile: &NnfStorageProfile,
    device_dir: &Path,
) -> Result<EntryPlan, ResourceError> {
    let info: &ClientMountInfo = cm
        .spec
        .mounts
        .get(index)
        .ok_or_else(|| user_error(format!("no spec.mounts[{index}]")))?;
    let mount_path = clean(&info.mount_path).ok_or_else(|| {
        user_error(format!(
            "spec.mounts[{index}].mountPath {:?} is not an absolute path",
            info.mount_path
        ))
    })?;
    let meta = &cm.metadata;
    let label = |k: &str| meta.label(k).unwrap_or("").to_string();
    let uid = info.user_id.unwrap_or(0);
    let gid = info.group_id.unwrap_or(0);
    let target_file = info.target_type == ClientMountTargetType::File;

    // Variables every command may use; upstream sets these from labels even
    // when the label is absent (empty value).
    let mut vars = Vars::new();
    let mut set = |k: &str, v: String| {
        vars.insert(k.to_string(), v);
    };
    set("$MOUNT_PATH", mount_path.display().to_string());
    set("$USERID", uid.to_string());
    set("$GROUPID", gid.to_string());
    set("$JOBID", label(labels::JOB_ID));
    set("$DIRECTIVE_INDEX", label(labels::TARGET_DIRECTIVE_INDEX));
    set("$WORKFLOW_UID", label(labels::WORKFLOW_UID));
    set(
        "$MOUNT_TARGET",
        if target_file { "file" } else { "directory" }.to_string(),
    );

    let mut plan = EntryPlan {
        index,
        mount_type: info.mount_type,
        mount_path,
        target_file,
        fstype: info.mount_type.as_str().to_string(),
        expected: Expected::Lustre {
            source: String::new(),
        },
        pre_activate: vec![],
        vg_lock_start: None,
        lv_activate: None,
        post_activate: vec![],
        pre_mount: vec![],
        mount: None,
        post_mount: vec![],
        pre_unmount: vec![],
        unmount: None,
        post_unmount: vec![],
        pre_deactivate: vec![],
        lv_deactivate: None,
        vg_lock_stop: None,
        post_deactivate: vec![],
        owner: info.set_permissions.then_some((uid, gid)),
        write_servers: info.set_permissions && info.mount_type == ClientMountType::Lustre,
    };

    if info.mount_type == ClientMountType::Lustre {
        let lustre = info.device.lustre.as_ref().ok_or_else(|| {
            user_error(format!(
                "spec.mounts[{index}] is of type lustre but has no device.lustre"
            ))
        })?;
        let opts = &profile.data.lustre_storage.client_options;
        vars.insert("$MGS_NID".into(), lustre.mgs_addresses.clone());
        vars.insert("$FS_NAME".into(), lustre.file_system_name.clone());
        vars.insert("$FSTYPE".into(), "lustre".into());
        for (k, v) in &opts.variable_override {
            vars.insert(k.clone(), v.clone());
        }
        let source = format!("{}:/{}", vars["$MGS_NID"], vars["$FS_NAME"]);
        vars.insert("$DEVICE".into(), source.clone());
        plan.expected = Expected::Lustre { source };
        let c = &opts.commandlines;
        plan.pre_mount = lines(&c.compute_pre_mount, &vars);
        plan.mount = command("mount -t lustre", &c.mount_compute, &vars);
        plan.post_mount = lines(&c.compute_post_mount, &vars);
        plan.pre_unmount = lines(&c.compute_pre_unmount, &vars);
        plan.unmount = command("umount", &c.unmount_compute, &vars);
        plan.post_unmount = lines(&c.compute_post_unmount, &vars);
        plan.fstype = "lustre".into();
        return Ok(plan);
    }

    let section: &NnfStorageProfileSharedData = match info.mount_type {
        ClientMountType::Xfs => &profile.data.xfs_storage,
        ClientMountType::Gfs2 => &profile.data.gfs2_storage,
        _ => &profile.data.raw_storage,
    };
    let shared = section.block_device_commands.shared_vg;
    // The allocation index on the Rabbit: NNF stores it in the device
    // reference's private data.
    let alloc = info
        .device
        .device_reference
        .as_ref()
        .and_then(|r| r.data)
        .unwrap_or(index as i64);
    let lvm = info.device.lvm.as_ref();
    let explicit = |v: Option<&String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let vg = match explicit(lvm.and_then(|l| l.volume_group.as_ref())) {
        Some(vg) => vg,
        None => {
            let owner = label(labels::TARGET_OWNER_UID);
            let dir = label(labels::TARGET_DIRECTIVE_INDEX);
            if owner.is_empty() || dir.is_empty() {
                if !section.variable_override.contains_key("$VG_NAME") {
                    return Err(user_error(format!(
                        "spec.mounts[{index}] has no device.lvm.volumeGroup and the ClientMount lacks labels {} and {}",
                        labels::TARGET_OWNER_UID,
                        labels::TARGET_DIRECTIVE_INDEX
                    )));
                }
                String::new()
            } else if shared {
                format!("{owner}_{dir}")
            } else {
                format!("{owner}_{dir}_{alloc}")
            }
        }
    };
    let lv = explicit(lvm.and_then(|l| l.logical_volume.as_ref())).unwrap_or_else(|| {
        if shared {
            format!("lv-{alloc}")
        } else {
            "lv".to_string()
        }
    });
    vars.insert("$VG_NAME".into(), vg);
    vars.insert("$LV_NAME".into(), lv);
    vars.insert("$LV_INDEX".into(), alloc.to_string());
    vars.insert("$FSTYPE".into(), info.mount_type.as_str().into());
    if info.mount_type == ClientMountType::Gfs2 {
        let cluster = info
            .device
            .device_reference
            .as_ref()
            .and_then(|r| r.object_reference.namespace.clone())
            .unwrap_or_default();
        vars.insert("$CLUSTER_NAME".into(), cluster);
        vars.insert("$PROTOCOL".into(), "lock_dlm".into());
    }
    for (k, v) in &section.variable_override {
        vars.insert(k.clone(), v.clone());
    }
    let device = device_dir.join(dm_name(&vars["$VG_NAME"], &vars["$LV_NAME"]));
    vars.insert("$DEVICE".into(), device.display().to_string());
    plan.fstype = vars["$FSTYPE"].clone();
    plan.expected = Expected::Block { device };

    let b = &section.block_device_commands.compute_commands;
    plan.pre_activate = lines(&b.user_commands.pre_activate, &vars);
    plan.vg_lock_start = command("vgchange", &b.vg_change.lock_start, &vars);
    plan.lv_activate = command("lvchange", &b.lv_change.activate, &vars);
    plan.post_activate = lines(&b.user_commands.post_activate, &vars);
    plan.pre_deactivate = lines(&b.user_commands.pre_deactivate, &vars);
    plan.lv_deactivate = command("lvchange", &b.lv_change.deactivate, &vars);
    plan.vg_lock_stop = command("vgchange", &b.vg_change.lock_stop, &vars);
    plan.post_deactivate = lines(&b.user_commands.post_deactivate, &vars);

    let f = &section.file_system_commands.compute_commands;
    plan.pre_mount = lines(&f.user_commands.pre_mount, &vars);
    plan.mount = command(&format!("mount -t {}", plan.fstype), &f.mount, &vars);
    plan.post_mount = lines(&f.user_commands.post_mount, &vars);
    plan.pre_unmount = lines(&f.user_commands.pre_unmount, &vars);
    plan.unmount = command("umount", &f.unmount, &vars);
    plan.post_unmount = lines(&f.user_commands.post_unmount, &vars);
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(json: serde_json::Value) -> ClientMount {
        serde_json::from_value(json).unwrap()
    }

    fn profile(json: serde_json::Value) -> NnfStorageProfile {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn xfs_from_labels_shared_vg() {
        let cm = cm(serde_json::json!({
            "metadata": {"name": "c", "labels": {
                "nnf.cray.hpe.com/target_owner_uid": "abc-1",
                "nnf.cray.hpe.com/target_directive_index": "0",
                "nnf.cray.hpe.com/job_id": "77"}},
            "spec": {"node": "n", "desiredState": "mounted", "mounts": [{
                "mountPath": "/mnt/x/", "type": "xfs", "targetType": "directory",
                "options": "", "setPermissions": true, "userID": 1000, "groupID": 100,
                "device": {"type": "lvm", "lvm": {"deviceType": "nvme"},
                    "deviceReference": {"objectReference": {"name": "a"}, "data": 2}}}]}
        }));
        let p = profile(serde_json::json!({"data": {"pinned": true, "xfsStorage": {
            "blockDeviceCommands": {"sharedVg": true, "computeCommands": {
                "lvChange": {"activate": "--activate y $VG_NAME/$LV_NAME", "deactivate": ""},
                "vgChange": {"lockStart": "--lock-start $VG_NAME"}}},
            "fileSystemCommands": {"computeCommands": {"mount": "$DEVICE $MOUNT_PATH",
                "unmount": "$MOUNT_PATH",
                "userCommands": {"postMount": ["echo $JOBID $USERID:$GROUPID $DEVICE_LIST"]}}}}}}));
        let plan = build(&cm, 0, &p, Path::new("/dev/mapper")).unwrap();
        assert_eq!(plan.mount_path, PathBuf::from("/mnt/x"));
        assert_eq!(
            plan.lv_activate.as_deref(),
            Some("lvchange --activate y abc-1_0/lv-2")
        );
        assert_eq!(plan.lv_deactivate, None);
        assert_eq!(
            plan.vg_lock_start.as_deref(),
            Some("vgchange --lock-start abc-1_0")
        );
        assert_eq!(
            plan.mount.as_deref(),
            Some("mount -t xfs /dev/mapper/abc--1_0-lv--2 /mnt/x")
        );
        assert_eq!(plan.unmount.as_deref(), Some("umount /mnt/x"));
        assert_eq!(
            plan.post_mount,
            vec!["echo 77 1000:100 $DEVICE_LIST".to_string()]
        );
        assert_eq!(plan.owner, Some((1000, 100)));
        assert!(!plan.write_servers);
    }

    #[test]
    fn lustre_and_missing_fields() {
        let cm = cm(serde_json::json!({
            "metadata": {"name": "c"},
            "spec": {"node": "n", "desiredState": "mounted", "mounts": [{
                "mountPath": "/lus", "type": "lustre", "targetType": "directory",
                "options": "", "setPermissions": true,
                "device": {"type": "lustre", "lustre": {"fileSystemName": "fs1", "mgsAddresses": "10.1.1.1@tcp"}}}]}
        }));
        // An empty profile: every step is skipped, nothing panics.
        let plan = build(&cm, 0, &profile(serde_json::json!({})), Path::new("/d")).unwrap();
        assert_eq!(plan.mount, None);
        assert_eq!(
            plan.expected,
            Expected::Lustre {
                source: "10.1.1.1@tcp:/fs1".into()
            }
        );
        assert_eq!(plan.owner, Some((0, 0)));
        assert!(plan.write_servers);
        let p = profile(
            serde_json::json!({"data": {"lustreStorage": {"clientOptions": {
            "commandlines": {"mountCompute": "$MGS_NID:/$FS_NAME $MOUNT_PATH"},
            "variableOverride": {"$FS_NAME": "other"}}}}}),
        );
        let plan = build(&cm, 0, &p, Path::new("/d")).unwrap();
        assert_eq!(
            plan.mount.as_deref(),
            Some("mount -t lustre 10.1.1.1@tcp:/other /lus")
        );
        assert!(build(&cm, 1, &p, Path::new("/d")).is_err());
    }

    #[test]
    fn block_without_names_is_user_error() {
        let cm = cm(serde_json::json!({
            "spec": {"node": "n", "desiredState": "mounted", "mounts": [{
                "mountPath": "rel", "type": "xfs", "targetType": "directory",
                "options": "", "setPermissions": false, "device": {"type": "lvm"}}]}
        }));
        let e = build(&cm, 0, &profile(serde_json::json!({})), Path::new("/d")).unwrap_err();
        assert!(e.debug_message.contains("absolute"));
    }
}
