//! Create rate of the Kubernetes backend against the in-process API server
//! (real CRD schemas and ClusterRole), with the default
//! `--kubernetes-qps 50 --kubernetes-burst 100`: gfs2 copy-outs as the
//! upstream comparison in `agent/BENCHMARKS-kube.md` did, through the
//! control filesystem (one write(2) per request) and the gRPC socket.
//!
//! cargo build --release -p nnf-dm && cargo bench -p integration-tests --bench kube
//! Environment: NNF_DM_BENCH_SECONDS (default 30), NNF_DM_BENCH_CLIENTS (4).
//! Needs root (FUSE mount), like the integration tests.

#[path = "grpc_client.rs"]
mod grpc_client;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dm_proto::data_mover_client::DataMoverClient;
use dm_proto::{DataMovementCreateRequest, DataMovementWorkflow};
use integration_tests::kube::{kube_agent, seed_wf1, upstream_default_profile, Wf1Mount};
use integration_tests::{env_or, wait_until};
use kube_testserver::{Config, TestServer, NNF_DM};

/// Workflow `wf1` in PreRun with one gfs2 mount on the compute node and the
/// Rabbit, one LustreFileSystem, one default profile.
fn seed(server: &TestServer) {
    seed_wf1(server, Wf1Mount::Gfs2, upstream_default_profile());
}

struct Run {
    label: String,
    clients: usize,
    wall: Duration,
    latencies: Vec<Duration>,
    requests: BTreeMap<(String, String), usize>,
}

impl Run {
    fn report(&mut self) -> String {
        self.latencies.sort();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies[i].as_secs_f64() * 1e3
        };
        let creates = self.latencies.len();
        let total: usize = self.requests.values().sum();
        let by_kind: Vec<String> = self
            .requests
            .iter()
            .map(|((verb, res), n)| format!("{verb} {res} {:.3}", *n as f64 / creates as f64))
            .collect();
        format!(
            "| {} | {} | {:.1} s | {} | {:.1} | {:.1} | {:.1} | {:.2} ({}) |",
            self.label,
            self.clients,
            self.wall.as_secs_f64(),
            creates,
            creates as f64 / self.wall.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            total as f64 / creates as f64,
            by_kind.join(", "),
        )
    }
}

/// The agent's requests since the last clear, by (verb, resource); watches
/// (long-running, not per create) left out.
fn agent_requests(server: &TestServer) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for r in server.requests() {
        if r.account.as_deref() != Some(NNF_DM) || r.verb.as_deref() == Some("watch") {
            continue;
        }
        *counts
            .entry((r.verb.unwrap_or_default(), r.resource.unwrap_or_default()))
            .or_insert(0) += 1;
    }
    counts
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// One create through the control filesystem: one write(2) of the request.
fn fs_create(mnt: &Path) -> Duration {
    let i = SEQ.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("request"))
        .unwrap();
    file.write_all(
        format!(
            "name=f{i} workflow=wf1 namespace=default source=/mnt/nnf/gfs-1/out/{i} destination=/home/me/out/{i}"
        )
        .as_bytes(),
    )
    .unwrap_or_else(|e| panic!("create f{i}: {e}"));
    t0.elapsed()
}

fn fs_run(server: &TestServer, mnt: &Path, clients: usize, until: Until) -> Run {
    server.clear_requests();
    let t0 = Instant::now();
    let latencies = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let mut l = Vec::new();
                    while !until.done(t0, l.len()) {
                        l.push(fs_create(mnt));
                    }
                    l
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    Run {
        label: "control fs".into(),
        clients,
        wall: t0.elapsed(),
        latencies,
        requests: agent_requests(server),
    }
}

fn grpc_request(i: usize) -> DataMovementCreateRequest {
    DataMovementCreateRequest {
        workflow: Some(DataMovementWorkflow {
            name: "wf1".into(),
            namespace: "default".into(),
        }),
        source: format!("/mnt/nnf/gfs-1/out/{i}"),
        destination: format!("/home/me/out/{i}"),
        slots: -1,
        max_slots: -1,
        ..Default::default()
    }
}

fn grpc_run(server: &TestServer, socket: &Path, clients: usize, until: Until) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    server.clear_requests();
    let (wall, latencies) = rt.block_on(async {
        let mut connected = Vec::new();
        for _ in 0..clients {
            let channel = grpc_client::connect(socket.to_path_buf()).await.unwrap();
            connected.push(DataMoverClient::new(channel));
        }
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for mut client in connected {
            tasks.spawn(async move {
                let mut l = Vec::new();
                while !until.done(t0, l.len()) {
                    let i = SEQ.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let r = client.create(grpc_request(i)).await.unwrap().into_inner();
                    assert_eq!(r.status, 0, "{r:?}");
                    l.push(t.elapsed());
                }
                l
            });
        }
        let all: Vec<Duration> = tasks.join_all().await.into_iter().flatten().collect();
        (t0.elapsed(), all)
    });
    Run {
        label: "gRPC".into(),
        clients,
        wall,
        latencies,
        requests: agent_requests(server),
    }
}

#[derive(Clone, Copy)]
enum Until {
    /// For this long, as fast as the agent answers.
    Time(Duration),
    /// This many creates per client.
    Count(usize),
}

impl Until {
    fn done(self, t0: Instant, made: usize) -> bool {
        match self {
            Until::Time(d) => t0.elapsed() >= d,
            Until::Count(n) => made >= n,
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = env_or("NNF_DM_BENCH_SECONDS", 30) as u64;
    let clients = env_or("NNF_DM_BENCH_CLIENTS", 4);
    let server = TestServer::start(Config::default());
    seed(&server);
    let agent = kube_agent(&server, &["--max-ops-per-user", "1000000"]);
    let socket = agent.dir.path().join("nnf-dm.sock");
    assert!(wait_until(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    // Warm up: the watches have listed, the first reads are made; then let
    // every bucket fill again.
    fs_run(&server, &agent.mnt, 1, Until::Count(5));
    grpc_run(&server, &socket, 1, Until::Count(5));
    let refill = Duration::from_secs(3);
    std::thread::sleep(refill);

    println!("| door | clients | window | creates | creates/s | p50 ms | p99 ms | API requests per create (by verb and kind) |");
    println!("|---|---|---|---|---|---|---|---|");
    // Inside the burst: one client, 50 creates (the bucket holds 100).
    println!(
        "{}",
        fs_run(&server, &agent.mnt, 1, Until::Count(50)).report()
    );
    std::thread::sleep(refill);
    println!(
        "{}",
        grpc_run(&server, &socket, 1, Until::Count(50)).report()
    );
    std::thread::sleep(refill);
    // Sustained: the burst is spent in the first seconds, then qps rules.
    let window = Until::Time(Duration::from_secs(seconds));
    println!("{}", fs_run(&server, &agent.mnt, clients, window).report());
    std::thread::sleep(refill);
    println!("{}", grpc_run(&server, &socket, clients, window).report());
    let rss = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        .unwrap_or_default();
    println!(
        "\nagent RSS after {} creates: {rss} kB",
        SEQ.load(Ordering::Relaxed)
    );
}
