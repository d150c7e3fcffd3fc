//! Turning one `spec.mounts[i]` entry plus the pinned profile into the exact
//! command lines and checks that mount or unmount it. Pure: no I/O, so the
//! command lines a profile produces can be unit-tested.

use std::path::{Component, Path, PathBuf};

use nnf_api::{
    labels, ClientMount, ClientMountInfo, ClientMountTargetType, ClientMountType,
    NnfStorageProfile, NnfStorageProfileSharedData, ResourceError, ResourceErrorSeverity,
    ResourceErrorType,
};

use crate::vars::Vars;

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

/// The VG and LV of a block entry, for the guards around the LVM steps, and
/// the NVMe namespaces (`deviceSerial` = subsystem NQN, `namespaceID`) it is
/// made of, for the rescan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmTarget {
    pub vg: String,
    pub lv: String,
    pub nvme: Vec<(String, String)>,
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
    /// The LVM volume behind a block entry (`None` for Lustre).
    pub lvm: Option<LvmTarget>,
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

fn refused(e: crate::vars::Refused) -> ResourceError {
    let mut err = user_error(format!(
        "{} would change the words of a profile command: refused",
        e.name
    ));
    err.debug_message = e.to_string();
    err
}

fn command(
    prefix: &str,
    value: &Option<String>,
    vars: &Vars,
) -> Result<Option<String>, ResourceError> {
    let Some(value) = value.as_deref().map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let line = vars.expand(value).map_err(refused)?;
    Ok(Some(format!("{prefix} {line}")))
}

fn lines(list: &[String], vars: &Vars) -> Result<Vec<String>, ResourceError> {
    list.iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(|l| vars.expand(l).map_err(refused))
        .collect()
}

/// What upstream's compute node puts in `$LOCK_SPACE`: nnf-sos
/// `newGfs2FileSystem` formats `fs-%02d-%x` of the allocation index and the
/// first five bytes of the NnfNodeStorage UID, and on a compute that object
/// is the stand-in `fakeNnfNodeStorage` whose UID is `fake_UID`.
fn compute_lock_space(alloc: i64) -> String {
    let hex: String = b"fake_".iter().map(|b| format!("{b:02x}")).collect();
    format!("fs-{alloc:02}-{hex}")
}

