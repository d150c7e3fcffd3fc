//! How a site runs the agent besides the usual: `--simulated` (no cluster,
//! no copy), `--mountpoint ''` (the gRPC socket alone, for nodes without
//! FUSE), and the start-up errors that name why a mount failed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::python_grpc::{files_of, PythonClient};
use integration_tests::*;
use serde_json::Value;

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

#[test]
fn simulated_requests_complete_at_once_on_both_doors_and_copy_nothing() {
    // Kubernetes settings in the environment (as in a pod) do not matter.
    let agent = Agent::start(&[
        "--simulated",
        "--kubernetes-service-host",
        "127.0.0.1",
        "--kubernetes-service-port",
        "1",
    ]);
    let u = user("nnfdmt1");
    let dest = agent.dir.path().join("never-written");
    let out = agent.request_as(
        &u,
        &format!(
            "name=sim-a source=/no/such/source destination={}",
            dest.display()
        ),
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.log());
    let wait = sh_as(&u, &format!("cat {}", agent.path("sim-a/wait").display()));
    let status = stdout(&wait);
    assert_eq!(field(&status, "state").unwrap(), "completed", "{status}");
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    assert_eq!(field(&status, "progress").unwrap(), "100", "{status}");
    assert_eq!(
        field(&status, "command").unwrap(),
        format!(
            "mpirun -np 1 dcp --progress 1 /no/such/source {}",
            dest.display()
        )
    );
    assert!(!dest.exists(), "a simulated request copies nothing");
    let meta = std::fs::metadata(agent.path("sim-a")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), u.uid);

    // The request grammar and names still hold: a bad request is refused.
    let bad = agent.request_as(&u, "source=relative destination=/x");
    assert!(!bad.status.success());
    let dup = agent.request_as(&u, "name=sim-a source=/a destination=/b");
    assert!(!dup.status.success(), "a taken name is refused");

    // The gRPC door: a C-core client as the same user, dryrun and not.
    let python = PythonClient::new();
    let created = python.call(&agent.socket(), &u, &["create", "/x/y", "/x/z", ""]);
    assert_eq!(s(&created, "status"), "SUCCESS", "{created}");
    let done = python.call(&agent.socket(), &u, &["status", &s(&created, "uid"), "0"]);
    assert_eq!(
        (s(&done, "state").as_str(), s(&done, "status").as_str()),
        ("COMPLETED", "SUCCESS"),
        "{done}"
    );

    // rmdir forgets it.
    let rm = sh_as(&u, &format!("rmdir {}", agent.path("sim-a").display()));
    assert!(rm.status.success(), "{}", stderr(&rm));
    assert!(!agent.path("sim-a").exists());
    assert!(
        agent.log().contains("simulated"),
        "the log says it is simulated:\n{}",
        agent.log()
    );
}

#[test]
fn socket_only_mode_copies_as_the_user_and_keeps_ownership() {
    let mut agent = Agent::start_socket_only(&[]);
    assert!(
        std::fs::read_dir(&agent.mnt).unwrap().next().is_none(),
        "nothing is mounted with --mountpoint ''"
    );
    let python = PythonClient::new();
    let sock = agent.socket();
    let (u1, u2) = (user("nnfdmt1"), user("nnfdmt2"));
    let (src, dst) = files_of(agent.dir.path(), &u1, "u1");
    let created = python.call(&sock, &u1, &["create", &src, &dst, ""]);
    assert_eq!(s(&created, "status"), "SUCCESS", "{created}");
    let uid = s(&created, "uid");
    let done = python.call(&sock, &u1, &["status", &uid, "30"]);
    assert_eq!(
        (s(&done, "state").as_str(), s(&done, "status").as_str()),
        ("COMPLETED", "SUCCESS"),
        "{done}\n{}",
        agent.log()
    );
    assert_eq!(std::fs::read_to_string(&dst).unwrap(), "payload of nnfdmt1");
    let meta = std::fs::metadata(&dst).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        u1.uid,
        "the copy ran as its user"
    );

    // Another user sees nothing of it.
    let peek = python.call(&sock, &u2, &["status", &uid, "0"]);
    assert_eq!(s(&peek, "status"), "NOT_FOUND", "{peek}");
    let listed = python.call(&sock, &u2, &["list"]);
    assert_eq!(listed["uids"], serde_json::json!([]), "{listed}");
    let delete = python.call(&sock, &u2, &["delete", &uid]);
    assert_eq!(s(&delete, "status"), "NOT_FOUND", "{delete}");
    let mine = python.call(&sock, &u1, &["delete", &uid]);
    assert_eq!(s(&mine, "status"), "SUCCESS", "{mine}");

    // SIGTERM: a clean exit, with nothing to unmount.
    assert!(agent.stop().success(), "{}", agent.log());
}

