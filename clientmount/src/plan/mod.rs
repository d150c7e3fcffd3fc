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
mod tests;
