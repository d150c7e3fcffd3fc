//! The agent's metrics after real work: the `metrics` file read as root and
//! as a user, and the `--metrics-bind-address` endpoint, parsed with
//! `prometheus_client`'s own parsers (the 0.0.4 text parser for the file,
//! the OpenMetrics parser for the endpoint), counts checked against the work
//! done; on the Kubernetes backend, against the API server's own request log.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::kube::{
    kube_agent, seed_wf1, set_dm_status, upstream_default_profile, utc_now, Wf1Mount,
};
use integration_tests::*;
use kube_testserver::{Config, EventType, TestServer, NNF_DM};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(30);
/// The interpreter every test user can run, with the pip-installed parser.
const PYTHON: &str = "/usr/bin/python3";

/// Parses Prometheus text with `prometheus_client` and prints its families
/// and samples as JSON.
const PARSE: &str = r#"
import json, sys
try:
    if sys.argv[1] == "openmetrics":
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:
    sys.exit("prometheus_client is missing (pip install prometheus_client): %s" % e)
families = []
for f in text_string_to_metric_families(sys.stdin.read()):
    families.append({"name": f.name, "type": f.type,
                     "samples": [{"name": s.name, "labels": s.labels, "value": s.value}
                                 for s in f.samples]})
print(json.dumps(families))
"#;

#[derive(Debug, Clone, PartialEq, PartialOrd)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug)]
struct Scrape {
    /// Family name → type, as the parser understood them.
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
    text: String,
}

#[derive(Clone, Copy)]
enum Format {
    /// Prometheus 0.0.4 text: what the file serves.
    Text,
    OpenMetrics,
}

fn parse(text: &str, format: Format) -> Scrape {
    let mut child = Command::new(PYTHON)
        .arg("-c")
        .arg(PARSE)
        .arg(match format {
            Format::Text => "text",
            Format::OpenMetrics => "openmetrics",
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{PYTHON} is needed to parse the metrics: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse the metrics: {}\n{text}",
        stderr(&out)
    );
    let families: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut scrape = Scrape {
        types: BTreeMap::new(),
        samples: Vec::new(),
        text: text.to_string(),
    };
    for f in families {
        scrape.types.insert(
            f["name"].as_str().unwrap().to_string(),
            f["type"].as_str().unwrap().to_string(),
        );
        for s in f["samples"].as_array().unwrap() {
            scrape.samples.push(Sample {
                name: s["name"].as_str().unwrap().to_string(),
                labels: serde_json::from_value(s["labels"].clone()).unwrap(),
                value: s["value"].as_f64().unwrap(),
            });
        }
    }
    scrape
}

impl Scrape {
    /// The sum of the samples `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The one sample `name` with exactly these labels (panics if absent).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .matching(name, labels)
            .filter(|s| s.labels.len() == labels.len())
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{name}{labels:?}: {} samples in\n{}",
            found.len(),
            self.text
        );
        found[0].value
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    fn sorted(&self) -> Vec<Sample> {
        let mut v = self.samples.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    }
}

fn scrape_file(agent: &Agent, as_user: Option<&User>) -> Scrape {
    let path = agent.path("metrics");
    let out = match as_user {
        Some(u) => sh_as(u, &format!("cat {}", path.display())),
        None => sh(&format!("cat {}", path.display())),
    };
    assert!(out.status.success(), "cat metrics: {}", stderr(&out));
    parse(&stdout(&out), Format::Text)
}

/// The endpoint's address, from the agent's start-up log line.
fn endpoint(agent: &Agent) -> String {
    let log = agent.log();
    log.lines()
        .rfind(|l| l.contains("serving metrics on /metrics"))
        .and_then(|l| l.split("address=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no metrics endpoint in the log:\n{log}"))
}

