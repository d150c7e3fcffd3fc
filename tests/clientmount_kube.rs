//! `clientmountd` in Kubernetes mode against the in-process API server
//! (`kube-testserver`): the daemon connects exactly as in production, with
//! the clientmount service account's token and the server's CA, so the
//! ClientMount schema and the real ClusterRole are enforced on everything it
//! sends. Real xfs mounts of loop devices; recording stand-ins for the LVM
//! commands. Run as root. Every test has its own server, namespace, loop
//! devices and mount paths.
//!
//! `api_server_down_at_start_and_mid_watch` and
//! `status_conflict_storm_converges` use the in-process server's fault
//! hooks.
//!
//! The benchmark is an ignored test:
//! `cargo test -p integration-tests --test clientmount_kube -- --ignored --nocapture bench`

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use integration_tests::clientmount::*;
use kube_testserver::{Config, TestServer, CLIENTMOUNT};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
const CM: &str = "ClientMount";

struct World {
    scratch: Scratch,
    server: TestServer,
    node: String,
}

impl std::ops::Deref for World {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        &self.scratch
    }
}

impl World {
    fn new(node: &str) -> World {
        World::with_server(node, Config::default())
    }

    fn with_server(node: &str, config: Config) -> World {
        World {
            scratch: Scratch::new("clientmountd-kube-"),
            server: TestServer::start(config),
            node: node.to_string(),
        }
    }
    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--kubernetes-service-host",
            "127.0.0.1",
            "--kubernetes-service-port",
            &self.server.port().to_string(),
            "--service-token-file",
            self.server.token_file(CLIENTMOUNT).to_str().unwrap(),
            "--service-cert-file",
            self.server.ca_file().to_str().unwrap(),
            "--node-name",
            &self.node,
            "--command-timeout",
            "20s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.device_args());
        args
    }
    fn start(&self) -> Daemon {
        Daemon::spawn(&self.bin(), &self.p("daemon.log"), &self.args())
    }
    fn put_profile(&self) {
        self.server.put_object(profile());
    }
    fn put_cm(&self, name: &str, state: &str, mounts: Value) {
        self.server
            .put_object(clientmount(&self.node, name, state, mounts));
    }
    fn get_cm(&self, name: &str) -> Option<Value> {
        self.server.get_object(CM, &self.node, name)
    }
    fn set_state(&self, name: &str, state: &str) {
        // Retried: the daemon writes the object too, so a 409 is expected.
        for _ in 0..50 {
            match self
                .server
                .modify_object(CM, &self.node, name, |o| {
                    o["spec"]["desiredState"] = json!(state)
                })
                .expect("ClientMount exists")
            {
                Ok(_) => return,
                Err(_) => sleep(Duration::from_millis(20)),
            }
        }
        panic!("could not set desiredState");
    }
    /// Waits for the ClientMount to satisfy `pred`; panics with the object
    /// and the daemon log.
    fn wait_cm(&self, d: &Daemon, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let node = self.node.clone();
        let name_s = name.to_string();
        match self.server.wait_for(CM, Some(&self.node), T, move |o| {
            o["metadata"]["name"] == json!(name_s) && pred(o)
        }) {
            Some(o) => o,
            None => panic!(
                "timed out waiting for {what} on {node}/{name}; object:\n{:#}\ndaemon log:\n{}",
                self.get_cm(name).unwrap_or(Value::Null),
                d.log_text()
            ),
        }
    }
}

/// The pinned xfs-on-LVM profile both modes' tests use.
fn profile() -> Value {
    pinned_xfs_profile()
}

fn clientmount(node: &str, name: &str, state: &str, mounts: Value) -> Value {
    json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7",
        "kind": "ClientMount",
        "metadata": {"name": name, "namespace": node, "labels": {
            "nnf.cray.hpe.com/pinned_storage_profile_name": "pinned-prof",
            "nnf.cray.hpe.com/pinned_storage_profile_namespace": "nnf-system",
            "dataworkflowservices.github.io/workflow.name": "wf",
            "dataworkflowservices.github.io/workflow.namespace": "default",
            "nnf.cray.hpe.com/job_id": "4242"}},
        "spec": {"node": node, "desiredState": state, "mounts": mounts}
    })
}

fn xfs_mount(path: &Path, vg: &str, lv: &str, perms: Option<(u32, u32)>) -> Value {
    let mut m = json!({
        "mountPath": path, "type": "xfs", "targetType": "directory",
        "options": "", "setPermissions": perms.is_some(),
        "device": {"type": "lvm", "lvm": {"deviceType": "nvme", "volumeGroup": vg, "logicalVolume": lv}}
    });
    if let Some((u, g)) = perms {
        m["userID"] = json!(u);
        m["groupID"] = json!(g);
    }
    m
}

