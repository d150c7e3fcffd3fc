//! What resuming costs on 50,000 x 4 KiB files in 500 directories:
//! a plain copy, the same copy writing a resume journal, and the re-run
//! that finds every file complete (the resume scan: journal read, then per
//! file open, fstat, and the target's fstatat, and nothing written).
//!
//! `BENCH_DIR` picks the file system (default /dev/shm: tmpfs keeps the
//! disk out of it, so what is left is the engine's own work). Each case
//! runs 5 times, interleaved; medians in seconds.
//! `cargo bench -p copy-engine --bench resume`

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use copy_engine::{copy_resuming, prescan, Journal, Options, Progress};

const RUNS: usize = 5;
const DIRS: usize = 500;
const PER_DIR: usize = 100;

fn make_tree(root: &Path) {
    let mut buf = vec![0u8; 4096];
    for d in 0..DIRS {
        let dir = root.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..PER_DIR {
            let seed = (d * PER_DIR + i) as u64;
            for (n, b) in buf.iter_mut().enumerate() {
                *b = (seed as usize).wrapping_mul(31).wrapping_add(n) as u8;
            }
            fs::write(dir.join(format!("f{i:03}")), &buf).unwrap();
        }
    }
}

fn journal(path: &Path, target: &Path) -> Journal {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    Journal::open(file, target).unwrap()
}

/// Pre-scan and copy, as the worker does; returns the time and the
/// files the run resumed.
fn run(src: &Path, dst: &Path, j: Option<&Journal>) -> (Duration, u64) {
    let opts = Options { workers: 0 };
    let cancel = AtomicBool::new(false);
    let t = Instant::now();
    prescan(src, &opts, &cancel).unwrap();
    let progress = Progress::default();
    let r = copy_resuming(src, dst, &opts, &progress, &cancel, j).unwrap();
    let took = t.elapsed();
    assert_eq!(r.failure_count, 0, "{:?}", r.failures);
    (took, r.counts.resumed_files)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let base = std::env::var_os("BENCH_DIR").unwrap_or_else(|| "/dev/shm".into());
    let dir = tempfile::Builder::new()
        .prefix("resume-bench-")
        .tempdir_in(&base)
        .unwrap();
    let src = dir.path().join("src");
    make_tree(&src);
    let files = (DIRS * PER_DIR) as u64;
    let (mut plain, mut journaled, mut resumed) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let dst = dir.path().join(format!("plain{i}"));
        plain.push(run(&src, &dst, None).0.as_secs_f64());
        fs::remove_dir_all(&dst).unwrap();

        let dst = dir.path().join(format!("journaled{i}"));
        let jp = dir.path().join(format!("journal{i}"));
        let (t, n) = run(&src, &dst, Some(&journal(&jp, &dst)));
        assert_eq!(n, 0);
        journaled.push(t.as_secs_f64());
        let t0 = Instant::now();
        let j = journal(&jp, &dst);
        let load = t0.elapsed();
        assert_eq!(j.known_files() as u64, files);
        let (t, n) = run(&src, &dst, Some(&j));
        assert_eq!(n, files, "every file resumed");
        resumed.push((t + load).as_secs_f64());
        fs::remove_dir_all(&dst).unwrap();
        fs::remove_file(&jp).unwrap();
    }
    println!("| run | median (s) | runs |");
    println!("|---|---:|---|");
    for (name, v) in [
        ("copy, no journal", &plain),
        ("copy, writing the journal", &journaled),
        ("re-run, all 50,000 complete (resume scan)", &resumed),
    ] {
        let runs: Vec<String> = v.iter().map(|s| format!("{s:.3}")).collect();
        println!(
            "| {name} | {:.3} | {} |",
            median(v.clone()),
            runs.join(", ")
        );
    }
}