/// GET `path` with plain HTTP/1.1: (status line, content type, body).
fn http_get(addr: &str, path: &str) -> (String, String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(LONG)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.lines().next().unwrap().to_string();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

fn scrape_http(agent: &Agent) -> Scrape {
    let (status, content_type, body) = http_get(&endpoint(agent), "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    parse(&body, Format::OpenMetrics)
}

/// Every family of `scrape` is listed in the README.
fn documented(scrape: &Scrape) {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    for family in scrape.types.keys() {
        assert!(
            readme.contains(&format!("`{family}")),
            "{family} is not in README.md"
        );
    }
}

fn write_file(path: &Path, size: usize, owner: &User) -> u64 {
    std::fs::write(path, vec![b'x'; size]).unwrap();
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid)).unwrap();
    size as u64
}

#[test]
fn local_backend_counts_the_work_done_per_user_for_root_only() {
    let u = user("nnfdmt1");
    let agent = Agent::start(&["--metrics-bind-address", "127.0.0.1:0"]);
    let work = scratch();
    let src = work.path().join("src");
    let dst = work.path().join("dst");
    for dir in [&src, &dst, &src.join("tree")] {
        std::fs::create_dir(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(u.uid), Some(u.gid)).unwrap();
    }
    // The user's copies: three files and a directory of two.
    let mut user_bytes = 0;
    for (i, size) in [1000, 20_000, 300_000].into_iter().enumerate() {
        user_bytes += write_file(&src.join(format!("f{i}")), size, &u);
    }
    user_bytes += write_file(&src.join("tree/a"), 4096, &u);
    user_bytes += write_file(&src.join("tree/b"), 123, &u);
    let mut names = Vec::new();
    for (name, from) in [("m0", "f0"), ("m1", "f1"), ("m2", "f2"), ("m3", "tree")] {
        let out = agent.request_as(
            &u,
            &format!(
                "name={name} source={} destination={}",
                src.join(from).display(),
                dst.join(from).display()
            ),
        );
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        names.push(name);
    }
    // The user's rejections: three EINVAL (one for a name the file takes),
    // one EEXIST.
    for bad in [
        "source=relative destination=/x".to_string(),
        format!("name=metrics source={} destination=/x", src.display()),
        format!("bogus=1 source={} destination=/x", src.display()),
        format!("name=m0 source={} destination=/x", src.join("f0").display()),
    ] {
        assert!(!agent.request_as(&u, &bad).status.success(), "{bad}");
    }
    // Root's: one copy, one ENOENT.
    let root_bytes = write_file(
        &work.path().join("r"),
        777,
        &User {
            name: "root",
            uid: 0,
            gid: 0,
        },
    );
    let out = agent.request(&format!(
        "name=r0 source={} destination={}",
        work.path().join("r").display(),
        work.path().join("r.out").display()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    names.push("r0");
    assert!(!agent
        .request("source=/nonexistent/x destination=/tmp/y")
        .status
        .success());
    for name in &names {
        let status = agent.wait_completed(name, LONG);
        assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    }
    let user_files = 5.0;

    let root = scrape_file(&agent, None);
    documented(&root);
    assert!(
        !root.types.values().any(|t| t == "unknown"),
        "a family the 0.0.4 parser did not type: {:?}",
        root.types
    );
    assert_eq!(root.types["nnf_dm_creates"], "counter");
    assert_eq!(root.types["nnf_dm_create_duration_seconds"], "histogram");
    assert_eq!(root.types["nnf_dm_operations"], "gauge");
    assert_eq!(root.value("nnf_dm_creates_total", &[]), 5.0);
    for (errno, n) in [
        ("EINVAL", 3.0),
        ("EEXIST", 1.0),
        ("ENOENT", 1.0),
        ("ENOSPC", 0.0),
        ("EAGAIN", 0.0),
    ] {
        assert_eq!(
            root.value("nnf_dm_rejections_total", &[("errno", errno)]),
            n,
            "{errno}"
        );
    }
    assert_eq!(root.value("nnf_dm_create_duration_seconds_count", &[]), 5.0);
    assert_eq!(
        root.value("nnf_dm_create_duration_seconds_bucket", &[("le", "+Inf")]),
        5.0
    );
    assert_eq!(
        root.value("nnf_dm_copied_bytes_total", &[]),
        (user_bytes + root_bytes) as f64
    );
    assert_eq!(
        root.value("nnf_dm_copied_files_total", &[]),
        user_files + 1.0
    );
    let state = |s: &Scrape, state: &str| {
        s.value(
            "nnf_dm_operations",
            &[("backend", "local"), ("state", state)],
        )
    };
    assert_eq!(state(&root, "completed"), 5.0);
    for other in ["pending", "starting", "running", "cancelling"] {
        assert_eq!(state(&root, other), 0.0, "{other}");
    }
    assert_eq!(
        root.value(
            "nnf_dm_operations_completed_total",
            &[("backend", "local"), ("status", "success")]
        ),
        5.0
    );
    // Per user, for root's eyes.
    let uid = u.uid.to_string();
    let uid = uid.as_str();
    assert_eq!(
        root.value("nnf_dm_user_creates_total", &[("user", uid)]),
        4.0
    );
    assert_eq!(
        root.value("nnf_dm_user_creates_total", &[("user", "0")]),
        1.0
    );
    assert_eq!(
        root.value(
            "nnf_dm_user_rejections_total",
            &[("user", uid), ("errno", "EINVAL")]
        ),
        3.0
    );
    assert_eq!(
        root.value(
            "nnf_dm_user_rejections_total",
            &[("user", "0"), ("errno", "ENOENT")]
        ),
        1.0
    );
    assert_eq!(
        root.value("nnf_dm_user_copied_bytes_total", &[("user", uid)]),
        user_bytes as f64
    );
    assert_eq!(
        root.value("nnf_dm_user_copied_files_total", &[("user", uid)]),
        user_files
    );
    assert_eq!(
        root.value(
            "nnf_dm_user_operations",
            &[("user", uid), ("state", "completed")]
        ),
        4.0
    );

    // The user sees the same aggregates and nobody's series.
    let mine = scrape_file(&agent, Some(&u));
    assert!(
        mine.samples.iter().all(|s| !s.labels.contains_key("user")),
        "a user label in a user's read:\n{}",
        mine.text
    );
    assert!(!mine.types.keys().any(|f| f.starts_with("nnf_dm_user_")));
    let aggregates: Vec<Sample> = root
        .sorted()
        .into_iter()
        .filter(|s| !s.name.starts_with("nnf_dm_user_"))
        .collect();
    assert_eq!(mine.sorted(), aggregates);

    // The endpoint: the same series, in OpenMetrics, aggregates only.
    let http = scrape_http(&agent);
    assert_eq!(http.sorted(), mine.sorted());
    assert_eq!(http.types["nnf_dm_copied_bytes"], "counter");
    let (status, _, _) = http_get(&endpoint(&agent), "/other");
    assert!(status.contains(" 404 "), "{status}");
}

#[test]
fn metrics_bind_address_is_off_by_default_and_its_errors_name_the_flag() {
    let agent = Agent::start(&[]);
    assert!(!agent.log().contains("serving metrics"), "{}", agent.log());
    assert!(agent
        .read("metrics")
        .unwrap()
        .contains("nnf_dm_creates_total"));

    let dir = scratch();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    for (value, says) in [("8080", "expected 0, :PORT or HOST:PORT"), (&busy, &busy)] {
        let out = nnf_dm_local(dir.path())
            .arg("--socket")
            .arg("")
            .args(["--metrics-bind-address", value])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{value}: started");
        assert!(err.contains("--metrics-bind-address"), "{value}: {err}");
        assert!(err.contains(says), "{value}: {err}");
    }
}

// ---- The Kubernetes backend ----

const DM: &str = "NnfDataMovement";
const LUS_REQ: &str =
    "workflow=wf1 namespace=default source=/mnt/nnf/lus-0/ckpt destination=/lus/global/me/ckpt";

/// A PreRun workflow with one Lustre mount on this node, its file system
/// and the default profile; and a Rabbit that finishes each copy at once,
/// reporting 3 files and 3 KiB.
fn cluster() -> Arc<TestServer> {
    let server = Arc::new(TestServer::start(Config::default()));
    seed_wf1(&server, Wf1Mount::Lustre, upstream_default_profile());
    let weak = Arc::downgrade(&server);
    server.on_change(DM, move |change| {
        if change.event_type != EventType::Added {
            return;
        }
        let Some(s) = weak.upgrade() else { return };
        let now = utc_now();
        let finish = |o: &mut Value| {
            o["status"] = json!({
                "state": "Finished", "status": "Success", "restarts": 0,
                "startTime": now, "endTime": now,
                "commandStatus": {"command": "mpirun dcp", "progress": 100,
                    "items": 4, "directories": 1, "files": 3, "links": 0,
                    "data": "3.000 KiB", "elapsedTime": "1s"},
            });
        };
        set_dm_status(&s, &change.namespace, &change.name, finish);
    });
    server
}

/// The API server's log of the agent's requests: (verb, resource, code) →
/// count; a request that named no resource counts as ("", "", code).
fn server_counts(server: &TestServer) -> BTreeMap<(String, String, String), f64> {
    let mut counts = BTreeMap::new();
    for r in server.requests() {
        if r.account.as_deref() != Some(NNF_DM) {
            continue;
        }
        let key = (
            r.verb.unwrap_or_default(),
            r.resource.unwrap_or_default(),
            r.status.to_string(),
        );
        *counts.entry(key).or_default() += 1.0;
    }
    counts
}

/// The agent's own count of the same.
fn agent_counts(scrape: &Scrape) -> BTreeMap<(String, String, String), f64> {
    let mut counts = BTreeMap::new();
    for s in scrape.matching("nnf_dm_kubernetes_requests_total", &[]) {
        if s.value == 0.0 {
            continue;
        }
        let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        let (verb, resource) = if l("resource").is_empty() {
            (String::new(), String::new())
        } else if l("subresource").is_empty() {
            (l("verb"), l("resource"))
        } else {
            (l("verb"), format!("{}/{}", l("resource"), l("subresource")))
        };
        *counts.entry((verb, resource, l("code"))).or_default() += s.value;
    }
    counts
}

#[test]
fn kubernetes_requests_match_the_servers_log_and_a_scrape_costs_none() {
    let server = cluster();
    let u = user("nnfdmt2");
    let mut agent = kube_agent(&server, &["--metrics-bind-address", "127.0.0.1:0"]);
    for i in 0..3 {
        let out = agent.request(&format!("name=k{i} {LUS_REQ}"));
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = agent.request_as(&u, &format!("name=k3 {LUS_REQ}"));
    assert!(out.status.success(), "{}", stderr(&out));
    // ENOENT: a workflow that does not exist (a GET answered 404).
    assert!(!agent
        .request("name=gone workflow=nope namespace=default source=/mnt/nnf/lus-0/a destination=/lus/global/b")
        .status
        .success());
    for name in ["k0", "k1", "k2", "k3"] {
        let status = agent.wait_completed(name, LONG);
        assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    }

    // What the agent counted is what the server saw, request for request
    // (polled: a watch may still be starting).
    let mut last = (BTreeMap::new(), BTreeMap::new());
    let same = wait_until(LONG, || {
        last = (
            agent_counts(&scrape_file(&agent, None)),
            server_counts(&server),
        );
        last.0 == last.1
    });
    assert!(same, "agent {:?}\nserver {:?}", last.0, last.1);
    let counts = last.0;
    eprintln!("API requests: {counts:?}");
    assert_eq!(
        counts[&("create".into(), "nnfdatamovements".into(), "201".into())],
        4.0,
        "{counts:?}"
    );
    assert!(
        counts.contains_key(&("get".into(), "workflows".into(), "404".into())),
        "{counts:?}"
    );

    let root = scrape_file(&agent, None);
    documented(&root);
    assert_eq!(root.value("nnf_dm_creates_total", &[]), 4.0);
    assert_eq!(
        root.value("nnf_dm_rejections_total", &[("errno", "ENOENT")]),
        1.0
    );
    assert_eq!(root.value("nnf_dm_copied_files_total", &[]), 12.0);
    assert_eq!(root.value("nnf_dm_copied_bytes_total", &[]), 4.0 * 3072.0);
    assert_eq!(
        root.value(
            "nnf_dm_operations",
            &[("backend", "kubernetes"), ("state", "completed")]
        ),
        4.0
    );
    assert_eq!(
        root.value("nnf_dm_user_creates_total", &[("user", &u.uid.to_string())]),
        1.0
    );
    let mine = scrape_file(&agent, Some(&u));
    assert!(mine.samples.iter().all(|s| !s.labels.contains_key("user")));

    // Scrapes, idle: not one API request.
    server.clear_requests();
    for _ in 0..3 {
        scrape_file(&agent, None);
        scrape_file(&agent, Some(&u));
        scrape_http(&agent);
    }
    let after = scrape_http(&agent);
    assert!(
        server.requests().is_empty(),
        "scrapes cost API requests: {:?}",
        server.request_counts()
    );
    assert_eq!(agent_counts(&after), counts, "the agent counted requests");

    // Restarted, the agent lists the four again: they are held, completed,
    // but were not completed in this agent's life. The agent allows the
    // Rabbit's whole-second end times 2 s of slack: restart past it.
    let ended = std::time::SystemTime::now();
    assert!(wait_until(LONG, || ended.elapsed().unwrap() > Duration::from_secs(3)));
    agent.stop();
    agent.restart();
    let again = |s: &Scrape| {
        s.value(
            "nnf_dm_operations",
            &[("backend", "kubernetes"), ("state", "completed")],
        )
    };
    let mut root = scrape_file(&agent, None);
    assert!(
        wait_until(LONG, || {
            root = scrape_file(&agent, None);
            again(&root) == 4.0
        }),
        "{}",
        root.text
    );
    assert_eq!(root.sum("nnf_dm_operations_completed_total", &[]), 0.0);
    assert_eq!(root.value("nnf_dm_copied_bytes_total", &[]), 0.0);
    assert_eq!(root.value("nnf_dm_creates_total", &[]), 0.0);
    scrape_http(&agent);
}

#[test]
fn waits_on_the_client_side_rate_limit_are_counted_per_kind() {
    let server = cluster();
    // Two requests a second per kind, no burst: creates in a row wait for
    // their kind's token.
    let agent = kube_agent(
        &server,
        &["--kubernetes-qps", "2", "--kubernetes-burst", "1"],
    );
    for i in 0..4 {
        let out = agent.request(&format!("name=q{i} {LUS_REQ}"));
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let root = scrape_file(&agent, None);
    let dm = [
        ("group", "nnf.cray.hpe.com"),
        ("resource", "nnfdatamovements"),
    ];
    let waited = root.value("nnf_dm_kubernetes_rate_limited_requests_total", &dm);
    assert!(waited >= 1.0, "{}", root.text);
    assert!(
        root.value("nnf_dm_kubernetes_rate_limit_wait_seconds_total", &dm) > 0.0,
        "{}",
        root.text
    );
    // Counted once per waiting request: never more than were sent.
    let sent = root.sum("nnf_dm_kubernetes_requests_total", &dm);
    assert!(waited <= sent, "{waited} waits for {sent} requests");
}