fn has_finalizer(o: &Value) -> bool {
    o["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "nnf.cray.hpe.com/nnf_clientmount"))
}

fn all_ready(state: &'static str) -> impl Fn(&Value) -> bool {
    move |o: &Value| status_all_ready(&o["status"], state)
}

/// Every write the daemon sent was made as the clientmount account, and
/// none was refused by RBAC or the schema.
fn assert_clean_requests(server: &TestServer) {
    for r in server.requests() {
        assert_eq!(r.account.as_deref(), Some(CLIENTMOUNT), "{r:?}");
        let expected_403 = r.resource.as_deref() == Some("servers");
        assert!(
            (expected_403 || r.status != 403) && r.status != 401 && r.status != 422,
            "refused request: {r:?}"
        );
    }
}

#[test]
fn xfs_finalizer_status_unmount_restart_and_deletion() {
    let w = World::new("knode1");
    let XfsLv {
        dev,
        mnt,
        guard: _guard,
    } = w.xfs_lv("xfs", "mnt/xfs", "vg-a", "lv-0");
    w.put_profile();
    w.put_cm(
        "cm",
        "mounted",
        json!([xfs_mount(&mnt, "vg-a", "lv-0", Some((1234, 5678)))]),
    );

    let mut d = w.start();
    let o = w.wait_cm(&d, "cm", "allReady mounted", all_ready("mounted"));
    assert!(has_finalizer(&o), "{o:#}");
    assert_eq!(
        o["status"]["mounts"],
        json!([{"state": "mounted", "ready": true}])
    );
    assert!(o["status"].get("error").is_none(), "{o:#}");
    let mounts = mounts_at(&mnt);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0].fstype, "xfs");
    assert_eq!((mounts[0].major, mounts[0].minor), dev.rdev());
    let md = fs::metadata(&mnt).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!(
        w.commands(),
        vec![
            "vgchange --lock-start vg-a".to_string(),
            "lvchange --activate y vg-a/lv-0".to_string(),
        ]
    );
    // The finalizer went on before the first status write and the mount.
    let reqs = w.server.requests();
    let first_fin = reqs
        .iter()
        .position(|r| {
            r.verb.as_deref() == Some("update") && r.resource.as_deref() == Some("clientmounts")
        })
        .expect("finalizer update");
    let first_status = reqs
        .iter()
        .position(|r| r.resource.as_deref() == Some("clientmounts/status"))
        .expect("status update");
    assert!(first_fin < first_status);

    // SIGTERM: exit 0. Restart: recognised as mounted, no command runs.
    assert!(d.stop().unwrap().success(), "{}", d.log_text());
    let before = w.commands().len();
    let reconciled = d.log_text().matches("reconciled").count();
    let d = w.start();
    wait_until(&d, T, "reconcile after restart", || {
        d.log_text().matches("reconciled").count() > reconciled
    });
    assert_eq!(mounts_at(&mnt).len(), 1, "mounted twice");
    assert_eq!(w.commands().len(), before, "{:?}", w.commands());

    // desiredState unmounted.
    w.set_state("cm", "unmounted");
    w.wait_cm(&d, "cm", "allReady unmounted", all_ready("unmounted"));
    assert!(mount_at(&mnt).is_none());
    assert!(!mnt.exists(), "mount point not removed");
    assert_eq!(
        w.commands()[before..].to_vec(),
        vec![
            "lvchange --activate n vg-a/lv-0".to_string(),
            "vgchange --lock-stop vg-a".to_string()
        ]
    );

    // Mounted again, then deleted: unmount, finalizer off, object gone.
    w.set_state("cm", "mounted");
    w.wait_cm(&d, "cm", "allReady mounted again", all_ready("mounted"));
    assert!(mount_at(&mnt).is_some());
    w.server.delete_object(CM, &w.node, "cm").expect("delete");
    assert!(
        w.server.wait_gone(CM, &w.node, "cm", T),
        "not finalized; daemon log:\n{}",
        d.log_text()
    );
    assert!(mount_at(&mnt).is_none(), "still mounted after deletion");
    assert_clean_requests(&w.server);
}

