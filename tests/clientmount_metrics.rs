//! `clientmountd --metrics-bind-address`: the real daemon in both modes does
//! real work (xfs mounts of loop devices, recording stand-ins for the LVM
//! commands), its `/metrics` is scraped over HTTP and parsed with Python
//! `prometheus_client`'s OpenMetrics parser, and the figures are checked
//! against the work done. Every test picks free ports of its own.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::clientmount::*;
use kube_testserver::{Config, TestServer, CLIENTMOUNT};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET /metrics: the status line, the headers, the body.
fn get(addr: SocketAddr) -> std::io::Result<(String, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(T))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header end: {text}"));
    Ok((head.to_string(), body.to_string()))
}

/// One sample of a scrape: name and labels to value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

const PARSER: &str = r#"
import json, sys
try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError as e:
    sys.exit("python3 module prometheus_client is missing (pip install prometheus_client): %s" % e)
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// Scrapes `addr` and parses the text with `prometheus_client`; the
/// families and their types are returned too.
fn scrape(addr: SocketAddr) -> (Samples, BTreeMap<String, String>) {
    let (head, body) = get(addr).unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let mut child = Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed to parse the metrics (with prometheus_client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the scrape: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut samples = Samples::new();
    let mut types = BTreeMap::new();
    for s in parsed {
        let labels: BTreeMap<String, String> = serde_json::from_value(s["labels"].clone()).unwrap();
        samples.insert(
            (s["name"].as_str().unwrap().to_string(), labels),
            s["value"].as_f64().unwrap(),
        );
        types.insert(
            s["family"].as_str().unwrap().to_string(),
            s["type"].as_str().unwrap().to_string(),
        );
    }
    (samples, types)
}

fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.get(&(name.to_string(), labels)).copied()
}

fn clientmounts(s: &Samples, state: &str, ready: bool) -> f64 {
    value(
        s,
        "nnf_clientmount_clientmounts",
        &[("state", state), ("ready", &ready.to_string())],
    )
    .unwrap_or_else(|| panic!("no gauge for {state}/{ready}: {s:#?}"))
}

/// How often `command` ran, as the histogram counts it (0 when never).
fn runs(s: &Samples, command: &str) -> f64 {
    value(
        s,
        "nnf_clientmount_command_duration_seconds_count",
        &[("command", command)],
    )
    .unwrap_or(0.0)
}

fn logged(log: &[String], prefix: &str) -> f64 {
    log.iter().filter(|l| l.starts_with(prefix)).count() as f64
}

/// The pinned xfs-on-LVM profile both modes' tests use.
fn profile() -> Value {
    pinned_xfs_profile()
}

fn clientmount(ns: &str, name: &str, profile: &str, state: &str, path: &Path) -> Value {
    json!({
        "apiVersion": "dataworkflowservices.github.io/v1alpha7",
        "kind": "ClientMount",
        "metadata": {"name": name, "namespace": ns, "labels": {
            "nnf.cray.hpe.com/pinned_storage_profile_name": profile,
            "nnf.cray.hpe.com/pinned_storage_profile_namespace": "nnf-system",
            "dataworkflowservices.github.io/workflow.name": "wf",
            "dataworkflowservices.github.io/workflow.namespace": "default",
            "nnf.cray.hpe.com/job_id": "4242"}},
        "spec": {"node": ns, "desiredState": state, "mounts": [{
            "mountPath": path, "type": "xfs", "targetType": "directory",
            "options": "", "setPermissions": false,
            "device": {"type": "lvm", "lvm": {"deviceType": "nvme", "volumeGroup": "vg", "logicalVolume": "lv"}}}]}
    })
}

fn all_ready(state: &'static str) -> impl Fn(&Value) -> bool {
    move |s: &Value| status_all_ready(s, state)
}

