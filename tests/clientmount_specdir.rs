//! `clientmountd --spec-dir`: real mounts of loop devices, recording
//! stand-ins for the LVM, gfs2 and Lustre commands this machine lacks.
//! Run as root. Every test has its own directory, loop devices and mount
//! paths, so they run in parallel with each other and with other tests.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::clientmount::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// A test's world: spec dir, stand-in bin dir, device dir, LV map, logs.
struct World(Scratch);

impl std::ops::Deref for World {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        &self.0
    }
}

impl World {
    fn new() -> World {
        World(Scratch::new("clientmountd-test-"))
    }
    fn start(&self) -> Daemon {
        let args = self.device_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(&self.spec(), &self.bin(), &self.p("daemon.log"), &args)
    }
    fn put(&self, name: &str, v: &Value) {
        write_json(&self.spec().join(format!("{name}.json")), v);
    }
    /// ClientMount `cm` in `state` with `mounts`.
    fn put_cm(&self, state: &str, mounts: Value) {
        self.put("cm", &clientmount(state, mounts));
    }
}

fn profile(data: Value) -> Value {
    let mut data = data;
    data["pinned"] = json!(true);
    json!({
        "apiVersion": "nnf.cray.hpe.com/v1alpha11",
        "kind": "NnfStorageProfile",
        "metadata": {"name": "pinned-prof", "namespace": "nnf-system"},
        "data": data
    })
}

fn block_section(extra_fs_user: Value, overrides: Value) -> Value {
    json!({
        "blockDeviceCommands": {"sharedVg": true, "computeCommands": {
            "lvChange": {"activate": "--activate y $VG_NAME/$LV_NAME",
                         "deactivate": "--activate n $VG_NAME/$LV_NAME"},
            "vgChange": {"lockStart": "--lock-start $VG_NAME", "lockStop": "--lock-stop $VG_NAME"}}},
        "fileSystemCommands": {"computeCommands": {
            "mount": "$DEVICE $MOUNT_PATH", "unmount": "$MOUNT_PATH",
            "userCommands": extra_fs_user}},
        "variableOverride": overrides
    })
}

fn clientmount(state: &str, mounts: Value) -> Value {
    json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7",
        "kind": "ClientMount",
        "metadata": {"name": "cm", "namespace": "testnode", "labels": {
            "nnf.cray.hpe.com/pinned_storage_profile_name": "pinned-prof",
            "nnf.cray.hpe.com/pinned_storage_profile_namespace": "nnf-system",
            "dataworkflowservices.github.io/workflow.name": "wf",
            "dataworkflowservices.github.io/workflow.namespace": "default",
            "nnf.cray.hpe.com/job_id": "4242"}},
        "spec": {"node": "testnode", "desiredState": state, "mounts": mounts}
    })
}

fn lvm_mount(path: &Path, ty: &str, vg: &str, lv: &str, perms: Option<(u32, u32)>) -> Value {
    let mut m = json!({
        "mountPath": path, "type": ty,
        "targetType": if ty == "none" { "file" } else { "directory" },
        "options": "", "setPermissions": perms.is_some(),
        "device": {"type": "lvm", "lvm": {"deviceType": "nvme", "volumeGroup": vg, "logicalVolume": lv}}
    });
    if let Some((u, g)) = perms {
        m["userID"] = json!(u);
        m["groupID"] = json!(g);
    }
    m
}

fn all_ready(state: &'static str) -> impl Fn(&Value) -> bool {
    move |s: &Value| {
        s["allReady"] == json!(true)
            && s["mounts"]
                .as_array()
                .is_some_and(|m| m.iter().all(|e| e["state"] == json!(state)))
    }
}

#[test]
fn xfs_mount_permissions_substitution_restart_and_unmount() {
    let w = World::new();
    let XfsLv {
        dev,
        mnt,
        guard: _guard,
    } = w.xfs_lv("xfs", "mnt/xfs", "vg-a", "lv-0");
    let hook = format!(
        "echo '$DEVICE|$DEVICE_LIST|$VG_NAME/$LV_NAME|$UNKNOWN_X|$JOBID|$USERID:$GROUPID' >> {}",
        w.p("hooks.log").display()
    );
    w.put("profile", &profile(json!({"xfsStorage": block_section(
        json!({"preMount": ["echo premount $MOUNT_PATH >> ".to_string() + w.cmdlog().to_str().unwrap()],
               "postMount": [hook]}),
        json!({"$DEVICE_LIST": "pvA pvB"}))})));
    w.put_cm(
        "mounted",
        json!([lvm_mount(&mnt, "xfs", "vg-a", "lv-0", Some((1234, 5678)))]),
    );

    let mut d = w.start();
    let st = wait_status(&w.spec(), "cm", &d, T, all_ready("mounted"));
    assert_eq!(st["mounts"], json!([{"state": "mounted", "ready": true}]));
    assert!(st.get("error").is_none(), "{st}");

    // Really mounted: xfs, and the kernel's device is the loop device the
    // stand-in /dev/mapper symlink points at.
    let mounts = mounts_at(&mnt);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0].fstype, "xfs");
    assert_eq!((mounts[0].major, mounts[0].minor), dev.rdev());
    let md = fs::metadata(&mnt).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));

    let mapper = w.p("mapper").join("vg--a-lv--0");
    assert_eq!(
        w.commands(),
        vec![
            "vgchange --lock-start vg-a".to_string(),
            "lvchange --activate y vg-a/lv-0".to_string(),
            format!("premount {}", mnt.display()),
        ]
    );
    // Whole-name substitution: $DEVICE does not eat the front of
    // $DEVICE_LIST, an unknown variable stays as written.
    assert_eq!(
        read_lines(&w.p("hooks.log")),
        vec![format!(
            "{}|pvA pvB|vg-a/lv-0|$UNKNOWN_X|4242|1234:5678",
            mapper.display()
        )]
    );

    // SIGTERM: exit 0. Restart: the mount is recognised, nothing runs again.
    assert!(d.stop().unwrap().success(), "{}", d.log_text());
    let before = w.commands().len();
    let d = w.start();
    wait_until(&d, T, "second reconcile", || {
        d.log_text().matches("reconciled").count() >= 2
    });
    assert_eq!(mounts_at(&mnt).len(), 1, "mounted twice");
    assert_eq!(
        w.commands().len(),
        before,
        "commands re-run: {:?}",
        w.commands()
    );
    assert_eq!(read_lines(&w.p("hooks.log")).len(), 1);
    // Every log line of a reconcile names the ClientMount.
    for line in d.log_text().lines().filter(|l| l.contains("reconciled")) {
        assert!(line.contains("name=cm"), "{line}");
    }

    // desiredState unmounted: umount, remove the mount point, deactivate.
    w.put_cm(
        "unmounted",
        json!([lvm_mount(&mnt, "xfs", "vg-a", "lv-0", Some((1234, 5678)))]),
    );
    wait_status(&w.spec(), "cm", &d, T, all_ready("unmounted"));
    assert!(mount_at(&mnt).is_none());
    assert!(!mnt.exists(), "mount point not removed");
    assert!(!mapper.exists());
    assert_eq!(
        w.commands()[before..].to_vec(),
        vec![
            "lvchange --activate n vg-a/lv-0".to_string(),
            "vgchange --lock-stop vg-a".to_string()
        ]
    );
}