#[test]
fn status_conflict_storm_converges() {
    let w = World::new("knode2");
    let XfsLv {
        dev: _dev,
        mnt,
        guard: _guard,
    } = w.xfs_lv("xfs", "mnt/xfs", "vg", "lv");
    w.put_profile();
    // 12 status updates in a row answer 409, and the finalizer update too.
    w.server
        .fail_next_matching(Some("update"), Some("clientmounts/status"), 409, 12);
    w.server
        .fail_next_matching(Some("update"), Some("clientmounts"), 409, 3);
    w.put_cm("cm", "mounted", json!([xfs_mount(&mnt, "vg", "lv", None)]));
    let d = w.start();
    let o = w.wait_cm(&d, "cm", "allReady despite 409s", all_ready("mounted"));
    assert!(has_finalizer(&o));
    let conflicts = w
        .server
        .requests()
        .iter()
        .filter(|r| r.status == 409)
        .count();
    assert_eq!(conflicts, 15, "the injected conflicts were not all hit");
    assert_eq!(mounts_at(&mnt).len(), 1);
    w.server.delete_object(CM, &w.node, "cm").unwrap();
    assert!(w.server.wait_gone(CM, &w.node, "cm", T), "{}", d.log_text());
}

/// Uses the in-process server's fault hooks (down, 410 Gone).
#[test]
fn api_server_down_at_start_and_mid_watch() {
    let w = World::new("knode3");
    let XfsLv {
        dev: _dev,
        mnt,
        guard: _guard,
    } = w.xfs_lv("xfs", "mnt/xfs", "vg", "lv");
    w.put_profile();

    // Down at start: the daemon keeps retrying (systemd would restart it
    // anyway; retrying keeps the node's mounts handled without a restart
    // storm) and logs why.
    w.server.set_down(true);
    let mut d = w.start();
    wait_until(&d, T, "watch failure logged", || {
        d.log_text().contains("watch failed")
    });
    assert!(d.running(), "daemon exited: {}", d.log_text());
    w.put_cm("cm", "mounted", json!([xfs_mount(&mnt, "vg", "lv", None)]));
    sleep(Duration::from_millis(500));
    w.server.set_down(false);
    w.wait_cm(
        &d,
        "cm",
        "allReady after the server came up",
        all_ready("mounted"),
    );
    assert_eq!(mounts_at(&mnt).len(), 1);

    // Down mid-watch: a change made meanwhile is picked up on resume.
    w.server.set_down(true);
    sleep(Duration::from_millis(300));
    w.set_state("cm", "unmounted");
    sleep(Duration::from_millis(700));
    w.server.set_down(false);
    w.wait_cm(&d, "cm", "unmounted after resume", all_ready("unmounted"));
    assert!(mount_at(&mnt).is_none());

    // 410 Gone (history compacted): relist and carry on.
    w.server.expire_watches();
    w.set_state("cm", "mounted");
    w.wait_cm(&d, "cm", "mounted after 410", all_ready("mounted"));
    assert_eq!(mounts_at(&mnt).len(), 1);
    assert!(d.log_text().contains("watch resumed"), "{}", d.log_text());
    w.server.delete_object(CM, &w.node, "cm").unwrap();
    assert!(w.server.wait_gone(CM, &w.node, "cm", T), "{}", d.log_text());
    assert!(d.stop().unwrap().success());
}

#[test]
fn foreign_mount_error_in_status_and_deletion_waits_for_it() {
    let w = World::new("knode4");
    let dev = LoopDev::new(w.tmp.path(), "xfs", Some(&["mkfs.xfs", "-q"]));
    let mnt = w.p("mnt/xfs");
    fs::create_dir_all(&mnt).unwrap();
    let mut guard = MountGuard::default();
    guard.watch(&mnt);
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "foreign", mnt.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    map_lv(&w.p("map"), "vg", "lv", &dev.dev);
    w.put_profile();
    w.put_cm("cm", "mounted", json!([xfs_mount(&mnt, "vg", "lv", None)]));
    let d = w.start();
    let o = w.wait_cm(&d, "cm", "foreign-mount error", |o| {
        o["status"]["error"]["debugMessage"]
            .as_str()
            .is_some_and(|m| m.contains("unexpected mount at path"))
    });
    assert_eq!(o["status"]["allReady"], json!(false));
    assert_eq!(
        o["status"]["mounts"],
        json!([{"state": "mounted", "ready": false}])
    );
    assert_eq!(o["status"]["error"]["type"], json!("Internal"));
    assert!(has_finalizer(&o));
    let m = mount_at(&mnt).unwrap();
    assert_eq!(m.fstype, "tmpfs", "the foreign mount was touched");

    // Deleted while the foreign mount is there: the daemon must not unmount
    // it, so the finalizer stays; once it is gone, the deletion completes.
    w.server.delete_object(CM, &w.node, "cm").unwrap();
    sleep(Duration::from_secs(2));
    assert!(
        w.get_cm("cm").is_some(),
        "finalizer removed over a foreign mount"
    );
    assert_eq!(mount_at(&mnt).unwrap().fstype, "tmpfs");
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    assert!(
        w.server
            .wait_gone(CM, &w.node, "cm", Duration::from_secs(40)),
        "{}",
        d.log_text()
    );
}

