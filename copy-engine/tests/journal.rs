//! The resume journal: what a re-run of the same operation trusts.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use copy_engine::{copy_resuming, Journal, Options, Progress, Report};

fn tree(root: &Path) {
    for d in 0..4 {
        let dir = root.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..50 {
            fs::write(dir.join(format!("f{f}")), format!("{d}/{f}").repeat(100)).unwrap();
        }
    }
    symlink("d0/f0", root.join("link")).unwrap();
    fs::write(root.join("hard"), b"one inode, two names").unwrap();
    fs::hard_link(root.join("hard"), root.join("hard2")).unwrap();
}

fn journal_file(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .unwrap()
}

fn run(src: &Path, dst: &Path, journal: &Path) -> Report {
    let j = Journal::open(journal_file(journal), dst).unwrap();
    let r = copy_resuming(
        src,
        dst,
        &Options { workers: 2 },
        &Progress::default(),
        &AtomicBool::new(false),
        Some(&j),
    )
    .unwrap();
    assert!(j.error().is_none(), "{:?}", j.error());
    assert_eq!(r.failure_count, 0, "{:?}", r.failures);
    r
}

fn same(src: &Path, dst: &Path) {
    let out = std::process::Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(src)
        .arg(dst)
        .output()
        .expect("diff is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_rerun_skips_what_the_journal_lists_and_still_intact() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, jp) = (t.path().join("s"), t.path().join("d"), t.path().join("j"));
    tree(&src);
    let first = run(&src, &dst, &jp);
    assert_eq!(first.counts.resumed_files, 0);
    // 200 files + the first name of the hard-link pair.
    assert_eq!(fs::metadata(&jp).unwrap().len(), 201 * 80);
    let total = first.counts.bytes;

    let second = run(&src, &dst, &jp);
    assert_eq!(second.counts.resumed_files, 201);
    // Only the second name of the pair is linked again.
    assert_eq!(second.counts.bytes, 20);
    assert_eq!(second.counts.bytes + second.counts.resumed_bytes, total);
    same(&src, &dst);
    assert_eq!(
        fs::metadata(dst.join("hard")).unwrap().ino(),
        fs::metadata(dst.join("hard2")).unwrap().ino()
    );
    // Nothing new was completed, so nothing new was recorded.
    assert_eq!(fs::metadata(&jp).unwrap().len(), 201 * 80);
}

#[test]
fn an_empty_journal_trusts_no_existing_file() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, jp) = (t.path().join("s"), t.path().join("d"), t.path().join("j"));
    tree(&src);
    let r = run(&src, &dst, &t.path().join("other"));
    let again = run(&src, &dst, &jp);
    assert_eq!(again.counts.resumed_files, 0);
    assert_eq!(again.counts.bytes, r.counts.bytes);
}

#[test]
fn a_replaced_target_or_a_changed_source_is_copied_again() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, jp) = (t.path().join("s"), t.path().join("d"), t.path().join("j"));
    tree(&src);
    run(&src, &dst, &jp);
    // Same size and mtime, another inode: not the file this copy wrote.
    let victim = dst.join("d1/f1");
    let meta = fs::metadata(&victim).unwrap();
    fs::remove_file(&victim).unwrap();
    fs::write(&victim, vec![b'x'; meta.len() as usize]).unwrap();
    File::options()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_modified(meta.modified().unwrap())
        .unwrap();
    // Same size and mtime at the source, new content: its ctime tells.
    let changed = src.join("d2/f2");
    let smeta = fs::metadata(&changed).unwrap();
    let mut f = File::options().write(true).open(&changed).unwrap();
    f.write_all(b"new!").unwrap();
    f.set_modified(smeta.modified().unwrap()).unwrap();
    drop(f);
    let r = run(&src, &dst, &jp);
    assert_eq!(r.counts.resumed_files, 199);
    same(&src, &dst);
}

#[test]
fn a_torn_last_record_is_cut_off() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, jp) = (t.path().join("s"), t.path().join("d"), t.path().join("j"));
    tree(&src);
    run(&src, &dst, &jp);
    // As if a crash had cut the last write short.
    journal_file(&jp).write_all(&[0xab; 17]).unwrap();
    let r = run(&src, &dst, &jp);
    assert_eq!(r.counts.resumed_files, 201);
    assert_eq!(fs::metadata(&jp).unwrap().len(), 201 * 80);
    // A garbled record ends what is trusted: the files after it are
    // copied again, and the journal goes on from there.
    let data = fs::read(&jp).unwrap();
    let mut garbled = data.clone();
    garbled[100 * 80 + 3] ^= 0xff;
    fs::write(&jp, &garbled).unwrap();
    let r = run(&src, &dst, &jp);
    assert_eq!(r.counts.resumed_files, 100);
    assert_eq!(fs::metadata(&jp).unwrap().len(), 201 * 80);
    same(&src, &dst);
}