#[test]
fn raw_bind_onto_file_and_deletion() {
    let w = World::new();
    let dev = LoopDev::new(w.tmp.path(), "raw", None);
    let file = w.p("mnt/raw/dev-file");
    let mut guard = MountGuard::default();
    guard.watch(&file);
    map_lv(&w.p("map"), "vgraw", "lv", &dev.dev);
    let mut raw = block_section(json!({}), json!({}));
    raw["fileSystemCommands"]["computeCommands"]["mount"] = json!("-o bind $DEVICE $MOUNT_PATH");
    w.put("profile", &profile(json!({"rawStorage": raw})));
    w.put_cm(
        "mounted",
        json!([lvm_mount(&file, "none", "vgraw", "lv", None)]),
    );
    let d = w.start();
    wait_status(&w.spec(), "cm", &d, T, all_ready("mounted"));

    // The file is now the block device itself.
    assert!(mount_at(&file).is_some());
    let md = fs::metadata(&file).unwrap();
    assert!(md.file_type().is_block_device());
    assert_eq!((libc::major(md.rdev()), libc::minor(md.rdev())), dev.rdev());
    assert!(w
        .commands()
        .contains(&"lvchange --activate y vgraw/lv".to_string()));

    // The status file carries the implicit finalizer.
    let sf: Value =
        serde_json::from_slice(&fs::read(w.spec().join("cm.status.json")).unwrap()).unwrap();
    assert_eq!(
        sf["finalizer"]["name"],
        json!("nnf.cray.hpe.com/nnf_clientmount")
    );

    // Deleting the ClientMount unmounts, removes the mount point, and then
    // the status file.
    fs::remove_file(w.spec().join("cm.json")).unwrap();
    let status = w.spec().join("cm.status.json");
    wait_until(&d, T, "status file removal", || !status.exists());
    assert!(mount_at(&file).is_none());
    assert!(!file.exists());
    assert!(w
        .commands()
        .contains(&"lvchange --activate n vgraw/lv".to_string()));
}

#[test]
fn foreign_mounts_are_errors_and_every_entry_is_tried() {
    let w = World::new();
    let good = LoopDev::new(w.tmp.path(), "good", Some(&["mkfs.xfs", "-q"]));
    let ext4 = LoopDev::new(w.tmp.path(), "ext4", Some(&["mkfs.ext4", "-q"]));
    let other = LoopDev::new(w.tmp.path(), "other", Some(&["mkfs.xfs", "-q"]));
    let (p0, p1, p2) = (w.p("mnt/tmpfs"), w.p("mnt/ext4"), w.p("mnt/good"));
    let mut guard = MountGuard::default();
    for p in [&p0, &p1, &p2] {
        guard.watch(p);
        fs::create_dir_all(p).unwrap();
    }
    map_lv(&w.p("map"), "vg0", "lv", &other.dev);
    map_lv(&w.p("map"), "vg1", "lv", &ext4.dev);
    map_lv(&w.p("map"), "vg2", "lv", &good.dev);
    // Entry 0: something else entirely at the path. Entry 1: the right
    // device, but ext4 where the ClientMount says xfs.
    assert!(Command::new("mount")
        .args(["-t", "tmpfs", "foreign"])
        .arg(&p0)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("mount")
        .args(["-t", "ext4"])
        .arg(&ext4.dev)
        .arg(&p1)
        .status()
        .unwrap()
        .success());
    w.put(
        "profile",
        &profile(json!({"xfsStorage": block_section(json!({}), json!({}))})),
    );
    w.put_cm(
        "mounted",
        json!([
            lvm_mount(&p0, "xfs", "vg0", "lv", None),
            lvm_mount(&p1, "xfs", "vg1", "lv", None),
            lvm_mount(&p2, "xfs", "vg2", "lv", None)
        ]),
    );
    let d = w.start();
    let st = wait_status(&w.spec(), "cm", &d, T, |s| {
        s["mounts"]
            .get(2)
            .is_some_and(|m| m["ready"] == json!(true))
            && s.get("error").is_some()
    });
    assert_eq!(st["allReady"], json!(false));
    assert_eq!(st["mounts"][0]["ready"], json!(false));
    assert_eq!(st["mounts"][1]["ready"], json!(false));
    let err = &st["error"];
    assert_eq!(err["type"], json!("Internal"));
    assert_eq!(err["severity"], json!("Major"));
    let msg = err["debugMessage"].as_str().unwrap();
    assert!(msg.contains("unexpected mount at path"), "{msg}");
    assert!(
        msg.contains(p0.to_str().unwrap()),
        "first failure is entry 0: {msg}"
    );
    // The foreign mounts are untouched, the good one is mounted.
    assert_eq!(mount_at(&p0).unwrap().fstype, "tmpfs");
    assert_eq!(mount_at(&p1).unwrap().fstype, "ext4");
    assert_eq!(mount_at(&p2).unwrap().fstype, "xfs");
    // Retried with backoff: the error stays while the foreign mounts do.
    wait_until(&d, T, "a retry", || {
        d.log_text().matches("will retry").count() >= 2
    });
    // The foreign mount goes away: the retry mounts entry 0 and the error
    // is cleared ... once entry 1 is also fixed.
    assert!(Command::new("umount").arg(&p0).status().unwrap().success());
    assert!(Command::new("umount").arg(&p1).status().unwrap().success());
    fs::remove_dir(&p1).ok();
    let ext4_as_xfs = wait_status(&w.spec(), "cm", &d, T, |s| {
        s["mounts"][0]["ready"] == json!(true)
    });
    // vg1 is ext4 on disk: mount -t xfs fails and its stderr is reported.
    assert_eq!(ext4_as_xfs["mounts"][1]["ready"], json!(false));
    let msg = ext4_as_xfs["error"]["debugMessage"]
        .as_str()
        .unwrap_or_default();
    assert!(
        msg.contains(&format!("mount -t xfs {}", w.p("mapper/vg1-lv").display())),
        "{msg}"
    );
}