/// The ClusterRole grants nothing on Servers: `.nnf-servers.json` is
/// skipped with one warning, and the mount still succeeds without a status
/// error. Lustre mount/umount are recording stand-ins.
#[test]
fn lustre_servers_forbidden_is_best_effort() {
    let w = World::new("knode6");
    let mnt = w.p("mnt/lus");
    w.recording_stub("mount");
    w.recording_stub("umount");
    let mut prof = profile();
    prof["data"] = json!({"pinned": true, "lustreStorage": {"clientOptions": {"commandlines": {
        "mountCompute": "$MGS_NID:/$FS_NAME $MOUNT_PATH", "unmountCompute": "$MOUNT_PATH"}}}});
    w.server.put_object(prof);
    w.server.put_object(json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7", "kind": "Servers",
        "metadata": {"name": "wf-0", "namespace": "default", "labels": {
            "dataworkflowservices.github.io/workflow.name": "wf",
            "dataworkflowservices.github.io/workflow.namespace": "default"}},
        "spec": {"allocationSets": [
            {"allocationSize": 1, "label": "mgtmdt", "storage": [{"allocationCount": 1, "name": "rabbit-1"}]}]}
    }));
    w.put_cm("cm", "mounted", json!([{
        "mountPath": mnt, "type": "lustre", "targetType": "directory", "options": "",
        "setPermissions": true, "userID": 1001, "groupID": 1002,
        "device": {"type": "lustre", "lustre": {"fileSystemName": "lusfs", "mgsAddresses": "10.1.0.1@o2ib"}}}]));
    let d = w.start();
    let o = w.wait_cm(&d, "cm", "lustre allReady", all_ready("mounted"));
    assert!(o["status"].get("error").is_none(), "{o:#}");
    // The daemon's own status write comes back as a watch event and may
    // reconcile once more; the stand-in leaves no mount behind for the
    // idempotency check to see, so it may be asked again: same line each time.
    let expected = format!("mount -t lustre 10.1.0.1@o2ib:/lusfs {}", mnt.display());
    let commands = w.commands();
    assert!(
        !commands.is_empty() && commands.iter().all(|c| *c == expected),
        "{commands:?}"
    );
    assert!(!mnt.join(".nnf-servers.json").exists());
    w.set_state("cm", "unmounted");
    w.wait_cm(&d, "cm", "lustre unmounted", all_ready("unmounted"));
    assert_eq!(
        d.log_text().matches("no access to Servers").count(),
        1,
        "{}",
        d.log_text()
    );
    assert!(w
        .server
        .requests()
        .iter()
        .any(|r| r.resource.as_deref() == Some("servers") && r.status == 403));
    assert_clean_requests(&w.server);
}

/// Concurrency in Kubernetes mode: two ClientMounts on different paths are
/// mounting at the same moment (each waits in the Lustre `mount` stand-in
/// until the other has started); two on the same path never overlap.
#[test]
fn different_paths_mount_concurrently_same_path_never_overlaps() {
    let w = World::new("knode7");
    let log = w.cmdlog();
    timing_mount_stub(&w.bin(), &log, "/par-", 2);
    let mut prof = profile();
    prof["data"] = json!({"pinned": true, "lustreStorage": {"clientOptions": {"commandlines": {
        "mountCompute": "$MGS_NID:/$FS_NAME $MOUNT_PATH", "unmountCompute": "$MOUNT_PATH"}}}});
    w.server.put_object(prof);
    let shared = w.p("mnt/shared");
    let names = ["par0", "par1", "same0", "same1"];
    for name in names {
        let path = match name {
            "par0" => w.p("mnt/par-0"),
            "par1" => w.p("mnt/par-1"),
            _ => shared.clone(),
        };
        w.put_cm(name, "mounted", json!([{
            "mountPath": path, "type": "lustre", "targetType": "directory", "options": "",
            "setPermissions": false,
            "device": {"type": "lustre", "lustre": {"fileSystemName": name, "mgsAddresses": "10.1.0.1@o2ib"}}}]));
    }
    let d = w.start();
    for name in names {
        w.wait_cm(&d, name, "allReady mounted", all_ready("mounted"));
    }
    wait_mounts_settled(&d, &log);
    let (runs, overlaps) = mount_runs(&log);
    assert!(overlaps.is_empty(), "{overlaps:?}");
    // Each status write is a watch event and so another reconcile, which
    // mounts again here (the stand-in leaves nothing in mountinfo): every
    // run counts for the same path, the first ones for concurrency.
    let same: Vec<&MountRun> = runs
        .iter()
        .filter(|r| r.source.contains(":/same"))
        .collect();
    let (par, firsts) = (first_runs(&runs, ":/par"), first_runs(&runs, ":/same"));
    assert_eq!((par.len(), firsts.len()), (2, 2), "{runs:#?}");
    assert!(same.iter().all(|r| r.path == shared.display().to_string()));
    assert_all_overlap(&par);
    assert_none_overlap(&same);
    assert_clean_requests(&w.server);
}

