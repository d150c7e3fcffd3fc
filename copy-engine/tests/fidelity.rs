//! What `cp -a` keeps beyond `cp -r`: owners, xattrs, POSIX ACLs, hard-link
//! groups and special files. Run as root (trusted.* xattrs, chown, mknod,
//! a ramfs mount); the unprivileged side is tested through the agent in
//! the integration tests.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use copy_engine::{copy, Options, Progress, Report};

fn require_root() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions and always succeeds.
        unsafe { libc::geteuid() },
        0,
        "these tests need root (trusted.* xattrs, chown, mknod, mount)"
    );
}

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn setx(path: &Path, name: &str, value: &[u8]) {
    let (p, n) = (c(path), CString::new(name).unwrap());
    // SAFETY: valid C strings; `value` is readable for its length.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Every xattr of `path` (not followed), ACLs included.
fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = c(path);
    let mut names = vec![0u8; 65536];
    // SAFETY: `names` is writable for its length.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr {}", path.display());
    names.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: valid C strings; `v` is writable for its length.
        let len =
            unsafe { libc::lgetxattr(p.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(len >= 0, "getxattr {:?} {}", cn, path.display());
        v.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

/// A POSIX ACL in the kernel's xattr form: version 2, then (tag, perm, id)
/// entries sorted by tag.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

const UNDEF: u32 = u32::MAX;
/// user::rw- user:1234:r-- group::r-- mask::r-- other::---
fn file_acl() -> Vec<u8> {
    acl(&[
        (0x01, 6, UNDEF),
        (0x02, 4, 1234),
        (0x04, 4, UNDEF),
        (0x10, 4, UNDEF),
        (0x20, 0, UNDEF),
    ])
}
/// user::rwx group::r-x group:4321:rwx mask::rwx other::---
fn dir_acl() -> Vec<u8> {
    acl(&[
        (0x01, 7, UNDEF),
        (0x04, 5, UNDEF),
        (0x08, 7, 4321),
        (0x10, 7, UNDEF),
        (0x20, 0, UNDEF),
    ])
}

fn copy_ok(src: &Path, dst: &Path, workers: usize) -> Report {
    let r = copy(
        src,
        dst,
        &Options { workers },
        &Progress::default(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(r.failure_count, 0, "{:?}", r.failures);
    r
}

fn set_mtime(path: &Path, secs: i64, nsec: i64) {
    let p = c(path);
    let ts = [libc::timespec {
        tv_sec: secs,
        tv_nsec: nsec,
    }; 2];
    // SAFETY: valid C string and two valid timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", path.display());
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

/// Entry-by-entry: type, mode, owner, mtime, size, symlink target, xattrs
/// (ACLs included). Returns the relative paths of regular files with their
/// (source inode, target inode), for the hard-link checks.
fn compare(src: &Path, dst: &Path, rel: &Path, inodes: &mut Vec<(PathBuf, u64, u64)>) {
    let (a, b) = (src.join(rel), dst.join(rel));
    let ma = fs::symlink_metadata(&a).unwrap();
    let mb = fs::symlink_metadata(&b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    let what = b.display();
    assert_eq!(ma.file_type(), mb.file_type(), "type of {what}");
    assert_eq!(
        (ma.uid(), ma.gid()),
        (mb.uid(), mb.gid()),
        "owner of {what}"
    );
    if !ma.file_type().is_symlink() {
        assert_eq!(ma.mode() & 0o7777, mb.mode() & 0o7777, "mode of {what}");
    }
    assert_eq!(
        (ma.mtime(), ma.mtime_nsec()),
        (mb.mtime(), mb.mtime_nsec()),
        "mtime of {what}"
    );
    assert_eq!(xattrs(&a), xattrs(&b), "xattrs of {what}");
    let ft = ma.file_type();
    if ft.is_file() {
        assert_eq!(
            fs::read(&a).unwrap(),
            fs::read(&b).unwrap(),
            "data of {what}"
        );
        inodes.push((rel.to_path_buf(), ma.ino(), mb.ino()));
    } else if ft.is_symlink() {
        assert_eq!(fs::read_link(&a).unwrap(), fs::read_link(&b).unwrap());
    } else if ft.is_char_device() || ft.is_block_device() {
        assert_eq!(ma.rdev(), mb.rdev(), "rdev of {what}");
    } else if ft.is_dir() {
        let names = |p: &Path| {
            let mut v: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let na = names(&a);
        assert_eq!(na, names(&b), "entries of {what}");
        for n in na {
            compare(src, dst, &rel.join(n), inodes);
        }
    }
}

/// Files with the same source inode share one target inode, and files of
/// different source inodes do not.
fn assert_link_groups(inodes: &[(PathBuf, u64, u64)]) {
    for (pa, sa, ta) in inodes {
        for (pb, sb, tb) in inodes {
            assert_eq!(
                sa == sb,
                ta == tb,
                "hard links of {} and {}",
                pa.display(),
                pb.display()
            );
        }
    }
}

#[test]
fn owners_xattrs_acls_links_and_special_files_are_kept() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    for d in ["d1", "d2", "acl-dir", "sgid-dir"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    fs::write(src.join("d1/plain"), b"plain").unwrap();
    fs::write(src.join("d1/x"), b"xattrs").unwrap();
    setx(&src.join("d1/x"), "user.tool", b"v1");
    setx(&src.join("d1/x"), "user.bin", &[0, 1, 2, 255]);
    setx(&src.join("d1/x"), "trusted.site", b"root only");
    setx(&src.join("d1"), "user.dir", b"on a directory");
    // Read-only with a user xattr: needs the write-then-chmod order.
    fs::write(src.join("d1/ro"), b"ro").unwrap();
    setx(&src.join("d1/ro"), "user.ro", b"still kept");
    fs::set_permissions(src.join("d1/ro"), fs::Permissions::from_mode(0o444)).unwrap();
    fs::write(src.join("acl-dir/f"), b"acl").unwrap();
    setx(
        &src.join("acl-dir/f"),
        "system.posix_acl_access",
        &file_acl(),
    );
    setx(&src.join("acl-dir"), "system.posix_acl_access", &dir_acl());
    setx(&src.join("acl-dir"), "system.posix_acl_default", &dir_acl());
    // A foreign owner, setgid kept after the chown.
    fs::write(src.join("sgid-dir/owned"), b"owned").unwrap();
    chown(&src.join("sgid-dir/owned"), 1234, 5678);
    fs::set_permissions(
        src.join("sgid-dir/owned"),
        fs::Permissions::from_mode(0o2755),
    )
    .unwrap();
    chown(&src.join("sgid-dir"), 1234, 5678);
    fs::set_permissions(src.join("sgid-dir"), fs::Permissions::from_mode(0o2775)).unwrap();
    symlink("owned", src.join("sgid-dir/link")).unwrap();
    chown(&src.join("sgid-dir/link"), 1234, 5678);
    // Three names of one file in two directories, and a group of two.
    fs::write(src.join("d1/h1"), b"linked").unwrap();
    fs::hard_link(src.join("d1/h1"), src.join("d1/h2")).unwrap();
    fs::hard_link(src.join("d1/h1"), src.join("d2/h3")).unwrap();
    fs::write(src.join("d2/g1"), b"other group").unwrap();
    fs::hard_link(src.join("d2/g1"), src.join("d1/g2")).unwrap();
    // Linked to a name outside the tree: a plain copy.
    fs::write(src.join("d2/outside"), b"out").unwrap();
    fs::hard_link(src.join("d2/outside"), t.path().join("outside-link")).unwrap();
    let sh = |s: &str| {
        let ok = Command::new("bash")
            .arg("-c")
            .arg(s)
            .current_dir(&src)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{s}");
    };
    sh("mkfifo -m 0620 d2/fifo && mknod -m 0600 d2/null c 1 3 && mknod -m 0640 d2/loop b 7 200");
    sh("python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"d2/sock\")'");
    setx(&src.join("d2/fifo"), "system.posix_acl_access", &file_acl());
    for (i, p) in [
        "d1/plain",
        "d1/x",
        "d1/ro",
        "acl-dir/f",
        "sgid-dir/owned",
        "sgid-dir/link",
        "d1/h1",
        "d2/g1",
        "d2/outside",
        "d2/fifo",
        "d2/null",
        "d2/loop",
        "d2/sock",
        "d1",
        "d2",
        "acl-dir",
        "sgid-dir",
        "",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&src.join(p), 1_600_000_000 + i as i64, 100 + i as i64);
    }
    for workers in [1, 4] {
        let dst = t.path().join(format!("dst{workers}"));
        let r = copy_ok(&src, &dst, workers);
        assert_eq!(r.notes, Vec::<String>::new(), "{workers} workers");
        let mut inodes = Vec::new();
        compare(&src, &dst, Path::new(""), &mut inodes);
        assert_link_groups(&inodes);
        let h = fs::metadata(dst.join("d1/h1")).unwrap();
        assert_eq!(h.nlink(), 3);
        assert_eq!(fs::metadata(dst.join("d2/outside")).unwrap().nlink(), 1);
        // A re-run into the finished copy keeps all of it.
        let r = copy_ok(&src, &dst, workers);
        assert_eq!(r.notes, Vec::<String>::new());
        let mut inodes = Vec::new();
        compare(&src, &dst, Path::new(""), &mut inodes);
        assert_link_groups(&inodes);
    }
}

#[test]
fn many_hard_link_groups_across_workers() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    for d in 0..4 {
        fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
    }
    // 300 groups of 4 names, one per directory, so workers race for them.
    for g in 0..300 {
        let first = src.join(format!("d0/g{g}"));
        fs::write(&first, format!("group {g}").repeat(g % 50 + 1)).unwrap();
        for d in 1..4 {
            fs::hard_link(&first, src.join(format!("d{d}/g{g}"))).unwrap();
        }
    }
    let dst = t.path().join("dst");
    let r = copy_ok(&src, &dst, 8);
    assert_eq!(r.counts.files, 1200);
    let mut inodes = Vec::new();
    compare(&src, &dst, Path::new(""), &mut inodes);
    assert_link_groups(&inodes);
}

#[test]
fn a_hard_link_whose_first_copy_fails_is_copied_by_the_next_name() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("a")).unwrap();
    fs::create_dir_all(src.join("b")).unwrap();
    fs::write(src.join("a/x"), b"data").unwrap();
    fs::hard_link(src.join("a/x"), src.join("b/y")).unwrap();
    fs::hard_link(src.join("a/x"), src.join("b/z")).unwrap();
    let dst = t.path().join("dst");
    // A directory in the way of one name: whichever name comes first,
    // exactly that name fails and the other two are one copy.
    fs::create_dir_all(dst.join("a/x/occupied")).unwrap();
    let r = copy(
        &src,
        &dst,
        &Options { workers: 4 },
        &Progress::default(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(r.failure_count, 1, "{:?}", r.failures);
    assert!(
        r.failures[0].starts_with(&format!("{}:", dst.join("a/x").display())),
        "{:?}",
        r.failures
    );
    let (y, z) = (
        fs::metadata(dst.join("b/y")).unwrap(),
        fs::metadata(dst.join("b/z")).unwrap(),
    );
    assert_eq!(y.ino(), z.ino());
    assert_eq!(fs::read(dst.join("b/y")).unwrap(), b"data");
}

/// A ramfs mount (no xattrs, no ACLs), unmounted on drop.
struct Ramfs(PathBuf);

impl Ramfs {
    fn mount(at: &Path) -> Ramfs {
        fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount ramfs at {}", at.display());
        Ramfs(at.to_path_buf())
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_destination_without_xattrs_or_acls_is_a_note_not_a_failure() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..3 {
        let f = src.join(format!("sub/f{i}"));
        fs::write(&f, b"data").unwrap();
        setx(&f, "user.k", b"v");
    }
    setx(&src.join("sub"), "system.posix_acl_default", &dir_acl());
    setx(&src.join("sub/f0"), "system.posix_acl_access", &file_acl());
    let ram = Ramfs::mount(&t.path().join("ram"));
    let dst = ram.0.join("copy");
    let r = copy_ok(&src, &dst, 2);
    let mut notes = r.notes.clone();
    notes.sort();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes[0].starts_with(
            "not kept (the destination does not support them): ACLs of 2 entries, first "
        ),
        "{notes:?}"
    );
    assert!(
        notes[1].starts_with(
            "not kept (the destination does not support them): user.* xattrs of 3 entries, first "
        ),
        "{notes:?}"
    );
    for i in 0..3 {
        assert_eq!(fs::read(dst.join(format!("sub/f{i}"))).unwrap(), b"data");
    }
    // The mode still carries what the ACL's mask allowed (group r--).
    assert_eq!(
        fs::metadata(dst.join("sub/f0")).unwrap().mode() & 0o777,
        fs::metadata(src.join("sub/f0")).unwrap().mode() & 0o777
    );
}

#[test]
fn a_default_acl_of_the_destination_does_not_leak_into_the_copy() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("f644"), b"plain").unwrap();
    fs::write(src.join("sub/f600"), b"private").unwrap();
    fs::set_permissions(src.join("sub/f600"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(src.join("sub/acl"), b"own acl").unwrap();
    setx(&src.join("sub/acl"), "system.posix_acl_access", &file_acl());
    let sh = |s: &str| {
        let ok = Command::new("bash")
            .arg("-c")
            .arg(s)
            .current_dir(&src)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{s}");
    };
    sh("mkfifo -m 0644 sub/fifo");
    for (i, p) in ["f644", "sub/f600", "sub/acl", "sub/fifo", "sub", ""]
        .iter()
        .enumerate()
    {
        set_mtime(&src.join(p), 1_650_000_000 + i as i64, 7);
    }
    // A project directory whose default ACL gives a group rwx and others
    // nothing: new entries would get that instead of their own modes.
    let project = t.path().join("project");
    fs::create_dir(&project).unwrap();
    setx(&project, "system.posix_acl_default", &dir_acl());
    let native = project.join("native");
    let r = copy_ok(&src, &native, 2);
    assert_eq!(r.notes, Vec::<String>::new());
    let mut inodes = Vec::new();
    compare(&src, &native, Path::new(""), &mut inodes);
    // cp -a does the same, so the expectation is the peer's.
    let cp = project.join("cp");
    let ok = Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&cp)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a");
    compare(&src, &cp, Path::new(""), &mut inodes);
}
