//! Copies real trees and compares them with the sources.

use std::ffi::CString;
use std::fs::{self, File, FileTimes};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use copy_engine::{
    copy, prescan, resolve_destination, run_worker_to, Counts, Error, Options, Progress,
    WorkerEvent,
};

fn opts(workers: usize) -> Options {
    Options { workers }
}

/// Content that compresses badly and differs per file, so a mixed-up copy shows.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn time(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn set_times(path: &Path, atime: SystemTime, mtime: SystemTime) {
    let f = File::open(path).unwrap();
    f.set_times(FileTimes::new().set_accessed(atime).set_modified(mtime))
        .unwrap();
}

fn lset_times(path: &Path, secs: i64, nanos: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
    ];
    // SAFETY: valid C string and two valid timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "lutimes {}", path.display());
}

fn write_file(path: &Path, data: &[u8], mode: u32, mtime: SystemTime) {
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    // A recent atime, later than mtime: with relatime an older one would be
    // bumped by the copy's own read, and the source would no longer match.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    set_times(path, time(now.as_secs() - 10, 123_456_789), mtime);
}

/// A tree with every kind of thing the engine handles, times set last.
fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::create_dir_all(root.join("ro")).unwrap();
    write_file(
        &root.join("top.txt"),
        b"hello\n",
        0o644,
        time(1_600_000_000, 1),
    );
    write_file(
        &root.join("zero"),
        b"",
        0o600,
        time(1_600_000_001, 999_999_999),
    );
    write_file(
        &root.join("a/big.bin"),
        &content(1, 3 << 20 | 17),
        0o640,
        time(1_600_000_002, 500),
    );
    write_file(
        &root.join("a/exec"),
        b"#!/bin/sh\n",
        0o755,
        time(1_600_000_003, 0),
    );
    write_file(
        &root.join("a/setgid"),
        b"x",
        0o2750,
        time(1_600_000_004, 42),
    );
    for i in 0..200 {
        write_file(
            &root.join(format!("a/b/c/f{i}")),
            &content(i + 10, (i as usize * 37) % 5000),
            0o644,
            time(1_600_001_000 + i, i as u32),
        );
    }
    write_file(
        &root.join("ro/inside"),
        b"inside",
        0o444,
        time(1_600_000_005, 5),
    );
    symlink("../top.txt", root.join("a/rel-link")).unwrap();
    symlink("/nonexistent/dangling", root.join("dangling")).unwrap();
    lset_times(&root.join("a/rel-link"), 1_400_000_000, 777);
    lset_times(&root.join("dangling"), 1_400_000_001, 888);
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    for (d, t) in [
        ("a/b/c", 1_700_000_001),
        ("a/b", 1_700_000_002),
        ("a", 1_700_000_003),
        ("empty", 1_700_000_004),
        ("ro", 1_700_000_005),
        ("", 1_700_000_006),
    ] {
        set_times(&root.join(d), time(t, 11), time(t, 123_456_789));
    }
}

/// Asserts `b` is a faithful copy of `a`: types, bytes, modes, mtimes, links.
fn assert_same_tree(a: &Path, b: &Path) {
    let ma = fs::symlink_metadata(a).unwrap();
    let mb =
        fs::symlink_metadata(b).unwrap_or_else(|e| panic!("{} missing in copy: {e}", b.display()));
    assert_eq!(ma.file_type(), mb.file_type(), "type of {}", b.display());
    if !ma.file_type().is_symlink() {
        assert_eq!(
            ma.mode() & 0o7777,
            mb.mode() & 0o7777,
            "mode of {}",
            b.display()
        );
    }
    assert_eq!(
        (ma.mtime(), ma.mtime_nsec()),
        (mb.mtime(), mb.mtime_nsec()),
        "mtime of {}",
        b.display()
    );
    if ma.file_type().is_symlink() {
        assert_eq!(fs::read_link(a).unwrap(), fs::read_link(b).unwrap());
    } else if ma.is_file() {
        assert!(
            fs::read(a).unwrap() == fs::read(b).unwrap(),
            "content of {}",
            b.display()
        );
    } else if ma.is_dir() {
        let mut names: Vec<_> = fs::read_dir(a)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let mut names_b: Vec<_> = fs::read_dir(b)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names_b.sort();
        assert_eq!(names, names_b, "entries of {}", b.display());
        for n in names {
            assert_same_tree(&a.join(&n), &b.join(&n));
        }
    }
}