#[test]
fn lustre_exact_command_lines_and_servers_file() {
    let w = World::new();
    let mnt = w.p("mnt/lus");
    let log = w.cmdlog();
    // Recording stand-ins for the Lustre mount and unmount.
    w.recording_stub("mount");
    w.recording_stub("umount");
    w.put(
        "profile",
        &profile(json!({"lustreStorage": {"clientOptions": {
        "commandlines": {
            "mountCompute": "$MGS_NID:/$FS_NAME $MOUNT_PATH",
            "unmountCompute": "$MOUNT_PATH",
            "computePreMount": [format!("echo pre $FS_NAME >> {}", log.display())],
            "computePostMount": [format!("echo post $MOUNT_PATH $JOBID >> {}", log.display())]},
        "variableOverride": {"$FS_NAME": "lusfs"}}}})),
    );
    w.put("servers", &json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7", "kind": "Servers",
        "metadata": {"name": "wf-0", "namespace": "default", "labels": {
            "dataworkflowservices.github.io/workflow.name": "wf",
            "dataworkflowservices.github.io/workflow.namespace": "default"}},
        "spec": {"allocationSets": [
            {"allocationSize": 1, "label": "mgtmdt", "storage": [{"allocationCount": 1, "name": "rabbit-1"}]},
            {"allocationSize": 1, "label": "ost", "storage": [
                {"allocationCount": 2, "name": "rabbit-1"}, {"allocationCount": 1, "name": "rabbit-2"}]}]}
    }));
    w.put_cm("mounted", json!([{
        "mountPath": mnt, "type": "lustre", "targetType": "directory", "options": "",
        "setPermissions": true, "userID": 1001, "groupID": 1002,
        "device": {"type": "lustre", "lustre": {"fileSystemName": "orig", "mgsAddresses": "10.1.0.1@o2ib"}}}]));
    let d = w.start();
    wait_status(&w.spec(), "cm", &d, T, all_ready("mounted"));
    assert_eq!(
        w.commands(),
        vec![
            "pre lusfs".to_string(),
            format!("mount -t lustre 10.1.0.1@o2ib:/lusfs {}", mnt.display()),
            format!("post {} 4242", mnt.display()),
        ]
    );
    let md = fs::metadata(&mnt).unwrap();
    assert!(md.is_dir());
    assert_eq!((md.uid(), md.gid()), (1001, 1002));
    let servers: Value =
        serde_json::from_slice(&fs::read(mnt.join(".nnf-servers.json")).unwrap()).unwrap();
    assert_eq!(
        servers,
        json!({"mdt": [], "mgt": [], "mgtmdt": ["rabbit-1"],
        "ost": ["rabbit-1", "rabbit-1", "rabbit-2"], "nnfNode": ["rabbit-1", "rabbit-2"]})
    );
    let smd = fs::metadata(mnt.join(".nnf-servers.json")).unwrap();
    assert_eq!((smd.uid(), smd.gid()), (1001, 1002));
}

#[test]
fn gfs2_with_recording_standins() {
    let w = World::new();
    let dev = LoopDev::new(w.tmp.path(), "gfs2", None);
    let mnt = w.p("mnt/gfs2");
    let log = w.cmdlog();
    w.recording_stub("mount");
    map_lv(&w.p("map"), "uid-9_1", "lv-3", &dev.dev);
    let mut gfs2 = block_section(json!({}), json!({}));
    gfs2["blockDeviceCommands"]["computeCommands"]["lvChange"]["activate"] =
        json!("--activate ys $VG_NAME/$LV_NAME");
    gfs2["blockDeviceCommands"]["computeCommands"]["userCommands"] = json!({
        "preActivate": [format!("echo preact $CLUSTER_NAME $PROTOCOL >> {}", log.display())],
        "postDeactivate": [format!("echo postdeact $LV_INDEX >> {}", log.display())]});
    w.put("profile", &profile(json!({"gfs2Storage": gfs2})));
    // No explicit LVM names: derived from the target labels, the allocation
    // index and sharedVg, as NNF names them.
    let mut cm = clientmount(
        "mounted",
        json!([{
        "mountPath": mnt, "type": "gfs2", "targetType": "directory", "options": "",
        "setPermissions": false,
        "device": {"type": "lvm", "lvm": {"deviceType": "nvme"},
            "deviceReference": {"objectReference": {"name": "nns", "namespace": "rabbit-7"}, "data": 3}}}]),
    );
    cm["metadata"]["labels"]["nnf.cray.hpe.com/target_owner_uid"] = json!("uid-9");
    cm["metadata"]["labels"]["nnf.cray.hpe.com/target_directive_index"] = json!("1");
    w.put("cm", &cm);
    let d = w.start();
    wait_status(&w.spec(), "cm", &d, T, all_ready("mounted"));
    let mapper = w.p("mapper/uid--9_1-lv--3");
    assert_eq!(
        w.commands(),
        vec![
            "preact rabbit-7 lock_dlm".to_string(),
            "vgchange --lock-start uid-9_1".to_string(),
            "lvchange --activate ys uid-9_1/lv-3".to_string(),
            format!("mount -t gfs2 {} {}", mapper.display(), mnt.display()),
        ]
    );
    cm["spec"]["desiredState"] = json!("unmounted");
    w.put("cm", &cm);
    wait_status(&w.spec(), "cm", &d, T, all_ready("unmounted"));
    assert_eq!(
        w.commands()[4..].to_vec(),
        vec![
            "lvchange --activate n uid-9_1/lv-3".to_string(),
            "vgchange --lock-stop uid-9_1".to_string(),
            "postdeact 3".to_string(),
        ]
    );
}