#[test]
fn startup_checks_name_the_flag() {
    let w = World::new("knode5");
    // A trailing newline is trimmed (as client-go does); an empty file is
    // refused at startup.
    let nl = w.p("empty.token");
    fs::write(&nl, "\n").unwrap();
    let port = w.server.port().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kubernetes-service-host", "127.0.0.1"],
            "--kubernetes-service-port",
        ),
        (
            vec![
                "--kubernetes-service-host",
                "127.0.0.1",
                "--kubernetes-service-port",
                &port,
            ],
            "--service-token-file not given",
        ),
        (
            vec![
                "--kubernetes-service-host",
                "127.0.0.1",
                "--kubernetes-service-port",
                &port,
                "--service-token-file",
                nl.to_str().unwrap(),
            ],
            "empty",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(clientmountd_bin())
            .args(&args)
            .env_remove("DWS_CLIENT_MOUNT_SERVICE_TOKEN_FILE")
            .env_remove("DWS_CLIENT_MOUNT_SERVICE_CERT_FILE")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // The environment variables of the spec's clientmount column work too.
    let out = Command::new(clientmountd_bin())
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", &port)
        .env("DWS_CLIENT_MOUNT_SERVICE_TOKEN_FILE", &nl)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--service-token-file"));
}

fn sample_idle(d: &Daemon, secs: u64) -> (ProcSample, ProcSample) {
    let pid = d.pid().expect("running");
    let a = proc_sample(pid);
    sleep(Duration::from_secs(secs));
    (a, proc_sample(pid))
}

fn print_idle(mode: &str, (a, b): (ProcSample, ProcSample), secs: u64) {
    // SAFETY: sysconf takes a plain integer name and touches no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    println!(
        "| {mode} | {secs} s | {} | {} | {:.0} ms | {:.1} MiB | {} |",
        b.voluntary_ctxt_switches
            .saturating_sub(a.voluntary_ctxt_switches),
        b.nonvoluntary_ctxt_switches
            .saturating_sub(a.nonvoluntary_ctxt_switches),
        (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 * 1000.0 / ticks as f64,
        b.rss_kib as f64 / 1024.0,
        b.threads
    );
}

/// Creation-to-allReady for 1, 10, 50 xfs mounts (one ClientMount each,
/// created at once) through the test API server; then idle wakeups, CPU
/// and RSS of the Kubernetes and spec-dir modes.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_clientmount_kube() {
    // A bookmark a minute, as the real API server sends.
    let w = World::with_server(
        "kbench",
        Config::default().bookmark_interval(Duration::from_secs(60)),
    );
    w.put_profile();
    let mut d = w.start();
    println!("| mounts | creation → all allReady | deletion → all gone |");
    println!("|---|---|---|");
    for n in [1usize, 10, 50] {
        let devs: Vec<LoopDev> = (0..n)
            .map(|i| {
                LoopDev::new(
                    w.tmp.path(),
                    &format!("b{n}-{i}"),
                    Some(&["mkfs.xfs", "-q"]),
                )
            })
            .collect();
        let mut guard = MountGuard::default();
        for (i, dev) in devs.iter().enumerate() {
            map_lv(&w.p("map"), &format!("vg{n}-{i}"), "lv", &dev.dev);
            guard.watch(&w.p(&format!("mnt/b{n}-{i}")));
        }
        let t0 = Instant::now();
        for i in 0..n {
            w.put_cm(
                &format!("b{n}-{i}"),
                "mounted",
                json!([xfs_mount(
                    &w.p(&format!("mnt/b{n}-{i}")),
                    &format!("vg{n}-{i}"),
                    "lv",
                    None
                )]),
            );
        }
        let ready = |o: &Value| all_ready("mounted")(o);
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let done = w
                .server
                .objects(CM, Some(&w.node))
                .iter()
                .filter(|o| ready(o))
                .count();
            if done == n {
                break;
            }
            assert!(Instant::now() < deadline, "{}", d.log_text());
            // Polled every 10 ms: the measurement's resolution.
            sleep(Duration::from_millis(10));
        }
        let up = t0.elapsed();
        let t1 = Instant::now();
        for i in 0..n {
            w.server
                .delete_object(CM, &w.node, &format!("b{n}-{i}"))
                .unwrap();
        }
        while !w.server.objects(CM, Some(&w.node)).is_empty() {
            assert!(Instant::now() < deadline + Duration::from_secs(300));
            sleep(Duration::from_millis(20));
        }
        println!(
            "| {n} | {:.2} s | {:.2} s |",
            up.as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
    }
    // Idle with one mounted ClientMount being watched.
    let XfsLv {
        dev: _dev,
        mnt,
        guard: _guard,
    } = w.xfs_lv("idle", "mnt/idle", "vgidle", "lv");
    w.put_cm(
        "idle",
        "mounted",
        json!([xfs_mount(&mnt, "vgidle", "lv", None)]),
    );
    w.wait_cm(&d, "idle", "idle mount", all_ready("mounted"));
    // Let tokio's blocking-pool threads retire (10 s keep-alive).
    sleep(Duration::from_secs(12));
    println!();
    println!("| mode | window | voluntary ctxt switches | involuntary | CPU | RSS | threads |");
    println!("|---|---|---|---|---|---|---|");
    print_idle("Kubernetes", sample_idle(&d, 10), 10);
    w.server.delete_object(CM, &w.node, "idle").unwrap();
    assert!(w.server.wait_gone(CM, &w.node, "idle", T));
    d.stop();

    // Spec-dir mode, same mount, for comparison.
    let spec = w.p("spec");
    fs::create_dir_all(&spec).unwrap();
    write_json(&spec.join("profile.json"), &profile());
    write_json(
        &spec.join("idle.json"),
        &clientmount(
            "testnode",
            "idle",
            "mounted",
            json!([xfs_mount(&mnt, "vgidle", "lv", None)]),
        ),
    );
    let mut sd = Daemon::start(
        &spec,
        &w.bin(),
        &w.p("specdir.log"),
        &[
            "--device-dir",
            w.p("mapper").to_str().unwrap(),
            "--device-wait",
            "5s",
        ],
    );
    wait_status(&spec, "idle", &sd, T, |s| s["allReady"] == json!(true));
    sleep(Duration::from_secs(2));
    print_idle("spec-dir", sample_idle(&sd, 10), 10);
    fs::remove_file(spec.join("idle.json")).unwrap();
    wait_until(&sd, T, "spec-dir unmount", || {
        !spec.join("idle.status.json").exists()
    });
    sd.stop();
}