fn copy_ok(src: &Path, dst: &Path, workers: usize) -> copy_engine::Report {
    let p = Progress::default();
    copy(src, dst, &opts(workers), &p, &AtomicBool::new(false)).unwrap()
}

#[test]
fn copies_tree_faithfully_and_counts() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src);
    let totals = prescan(&src, &opts(0), &AtomicBool::new(false)).unwrap();
    for workers in [1, 4] {
        let dst = t.path().join(format!("out{workers}/deep/er/dst"));
        let r = copy_ok(&src, &dst, workers);
        assert_eq!(r.failure_count, 0, "{:?}", r.failures);
        assert!(r.failures.is_empty() && r.notes.is_empty());
        assert_same_tree(&src, &dst);
        // 6 dirs, 206 files, 2 links.
        assert_eq!(
            r.counts,
            Counts {
                items: 214,
                directories: 6,
                files: 206,
                links: 2,
                bytes: totals.total_bytes,
                resumed_files: 0,
                resumed_bytes: 0,
            }
        );
        assert_eq!(totals.total_items, 214);
        // Missing parents come from mkdir -p: 0777 less the umask, not 0700.
        let parent_mode = fs::metadata(t.path().join(format!("out{workers}/deep")))
            .unwrap()
            .mode();
        assert_eq!(parent_mode & 0o700, 0o700);
    }
}

#[test]
fn rerun_overwrites_into_existing_target() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src);
    let dest = t.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let target = resolve_destination(&src, &dest);
    assert_eq!(target, dest.join("src"));
    copy_ok(&src, &target, 2);
    // The source changes between runs; the recorded target is reused, so
    // the second run must not nest a `src/src`.
    fs::set_permissions(src.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
    write_file(
        &src.join("ro/inside"),
        b"changed, and longer",
        0o600,
        time(1_650_000_000, 9),
    );
    set_times(&src.join("ro"), time(1, 0), time(2, 3));
    fs::remove_file(src.join("a/rel-link")).unwrap();
    symlink("elsewhere", src.join("a/rel-link")).unwrap();
    fs::write(src.join("top.txt"), b"hi").unwrap();
    set_times(&src.join("top.txt"), time(5, 0), time(6, 0));
    set_times(&src.join("a"), time(7, 0), time(8, 0));
    set_times(&src, time(7, 0), time(8, 0));
    let r = copy_ok(&src, &target, 2);
    assert_eq!(r.failure_count, 0, "{:?}", r.failures);
    assert_same_tree(&src, &target);
    assert!(!target.join("src").exists());
}

#[test]
fn sparse_file_keeps_holes() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("sparse");
    let size = 64u64 << 20;
    {
        let mut f = File::create(&src).unwrap();
        f.set_len(size).unwrap();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&content(7, 100_000)).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(&content(8, 5000)).unwrap();
        // Trailing hole: the copy must still end at the full length.
    }
    let meta = fs::metadata(&src).unwrap();
    assert!(
        meta.blocks() * 512 < size / 4,
        "filesystem did not make a sparse file"
    );
    let dst = t.path().join("copy");
    let r = copy_ok(&src, &dst, 1);
    assert_eq!(r.counts.bytes, size);
    let md = fs::metadata(&dst).unwrap();
    assert_eq!(md.len(), size);
    assert!(
        md.blocks() * 512 < size / 4,
        "holes filled: {} blocks",
        md.blocks()
    );
    assert!(fs::read(&src).unwrap() == fs::read(&dst).unwrap());
}

#[test]
fn single_file_and_symlink_sources() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("f");
    write_file(&f, &content(3, 70_000), 0o604, time(1_234_567_890, 12));
    let dst = t.path().join("x/y/f2");
    let r = copy_ok(&f, &dst, 0);
    assert_eq!(r.counts.files, 1);
    assert_eq!(r.counts.bytes, 70_000);
    // Checked before anything reads either file: relatime bumps an atime
    // older than the ctime, which set_times/futimens just made "now". The
    // copy carries the atime from before its own read.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let md = fs::metadata(&dst).unwrap();
    assert_eq!(md.atime_nsec(), 123_456_789);
    assert!((now - 60..now).contains(&md.atime()));
    assert_same_tree(&f, &dst);

    let l = t.path().join("l");
    symlink("f", &l).unwrap();
    lset_times(&l, 1_111_111_111, 5);
    let dl = t.path().join("l2");
    let r = copy_ok(&l, &dl, 0);
    assert_eq!(r.counts.links, 1);
    assert_same_tree(&l, &dl);
}