/// Polls the scrape until `pred` holds; panics with the last one.
fn wait_scrape(
    d: &Daemon,
    addr: SocketAddr,
    what: &str,
    pred: impl Fn(&Samples) -> bool,
) -> Samples {
    let deadline = std::time::Instant::now() + T;
    loop {
        let (s, _) = scrape(addr);
        if pred(&s) {
            return s;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; last scrape:\n{s:#?}\ndaemon log:\n{}",
                d.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn spec_dir_metrics_count_the_work() {
    let w = Scratch::new("clientmountd-metrics-");
    let XfsLv {
        dev: _dev,
        mnt,
        guard: _guard,
    } = w.xfs_lv("xfs", "mnt/xfs", "vg", "lv");
    let spec = w.p("spec");
    write_json(&spec.join("profile.json"), &profile());
    write_json(
        &spec.join("cm.json"),
        &clientmount("testnode", "cm", "pinned-prof", "mounted", &mnt),
    );
    // A ClientMount whose pinned profile does not exist: a reconcile error.
    write_json(
        &spec.join("broken.json"),
        &clientmount(
            "testnode",
            "broken",
            "no-such-prof",
            "mounted",
            &w.p("mnt/b"),
        ),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let bind = addr.to_string();
    let mut args = w.device_args();
    args.extend(["--metrics-bind-address".to_string(), bind]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(&spec, &w.p("bin"), &w.p("daemon.log"), &args);
    wait_status(&spec, "cm", &d, T, all_ready("mounted"));
    wait_status(&spec, "broken", &d, T, |s| s.get("error").is_some());

    let (s, types) = scrape(addr);
    assert_eq!(types["nnf_clientmount_reconciles"], "counter", "{types:?}");
    assert_eq!(types["nnf_clientmount_reconcile_errors"], "counter");
    assert_eq!(types["nnf_clientmount_clientmounts"], "gauge");
    assert_eq!(
        types["nnf_clientmount_command_duration_seconds"],
        "histogram"
    );
    assert_eq!(clientmounts(&s, "mounted", true), 1.0, "{s:#?}");
    assert_eq!(clientmounts(&s, "mounted", false), 1.0, "{s:#?}");
    assert_eq!(clientmounts(&s, "unmounted", true), 0.0);
    // Every reconcile error was logged as one and counted as one; at least
    // one pass per ClientMount.
    let s = wait_scrape(&d, addr, "errors counted as logged", |s| {
        let failed = d.log_text().matches("reconcile failed").count() as f64;
        value(s, "nnf_clientmount_reconcile_errors_total", &[]) == Some(failed) && failed >= 1.0
    });
    let reconciles = value(&s, "nnf_clientmount_reconciles_total", &[]).unwrap();
    let errors = value(&s, "nnf_clientmount_reconcile_errors_total", &[]).unwrap();
    assert!(
        reconciles >= 1.0 + errors,
        "{reconciles} reconciles, {errors} errors"
    );
    // The LVM stand-ins record each run: the histogram saw the same runs.
    let cmds = w.commands();
    assert_eq!(runs(&s, "lvchange"), logged(&cmds, "lvchange"), "{cmds:?}");
    assert_eq!(runs(&s, "vgchange"), logged(&cmds, "vgchange"), "{cmds:?}");
    assert_eq!(runs(&s, "lvchange"), 1.0, "{cmds:?}");
    assert!(runs(&s, "mount") >= 1.0, "{s:#?}");
    let sum = value(
        &s,
        "nnf_clientmount_command_duration_seconds_sum",
        &[("command", "lvchange")],
    )
    .unwrap();
    assert!(sum > 0.0, "{sum}");

    // Unmounted: the gauge moves, the deactivation is counted.
    let cm = clientmount("testnode", "cm", "pinned-prof", "unmounted", &mnt);
    write_json(&spec.join("cm.json"), &cm);
    wait_status(&spec, "cm", &d, T, all_ready("unmounted"));
    let s = wait_scrape(&d, addr, "cm unmounted in the gauge", |s| {
        clientmounts(s, "unmounted", true) == 1.0
    });
    assert_eq!(clientmounts(&s, "mounted", true), 0.0, "{s:#?}");
    let cmds = w.commands();
    assert_eq!(runs(&s, "lvchange"), 2.0, "{cmds:?}");
    assert_eq!(runs(&s, "vgchange"), logged(&cmds, "vgchange"));
    assert!(runs(&s, "umount") >= 1.0, "{s:#?}");

    // Deleted and finalized: gone from the gauge; the broken one stays.
    fs::remove_file(spec.join("cm.json")).unwrap();
    let s = wait_scrape(
        &d,
        addr,
        "the deleted ClientMount gone from the gauge",
        |s| clientmounts(s, "unmounted", true) == 0.0 && clientmounts(s, "mounted", true) == 0.0,
    );
    assert_eq!(clientmounts(&s, "mounted", false), 1.0, "{s:#?}");
    assert!(value(&s, "nnf_clientmount_reconciles_total", &[]).unwrap() > reconciles);
}

/// The Kubernetes mode: the same figures, and a scrape of an idle daemon
/// sends nothing to the API server.
#[test]
fn kubernetes_metrics_and_an_idle_scrape_costs_no_request() {
    let w = Scratch::new("clientmountd-kmetrics-");
    let server = TestServer::start(Config::default());
    let node = "kmetrics1";
    let XfsLv {
        dev: _dev,
        mnt,
        guard: _guard,
    } = w.xfs_lv("xfs", "mnt/xfs", "vg", "lv");
    server.put_object(profile());
    server.put_object(clientmount(node, "cm", "pinned-prof", "mounted", &mnt));
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut args: Vec<String> = [
        "--kubernetes-service-host",
        "127.0.0.1",
        "--kubernetes-service-port",
        &server.port().to_string(),
        "--service-token-file",
        server.token_file(CLIENTMOUNT).to_str().unwrap(),
        "--service-cert-file",
        server.ca_file().to_str().unwrap(),
        "--node-name",
        node,
        "--command-timeout",
        "20s",
        "--metrics-bind-address",
        &addr.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(w.device_args());
    let d = Daemon::spawn(&w.p("bin"), &w.p("daemon.log"), &args);
    let ok = server.wait_for("ClientMount", Some(node), T, |o| {
        all_ready("mounted")(&o["status"])
    });
    assert!(ok.is_some(), "not mounted; log:\n{}", d.log_text());
    let s = wait_scrape(&d, addr, "cm mounted in the gauge", |s| {
        clientmounts(s, "mounted", true) == 1.0
    });
    let cmds = w.commands();
    assert_eq!(runs(&s, "lvchange"), logged(&cmds, "lvchange"), "{cmds:?}");
    assert_eq!(runs(&s, "lvchange"), 1.0, "{cmds:?}");
    assert_eq!(runs(&s, "vgchange"), logged(&cmds, "vgchange"), "{cmds:?}");
    // A reconcile is counted when it starts, so every one logged before a
    // scrape is in it (its own status write may start more meanwhile).
    let reconciled = d.log_text().matches("reconciled").count() as f64;
    let (s, _) = scrape(addr);
    assert!(reconciled >= 1.0, "{}", d.log_text());
    assert!(
        value(&s, "nnf_clientmount_reconciles_total", &[]).unwrap() >= reconciled,
        "{reconciled} logged: {s:#?}"
    );
    assert_eq!(
        value(&s, "nnf_clientmount_reconcile_errors_total", &[]),
        Some(0.0)
    );

    // Idle: the reconciles its own writes started are over. Scrapes cost
    // the API server nothing.
    settle(&d);
    let before = server.requests().len();
    for _ in 0..5 {
        scrape(addr);
    }
    settle(&d);
    assert_eq!(
        server.requests().len(),
        before,
        "scrapes made API requests: {:#?}",
        &server.requests()[before..]
    );

    // Deleted: finalized, and no longer in the gauge.
    server.delete_object("ClientMount", node, "cm").unwrap();
    assert!(
        server.wait_gone("ClientMount", node, "cm", T),
        "{}",
        d.log_text()
    );
    let s = wait_scrape(&d, addr, "cm gone from the gauge", |s| {
        clientmounts(s, "mounted", true) == 0.0 && clientmounts(s, "unmounted", true) == 0.0
    });
    assert_eq!(runs(&s, "lvchange"), 2.0, "{s:#?}");
}

/// The process's listening TCP sockets (its socket fds that `/proc/net/tcp*`
/// lists in state LISTEN).
fn listening_sockets(pid: u32) -> usize {
    let mut inodes = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if let Ok(target) = fs::read_link(entry.path()) {
            let t = target.to_string_lossy().into_owned();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.push(inode.to_string());
            }
        }
    }
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn zero_disables_the_endpoint_the_default_is_8080_a_busy_port_is_named() {
    let help = Command::new(clientmountd_bin())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(help.contains("--metrics-bind-address"), "{help}");
    assert!(help.contains("[default: :8080]"), "{help}");

    let w = Scratch::new("clientmountd-metrics-off-");
    let spec = w.p("spec");
    let args = w.device_args();
    let start = |log: &str, bind: &str| {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend(["--metrics-bind-address", bind]);
        let d = Daemon::start(&spec, &w.p("bin"), &w.p(log), &a);
        wait_until(&d, T, "watching", || {
            d.log_text().contains("watching spec directory")
        });
        d
    };
    // The check sees a listener when there is one...
    let port = free_port();
    let on = start("on.log", &format!("127.0.0.1:{port}"));
    assert_eq!(listening_sockets(on.pid().unwrap()), 1, "{}", on.log_text());
    drop(on);
    // ...and `0` leaves none.
    let off = start("off.log", "0");
    assert_eq!(
        listening_sockets(off.pid().unwrap()),
        0,
        "{}",
        off.log_text()
    );
    assert!(
        !off.log_text().contains("serving metrics"),
        "{}",
        off.log_text()
    );

    // A busy port: a start-up error naming the address (in upstream's
    // single-dash spelling of the flag, which works too).
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = Command::new(clientmountd_bin())
        .args(["--spec-dir", spec.to_str().unwrap(), "--node-name", "n"])
        .args(["-metrics-bind-address", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen for metrics on {addr}")),
        "{err}"
    );
    // Nonsense is refused before anything starts.
    let out = Command::new(clientmountd_bin())
        .args([
            "--spec-dir",
            spec.to_str().unwrap(),
            "--metrics-bind-address",
            "8080",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--metrics-bind-address"),
        "{out:?}"
    );
}
