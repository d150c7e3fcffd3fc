//! The command plans of every mount type, and the refusals.

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