/// The pinned profile with `section` as its xfsStorage (the block
/// commands of [`profile`] unless `section` brings its own) and `pinned`.
fn profile_with(section: Value, pinned: bool) -> Value {
    let mut p = profile();
    for (k, v) in section.as_object().unwrap() {
        p["data"]["xfsStorage"][k] = v.clone();
    }
    p["data"]["pinned"] = json!(pinned);
    p
}

/// Nothing more is run for a ClientMount after it is gone: its commands
/// log stays as it is for 3 s (a stale copy would deactivate again).
fn assert_never_again(w: &World, d: &Daemon) {
    let settled = w.commands();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        assert_eq!(
            w.commands(),
            settled,
            "ran again after the finalizer went; log:\n{}",
            d.log_text()
        );
        sleep(Duration::from_millis(100));
    }
}

#[test]
fn hostile_mount_path_is_one_word_and_newline_refused() {
    let w = World::new("khostile");
    let dev = LoopDev::new(w.tmp.path(), "xfs", Some(&["mkfs.xfs", "-q"]));
    let p = w.p("pwned");
    let p = p.display();
    let mnt = w.p(&format!("mnt/a b;touch {p}1;$(touch {p}2)`touch {p}3`'\"x"));
    let mut guard = MountGuard::default();
    guard.watch(&mnt);
    map_lv(&w.p("map"), "vg", "lv", &dev.dev);
    let hooks = w.p("hooks.log");
    w.server.put_object(profile_with(
        json!({"fileSystemCommands": {"computeCommands": {
            "mount": "$DEVICE $MOUNT_PATH", "unmount": "$MOUNT_PATH",
            "userCommands": {"postMount": [format!("printf '%s\\n' $MOUNT_PATH >> {}", hooks.display())]}}}}),
        true,
    ));
    w.put_cm("cm", "mounted", json!([xfs_mount(&mnt, "vg", "lv", None)]));
    let nl = w.p("mnt/new\nline");
    w.put_cm("nl", "mounted", json!([xfs_mount(&nl, "vg", "lv", None)]));
    let d = w.start();
    w.wait_cm(&d, "cm", "allReady mounted", all_ready("mounted"));
    let m = mounts_at(&mnt);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].fstype, "xfs");
    assert_eq!(read_lines(&hooks), vec![mnt.display().to_string()]);
    let o = w.wait_cm(&d, "nl", "refusal", |o| o["status"].get("error").is_some());
    let e = &o["status"]["error"];
    assert_eq!(e["type"], json!("User"), "{o:#}");
    assert_eq!(e["severity"], json!("Fatal"), "{o:#}");
    assert!(
        e["userMessage"].as_str().unwrap().contains("$MOUNT_PATH"),
        "{o:#}"
    );
    assert!(!nl.exists());
    w.server.delete_object(CM, &w.node, "cm").unwrap();
    w.server.delete_object(CM, &w.node, "nl").unwrap();
    assert!(w.server.wait_gone(CM, &w.node, "cm", T), "{}", d.log_text());
    assert!(w.server.wait_gone(CM, &w.node, "nl", T), "{}", d.log_text());
    assert!(mount_at(&mnt).is_none());
    for n in 1..=3 {
        assert!(!w.p(&format!("pwned{n}")).exists(), "injected command ran");
    }
    assert_clean_requests(&w.server);
}