#[test]
fn bad_objects_do_not_crash_and_are_reported() {
    let w = World::new();
    // Missing required fields and no profile: a user error in the status,
    // no panic; the daemon keeps serving other files.
    w.put(
        "bad",
        &json!({"kind": "ClientMount", "metadata": {"name": "bad"}, "spec": {"node": "x"}}),
    );
    w.put(
        "noprof",
        &clientmount(
            "mounted",
            json!([{
        "mountPath": w.p("mnt/x"), "type": "xfs", "targetType": "directory", "options": "",
        "setPermissions": false, "device": {"type": "lvm"}}]),
        ),
    );
    let mut d = w.start();
    let st = wait_status(&w.spec(), "bad", &d, T, |s| s.get("error").is_some());
    assert_eq!(st["error"]["type"], json!("User"));
    assert!(st["error"]["debugMessage"]
        .as_str()
        .unwrap()
        .contains("invalid ClientMount"));
    let st = wait_status(&w.spec(), "noprof", &d, T, |s| s.get("error").is_some());
    assert!(
        st["error"]["debugMessage"]
            .as_str()
            .unwrap()
            .contains("pinned storage profile"),
        "{st}"
    );
    // The profile arrives: the ClientMount is retried at once, and fails
    // now on the missing LVM names (a user error, Fatal).
    w.put("profile", &profile(json!({})));
    let st = wait_status(&w.spec(), "noprof", &d, T, |s| {
        s["error"]["severity"] == json!("Fatal")
    });
    assert!(
        st["error"]["debugMessage"]
            .as_str()
            .unwrap()
            .contains("volumeGroup"),
        "{st}"
    );
    assert!(d.stop().unwrap().success());
}

