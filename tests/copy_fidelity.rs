//! The native copy is as faithful as `cp -a`: one torture tree, copied by
//! the same unprivileged user through the agent and with `cp -a`, each
//! copy compared with the source entry by entry by the same comparison,
//! so the expectation is the peer's, not ours.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::clientmount::{LoopDev, MountGuard};
use integration_tests::*;

const LONG: Duration = Duration::from_secs(120);

/// Fails loudly when a tool the tree needs is missing (package in .ci/run).
fn require_tools() {
    for (tool, package) in [
        ("setfacl", "acl"),
        ("getfacl", "acl"),
        ("setfattr", "attr"),
        ("mkfs.xfs", "xfsprogs"),
        ("mkfifo", "coreutils"),
        ("python3", "python3"),
    ] {
        require_tool(tool, package);
    }
}

fn run(script: &str) {
    let out = sh(script);
    assert!(
        out.status.success(),
        "{script}\nfailed: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// A fresh XFS on a loop device, mounted at `at`: user xattrs, ACLs, holes
/// and hard links whatever the file system of the temp dir is (tmpfs has
/// user xattrs only since Linux 6.6).
fn xfs_at(dir: &Path, at: &Path, guard: &mut MountGuard) -> LoopDev {
    let dev = LoopDev::new(dir, "fidelity", Some(&["mkfs.xfs", "-q"]));
    std::fs::create_dir_all(at).unwrap();
    guard.watch(at);
    run(&format!("mount {} {}", dev.dev.display(), at.display()));
    run(&format!("chmod 0755 {}", at.display()));
    dev
}

const LONG_NAME_LEN: usize = 250;

/// Everything in the issue's table, built as root and then handed to `u`,
/// except `secret` (root's, mode 0600: the user cannot read it) and `null`
/// (a device node the user cannot create).
/// With `root_only`, also a trusted.* xattr (root's namespace).
fn torture_tree(src: &Path, u: &User, other: &User, root_only: bool) {
    let long = "n".repeat(LONG_NAME_LEN);
    run(&format!(
        r#"set -e
cd {src}
mkdir -p sgid sticky empty deep/a/b/c acl-dir hl1 hl2 'unicodé-文件-🚀'
chmod 2775 sgid; chmod 1777 sticky; chmod 0750 deep/a
echo plain > plain; chmod 0640 plain
printf '#!/bin/sh\n' > exec; chmod 0755 exec
echo setgid > sgid/file
echo data > 'unicodé-文件-🚀/ünï'
echo long > {long}
ln -s plain link; ln -s /nonexistent/dangling dangling
truncate -s 1G sparse; echo tail >> sparse
echo xattrs > x
setfattr -n user.tool -v 'tool metadata' x
setfattr -n user.bin -v 0x00ff10 x
setfattr -n user.dir -v 'on a directory' deep
echo ro > ro; setfattr -n user.ro -v kept ro; chmod 0444 ro
echo acl > acl-file
setfacl -m u:{other}:rw,g:{other}:r acl-file
setfacl -m u:{other}:rwx acl-dir
setfacl -d -m u:{other}:rx,g::r-x acl-dir
echo inherits > acl-dir/child
echo linked > hl1/one; ln hl1/one hl1/two; ln hl1/one hl2/three
mkfifo -m 0640 fifo
python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("sock")'
chown -R {uid}:{gid} .
# After the chown, which clears setgid on files.
chmod 2750 sgid/file
echo secret > secret; chmod 0600 secret
mknod -m 0644 null c 1 3
{root_only}
find . -depth -exec touch -h -d '2020-01-02 03:04:05.123456789' {{}} +
"#,
        src = src.display(),
        other = other.name,
        uid = u.uid,
        gid = u.gid,
        root_only = if root_only {
            "setfattr -n trusted.site -v 'root metadata' x"
        } else {
            ""
        },
    ));
}

/// Not copied by either tool (the user may not): left out of the comparison.
const UNCOPYABLE: [&str; 2] = ["secret", "null"];

/// Every xattr of `path` (not followed), ACLs included, through the
/// syscalls rather than by parsing a tool's output.
fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
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
        assert!(len >= 0, "getxattr {cn:?} {}", path.display());
        v.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

fn same_content(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba).unwrap();
        let mut nb = 0;
        while nb < na {
            match fb.read(&mut bb[nb..na]).unwrap() {
                0 => return false,
                n => nb += n,
            }
        }
        if ba[..na] != bb[..na] {
            return false;
        }
        if na == 0 {
            return fb.read(&mut bb).unwrap() == 0;
        }
    }
}