/// An LVM teardown scenario in Kubernetes mode (see the spec-dir test of
/// the same name): ends with the mount removed, the finalizer gone and
/// nothing run again afterwards. Returns the commands the deletion ran.
fn lvm_teardown(node: &str, mount_first: bool, setup: impl FnOnce(&World, &Path)) -> Vec<String> {
    let w = World::new(node);
    let dev = LoopDev::new(w.tmp.path(), "xfs", Some(&["mkfs.xfs", "-q"]));
    let mnt = w.p("mnt/x");
    let mut guard = MountGuard::default();
    guard.watch(&mnt);
    if mount_first {
        map_lv(&w.p("map"), "vg", "lv-0", &dev.dev);
    }
    let hooks = w.p("hooks.log");
    w.server.put_object(profile_with(
        json!({"blockDeviceCommands": {"sharedVg": true, "computeCommands": {
            "lvChange": {"activate": "--activate y $VG_NAME/$LV_NAME",
                         "deactivate": "--activate n $VG_NAME/$LV_NAME"},
            "vgChange": {"lockStart": "--lock-start $VG_NAME", "lockStop": "--lock-stop $VG_NAME"},
            "userCommands": {"postDeactivate": [format!("echo postdeactivate >> {}", hooks.display())]}}}}),
        true,
    ));
    w.put_cm(
        "cm",
        "mounted",
        json!([xfs_mount(&mnt, "vg", "lv-0", None)]),
    );
    let d = w.start();
    if mount_first {
        w.wait_cm(&d, "cm", "allReady mounted", all_ready("mounted"));
    } else {
        w.wait_cm(&d, "cm", "activation error", |o| {
            o["status"]["error"]["debugMessage"]
                .as_str()
                .is_some_and(|m| m.contains("could not find logical volume"))
        });
    }
    settle(&d);
    setup(&w, &mnt);
    let before = w.commands().len();
    w.server.delete_object(CM, &w.node, "cm").unwrap();
    assert!(w.server.wait_gone(CM, &w.node, "cm", T), "{}", d.log_text());
    assert!(mount_at(&mnt).is_none());
    assert!(!mnt.exists(), "mount point left behind");
    assert_never_again(&w, &d);
    assert_eq!(
        read_lines(&hooks),
        vec!["postdeactivate"],
        "{}",
        d.log_text()
    );
    assert_clean_requests(&w.server);
    w.commands()[before..].to_vec()
}

#[test]
fn lvm_teardown_vg_never_appeared() {
    let ran = lvm_teardown("klvm1", false, |_, _| {});
    assert!(ran.is_empty(), "{ran:?}");
}

#[test]
fn lvm_teardown_lv_already_inactive() {
    let ran = lvm_teardown("klvm2", true, |w, mnt| {
        assert!(Command::new("umount").arg(mnt).status().unwrap().success());
        fs::remove_file(w.p("mapper/vg-lv--0")).unwrap();
    });
    assert_eq!(ran, vec!["vgchange --lock-stop vg".to_string()]);
}

#[test]
fn lvm_teardown_another_lv_still_active() {
    let ran = lvm_teardown("klvm3", true, |w, _| {
        map_lv(&w.p("map"), "vg", "lv-1", Path::new("/dev/null"));
        std::os::unix::fs::symlink("/dev/null", w.p("mapper/vg-lv--1")).unwrap();
    });
    assert_eq!(ran, vec!["lvchange --activate n vg/lv-0".to_string()]);
}

