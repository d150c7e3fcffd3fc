//! Create -> Status(wait) -> Delete cycles over the gRPC socket against the
//! same cycle through the control filesystem (write `request` and read the
//! name back / read `wait` / rmdir), on one agent in the same run, dryrun
//! requests (so the agent's own cost is what is measured, not a copy).
//!
//! cargo build --release -p nnf-dm && cargo bench -p integration-tests --bench grpc
//! Environment: NNF_DM_BENCH_CYCLES (default 2000), NNF_DM_BENCH_CLIENTS (8).
//! Needs root (FUSE mount), like the integration tests.

#[path = "grpc_client.rs"]
mod grpc_client;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use dm_proto::data_mover_client::DataMoverClient;
use dm_proto::{DataMovementCreateRequest, DataMovementDeleteRequest, DataMovementStatusRequest};
use integration_tests::{env_or, wait_until, Agent};

struct Run {
    label: String,
    clients: usize,
    cycles: usize,
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn report(&mut self) {
        self.latencies.sort();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies[i].as_secs_f64() * 1e3
        };
        println!(
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} |",
            self.label,
            self.clients,
            self.cycles,
            self.cycles as f64 / self.wall.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            self.latencies.last().unwrap().as_secs_f64() * 1e3,
        );
    }
}

fn request(dest: &str) -> DataMovementCreateRequest {
    DataMovementCreateRequest {
        source: "/etc/hostname".into(),
        destination: dest.into(),
        dryrun: true,
        slots: -1,
        max_slots: -1,
        ..Default::default()
    }
}

/// One gRPC cycle on `client`; its latency.
async fn grpc_cycle(
    client: &mut DataMoverClient<tonic::transport::Channel>,
    dest: &str,
) -> Duration {
    let t0 = Instant::now();
    let uid = client.create(request(dest)).await.unwrap().into_inner();
    assert_eq!(uid.status, 0, "{uid:?}");
    let done = client
        .status(DataMovementStatusRequest {
            workflow: None,
            uid: uid.uid.clone(),
            max_wait_time: 30,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((done.state, done.status), (3, 2), "{done:?}");
    let deleted = client
        .delete(DataMovementDeleteRequest {
            workflow: None,
            uid: uid.uid,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.status, 2, "{deleted:?}");
    t0.elapsed()
}

fn grpc_run(socket: &Path, clients: usize, cycles: usize, dest: &str) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let per_client = cycles / clients;
    let (wall, latencies) = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        let mut connected = Vec::new();
        for _ in 0..clients {
            // One connection per client, as separate client processes have.
            let channel = grpc_client::connect(socket.to_path_buf()).await.unwrap();
            connected.push(DataMoverClient::new(channel));
        }
        let t0 = Instant::now();
        for mut client in connected {
            let dest = dest.to_string();
            tasks.spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    latencies.push(grpc_cycle(&mut client, &dest).await);
                }
                latencies
            });
        }
        let all: Vec<Duration> = tasks.join_all().await.into_iter().flatten().collect();
        (t0.elapsed(), all)
    });
    Run {
        label: "gRPC socket".into(),
        clients,
        cycles: per_client * clients,
        wall,
        latencies,
    }
}

/// One control-filesystem cycle as a program does it: one write(2) of the
/// request and the name read back on the same descriptor, a read of `wait`,
/// rmdir.
fn fs_cycle(mnt: &Path, dest: &str) -> Duration {
    let t0 = Instant::now();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("request"))
        .unwrap();
    file.write_all(format!("source=/etc/hostname destination={dest} dryrun=true\n").as_bytes())
        .unwrap();
    let mut reply = String::new();
    file.read_to_string(&mut reply).unwrap();
    let name = reply.trim_end();
    let status = std::fs::read_to_string(mnt.join(name).join("wait")).unwrap();
    assert!(status.contains("\nstatus=success\n"), "{status}");
    std::fs::remove_dir(mnt.join(name)).unwrap();
    t0.elapsed()
}

fn fs_run(mnt: &Path, clients: usize, cycles: usize, dest: &str) -> Run {
    let per_client = cycles / clients;
    let t0 = Instant::now();
    let latencies = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    (0..per_client)
                        .map(|_| fs_cycle(mnt, dest))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    Run {
        label: "control fs (write/read wait/rmdir)".into(),
        clients,
        cycles: per_client * clients,
        wall: t0.elapsed(),
        latencies,
    }
}

/// The same cycle as a job script writes it: echo, cat wait, rmdir (each
/// line a process: this includes bash's fork and exec).
fn shell_run(mnt: &Path, cycles: usize, dest: &str) -> Run {
    let script = format!(
        "exec 3<>{m}/request; echo 'source=/etc/hostname destination={dest} dryrun=true' >&3; \
         read -r n <&3; exec 3>&-; cat {m}/$n/wait >/dev/null; rmdir {m}/$n",
        m = mnt.display()
    );
    let mut latencies = Vec::with_capacity(cycles);
    let t0 = Instant::now();
    for _ in 0..cycles {
        let t = Instant::now();
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        latencies.push(t.elapsed());
    }
    Run {
        label: "control fs via bash (echo/cat/rmdir, incl. fork+exec)".into(),
        clients: 1,
        cycles,
        wall: t0.elapsed(),
        latencies,
    }
}

fn main() {
    // `cargo bench` passes --bench; a filter run by `cargo test --benches` too.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cycles = env_or("NNF_DM_BENCH_CYCLES", 2000);
    let clients = env_or("NNF_DM_BENCH_CLIENTS", 8);
    let agent = Agent::start(&["--max-ops-per-user", "100000"]);
    let socket = agent.dir.path().join("nnf-dm.sock");
    assert!(wait_until(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    let dest = agent.dir.path().join("dest");
    let dest = dest.to_str().unwrap();

    // Warm both doors up.
    grpc_run(&socket, 1, 50, dest);
    fs_run(&agent.mnt, 1, 50, dest);

    println!("| door | clients | cycles | cycles/s | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    // Interleaved, so that both doors see the same machine state.
    for _ in 0..2 {
        grpc_run(&socket, 1, cycles, dest).report();
        fs_run(&agent.mnt, 1, cycles, dest).report();
    }
    grpc_run(&socket, clients, cycles, dest).report();
    fs_run(&agent.mnt, clients, cycles, dest).report();
    shell_run(&agent.mnt, cycles / 10, dest).report();
    let left = std::fs::read_dir(&agent.mnt).unwrap().count();
    assert_eq!(left, 5, "every operation was deleted");
}