/// Build the plan of entry `index` of `cm`.
///
/// The variables are the ones upstream's compute node defines (nnf-sos
/// `fakeNnfNodeStorage` and `getBlockDeviceAndFileSystem` with a fake block
/// reference, so no device list and no capacity), then the profile's
/// `variableOverride`, which wins. Every variable is known to every command
/// of the entry, where upstream knows some only in some kinds of command.
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
    let at = |field: &str| format!("spec.mounts[{index}].{field}");
    let lbl = |k: &str| format!("label {k}");
    // The allocation index on the Rabbit: NNF stores it in the device
    // reference's private data; upstream passes it as the index of every
    // per-allocation variable.
    let alloc = info
        .device
        .device_reference
        .as_ref()
        .and_then(|r| r.data)
        .unwrap_or(index as i64);
    let dev_ref = info.device.device_reference.as_ref();

    // Upstream sets these from labels even when the label is absent (empty).
    let mut vars = Vars::new();
    vars.value(
        "$MOUNT_PATH",
        mount_path.display().to_string(),
        at("mountPath"),
    );
    vars.value("$USERID", uid.to_string(), at("userID"));
    vars.value("$GROUPID", gid.to_string(), at("groupID"));
    vars.value("$JOBID", label(labels::JOB_ID), lbl(labels::JOB_ID));
    vars.value(
        "$DIRECTIVE_INDEX",
        label(labels::TARGET_DIRECTIVE_INDEX),
        lbl(labels::TARGET_DIRECTIVE_INDEX),
    );
    vars.value(
        "$WORKFLOW_UID",
        label(labels::WORKFLOW_UID),
        lbl(labels::WORKFLOW_UID),
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
        lvm: None,
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
        vars.value("$MOUNT_TARGET", "directory", "computed");
        vars.value(
            "$MGS_NID",
            lustre.mgs_addresses.clone(),
            at("device.lustre.mgsAddresses"),
        );
        vars.value(
            "$FS_NAME",
            lustre.file_system_name.clone(),
            at("device.lustre.fileSystemName"),
        );
        vars.value("$FSTYPE", "lustre", "computed");
        // nnf-sos `LustreFileSystem.parseArgs` with the compute node's fake
        // NnfNodeStorage: an OST target of index = allocation index, backing
        // file system "none", no Lustre components.
        vars.value(
            "$INDEX",
            alloc.to_string(),
            at("device.deviceReference.data"),
        );
        vars.value(
            "$TARGET_NAME",
            format!("{}-OST{alloc:04}", lustre.file_system_name),
            at("device.lustre.fileSystemName"),
        );
        vars.value("$BACKFS", "none", "computed");
        for n in [
            "$NUM_MDTS",
            "$NUM_MGTS",
            "$NUM_MGTMDTS",
            "$NUM_OSTS",
            "$NUM_NNFNODES",
        ] {
            vars.value(n, "0", "computed");
        }
        for (k, v) in &opts.variable_override {
            vars.text(k, v.clone());
        }
        let mgs = vars.plain("$MGS_NID").unwrap_or_default();
        let fs = vars.plain("$FS_NAME").unwrap_or_default();
        let source = format!("{mgs}:/{fs}");
        if !opts.variable_override.contains_key("$DEVICE") {
            vars.value("$DEVICE", source.clone(), at("device.lustre"));
        }
        plan.expected = Expected::Lustre { source };
        let c = &opts.commandlines;
        plan.pre_mount = lines(&c.compute_pre_mount, &vars)?;
        plan.mount = command("mount -t lustre", &c.mount_compute, &vars)?;
        plan.post_mount = lines(&c.compute_post_mount, &vars)?;
        plan.pre_unmount = lines(&c.compute_pre_unmount, &vars)?;
        plan.unmount = command("umount", &c.unmount_compute, &vars)?;
        plan.post_unmount = lines(&c.compute_post_unmount, &vars)?;
        plan.fstype = "lustre".into();
        return Ok(plan);
    }

    let section: &NnfStorageProfileSharedData = match info.mount_type {
        ClientMountType::Xfs => &profile.data.xfs_storage,
        ClientMountType::Gfs2 => &profile.data.gfs2_storage,
        _ => &profile.data.raw_storage,
    };
    let shared = section.block_device_commands.shared_vg;
    let lvm = info.device.lvm.as_ref();
    let explicit = |v: Option<&String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let (vg, vg_origin) = match explicit(lvm.and_then(|l| l.volume_group.as_ref())) {
        Some(vg) => (vg, at("device.lvm.volumeGroup")),
        None => {
            let owner = label(labels::TARGET_OWNER_UID);
            let dir = label(labels::TARGET_DIRECTIVE_INDEX);
            let origin = format!(
                "labels {} and {}",
                labels::TARGET_OWNER_UID,
                labels::TARGET_DIRECTIVE_INDEX
            );
            if owner.is_empty() || dir.is_empty() {
                if !section.variable_override.contains_key("$VG_NAME") {
                    return Err(user_error(format!(
                        "spec.mounts[{index}] has no device.lvm.volumeGroup and the ClientMount lacks labels {} and {}",
                        labels::TARGET_OWNER_UID,
                        labels::TARGET_DIRECTIVE_INDEX
                    )));
                }
                (String::new(), origin)
            } else if shared {
                (format!("{owner}_{dir}"), origin)
            } else {
                (format!("{owner}_{dir}_{alloc}"), origin)
            }
        }
    };
    let (lv, lv_origin) = match explicit(lvm.and_then(|l| l.logical_volume.as_ref())) {
        Some(lv) => (lv, at("device.lvm.logicalVolume")),
        None if shared => (format!("lv-{alloc}"), at("device.deviceReference.data")),
        None => ("lv".to_string(), "computed".to_string()),
    };
    vars.value("$VG_NAME", vg, vg_origin);
    vars.value("$LV_NAME", lv, lv_origin);
    vars.value(
        "$LV_INDEX",
        alloc.to_string(),
        at("device.deviceReference.data"),
    );
    // nnf-sos `LogicalVolume.ParseArgs` on a compute: the fake
    // NnfNodeStorage has no block reference, so no devices and no capacity;
    // `ListToVars` of the empty list still makes `$DEVICE1` (empty).
    vars.value("$DEVICE_NUM", "0", "computed");
    vars.value("$DEVICE_NUM-1", "-1", "computed");
    vars.value("$DEVICE_NUM-2", "-2", "computed");
    vars.value("$DEVICE_LIST", "", "computed");
    vars.value("$DEVICE1", "", "computed");
    vars.value("$LV_SIZE", "0K", "computed");
    // 100 / NnfNodeStorage count, which is 1 on a compute.
    vars.value("$PERCENT_VG", "100%VG", "computed");
    let (fstype, target) = match info.mount_type {
        ClientMountType::Xfs => ("xfs", "directory"),
        ClientMountType::Gfs2 => ("gfs2", "directory"),
        _ => ("none", "file"),
    };
    vars.value("$FSTYPE", fstype, "computed");
    vars.value("$MOUNT_TARGET", target, "computed");
    let ref_name = dev_ref
        .and_then(|r| r.object_reference.name.clone())
        .unwrap_or_default();
    vars.value(
        "$TEMP_DIR",
        format!("/mnt/temp/{ref_name}-{alloc}"),
        at("device.deviceReference.objectReference.name"),
    );
    if info.mount_type == ClientMountType::Gfs2 {
        let cluster = dev_ref
            .and_then(|r| r.object_reference.namespace.clone())
            .unwrap_or_default();
        vars.value(
            "$CLUSTER_NAME",
            cluster,
            at("device.deviceReference.objectReference.namespace"),
        );
        vars.value("$PROTOCOL", "lock_dlm", "computed");
        vars.value("$LOCK_SPACE", compute_lock_space(alloc), "computed");
    }
    for (k, v) in &section.variable_override {
        vars.text(k, v.clone());
    }
    let vg = vars.plain("$VG_NAME").unwrap_or_default();
    let lv = vars.plain("$LV_NAME").unwrap_or_default();
    let device = device_dir.join(dm_name(&vg, &lv));
    if !section.variable_override.contains_key("$DEVICE") {
        vars.value(
            "$DEVICE",
            device.display().to_string(),
            "computed from $VG_NAME and $LV_NAME",
        );
    }
    plan.fstype = vars.plain("$FSTYPE").unwrap_or_default();
    plan.expected = Expected::Block { device };
    plan.lvm = Some(LvmTarget {
        vg,
        lv,
        nvme: lvm
            .map(|l| {
                l.nvme_info
                    .iter()
                    .map(|n| (n.device_serial.clone(), n.namespace_id.clone()))
                    .collect()
            })
            .unwrap_or_default(),
    });

    let b = &section.block_device_commands.compute_commands;
    plan.pre_activate = lines(&b.user_commands.pre_activate, &vars)?;
    plan.vg_lock_start = command("vgchange", &b.vg_change.lock_start, &vars)?;
    plan.lv_activate = command("lvchange", &b.lv_change.activate, &vars)?;
    plan.post_activate = lines(&b.user_commands.post_activate, &vars)?;
    plan.pre_deactivate = lines(&b.user_commands.pre_deactivate, &vars)?;
    plan.lv_deactivate = command("lvchange", &b.lv_change.deactivate, &vars)?;
    plan.vg_lock_stop = command("vgchange", &b.vg_change.lock_stop, &vars)?;
    plan.post_deactivate = lines(&b.user_commands.post_deactivate, &vars)?;

    let f = &section.file_system_commands.compute_commands;
    plan.pre_mount = lines(&f.user_commands.pre_mount, &vars)?;
    plan.mount = command(&format!("mount -t {}", plan.fstype), &f.mount, &vars)?;
    plan.post_mount = lines(&f.user_commands.post_mount, &vars)?;
    plan.pre_unmount = lines(&f.user_commands.pre_unmount, &vars)?;
    plan.unmount = command("umount", &f.unmount, &vars)?;
    plan.post_unmount = lines(&f.user_commands.post_unmount, &vars)?;
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
                "userCommands": {"postMount": ["echo $JOBID $USERID:$GROUPID $DEVICE_LIST $UNKNOWN"]}}}}}}));
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
            // Upstream's compute node has no device list: empty, one word.
            vec!["echo 77 1000:100 '' $UNKNOWN".to_string()]
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

    /// The command every variable of `names` expands to, as `NAME=value`
    /// words, for an entry of type `ty`.
    fn expand_all(ty: &str, names: &[&str], overrides: serde_json::Value) -> Vec<String> {
        let labels = serde_json::json!({
            "nnf.cray.hpe.com/target_owner_uid": "own",
            "nnf.cray.hpe.com/target_directive_index": "1",
            "nnf.cray.hpe.com/job_id": "j77",
            "dataworkflowservices.github.io/workflow.uid": "wf-uid"});
        let device = if ty == "lustre" {
            serde_json::json!({"type": "lustre", "lustre": {"fileSystemName": "fsx", "mgsAddresses": "10.0.0.1@tcp"},
                "deviceReference": {"objectReference": {"name": "nns", "namespace": "rabbit-1"}, "data": 3}})
        } else {
            serde_json::json!({"type": "lvm", "lvm": {"deviceType": "nvme"},
                "deviceReference": {"objectReference": {"name": "nns", "namespace": "rabbit-1"}, "data": 3}})
        };
        let cm = cm(serde_json::json!({
            "metadata": {"name": "c", "labels": labels},
            "spec": {"node": "n", "desiredState": "mounted", "mounts": [{
                "mountPath": "/mnt/v", "type": ty, "targetType": "directory",
                "options": "", "setPermissions": false, "userID": 1001, "groupID": 1002,
                "device": device}]}
        }));
        let line: Vec<String> = names.iter().map(|n| format!("{}={n}", &n[1..])).collect();
        let line = line.join(" ");
        let section = serde_json::json!({
            "blockDeviceCommands": {"computeCommands": {"userCommands": {"preActivate": [line]}}},
            "fileSystemCommands": {"computeCommands": {"userCommands": {"preMount": [line]}}},
            "variableOverride": overrides});
        let key = match ty {
            "xfs" => "xfsStorage",
            "gfs2" => "gfs2Storage",
            "none" => "rawStorage",
            _ => "",
        };
        let p = if ty == "lustre" {
            profile(
                serde_json::json!({"data": {"lustreStorage": {"clientOptions": {
                "commandlines": {"computePreMount": [line]}, "variableOverride": overrides}}}}),
            )
        } else {
            profile(serde_json::json!({"data": {key: section}}))
        };
        let plan = build(&cm, 0, &p, Path::new("/dev/mapper")).unwrap();
        if ty != "lustre" {
            assert_eq!(
                plan.pre_activate, plan.pre_mount,
                "same variables everywhere"
            );
        }
        plan.pre_mount[0].split(' ').map(str::to_string).collect()
    }

    fn one(ty: &str, name: &str) -> String {
        let words = expand_all(ty, &[name], serde_json::json!({}));
        words[0].split_once('=').unwrap().1.to_string()
    }

    #[test]
    fn every_common_variable() {
        for ty in ["xfs", "gfs2", "none", "lustre"] {
            assert_eq!(one(ty, "$MOUNT_PATH"), "/mnt/v");
            assert_eq!(one(ty, "$USERID"), "1001");
            assert_eq!(one(ty, "$GROUPID"), "1002");
            assert_eq!(one(ty, "$JOBID"), "j77");
            assert_eq!(one(ty, "$DIRECTIVE_INDEX"), "1");
            assert_eq!(one(ty, "$WORKFLOW_UID"), "wf-uid");
        }
    }

    #[test]
    fn every_block_variable() {
        for ty in ["xfs", "gfs2", "none"] {
            assert_eq!(one(ty, "$VG_NAME"), "own_1_3");
            assert_eq!(one(ty, "$LV_NAME"), "lv");
            assert_eq!(one(ty, "$LV_INDEX"), "3");
            assert_eq!(one(ty, "$DEVICE"), "/dev/mapper/own_1_3-lv");
            assert_eq!(one(ty, "$DEVICE_NUM"), "0");
            assert_eq!(one(ty, "$DEVICE_NUM-1"), "-1");
            assert_eq!(one(ty, "$DEVICE_NUM-2"), "-2");
            assert_eq!(one(ty, "$DEVICE_LIST"), "''");
            assert_eq!(one(ty, "$DEVICE1"), "''");
            assert_eq!(one(ty, "$DEVICE2"), "$DEVICE2", "unknown stays");
            assert_eq!(one(ty, "$LV_SIZE"), "0K");
            assert_eq!(one(ty, "$PERCENT_VG"), "100%VG");
            assert_eq!(one(ty, "$TEMP_DIR"), "/mnt/temp/nns-3");
        }
        assert_eq!(one("xfs", "$FSTYPE"), "xfs");
        assert_eq!(one("gfs2", "$FSTYPE"), "gfs2");
        assert_eq!(one("none", "$FSTYPE"), "none");
        assert_eq!(one("xfs", "$MOUNT_TARGET"), "directory");
        assert_eq!(one("gfs2", "$MOUNT_TARGET"), "directory");
        assert_eq!(one("none", "$MOUNT_TARGET"), "file");
    }

    #[test]
    fn every_gfs2_variable() {
        assert_eq!(one("gfs2", "$CLUSTER_NAME"), "rabbit-1");
        assert_eq!(one("gfs2", "$PROTOCOL"), "lock_dlm");
        assert_eq!(one("gfs2", "$LOCK_SPACE"), "fs-03-66616b655f");
        assert_eq!(one("xfs", "$LOCK_SPACE"), "$LOCK_SPACE", "gfs2 only");
    }

    #[test]
    fn every_lustre_variable() {
        assert_eq!(one("lustre", "$MGS_NID"), "10.0.0.1@tcp");
        assert_eq!(one("lustre", "$FS_NAME"), "fsx");
        assert_eq!(one("lustre", "$DEVICE"), "10.0.0.1@tcp:/fsx");
        assert_eq!(one("lustre", "$FSTYPE"), "lustre");
        assert_eq!(one("lustre", "$INDEX"), "3");
        assert_eq!(one("lustre", "$TARGET_NAME"), "fsx-OST0003");
        assert_eq!(one("lustre", "$BACKFS"), "none");
        for n in [
            "$NUM_MDTS",
            "$NUM_MGTS",
            "$NUM_MGTMDTS",
            "$NUM_OSTS",
            "$NUM_NNFNODES",
        ] {
            assert_eq!(one("lustre", n), "0", "{n}");
        }
        assert_eq!(one("lustre", "$VG_NAME"), "$VG_NAME", "block only");
    }

    #[test]
    fn overrides_win_and_nest() {
        let words = expand_all(
            "xfs",
            &["$VG_NAME", "$DEVICE", "$PERCENT_VG", "$MINE"],
            serde_json::json!({"$VG_NAME": "vg_$JOBID", "$PERCENT_VG": "50%VG",
                "$MINE": "<$INNER>", "$INNER": "$LV_NAME"}),
        );
        assert_eq!(
            words,
            vec![
                "VG_NAME=vg_j77",
                "DEVICE=/dev/mapper/vg_j77-lv",
                "PERCENT_VG=50%VG",
                "MINE=<lv>"
            ]
        );
    }

    #[test]
    fn hostile_clientmount_values_are_refused_or_one_word() {
        let mk = |path: &str, job: &str| {
            cm(serde_json::json!({
                "metadata": {"name": "c", "labels": {"nnf.cray.hpe.com/job_id": job}},
                "spec": {"node": "n", "desiredState": "mounted", "mounts": [{
                    "mountPath": path, "type": "xfs", "targetType": "directory",
                    "options": "", "setPermissions": false,
                    "device": {"type": "lvm", "lvm": {"deviceType": "nvme", "volumeGroup": "vg", "logicalVolume": "lv"}}}]}
            }))
        };
        let p = profile(serde_json::json!({"data": {"xfsStorage": {
            "fileSystemCommands": {"computeCommands": {"mount": "$DEVICE $MOUNT_PATH",
                "userCommands": {"postMount": ["logger \"job $JOBID\""]}}}}}}));
        let plan = build(&mk("/mnt/a b;rm -rf x", "1"), 0, &p, Path::new("/d")).unwrap();
        assert_eq!(
            plan.mount.as_deref(),
            Some("mount -t xfs /d/vg-lv '/mnt/a b;rm -rf x'")
        );
        let e = build(&mk("/mnt/a", "1\"; reboot; \""), 0, &p, Path::new("/d")).unwrap_err();
        assert_eq!(e.error_type, ResourceErrorType::User);
        assert_eq!(e.severity, ResourceErrorSeverity::Fatal);
        assert!(
            e.user_message.as_deref().unwrap().contains("$JOBID"),
            "{e:?}"
        );
        assert!(
            e.debug_message.contains("label nnf.cray.hpe.com/job_id"),
            "{e:?}"
        );
        let e = build(&mk("/mnt/a\nb", "1"), 0, &p, Path::new("/d")).unwrap_err();
        assert!(e.debug_message.contains("$MOUNT_PATH"), "{e:?}");
    }
}