#[test]
fn resolve_destination_follows_cp_rule() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("dir");
    fs::create_dir(&dir).unwrap();
    let file = t.path().join("file");
    fs::write(&file, b"").unwrap();
    let link_to_dir = t.path().join("link");
    symlink(&dir, &link_to_dir).unwrap();
    let missing = t.path().join("missing/deeper");
    for (i, name) in ["a", "with space", "dots.x.y", ".hidden", "ünïcode", "x-"]
        .iter()
        .enumerate()
    {
        for src in [
            PathBuf::from(format!("/some/where/{name}")),
            PathBuf::from(format!("/some/where/{name}/")),
            PathBuf::from(format!("rel/{name}")),
        ] {
            assert_eq!(resolve_destination(&src, &dir), dir.join(name), "case {i}");
            assert_eq!(
                resolve_destination(&src, &link_to_dir),
                link_to_dir.join(name)
            );
            assert_eq!(resolve_destination(&src, &file), file);
            assert_eq!(resolve_destination(&src, &missing), missing);
        }
    }
    // `..` has no file_name: cp uses the directory's real name.
    let inner = t.path().join("outer/inner");
    fs::create_dir_all(&inner).unwrap();
    assert_eq!(
        resolve_destination(&inner.join(".."), &dir),
        dir.join("outer")
    );
}

#[test]
fn fifo_recreated_and_not_counted() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("regular"), b"r").unwrap();
    let fifo = src.join("pipe");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
    lset_times(&fifo, 1_500_000_000, 4242);
    // Special files are not counted: totals are what progress counts.
    let totals = prescan(&src, &opts(0), &AtomicBool::new(false)).unwrap();
    assert_eq!(totals.total_items, 2);
    let dst = t.path().join("dst");
    let r = copy_ok(&src, &dst, 2);
    assert_eq!(r.notes, Vec::<String>::new());
    assert_eq!(r.failure_count, 0);
    assert_eq!(r.counts.items, 2);
    assert!(dst.join("regular").exists());
    let m = fs::symlink_metadata(dst.join("pipe")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_500_000_000, 4242));
}

#[test]
fn one_failure_does_not_stop_the_others() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::create_dir_all(src.join("e/sub")).unwrap();
    for i in 0..50 {
        fs::write(src.join(format!("d/f{i}")), content(i, 1000)).unwrap();
    }
    fs::write(src.join("e/sub/x"), b"x").unwrap();
    let dst = t.path().join("dst");
    // A directory where a file goes, and a file where a directory goes.
    fs::create_dir_all(dst.join("d/f7")).unwrap();
    fs::create_dir_all(dst.join("e")).unwrap();
    fs::write(dst.join("e/sub"), b"not a dir").unwrap();
    let r = copy_ok(&src, &dst, 2);
    assert_eq!(r.failure_count, 2, "{:?}", r.failures);
    let mut failures = r.failures.clone();
    failures.sort();
    assert_eq!(
        failures,
        vec![
            format!(
                "{}: Is a directory (os error 21)",
                dst.join("d/f7").display()
            ),
            format!(
                "{}: Not a directory (os error 20)",
                dst.join("e/sub").display()
            ),
        ]
        .into_iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
    );
    for i in (0..50).filter(|&i| i != 7) {
        assert_eq!(
            fs::read(dst.join(format!("d/f{i}"))).unwrap(),
            content(i, 1000)
        );
    }
    assert_eq!(r.counts.files, 49);
}

#[test]
fn only_first_ten_failures_kept() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let dst = t.path().join("dst");
    for i in 0..25 {
        fs::write(src.join(format!("f{i}")), b"x").unwrap();
        fs::create_dir_all(dst.join(format!("f{i}"))).unwrap();
    }
    let r = copy_ok(&src, &dst, 3);
    assert_eq!(r.failure_count, 25);
    assert_eq!(r.failures.len(), 10);
}

