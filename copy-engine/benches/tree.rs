//! Engine vs `cp -a` vs xcp on three trees (see bench.sh).
//!
//! Trees live in a temp dir under `$BENCH_DIR` (default /var/tmp) so source
//! and target share a filesystem. Each tool runs 5 times, interleaved (each
//! run starts with the next tool, after one untimed warm-up copy), with
//! a fresh target and `sync` before every timed run; medians
//! are reported because page-cache state cannot be reset everywhere.
//!
//! xcp (`cargo install xcp`, or `$XCP`) runs as `xcp -r -o -w 0
//! --no-progress`: recursive, owners (`-o`), modes and times (its
//! default), one worker per CPU like the engine. It copies no xattrs, ACLs
//! or hard links; the trees have none, so all three tools do the same work
//! but for the probes for them, which the engine and `cp -a` pay.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use copy_engine::{copy, prescan, Options, Progress};

const RUNS: usize = 5;

type MakeTree = Box<dyn Fn(&Path)>;

/// Cheap, incompressible-looking content, different per file.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_ne_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn make_big(root: &Path) {
    fs::create_dir_all(root).unwrap();
    let mut f = fs::File::create(root.join("big.bin")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..1024 {
        fill(&mut buf, i + 1);
        f.write_all(&buf).unwrap();
    }
}

fn make_many(root: &Path, dirs: usize, per_dir: usize, size: usize) {
    let mut buf = vec![0u8; size];
    for d in 0..dirs {
        let dir = root.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..per_dir {
            fill(&mut buf, (d * per_dir + i) as u64 + 1);
            fs::write(dir.join(format!("f{i:03}")), &buf).unwrap();
        }
    }
}

fn sync() {
    Command::new("sync").status().unwrap();
}

fn run_tool(tool: &str, src: &Path, dst: &Path) -> Duration {
    sync();
    // Lets the flush settle before the clock starts.
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    match tool {
        "engine" => {
            let opts = Options { workers: 0 };
            let cancel = AtomicBool::new(false);
            prescan(src, &opts, &cancel).unwrap();
            let r = copy(src, dst, &opts, &Progress::default(), &cancel).unwrap();
            assert_eq!(r.failure_count, 0, "{:?}", r.failures);
        }
        "cp -a" => assert!(Command::new("cp")
            .arg("-a")
            .arg(src)
            .arg(dst)
            .status()
            .unwrap()
            .success()),
        "xcp" => assert!(Command::new(xcp())
            .args(["-r", "-o", "-w", "0", "--no-progress"])
            .arg(src)
            .arg(dst)
            .status()
            .unwrap()
            .success()),
        _ => unreachable!(),
    }
    t.elapsed()
}

fn xcp() -> PathBuf {
    std::env::var_os("XCP").map_or_else(|| PathBuf::from("xcp"), PathBuf::from)
}

/// tmpfs holds the copies in RAM: those are removed after each run (cheap
/// there, unlike on a disk with a journal and online discard).
fn on_tmpfs(path: &Path) -> bool {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid C string and a writable statfs buffer.
    let r = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    // SAFETY: statfs succeeded, so it filled the struct.
    r == 0 && unsafe { st.assume_init() }.f_type == libc::TMPFS_MAGIC
}

/// What the engine's xattr/ACL probe costs per file: open, `flistxattr`
/// and close against open and close over every file of `root`, the probe
/// being one `flistxattr` on the descriptor the copy opens anyway.
fn probe_cost(root: &Path) -> (usize, Duration) {
    let mut files = Vec::new();
    for d in fs::read_dir(root).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            files.push(
                std::ffi::CString::new(f.unwrap().path().into_os_string().into_encoded_bytes())
                    .unwrap(),
            );
        }
    }
    let pass = |probe: bool| {
        let t = Instant::now();
        for c in &files {
            // SAFETY: valid C string; the descriptor is closed right after.
            unsafe {
                let fd = libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                assert!(fd >= 0);
                if probe {
                    assert!(libc::flistxattr(fd, std::ptr::null_mut(), 0) >= 0);
                }
                libc::close(fd);
            }
        }
        t.elapsed()
    };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        without.push(pass(false));
        with.push(pass(true));
    }
    let (w, wo) = (median(with), median(without));
    (files.len(), w.saturating_sub(wo))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo test --all-targets` runs harness-less benches too; only
    // `cargo bench` passes --bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let base =
        std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let trees: [(&str, MakeTree); 3] = [
        ("1 x 1 GiB", Box::new(make_big)),
        (
            "10,000 x 64 KiB / 100 dirs",
            Box::new(|p: &Path| make_many(p, 100, 100, 64 << 10)),
        ),
        (
            "50,000 x 4 KiB / 500 dirs",
            Box::new(|p: &Path| make_many(p, 500, 100, 4 << 10)),
        ),
    ];
    let tools = ["engine", "cp -a", "xcp"];
    let tmpfs = on_tmpfs(tmp.path());
    println!(
        "trees in {}, {RUNS} runs each, median seconds\n",
        tmp.path().display()
    );
    println!("| tree | engine | cp -a | xcp | engine vs cp -a | engine vs xcp |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, (name, make)) in trees.iter().enumerate() {
        let src = tmp.path().join(format!("src{i}"));
        make(&src);
        let mut times = vec![Vec::new(); tools.len()];
        // A fresh target per run, removed only after the tree is done:
        // deleting the previous copy first made the next run pay for the
        // delete (journal, discard) and swamped the differences measured.
        let mut dsts = Vec::new();
        // One untimed copy first: the first write of a tree pays for
        // first-touch effects (tmpfs page allocation, a cold inode cache)
        // that would otherwise all land on the tool that runs first.
        let warm = tmp.path().join(format!("warm{i}"));
        run_tool("cp -a", &src, &warm);
        fs::remove_dir_all(&warm).unwrap();
        for run in 0..RUNS {
            // Each run starts with the next tool, so no tool always follows
            // the same one (and its writeback).
            for k in 0..tools.len() {
                let t = (run + k) % tools.len();
                let tool = &tools[t];
                let dst = tmp.path().join(format!("dst{i}-{run}-{t}"));
                times[t].push(run_tool(tool, &src, &dst));
                if tmpfs {
                    fs::remove_dir_all(&dst).unwrap();
                } else {
                    dsts.push(dst);
                }
            }
        }
        eprintln!("{name}: {times:?}");
        let m: Vec<f64> = times.into_iter().map(|v| median(v).as_secs_f64()).collect();
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.2}x | {:.2}x |",
            m[0],
            m[1],
            m[2],
            m[1] / m[0],
            m[2] / m[0]
        );
        for d in dsts {
            let _ = fs::remove_dir_all(d);
        }
        if i == 2 {
            let (n, cost) = probe_cost(&src);
            println!(
                "\nxattr probe (flistxattr on the open fd): {:.2} us per file, {:.3} s over {n} files",
                cost.as_secs_f64() * 1e6 / n as f64,
                cost.as_secs_f64()
            );
        }
        let _ = fs::remove_dir_all(&src);
    }
}