/// Runs the agent with `args` until it exits (it must, on a start-up
/// error): its exit status and stderr.
fn failed_start(mut command: Command) -> (std::process::ExitStatus, String) {
    let mut child = command
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nnf-dm");
    let mut status = None;
    wait_until(Duration::from_secs(20), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("nnf-dm kept running although it cannot mount");
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status, err)
}

fn agent_command(dir: &Path, mountpoint: &Path) -> Command {
    let mut command = Command::new(bin("nnf-dm"));
    command
        .arg("--mountpoint")
        .arg(mountpoint)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("nnf-dm.sock"));
    command
}

#[test]
fn a_busy_mount_point_is_a_start_up_error_and_stays_mounted() {
    let dir = scratch();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = sh(&format!("mount -t tmpfs nnfdm-busy {}", mnt.display()));
    assert!(mounted.status.success(), "{}", stderr(&mounted));
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    std::fs::write(mnt.join("theirs"), "kept").unwrap();

    let (status, err) = failed_start(agent_command(dir.path(), &mnt));
    assert!(!status.success());
    assert!(err.contains("is busy"), "{err}");
    assert!(err.contains(mnt.to_str().unwrap()), "{err}");
    assert_eq!(
        std::fs::read_to_string(mnt.join("theirs")).unwrap(),
        "kept",
        "what was mounted there is untouched"
    );
}

#[test]
fn no_dev_fuse_is_a_start_up_error_naming_the_way_out() {
    let dir = scratch();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // A private mount namespace whose /dev has no fuse node: a container.
    let agent = agent_command(dir.path(), &mnt);
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs nodev /dev && exec \"$@\"")
        .arg("sh")
        .arg(agent.get_program())
        .args(agent.get_args());
    let (status, err) = failed_start(command);
    assert!(!status.success());
    assert!(err.contains("/dev/fuse is missing"), "{err}");
    assert!(err.contains("--mountpoint ''"), "{err}");
}

#[test]
fn not_root_is_a_start_up_error_saying_so() {
    let u = user("nnfdmt1");
    let dir = scratch();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let chown = sh(&format!(
        "chown -R {}:{} {}",
        u.uid,
        u.gid,
        dir.path().display()
    ));
    assert!(chown.status.success(), "{}", stderr(&chown));
    let agent = agent_command(dir.path(), &mnt);
    let mut command = as_user_cmd(&u, agent.get_program().to_str().unwrap());
    command.args(agent.get_args());
    let (status, err) = failed_start(command);
    assert!(!status.success());
    assert!(err.contains("not running as root"), "{err}");
    assert!(mount_at_is_gone(&mnt), "nothing is left mounted");
}

fn mount_at_is_gone(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    !mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
}

#[test]
fn no_door_at_all_is_refused() {
    let dir = scratch();
    let mut command = Command::new(bin("nnf-dm"));
    command
        .args(["--mountpoint", "", "--socket", ""])
        .arg("--state-dir")
        .arg(dir.path().join("state"));
    let (status, err) = failed_start(command);
    assert!(!status.success());
    assert!(err.contains("leave no way in"), "{err}");
}