#[test]
fn missing_source_is_fatal() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("nope");
    let err = copy(
        &src,
        &t.path().join("d"),
        &opts(1),
        &Progress::default(),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Source { .. }));
    let msg = err.to_string();
    assert!(msg.contains(&*src.to_string_lossy()), "{msg}");
    assert!(msg.contains("No such file or directory"), "{msg}");
    assert!(prescan(&src, &opts(1), &AtomicBool::new(false)).is_err());
}

#[test]
fn copy_into_itself_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let err = copy_engine::copy(
        &src,
        &src.join("new/inside"),
        &opts(1),
        &Progress::default(),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(matches!(err, Error::IntoItself { .. }), "{err}");
}

#[test]
fn cancel_stops_work() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    for d in 0..20 {
        fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        for f in 0..200 {
            fs::write(src.join(format!("d{d}/f{f}")), content(f, 4096)).unwrap();
        }
    }
    // Already cancelled: nothing is done.
    let cancelled = AtomicBool::new(true);
    let p = Progress::default();
    let r = copy(&src, &t.path().join("c0"), &opts(2), &p, &cancelled);
    assert!(matches!(r, Err(Error::Cancelled)));
    assert_eq!(p.snapshot().files, 0);

    // Cancelled mid-way: the copy stops well short of 4000 files.
    let cancel = AtomicBool::new(false);
    let p = Progress::default();
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            while p.files.load(Ordering::Relaxed) < 50 {
                std::thread::yield_now();
            }
            cancel.store(true, Ordering::Relaxed);
        });
        copy(&src, &t.path().join("c1"), &opts(1), &p, &cancel)
    });
    assert!(matches!(r, Err(Error::Cancelled)));
    assert!(p.snapshot().files < 4000, "{:?}", p.snapshot());
}

fn events(buf: &[u8]) -> Vec<WorkerEvent> {
    std::str::from_utf8(buf)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

#[test]
fn worker_protocol_success() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src);
    let dst = t.path().join("dst");
    let mut out = Vec::new();
    let code = run_worker_to(&mut out, &src, &dst, 2, Duration::from_millis(1));
    assert_eq!(code, 0);
    let ev = events(&out);
    let WorkerEvent::Scan {
        total_bytes,
        total_items,
    } = ev[0]
    else {
        panic!("first event {:?}", ev[0]);
    };
    let Some(WorkerEvent::Done {
        counts,
        failure_count,
        failures,
        notes,
    }) = ev.last()
    else {
        panic!("last event {:?}", ev.last());
    };
    assert_eq!((counts.bytes, counts.items), (total_bytes, total_items));
    assert_eq!((*failure_count, failures.len(), notes.len()), (0, 0, 0));
    assert!(ev[1..ev.len() - 1]
        .iter()
        .all(|e| matches!(e, WorkerEvent::Progress(_))));
    assert_same_tree(&src, &dst);
    // The wire format the agent parses.
    let line = std::str::from_utf8(&out)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(
        line.starts_with(r#"{"event":"scan","total_bytes":"#),
        "{line}"
    );
}

#[test]
fn worker_protocol_failure_and_fatal() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let dst = t.path().join("dst");
    fs::create_dir_all(dst.join("f")).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        run_worker_to(&mut out, &src, &dst, 1, Duration::from_millis(250)),
        1
    );
    match events(&out).last() {
        Some(WorkerEvent::Done {
            failure_count: 1,
            failures,
            ..
        }) => assert!(failures[0].ends_with("Is a directory (os error 21)")),
        other => panic!("{other:?}"),
    }

    let mut out = Vec::new();
    let missing = t.path().join("missing");
    assert_eq!(
        run_worker_to(&mut out, &missing, &dst, 1, Duration::from_millis(250)),
        2
    );
    let ev = events(&out);
    assert_eq!(ev.len(), 1);
    match &ev[0] {
        WorkerEvent::Fatal { message } => assert!(message.contains("missing"), "{message}"),
        other => panic!("{other:?}"),
    }
    let json = r#"{"event":"progress","items":1,"directories":1,"files":0,"links":0,"bytes":0}"#;
    assert_eq!(
        serde_json::from_str::<WorkerEvent>(json).unwrap(),
        WorkerEvent::Progress(Counts {
            items: 1,
            directories: 1,
            ..Counts::default()
        })
    );
}