#[test]
fn lvm_teardown_lvmlockd_not_running() {
    let ran = lvm_teardown("klvm4", true, |w, _| {
        fs::write(
            w.p("map/.fail-vgchange"),
            "  WARNING: lvmlockd process is not running.\n",
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

#[test]
fn nvme_rescan_quick_retry_and_rescan_on_deletion() {
    let w = World::new("knvme");
    let dev = LoopDev::new(w.tmp.path(), "xfs", Some(&["mkfs.xfs", "-q"]));
    let mnt = w.p("mnt/x");
    let mut guard = MountGuard::default();
    guard.watch(&mnt);
    for c in ["nvme0", "nvme1"] {
        fs::write(w.p("nvme").join(c), "").unwrap();
    }
    fs::write(
        w.p("map/.nvme/list.json"),
        nvme_list_json(&[("nqn.rabbit-a", 3)]),
    )
    .unwrap();
    let map = w.p("map");
    let hook = map.join(".nvme/on-rescan");
    fs::write(
        &hook,
        format!(
            "#!/bin/bash\nmkdir -p '{m}/vg'; echo -n '{d}' > '{m}/vg/lv'\n",
            m = map.display(),
            d = dev.dev.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w.put_profile();
    let mut m = xfs_mount(&mnt, "vg", "lv", None);
    m["device"]["lvm"]["nvmeInfo"] =
        json!([{"deviceSerial": "nqn.rabbit-a", "namespaceID": "3", "namespaceGUID": "g"}]);
    w.put_cm("cm", "mounted", json!([m]));
    let d = w.start();
    w.wait_cm(&d, "cm", "allReady mounted", all_ready("mounted"));
    let nv = w.p("nvme");
    let rescans = vec![
        format!("nvme ns-rescan {}/nvme0", nv.display()),
        format!("nvme ns-rescan {}/nvme1", nv.display()),
        "nvme list -v --output-format=json".to_string(),
    ];
    let mut want = rescans.clone();
    want.extend([
        "vgchange --lock-start vg".to_string(),
        "lvchange --activate y vg/lv".to_string(),
    ]);
    assert_eq!(w.commands(), want);
    assert!(d.log_text().contains("will retry soon"), "{}", d.log_text());
    let before = w.commands().len();
    w.server.delete_object(CM, &w.node, "cm").unwrap();
    assert!(w.server.wait_gone(CM, &w.node, "cm", T), "{}", d.log_text());
    let mut want = vec![
        "lvchange --activate n vg/lv".to_string(),
        "vgchange --lock-stop vg".to_string(),
    ];
    want.extend(rescans);
    assert_eq!(w.commands()[before..].to_vec(), want);
    assert!(d
        .log_text()
        .contains("NVMe namespaces still present after removal"));
    assert_never_again(&w, &d);
}

#[test]
fn fatal_errors_are_retried_on_the_slow_backoff() {
    let w = World::new("kfatal");
    let XfsLv {
        dev: _dev,
        mnt,
        guard: _guard,
    } = w.xfs_lv("xfs", "mnt/x", "vg", "lv");
    w.server.put_object(profile_with(json!({}), false));
    w.put_cm("cm", "mounted", json!([xfs_mount(&mnt, "vg", "lv", None)]));
    let d = w.start();
    let o = w.wait_cm(&d, "cm", "unpinned profile error", |o| {
        o["status"]["error"]["severity"] == json!("Fatal")
    });
    assert!(
        o["status"]["error"]["debugMessage"]
            .as_str()
            .unwrap()
            .contains("pinned"),
        "{o:#}"
    );
    // The daemon watches ClientMounts only: fixing the profile reaches it
    // through the slow retry, not through an event.
    w.server
        .modify_object("NnfStorageProfile", "nnf-system", "pinned-prof", |p| {
            p["data"]["pinned"] = json!(true)
        })
        .unwrap()
        .unwrap();
    w.wait_cm(
        &d,
        "cm",
        "allReady mounted after the fix",
        all_ready("mounted"),
    );
    assert!(mount_at(&mnt).is_some());
    assert!(
        d.log_text().contains("will retry on the slow backoff"),
        "{}",
        d.log_text()
    );
    w.server.delete_object(CM, &w.node, "cm").unwrap();
    assert!(w.server.wait_gone(CM, &w.node, "cm", T), "{}", d.log_text());
}

#[test]
fn mock_reports_ready_with_the_finalizer_and_runs_nothing() {
    let w = World::new("kmock");
    let mnt = w.p("mnt/x");
    w.put_profile();
    w.put_cm("cm", "mounted", json!([xfs_mount(&mnt, "vg", "lv", None)]));
    let mut args = w.args();
    args.push("--mock".into());
    let d = Daemon::spawn(&w.bin(), &w.p("daemon.log"), &args);
    let o = w.wait_cm(&d, "cm", "allReady mounted", all_ready("mounted"));
    assert!(has_finalizer(&o));
    w.server.delete_object(CM, &w.node, "cm").unwrap();
    assert!(w.server.wait_gone(CM, &w.node, "cm", T), "{}", d.log_text());
    assert!(w.commands().is_empty(), "{:?}", w.commands());
    assert!(read_lines(&w.cmdlog().with_extension("queries")).is_empty());
    assert!(!mnt.exists());
    assert_clean_requests(&w.server);
}