#[test]
fn version_and_incomplete_kubernetes_settings_refused() {
    let out = Command::new(clientmountd_bin())
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(clientmountd_bin())
        .args([
            "--kubernetes-service-host",
            "10.0.0.1",
            "--kubernetes-service-port",
            "6443",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--service-token-file not given"), "{err}");
}

/// ClientMounts are reconciled concurrently, but never two at once
/// on the same mount path. Six ClientMounts are there when the daemon
/// starts; the Lustre `mount` stand-in records when each mount runs. Three
/// with different paths must all be mounting at the same moment (each
/// waits in the stand-in until the other two have started); three on one
/// path (one spelled with a trailing `/`) must never overlap, and they do
/// not hold up the others.
#[test]
fn different_paths_mount_concurrently_same_path_never_overlaps() {
    let w = World::new();
    let log = w.cmdlog();
    timing_mount_stub(&w.bin(), &log, "/par-", 3);
    w.put(
        "profile",
        &profile(json!({"lustreStorage": {"clientOptions": {"commandlines": {
            "mountCompute": "$MGS_NID:/$FS_NAME $MOUNT_PATH", "unmountCompute": "$MOUNT_PATH"}}}})),
    );
    let lustre = |path: String, fs_name: &str| {
        let mut cm = clientmount(
            "mounted",
            json!([{
            "mountPath": path, "type": "lustre", "targetType": "directory", "options": "",
            "setPermissions": false,
            "device": {"type": "lustre", "lustre": {"fileSystemName": fs_name, "mgsAddresses": "10.1.0.1@o2ib"}}}]),
        );
        cm["metadata"]["name"] = json!(fs_name);
        cm
    };
    let shared = w.p("mnt/shared");
    let mut names = Vec::new();
    for i in 0..3 {
        let name = format!("par{i}");
        let path = w.p(&format!("mnt/par-{i}")).display().to_string();
        w.put(&name, &lustre(path, &name));
        names.push(name);
    }
    for i in 0..3 {
        let name = format!("same{i}");
        let mut path = shared.display().to_string();
        if i == 1 {
            path.push('/');
        }
        w.put(&name, &lustre(path, &name));
        names.push(name);
    }

    let d = w.start();
    for name in &names {
        wait_status(&w.spec(), name, &d, T, all_ready("mounted"));
    }
    let (runs, overlaps) = mount_runs(&log);
    assert!(overlaps.is_empty(), "{overlaps:?}");
    assert_eq!(runs.len(), 6, "one mount per ClientMount: {runs:#?}");
    let src = |name: &str| format!("10.1.0.1@o2ib:/{name}");
    let par: Vec<&MountRun> = runs.iter().filter(|r| r.source.contains(":/par")).collect();
    let same: Vec<&MountRun> = runs
        .iter()
        .filter(|r| r.source.contains(":/same"))
        .collect();
    assert_eq!(par.len(), 3, "{runs:#?}");
    assert_eq!(same.len(), 3, "{runs:#?}");
    for i in 0..3 {
        let r = par.iter().find(|r| r.source == src(&format!("par{i}")));
        let r = r.unwrap_or_else(|| panic!("par{i} not mounted: {runs:#?}"));
        assert_eq!(r.path, w.p(&format!("mnt/par-{i}")).display().to_string());
    }
    for r in &same {
        assert_eq!(r.path, shared.display().to_string(), "{r:?}");
    }
    // Concurrency: the three different paths were mounting at once.
    assert_all_overlap(&par);
    // Serialization: the one path was mounted by one ClientMount at a time.
    assert_none_overlap(&same);
    // ... while the others were not held up by it: they all started before
    // the first mount of the shared path had finished.
    let first_same_end = same.iter().map(|r| r.end).min().unwrap();
    assert!(par.iter().all(|r| r.start < first_same_end), "{runs:#?}");
}

/// `<dir>/<name>.json` gone and its status file removed: the spec-dir
/// mode's finalizer is done.
fn wait_finalized(w: &World, d: &Daemon, name: &str) {
    let status = w.spec().join(format!("{name}.status.json"));
    wait_until(d, T, &format!("{name} finalized"), || !status.exists());
}

fn delete(w: &World, name: &str) {
    fs::remove_file(w.spec().join(format!("{name}.json"))).expect("remove ClientMount file");
}

#[test]
fn hostile_clientmount_values_are_one_word_or_refused() {
    let w = World::new();
    let dev = LoopDev::new(w.tmp.path(), "xfs", Some(&["mkfs.xfs", "-q"]));
    let pwned = w.p("pwned");
    let p = pwned.display();
    // Spaces, `;`, `$(...)`, backquotes and both quotes in one path: every
    // one of them is a valid path character.
    let mnt = w.p(&format!("mnt/a b;touch {p}1;$(touch {p}2)`touch {p}3`'\"x"));
    let mut guard = MountGuard::default();
    guard.watch(&mnt);
    map_lv(&w.p("map"), "vg", "lv", &dev.dev);
    let hooks = w.p("hooks.log");
    w.put(
        "profile",
        &profile(json!({"xfsStorage": block_section(
            json!({"postMount": [format!("printf '%s\\n' $MOUNT_PATH >> {}", hooks.display())],
                   "preUnmount": [format!("echo \"job $JOBID\" >> {}", hooks.display())]}),
            json!({}))})),
    );
    w.put_cm("mounted", json!([lvm_mount(&mnt, "xfs", "vg", "lv", None)]));
    let d = w.start();
    wait_status(&w.spec(), "cm", &d, T, all_ready("mounted"));
    // Mounted at exactly that path, the hook saw it as one word, and
    // nothing in it ran.
    let m = mounts_at(&mnt);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].fstype, "xfs");
    assert_eq!(read_lines(&hooks), vec![mnt.display().to_string()]);
    for n in 1..=3 {
        assert!(!w.p(&format!("pwned{n}")).exists(), "injected command ran");
    }

    // A job id that would end the profile's double quotes: refused, with
    // a status error naming the variable and where it came from, and no
    // command of the entry runs.
    let mut cm = clientmount(
        "unmounted",
        json!([lvm_mount(&mnt, "xfs", "vg", "lv", None)]),
    );
    cm["metadata"]["labels"]["nnf.cray.hpe.com/job_id"] = json!(format!("1\"; touch {p}4; \""));
    let before = w.commands().len();
    w.put("cm", &cm);
    let st = wait_status(&w.spec(), "cm", &d, T, |s| s.get("error").is_some());
    assert_eq!(st["error"]["type"], json!("User"), "{st}");
    assert_eq!(st["error"]["severity"], json!("Fatal"), "{st}");
    let user = st["error"]["userMessage"].as_str().unwrap();
    assert!(user.contains("$JOBID"), "{st}");
    let debug = st["error"]["debugMessage"].as_str().unwrap();
    assert!(debug.contains("label nnf.cray.hpe.com/job_id"), "{st}");
    assert!(!w.p("pwned4").exists());
    assert_eq!(w.commands().len(), before, "{:?}", w.commands());
    assert_eq!(mounts_at(&mnt).len(), 1, "must stay mounted");

    // A newline is refused wherever it would go.
    let nl = w.p("mnt/new\nline");
    w.put(
        "nl",
        &clientmount("mounted", json!([lvm_mount(&nl, "xfs", "vg", "lv", None)])),
    );
    let st = wait_status(&w.spec(), "nl", &d, T, |s| s.get("error").is_some());
    let debug = st["error"]["debugMessage"].as_str().unwrap();
    assert!(
        debug.contains("$MOUNT_PATH") && debug.contains("control character"),
        "{st}"
    );
    assert!(!nl.exists());

    // A clean job id again: unmounted through the same quoting.
    w.put_cm(
        "unmounted",
        json!([lvm_mount(&mnt, "xfs", "vg", "lv", None)]),
    );
    wait_status(&w.spec(), "cm", &d, T, all_ready("unmounted"));
    assert!(mount_at(&mnt).is_none());
    assert_eq!(read_lines(&hooks)[1], "job 4242");
}

/// One of the LVM teardown scenarios: `setup` runs after the entry is
/// mounted and before the ClientMount file is removed; the deletion must
/// end with the mount gone and the finalizer (status file) removed.
/// Returns the commands the deletion ran.
fn lvm_teardown(mount_first: bool, setup: impl FnOnce(&World, &Path)) -> Vec<String> {
    let w = World::new();
    let dev = LoopDev::new(w.tmp.path(), "xfs", Some(&["mkfs.xfs", "-q"]));
    let mnt = w.p("mnt/x");
    let mut guard = MountGuard::default();
    guard.watch(&mnt);
    if mount_first {
        map_lv(&w.p("map"), "vg", "lv-0", &dev.dev);
    }
    w.put(
        "profile",
        &profile(json!({"xfsStorage": block_section(json!({}), json!({}))})),
    );
    w.put_cm(
        "mounted",
        json!([lvm_mount(&mnt, "xfs", "vg", "lv-0", None)]),
    );
    let d = w.start();
    if mount_first {
        wait_status(&w.spec(), "cm", &d, T, all_ready("mounted"));
        assert!(mount_at(&mnt).is_some());
    } else {
        let st = wait_status(&w.spec(), "cm", &d, T, |s| s.get("error").is_some());
        assert!(
            st["error"]["debugMessage"]
                .as_str()
                .unwrap()
                .contains("could not find logical volume"),
            "{st}"
        );
    }
    setup(&w, &mnt);
    let before = w.commands().len();
    delete(&w, "cm");
    wait_finalized(&w, &d, "cm");
    assert!(mount_at(&mnt).is_none());
    assert!(!mnt.exists(), "mount point left behind");
    w.commands()[before..].to_vec()
}