/// Compares `copy` with `src` entry by entry, but for the top-level names
/// in `skip`; returns every difference.
fn differences(src: &Path, copy: &Path, skip: &[&str]) -> Vec<String> {
    let mut diffs = Vec::new();
    // (source inode, copy inode, relative path) of regular files.
    let mut inodes = Vec::new();
    walk(src, copy, Path::new(""), skip, &mut diffs, &mut inodes);
    for (sa, ca, pa) in &inodes {
        for (sb, cb, pb) in &inodes {
            if (sa == sb) != (ca == cb) {
                diffs.push(format!(
                    "{} and {}: hard links {} in the source, {} in the copy",
                    pa.display(),
                    pb.display(),
                    if sa == sb { "linked" } else { "apart" },
                    if ca == cb { "linked" } else { "apart" },
                ));
            }
        }
    }
    diffs
}

fn walk(
    src: &Path,
    copy: &Path,
    rel: &Path,
    skip: &[&str],
    diffs: &mut Vec<String>,
    inodes: &mut Vec<(u64, u64, PathBuf)>,
) {
    let (a, b) = (src.join(rel), copy.join(rel));
    let r = rel.display();
    let ma = std::fs::symlink_metadata(&a).unwrap();
    let mb = match std::fs::symlink_metadata(&b) {
        Ok(m) => m,
        Err(e) => return diffs.push(format!("{r}: missing in the copy ({e})")),
    };
    let mut check = |what: &str, x: String, y: String| {
        if x != y {
            diffs.push(format!("{r}: {what} {x} in the source, {y} in the copy"));
        }
    };
    let ft = ma.file_type();
    check("type", format!("{ft:?}"), format!("{:?}", mb.file_type()));
    if !ft.is_symlink() {
        check(
            "mode",
            format!("{:o}", ma.mode() & 0o7777),
            format!("{:o}", mb.mode() & 0o7777),
        );
    }
    check(
        "owner",
        format!("{}:{}", ma.uid(), ma.gid()),
        format!("{}:{}", mb.uid(), mb.gid()),
    );
    check(
        "mtime",
        format!("{}.{:09}", ma.mtime(), ma.mtime_nsec()),
        format!("{}.{:09}", mb.mtime(), mb.mtime_nsec()),
    );
    check(
        "xattrs",
        format!("{:?}", xattrs(&a)),
        format!("{:?}", xattrs(&b)),
    );
    if ft.is_file() {
        check("size", ma.len().to_string(), mb.len().to_string());
        if ma.len() == mb.len() && !same_content(&a, &b) {
            diffs.push(format!("{r}: content differs"));
        }
        // A hole stays a hole: no more than twice the source's blocks.
        if mb.blocks() > 2 * ma.blocks().max(8) {
            diffs.push(format!(
                "{r}: {} blocks in the source, {} in the copy",
                ma.blocks(),
                mb.blocks()
            ));
        }
        inodes.push((ma.ino(), mb.ino(), rel.to_path_buf()));
    } else if ft.is_symlink() {
        check(
            "target",
            format!("{:?}", std::fs::read_link(&a).ok()),
            format!("{:?}", std::fs::read_link(&b).ok()),
        );
    } else if ft.is_dir() {
        let names = |p: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| rel != Path::new("") || !skip.iter().any(|u| n == *u))
                .collect();
            v.sort();
            v
        };
        let (na, nb) = (names(&a), names(&b));
        if na != nb {
            diffs.push(format!(
                "{r}: entries {na:?} in the source, {nb:?} in the copy"
            ));
        }
        for n in na {
            walk(src, copy, &rel.join(n), skip, diffs, inodes);
        }
    }
}

