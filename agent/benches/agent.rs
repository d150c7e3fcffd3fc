//! End-to-end benchmarks of the agent through its control filesystem, side
//! by side with what users would run instead. Run as root:
//!
//!   cargo bench -p nnf-dm --bench agent [-- control|copy]
//!
//! NNF_BENCH_DIR picks the file system to copy on (default /var/tmp); XCP
//! the xcp binary (default: xcp on PATH; `cargo install xcp`), run as
//! `xcp -r -o -w 0 --no-progress` (owners, modes, times, one worker per
//! CPU: the engine's semantics but for xattrs, ACLs and hard links, which
//! the trees do not have).
//! Results are written down in agent/BENCHMARKS.md.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent {
    child: Child,
    mnt: PathBuf,
}

impl Agent {
    fn start(dir: &Path, extra: &[&str]) -> Agent {
        let mnt = dir.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nnf-dm"))
            .arg("--mountpoint")
            .arg(&mnt)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg("")
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .expect("start nnf-dm");
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read(mnt.join("version")).map_or(true, |v| v.is_empty()) {
            assert!(Instant::now() < deadline, "nnf-dm did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent { child, mnt }
    }

    fn request(&self, text: &str) {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(self.mnt.join("request"))
            .unwrap();
        f.write_all(text.as_bytes()).expect("request accepted");
    }

    fn wait(&self, name: &str) -> String {
        fs::read_to_string(self.mnt.join(name).join("wait")).unwrap()
    }

    fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn control_plane(base: &Path) {
    const OPS: usize = 10_000;
    let dir = base.join("control");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let agent = Agent::start(&dir, &["--max-ops-per-user", "100000", "--max-active", "4"]);
    let rss_empty = agent.rss_kib();

    let started = Instant::now();
    for i in 0..OPS {
        agent.request(&format!(
            "name=op{i} source=/etc/hostname destination=/tmp/none dryrun=true"
        ));
    }
    let create_rate = OPS as f64 / started.elapsed().as_secs_f64();
    for i in 0..OPS {
        agent.wait(&format!("op{i}"));
    }
    let rss_full = agent.rss_kib();

    // Status reads as a script does them: open, read, close.
    let mut latencies = Vec::with_capacity(20_000);
    let mut buf = vec![0u8; 4096];
    for i in 0..20_000 {
        let path = agent
            .mnt
            .join(format!("op{}", (i * 7919) % OPS))
            .join("status");
        let t = Instant::now();
        let mut f = fs::File::open(&path).unwrap();
        let n = f.read(&mut buf).unwrap();
        drop(f);
        latencies.push(t.elapsed());
        assert!(n > 0);
    }
    latencies.sort();
    // The same with one descriptor kept open and re-read from offset 0.
    let mut kept = fs::File::open(agent.mnt.join("op1/status")).unwrap();
    let mut reread = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        kept.seek(SeekFrom::Start(0)).unwrap();
        let n = kept.read(&mut buf).unwrap();
        reread.push(t.elapsed());
        assert!(n > 0);
    }
    reread.sort();

    // Create -> completed -> removed cycles from one client.
    const CYCLES: usize = 2_000;
    let started = Instant::now();
    for i in 0..CYCLES {
        let name = format!("cy{i}");
        agent.request(&format!(
            "name={name} source=/etc/hostname destination=/tmp/none dryrun=true"
        ));
        agent.wait(&name);
        fs::remove_dir(agent.mnt.join(&name)).unwrap();
    }
    let cycle_rate = CYCLES as f64 / started.elapsed().as_secs_f64();

    println!("## Control plane ({OPS} operations present)\n");
    println!("| measure | result | target |");
    println!("|---|---:|---:|");
    println!(
        "| status read (open+read+close) p50 | {:.1} µs | < 100 µs |",
        percentile(&latencies, 0.5).as_secs_f64() * 1e6
    );
    println!(
        "| status read (open+read+close) p99 | {:.1} µs | |",
        percentile(&latencies, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "| status re-read (lseek 0 + read) p50 | {:.1} µs | |",
        percentile(&reread, 0.5).as_secs_f64() * 1e6
    );
    println!(
        "| status re-read (lseek 0 + read) p99 | {:.1} µs | |",
        percentile(&reread, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "| dry-run create→completed→rmdir cycles, one client | {cycle_rate:.0} /s | ≥ 1,000 /s |"
    );
    println!("| dry-run creates, one client | {create_rate:.0} /s | |");
    println!(
        "| agent RSS, no operations | {:.1} MiB | |",
        rss_empty as f64 / 1024.0
    );
    println!(
        "| agent RSS, {OPS} operations | {:.1} MiB | < 64 MiB |",
        rss_full as f64 / 1024.0
    );
    println!();
}

fn write_file(path: &Path, size: usize, seed: u64) {
    let mut data = vec![0u8; size];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(path)
        .unwrap()
        .write_all(&data)
        .unwrap();
}

fn make_tree(root: &Path, files: usize, dirs: usize, size: usize) {
    for d in 0..dirs {
        let dir = root.join(format!("d{d:04}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..files / dirs {
            write_file(&dir.join(format!("f{f:05}")), size, (d * files + f) as u64);
        }
    }
}

fn timed(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let status = cmd.status().unwrap();
    assert!(status.success(), "{cmd:?}");
    t.elapsed().as_secs_f64()
}

fn copies(base: &Path) {
    let agent_dir = base.join("copy-agent");
    let _ = fs::remove_dir_all(&agent_dir);
    let agent = Agent::start(&agent_dir, &[]);
    let dir = base.join("copy-data");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    type MakeTree<'a> = &'a dyn Fn(&Path);
    let trees: [(&str, MakeTree); 3] = [
        ("1 x 1 GiB", &|p: &Path| {
            fs::create_dir_all(p).unwrap();
            write_file(&p.join("big"), 1 << 30, 7)
        }),
        ("10,000 x 64 KiB / 100 dirs", &|p: &Path| {
            make_tree(p, 10_000, 100, 64 << 10)
        }),
        ("50,000 x 4 KiB / 500 dirs", &|p: &Path| {
            make_tree(p, 50_000, 500, 4 << 10)
        }),
    ];
    let tmpfs = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&dir)
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"tmpfs"));
    println!("## Copies (medians of 3, seconds)\n");
    println!("| tree | nnf-dm | cp -a | xcp | nnf-dm vs cp -a | nnf-dm vs xcp |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (t, (label, make)) in trees.iter().enumerate() {
        let src = dir.join(format!("src{t}"));
        make(&src);
        let (mut ours, mut cp, mut xcp) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..3 {
            for tool in 0..3 {
                let dst = dir.join(format!("dst{t}-{run}-{tool}"));
                Command::new("sync").status().unwrap();
                std::thread::sleep(Duration::from_secs(1));
                match tool {
                    0 => {
                        let name = format!("t{t}r{run}");
                        let started = Instant::now();
                        agent.request(&format!(
                            "name={name} source={} destination={}",
                            src.display(),
                            dst.display()
                        ));
                        let status = agent.wait(&name);
                        ours.push(started.elapsed().as_secs_f64());
                        assert!(status.contains("\nstatus=success\n"), "{status}");
                    }
                    1 => cp.push(timed(Command::new("cp").arg("-a").arg(&src).arg(&dst))),
                    _ => xcp.push(timed(
                        Command::new(std::env::var("XCP").unwrap_or_else(|_| "xcp".into()))
                            .args(["-r", "-o", "-w", "0", "--no-progress"])
                            .arg(&src)
                            .arg(&dst),
                    )),
                }
                // RAM is not a disk: copies on tmpfs go right away.
                if tmpfs {
                    fs::remove_dir_all(&dst).unwrap();
                }
            }
        }
        let (o, c, r) = (median(ours), median(cp), median(xcp));
        println!(
            "| {label} | {o:.3} | {c:.3} | {r:.3} | {:.2}x | {:.2}x |",
            c / o,
            r / o
        );
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
    }
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return; // `cargo test` builds benches too; only `cargo bench` runs them.
    }
    let base = PathBuf::from(std::env::var("NNF_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .join("nnf-dm-bench");
    let only = args.iter().skip(1).find(|a| !a.starts_with("--")).cloned();
    if only.as_deref().is_none_or(|o| o == "control") {
        control_plane(&base);
    }
    if only.as_deref().is_none_or(|o| o == "copy") {
        copies(&base);
    }
    for mnt in ["control/mnt", "copy-agent/mnt"] {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(base.join(mnt))
            .stderr(Stdio::null())
            .status();
    }
    let _ = fs::remove_dir_all(&base);
}