#[test]
fn deletion_without_its_profile_finishes_when_nothing_is_mounted() {
    let w = World::new();
    let mnt = w.p("mnt/never");
    // No profile object at all: the pinned profile never existed here.
    w.put_cm(
        "mounted",
        json!([lvm_mount(&mnt, "xfs", "vg", "lv-0", None)]),
    );
    let d = w.start();
    let st = wait_status(&w.spec(), "cm", &d, T, |s| s.get("error").is_some());
    assert!(
        st["error"]["debugMessage"]
            .as_str()
            .unwrap()
            .contains("unable to find pinned storage profile"),
        "{st}"
    );
    delete(&w, "cm");
    wait_finalized(&w, &d, "cm");
    assert!(w.commands().is_empty(), "{:?}", w.commands());
    assert!(d.log_text().contains("nothing is mounted at any path"));
}

#[test]
fn lvm_teardown_vg_never_appeared() {
    let ran = lvm_teardown(false, |_, _| {});
    assert!(ran.is_empty(), "{ran:?}");
}

#[test]
fn lvm_teardown_lv_already_inactive() {
    let ran = lvm_teardown(true, |w, mnt| {
        // A reboot: the mount and the activation are gone.
        assert!(Command::new("umount").arg(mnt).status().unwrap().success());
        fs::remove_file(w.p("mapper/vg-lv--0")).unwrap();
    });
    assert_eq!(ran, vec!["vgchange --lock-stop vg".to_string()]);
}

#[test]
fn lvm_teardown_another_lv_still_active() {
    let ran = lvm_teardown(true, |w, _| {
        map_lv(&w.p("map"), "vg", "lv-1", Path::new("/dev/null"));
        std::os::unix::fs::symlink("/dev/null", w.p("mapper/vg-lv--1")).unwrap();
    });
    assert_eq!(ran, vec!["lvchange --activate n vg/lv-0".to_string()]);
}

#[test]
fn lvm_teardown_lvmlockd_not_running() {
    let ran = lvm_teardown(true, |w, _| {
        fs::write(
            w.p("map/.fail-vgchange"),
            "  WARNING: lvmlockd process is not running.\n  Reading without shared global lock.\n",
        )
        .unwrap();
    });
    assert_eq!(
        ran,
        vec![
            "lvchange --activate n vg/lv-0".to_string(),
            "vgchange --lock-stop vg".to_string()
        ]
    );
}

fn nvme_mount(path: &Path, vg: &str, lv: &str) -> Value {
    let mut m = lvm_mount(path, "xfs", vg, lv, None);
    m["device"]["lvm"]["nvmeInfo"] = json!([
        {"deviceSerial": "nqn.rabbit-a", "namespaceID": "3", "namespaceGUID": "g3"},
        {"deviceSerial": "nqn.rabbit-b", "namespaceID": "7", "namespaceGUID": "g7"}]);
    m
}

/// Two NVMe controllers for the rescan, and the mount's namespaces shown
/// by `nvme list` when `present`.
fn nvme_setup(w: &World, present: bool) {
    for c in ["nvme0", "nvme1", "nvme0n1"] {
        fs::write(w.p("nvme").join(c), "").unwrap();
    }
    let list = if present {
        nvme_list_json(&[("nqn.rabbit-a", 3), ("nqn.rabbit-b", 7), ("nqn.other", 1)])
    } else {
        nvme_list_json(&[("nqn.rabbit-a", 3)])
    };
    fs::write(w.p("map/.nvme/list.json"), list).unwrap();
}