#[test]
fn native_copy_keeps_what_cp_a_keeps_for_an_unprivileged_user() {
    require_tools();
    let agent = Agent::start(&[]);
    let (u, other) = (user("nnfdmt1"), user("nnfdmt2"));
    let mut mounts = MountGuard::default();
    let fs_root = agent.dir.path().join("xfs");
    let _dev = xfs_at(agent.dir.path(), &fs_root, &mut mounts);
    let src = fs_root.join("src");
    std::fs::create_dir(&src).unwrap();
    torture_tree(&src, &u, &other, false);
    let out_dir = fs_root.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    run(&format!("chown {}:{} {}", u.uid, u.gid, out_dir.display()));

    // The peer first, as the same user on the same tree.
    let cp_copy = out_dir.join("cp-a");
    let cp = sh_as(
        &u,
        &format!("cp -a {} {}", src.display(), cp_copy.display()),
    );
    assert!(!cp.status.success(), "cp -a cannot read secret");
    let cp_err = stderr(&cp);
    assert!(cp_err.contains("secret"), "{cp_err}");

    let native = out_dir.join("native");
    let req = agent.request_as(
        &u,
        &format!(
            "name=fidelity source={} destination={}",
            src.display(),
            native.display()
        ),
    );
    assert!(req.status.success(), "{}", stderr(&req));
    let status = agent.wait_completed("fidelity", LONG);
    assert_eq!(field(&status, "status").unwrap(), "failed", "{status}");
    let message = agent.read("fidelity/message").unwrap();
    assert!(message.starts_with("1 of "), "{message}");
    assert!(
        message.contains(&format!(
            "{}: Permission denied",
            src.join("secret").display()
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "skipped device node (creating one needs privileges): {}",
            src.join("null").display()
        )),
        "{message}"
    );

    let cp_diffs = differences(&src, &cp_copy, &UNCOPYABLE);
    assert!(
        cp_diffs.is_empty(),
        "the comparison fails cp -a itself:\n{}",
        cp_diffs.join("\n")
    );
    let native_diffs = differences(&src, &native, &UNCOPYABLE);
    assert!(
        native_diffs.is_empty(),
        "the native copy lost what cp -a kept:\n{}",
        native_diffs.join("\n")
    );
    // The tree held what it should, so the empty lists above mean something.
    let x = xattrs(&native.join("x"));
    assert_eq!(
        x.get("user.bin").map(Vec::as_slice),
        Some(&[0, 0xff, 0x10][..])
    );
    let acl_dir = xattrs(&native.join("acl-dir"));
    assert!(
        acl_dir.contains_key("system.posix_acl_access"),
        "{acl_dir:?}"
    );
    assert!(
        acl_dir.contains_key("system.posix_acl_default"),
        "{acl_dir:?}"
    );
    assert!(xattrs(&native.join("ro")).contains_key("user.ro"));
    assert_eq!(
        std::fs::metadata(native.join("hl1/one")).unwrap().nlink(),
        3
    );
    assert!(std::fs::symlink_metadata(native.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(native.join("sock"))
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(
        std::fs::metadata(native.join("sgid/file")).unwrap().mode() & 0o7777,
        0o2750
    );
    let getfacl = sh(&format!("getfacl -p {}", native.join("acl-file").display()));
    assert!(
        stdout(&getfacl).contains(&format!("user:{}:rw-", other.name)),
        "{}",
        stdout(&getfacl)
    );
    drop(mounts);
}

#[test]
fn a_destination_without_xattrs_or_acls_succeeds_and_says_what_was_not_kept() {
    require_tools();
    let agent = Agent::start(&[]);
    let (u, other) = (user("nnfdmt1"), user("nnfdmt2"));
    let mut mounts = MountGuard::default();
    let fs_root = agent.dir.path().join("xfs");
    let _dev = xfs_at(agent.dir.path(), &fs_root, &mut mounts);
    let src = fs_root.join("src");
    std::fs::create_dir(&src).unwrap();
    run(&format!(
        "set -e; cd {}; echo a > a; echo b > b; setfattr -n user.k -v v a; setfattr -n user.k -v v b; \
         setfacl -m u:{}:r a; chown -R {}:{} .",
        src.display(),
        other.name,
        u.uid,
        u.gid
    ));
    // ramfs holds no xattrs and no ACLs at all.
    let ram = agent.dir.path().join("ram");
    std::fs::create_dir(&ram).unwrap();
    mounts.watch(&ram);
    run(&format!(
        "mount -t ramfs ramfs {0} && chmod 1777 {0}",
        ram.display()
    ));
    let req = agent.request_as(
        &u,
        &format!(
            "name=noxattr source={} destination={}/copy",
            src.display(),
            ram.display()
        ),
    );
    assert!(req.status.success(), "{}", stderr(&req));
    let status = agent.wait_completed("noxattr", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    let message = agent.read("noxattr/message").unwrap();
    let copy = ram.join("copy");
    assert!(
        message.contains(&format!(
            "not kept (the destination does not support them): user.* xattrs of 2 entries, first {}",
            copy.display()
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "not kept (the destination does not support them): ACLs of 1 entry, first {}",
            copy.join("a").display()
        )),
        "{message}"
    );
    for f in ["a", "b"] {
        assert_eq!(
            std::fs::read(copy.join(f)).unwrap(),
            std::fs::read(src.join(f)).unwrap()
        );
    }
    drop(mounts);
}

#[test]
fn as_root_the_native_copy_keeps_what_cp_a_keeps_with_devices_and_trusted_xattrs() {
    require_tools();
    let agent = Agent::start(&[]);
    let (u, other) = (user("nnfdmt1"), user("nnfdmt2"));
    let mut mounts = MountGuard::default();
    let fs_root = agent.dir.path().join("xfs");
    let _dev = xfs_at(agent.dir.path(), &fs_root, &mut mounts);
    let src = fs_root.join("src");
    std::fs::create_dir(&src).unwrap();
    torture_tree(&src, &u, &other, true);
    let cp_copy = fs_root.join("cp-a");
    run(&format!("cp -a {} {}", src.display(), cp_copy.display()));
    let native = fs_root.join("native");
    let req = agent.request(&format!(
        "name=rootcopy source={} destination={}",
        src.display(),
        native.display()
    ));
    assert!(req.status.success(), "{}", stderr(&req));
    let status = agent.wait_completed("rootcopy", LONG);
    assert_eq!(field(&status, "status").unwrap(), "success", "{status}");
    let message = agent.read("rootcopy/message").unwrap();
    assert_eq!(message.trim(), "", "nothing to note");
    let cp_diffs = differences(&src, &cp_copy, &[]);
    assert!(
        cp_diffs.is_empty(),
        "the comparison fails cp -a itself:\n{}",
        cp_diffs.join("\n")
    );
    let native_diffs = differences(&src, &native, &[]);
    assert!(
        native_diffs.is_empty(),
        "the native copy lost what cp -a kept:\n{}",
        native_diffs.join("\n")
    );
    assert_eq!(
        xattrs(&native.join("x"))
            .get("trusted.site")
            .map(Vec::as_slice),
        Some(&b"root metadata"[..])
    );
    let null = std::fs::symlink_metadata(native.join("null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    drop(mounts);
}