#[test]
fn nvme_rescan_on_failed_activation_quick_retry_and_on_deletion() {
    let w = World::new();
    let dev = LoopDev::new(w.tmp.path(), "xfs", Some(&["mkfs.xfs", "-q"]));
    let mnt = w.p("mnt/x");
    let mut guard = MountGuard::default();
    guard.watch(&mnt);
    nvme_setup(&w, true);
    // The namespaces "arrive" with the rescan: the VG and LV appear.
    let map = w.p("map");
    fs::write(
        map.join(".nvme/on-rescan"),
        format!(
            "#!/bin/bash\nmkdir -p '{m}/vg'; echo -n '{d}' > '{m}/vg/lv'\n",
            m = map.display(),
            d = dev.dev.display()
        ),
    )
    .unwrap();
    fs::set_permissions(
        map.join(".nvme/on-rescan"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    w.put(
        "profile",
        &profile(json!({"xfsStorage": block_section(json!({}), json!({}))})),
    );
    w.put_cm("mounted", json!([nvme_mount(&mnt, "vg", "lv")]));
    let d = w.start();
    wait_status(&w.spec(), "cm", &d, T, all_ready("mounted"));
    assert!(mount_at(&mnt).is_some());
    let nv = w.p("nvme");
    assert_eq!(
        w.commands(),
        vec![
            format!("nvme ns-rescan {}/nvme0", nv.display()),
            format!("nvme ns-rescan {}/nvme1", nv.display()),
            "nvme list -v --output-format=json".to_string(),
            "vgchange --lock-start vg".to_string(),
            "lvchange --activate y vg/lv".to_string(),
        ]
    );
    let log = d.log_text();
    assert!(
        log.contains("quick retry") && log.contains("will retry soon"),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("will retry") && !l.contains("will retry soon")),
        "{log}"
    );

    // Deletion: unmount, deactivate, then rescan and report what lingers.
    let before = w.commands().len();
    delete(&w, "cm");
    wait_finalized(&w, &d, "cm");
    assert_eq!(
        w.commands()[before..].to_vec(),
        vec![
            "lvchange --activate n vg/lv".to_string(),
            "vgchange --lock-stop vg".to_string(),
            format!("nvme ns-rescan {}/nvme0", nv.display()),
            format!("nvme ns-rescan {}/nvme1", nv.display()),
            "nvme list -v --output-format=json".to_string(),
        ]
    );
    assert!(
        d.log_text()
            .contains("NVMe namespaces still present after removal"),
        "{}",
        d.log_text()
    );
}

#[test]
fn nvme_namespaces_missing_after_rescan_use_the_normal_backoff() {
    let w = World::new();
    nvme_setup(&w, false);
    w.put(
        "profile",
        &profile(json!({"xfsStorage": block_section(json!({}), json!({}))})),
    );
    let mnt = w.p("mnt/x");
    w.put_cm("mounted", json!([nvme_mount(&mnt, "vg", "lv")]));
    let d = w.start();
    // Three attempts: 1 s, then 2 s of backoff, each answered by a rescan.
    wait_until(&d, T, "third rescan", || {
        w.commands()
            .iter()
            .filter(|c| c.ends_with("/nvme1"))
            .count()
            >= 3
    });
    let log = d.log_text();
    assert!(log.contains("retry_in=1s"), "{log}");
    assert!(log.contains("retry_in=2s"), "{log}");
    assert!(!log.contains("will retry soon"), "{log}");
    assert!(
        log.contains("could not find expected NVMe namespace"),
        "{log}"
    );
    let st = wait_status(&w.spec(), "cm", &d, T, |s| s.get("error").is_some());
    assert_eq!(st["mounts"][0]["ready"], json!(false));
}

#[test]
fn command_timeout_precedence_and_mapper_wait() {
    let w = World::new();
    let spec = w.spec();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--spec-dir",
            spec.to_str().unwrap(),
            "--node-name",
            "testnode",
            "--device-dir",
            w.p("mapper").to_str().unwrap(),
            "--nvme-dir",
            w.p("nvme").to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // A daemon with these settings, once the ClientMount has a status error.
    let until_error = |log: &str, extra: &[&str], env: (&str, &str)| {
        let d = Daemon::spawn_env(&w.bin(), &w.p(log), &args(extra), &[env]);
        let st = wait_status(&spec, "cm", &d, T, |s| s.get("error").is_some());
        (d, st)
    };
    // The LV "activates" but its device never appears.
    map_lv(&w.p("map"), "vg", "lv", &w.p("no-such-device"));
    let slow = w.p("slow.log");
    w.put(
        "profile",
        &profile(json!({"xfsStorage": block_section(
            json!({"preMount": [format!("sleep 3; echo done >> {}", slow.display())]}),
            json!({}))})),
    );
    let mnt = w.p("mnt/x");
    w.put_cm("mounted", json!([lvm_mount(&mnt, "xfs", "vg", "lv", None)]));

    // NNF_MAPPER_WAIT_TIMEOUT sets the device wait...
    let (mut d, st) = until_error("d1.log", &[], ("NNF_MAPPER_WAIT_TIMEOUT", "1"));
    assert!(
        st["error"]["debugMessage"]
            .as_str()
            .unwrap()
            .contains("after 1s"),
        "{st}"
    );
    assert!(
        d.log_text().contains("command_timeout=none"),
        "{}",
        d.log_text()
    );
    d.stop();
    fs::remove_file(spec.join("cm.status.json")).unwrap();
    // ... and --device-wait wins over it.
    let (mut d, st) = until_error(
        "d2.log",
        &["--device-wait", "2s"],
        ("NNF_MAPPER_WAIT_TIMEOUT", "1"),
    );
    assert!(
        st["error"]["debugMessage"]
            .as_str()
            .unwrap()
            .contains("after 2s"),
        "{st}"
    );
    d.stop();

    // The device is there now: the slow PreMount hook decides.
    let dev = LoopDev::new(w.tmp.path(), "xfs", Some(&["mkfs.xfs", "-q"]));
    let mut guard = MountGuard::default();
    guard.watch(&mnt);
    map_lv(&w.p("map"), "vg", "lv", &dev.dev);
    fs::remove_file(spec.join("cm.status.json")).unwrap();
    // NNF_COMMAND_TIMEOUT_SECONDS kills it...
    let (mut d, st) = until_error("d3.log", &[], ("NNF_COMMAND_TIMEOUT_SECONDS", "1"));
    assert!(
        st["error"]["debugMessage"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s"),
        "{st}"
    );
    d.stop();
    assert!(!slow.exists());
    fs::remove_file(spec.join("cm.status.json")).unwrap();
    // ... and --command-timeout overrides it.
    let d = Daemon::spawn_env(
        &w.bin(),
        &w.p("d4.log"),
        &args(&["--command-timeout", "20s"]),
        &[("NNF_COMMAND_TIMEOUT_SECONDS", "1")],
    );
    wait_status(&spec, "cm", &d, T, all_ready("mounted"));
    assert_eq!(read_lines(&slow), vec!["done"]);
    drop(d);

    // A malformed value is refused at start.
    let out = Command::new(clientmountd_bin())
        .args(args(&[]))
        .env("NNF_COMMAND_TIMEOUT_SECONDS", "1m")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NNF_COMMAND_TIMEOUT_SECONDS"),
        "{out:?}"
    );
}

#[test]
fn ownership_restored_and_hooks_after_restart_and_reboot() {
    let w = World::new();
    let XfsLv {
        dev: _dev,
        mnt,
        guard: _guard,
    } = w.xfs_lv("xfs", "mnt/x", "vg", "lv");
    let hooks = w.p("hooks.log");
    w.put(
        "profile",
        &profile(json!({"xfsStorage": block_section(
            json!({"postMount": [format!("echo postmount >> {}", hooks.display())]}), json!({}))})),
    );
    w.put_cm(
        "mounted",
        json!([lvm_mount(&mnt, "xfs", "vg", "lv", Some((1234, 5678)))]),
    );
    let mut d = w.start();
    wait_status(&w.spec(), "cm", &d, T, all_ready("mounted"));
    d.stop();
    // Someone took the ownership away while the daemon was down.
    std::os::unix::fs::chown(&mnt, Some(0), Some(0)).unwrap();
    let mut d = w.start();
    wait_until(&d, T, "ownership restored", || {
        let md = fs::metadata(&mnt).unwrap();
        (md.uid(), md.gid()) == (1234, 5678)
    });
    assert_eq!(
        read_lines(&hooks).len(),
        1,
        "hooks ran again on a present mount"
    );
    d.stop();
    // A reboot took the mount away: everything runs again, hooks too.
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    fs::remove_file(w.p("mapper/vg-lv")).unwrap();
    let d = w.start();
    wait_until(&d, T, "mounted again", || mount_at(&mnt).is_some());
    wait_until(&d, T, "hook ran again", || read_lines(&hooks).len() == 2);
    let md = fs::metadata(&mnt).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
}

#[test]
fn profile_variables_end_to_end() {
    let w = World::new();
    let XfsLv {
        dev: _dev,
        mnt,
        guard: _guard,
    } = w.xfs_lv("xfs", "mnt/vars", "own_2_5", "lv");
    let log = w.p("vars.log");
    let mut section = block_section(
        json!({"postMount": [format!(
            "echo $JOBID $DIRECTIVE_INDEX $WORKFLOW_UID $USERID:$GROUPID $LV_INDEX $DEVICE_NUM $DEVICE_NUM-1 $DEVICE_NUM-2 \
             [$DEVICE_LIST] [$DEVICE1] $LV_SIZE $PERCENT_VG $TEMP_DIR $MOUNT_TARGET $FSTYPE $SITE '$UNKNOWN' >> {}",
            log.display())]}),
        json!({"$SITE": "site-$TAG", "$TAG": "$VG_NAME.$LV_NAME", "$PERCENT_VG": "50%VG"}),
    );
    section["blockDeviceCommands"]["sharedVg"] = json!(false);
    w.put("profile", &profile(json!({"xfsStorage": section})));
    let mut m = lvm_mount(&mnt, "xfs", "", "", Some((1001, 1002)));
    m["device"] = json!({"type": "lvm", "lvm": {"deviceType": "nvme"},
        "deviceReference": {"objectReference": {"name": "nns-x", "namespace": "rabbit-2"}, "data": 5}});
    let mut cm = clientmount("mounted", json!([m]));
    let labels = &mut cm["metadata"]["labels"];
    labels["nnf.cray.hpe.com/target_owner_uid"] = json!("own");
    labels["nnf.cray.hpe.com/target_directive_index"] = json!("2");
    labels["dataworkflowservices.github.io/workflow.uid"] = json!("wf-77");
    w.put("cm", &cm);
    let d = w.start();
    wait_status(&w.spec(), "cm", &d, T, all_ready("mounted"));
    assert_eq!(
        read_lines(&log),
        vec![
            "4242 2 wf-77 1001:1002 5 0 -1 -2 [] [] 0K 50%VG /mnt/temp/nns-x-5 directory xfs \
             site-own_2_5.lv $UNKNOWN"
                .replace("             ", "")
        ]
    );
    assert_eq!(
        w.commands(),
        vec![
            "vgchange --lock-start own_2_5".to_string(),
            "lvchange --activate y own_2_5/lv".to_string(),
        ]
    );
}

#[test]
fn mock_reports_ready_and_runs_nothing() {
    let w = World::new();
    let mnt = w.p("mnt/x");
    w.put(
        "profile",
        &profile(json!({"xfsStorage": block_section(json!({}), json!({}))})),
    );
    w.put_cm("mounted", json!([lvm_mount(&mnt, "xfs", "vg", "lv", None)]));
    // Upstream's spelling: one dash.
    let d = Daemon::start(&w.spec(), &w.bin(), &w.p("daemon.log"), &["-mock"]);
    wait_status(&w.spec(), "cm", &d, T, all_ready("mounted"));
    delete(&w, "cm");
    wait_finalized(&w, &d, "cm");
    assert!(w.commands().is_empty(), "{:?}", w.commands());
    assert!(read_lines(&w.cmdlog().with_extension("queries")).is_empty());
    assert!(!mnt.exists());
}

#[test]
fn zap_logging_flags_and_unknown_flags() {
    let w = World::new();
    w.put("profile", &profile(json!({})));
    let mut d = Daemon::start(
        &w.spec(),
        &w.bin(),
        &w.p("json.log"),
        &[
            "--zap-encoder=json",
            "--zap-log-level",
            "debug",
            "--zap-time-encoding",
            "epoch",
            "--zap-stacktrace-level=panic",
        ],
    );
    wait_until(&d, T, "watching", || {
        d.log_text().contains("watching spec directory")
    });
    d.stop();
    let text = d.log_text();
    let mut levels = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let ts = v["timestamp"].as_str().unwrap();
        let (secs, frac) = ts.split_once('.').unwrap();
        assert!(
            secs.parse::<u64>().is_ok() && frac.parse::<u64>().is_ok(),
            "{ts}"
        );
        levels.push(v["level"].as_str().unwrap().to_string());
    }
    assert!(levels.iter().any(|l| l == "DEBUG"), "{text}");
    let mut d = Daemon::start(
        &w.spec(),
        &w.bin(),
        &w.p("devel.log"),
        &["--zap-devel=false", "--zap-log-level=error"],
    );
    d.stop();
    assert!(!d.log_text().contains("INFO"), "{}", d.log_text());

    for (bad, words) in [
        ("--zap-nope", "unexpected argument '--zap-nope'"),
        ("--zap-encoder=xml", "invalid value 'xml'"),
        ("--zap-log-level=loud", "invalid log level"),
    ] {
        let out = Command::new(clientmountd_bin())
            .args(["--spec-dir", w.spec().to_str().unwrap(), bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(words), "{bad}: {err}");
    }
}

/// A spec directory that is missing or not a directory is refused at start,
/// naming the path and the cause; one removed while the daemon runs stops
/// it with exit status 1 and a message naming it.
#[test]
fn spec_dir_missing_not_a_directory_or_removed() {
    let w = World::new();
    let missing = w.p("no-such-dir");
    let file = w.p("a-file");
    fs::write(&file, "").unwrap();
    for (dir, says) in [
        (
            &missing,
            format!("--spec-dir {}: No such file", missing.display()),
        ),
        (
            &file,
            format!("--spec-dir {}: not a directory", file.display()),
        ),
    ] {
        let out = Command::new(clientmountd_bin())
            .arg("--spec-dir")
            .arg(dir)
            .args(["--node-name", "testnode", "--metrics-bind-address", "0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&says), "{says:?} not in {err}");
    }

    let mut d = w.start();
    wait_until(&d, T, "watching", || {
        d.log_text().contains("watching spec directory")
    });
    let spec = w.spec().canonicalize().unwrap();
    fs::remove_dir_all(&spec).unwrap();
    wait_until(&d, T, "exit after removal", || {
        d.log_text().contains("clientmountd failed")
    });
    let status = d.stop().expect("the daemon was started");
    assert_eq!(status.code(), Some(1), "{}", d.log_text());
    assert!(
        d.log_text()
            .contains(&format!("spec directory {} was removed", spec.display())),
        "{}",
        d.log_text()
    );
}
