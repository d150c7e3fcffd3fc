//! What `cp -a` keeps besides data, modes and times: owners, xattrs, POSIX
//! ACLs (as their `system.posix_acl_*` xattrs) and hard-link groups.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use crate::sys::{self, Node};

const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
const ACL_ACCESS_C: &CStr = c"system.posix_acl_access";
const ACL_DEFAULT_C: &CStr = c"system.posix_acl_default";

/// Whether new entries in the directory `dir` inherit ACLs from its
/// default ACL.
pub(crate) fn gives_acls(dir: Node) -> bool {
    sys::has_xattr(dir, ACL_DEFAULT_C)
}

/// Removes the ACLs a new entry inherited from its directory's default ACL
/// where the source has none: `cp -a` gives the copy the source's
/// permissions, not the destination directory's (gnulib's
/// `set_permissions`, which also deletes a default ACL the source lacks).
pub(crate) fn drop_inherited(names: &Names, tgt: Tgt, dir: bool) -> io::Result<()> {
    let mut drop = vec![ACL_ACCESS_C];
    if dir {
        drop.push(ACL_DEFAULT_C);
    }
    for name in drop {
        if names.iter().any(|n| n == name) {
            continue;
        }
        match sys::removexattr(tgt.node(), name) {
            Err(e) if !matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => {
                return Err(e)
            }
            _ => {}
        }
    }
    Ok(())
}

/// A target entry whose metadata is being set: open (files, directories)
/// or by name in its directory (symlinks, special files).
#[derive(Clone, Copy)]
pub(crate) enum Tgt<'a> {
    Fd(&'a OwnedFd),
    At {
        dir: RawFd,
        name: &'a CStr,
        /// The full path, for the xattr calls (there are no `*xattrat`).
        path: &'a CStr,
    },
}

impl Tgt<'_> {
    fn node(&self) -> Node<'_> {
        match *self {
            Tgt::Fd(fd) => Node::Fd(fd),
            Tgt::At { path, .. } => Node::Path(path),
        }
    }

    fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        match *self {
            Tgt::Fd(fd) => sys::fchown(fd, uid, gid),
            Tgt::At { dir, name, .. } => sys::lchownat(dir, name, uid, gid),
        }
    }
}

/// Who the copy runs as, and what it learnt about its rights.
pub(crate) struct Identity {
    pub euid: u32,
    pub egid: u32,
    pub root: bool,
    /// Set at the first refused uid change, so an unprivileged copy tries
    /// only the group of later files (cp tries both every time).
    uid_refused: AtomicBool,
}

impl Identity {
    pub fn current() -> Identity {
        let euid = sys::geteuid();
        Identity {
            euid,
            egid: sys::getegid(),
            root: euid == 0,
            uid_refused: AtomicBool::new(false),
        }
    }

    /// The owner the kernel gives a new entry in a directory with `dir_st`:
    /// ours, with the directory's group when it is setgid.
    pub fn fresh_owner(&self, dir_st: &libc::stat) -> (u32, u32) {
        let gid = if dir_st.st_mode & libc::S_ISGID != 0 {
            dir_st.st_gid
        } else {
            self.egid
        };
        (self.euid, gid)
    }

    /// Gives `tgt` the owner of `st` as `cp -a` does (copy.c `set_owner`):
    /// uid and gid; failing that (unprivileged), the gid alone; a refusal
    /// is not an error for an unprivileged copy. `have` is the target's
    /// current owner, so the common case makes no call.
    pub fn set_owner(&self, tgt: Tgt, st: &libc::stat, have: (u32, u32)) -> io::Result<()> {
        let (uid, gid) = (st.st_uid, st.st_gid);
        let refusal_ok = |e: &io::Error| {
            !self.root && matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL))
        };
        if uid != have.0 && !self.uid_refused.load(Ordering::Relaxed) {
            match tgt.chown(uid, gid) {
                Ok(()) => return Ok(()),
                Err(e) if refusal_ok(&e) => self.uid_refused.store(true, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
        if gid != have.1 {
            match tgt.chown(u32::MAX, gid) {
                Err(e) if !refusal_ok(&e) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The NUL-separated xattr names of a source entry.
pub(crate) struct Names(Vec<u8>);

impl Names {
    pub fn of(node: Node) -> io::Result<Names> {
        sys::listxattr(node).map(Names)
    }

    fn iter(&self) -> impl Iterator<Item = &CStr> {
        let mut rest = &self.0[..];
        std::iter::from_fn(move || {
            let name = CStr::from_bytes_until_nul(rest).ok()?;
            rest = &rest[name.to_bytes().len() + 1..];
            Some(name)
        })
        .filter(|n| !n.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any name is copied in the plain-xattr step (the one that
    /// needs the target writable).
    pub fn has_plain(&self) -> bool {
        self.iter().any(|n| plain(n.to_bytes()))
    }
}

fn is_acl(name: &[u8]) -> bool {
    name == ACL_ACCESS || name == ACL_DEFAULT
}

/// Copied in the xattr step: everything but `system.*` (the ACLs have
/// their own step; other names there are file-system internals such as
/// NFSv4 ACLs) and the names libattr's /etc/xattr.conf makes `cp -a`
/// skip: XFS shows root its ACLs and capabilities again as
/// `trusted.SGI_*`, and writing those raw would bypass the ACL code.
fn plain(name: &[u8]) -> bool {
    const SKIP: [&[u8]; 9] = [
        b"system.",
        b"trusted.SGI_ACL_FILE",
        b"trusted.SGI_ACL_DEFAULT",
        b"trusted.SGI_CAP_FILE",
        b"trusted.SGI_DMI_",
        b"trusted.SGI_MAC_FILE",
        b"xfsroot.",
        b"security.evm",
        b"afs.",
    ];
    !SKIP.iter().any(|p| name.starts_with(p))
}

/// What kind of metadata a name is, for the "not kept" note.
fn kind(name: &[u8]) -> String {
    if is_acl(name) {
        return "ACLs".to_string();
    }
    let ns = name.split(|&b| b == b'.').next().unwrap_or(name);
    format!("{}.* xattrs", String::from_utf8_lossy(ns))
}

/// Metadata a destination could not hold, counted per kind and reason so
/// a big tree gives one line each, not one per file.
#[derive(Default)]
pub(crate) struct NotKept(Mutex<Vec<(String, &'static str, u64, PathBuf)>>);

impl NotKept {
    pub fn add(&self, what: String, why: &'static str, path: PathBuf) {
        let mut v = self.0.lock().unwrap();
        match v.iter_mut().find(|e| e.0 == what && e.1 == why) {
            Some(e) => e.2 += 1,
            None => v.push((what, why, 1, path)),
        }
    }

    pub fn into_notes(self) -> Vec<String> {
        self.0
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|(what, why, n, first)| {
                let entries = if n == 1 { "entry" } else { "entries" };
                format!(
                    "not kept ({why}): {what} of {n} {entries}, first {}",
                    first.display()
                )
            })
            .collect()
    }
}

/// Which names a call copies.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Before the mode: user.*/trusted.*/security.* need the target
    /// writable for an unprivileged owner (the kernel's xattr_permission).
    Plain,
    /// After the mode: a chmod would rewrite the ACL mask.
    Acls,
}

/// Why a copy of metadata failed, with the side it failed on.
pub(crate) enum XErr {
    Src(io::Error),
    Tgt(io::Error),
}

/// Copies the names of `step` from `src` to `tgt`. A destination without
/// support (ENOTSUP), or a namespace the user may not write, is noted in
/// `not_kept`, not failed: `cp -a` warns about neither either.
pub(crate) fn copy_xattrs(
    names: &Names,
    step: Step,
    src: Node,
    tgt: Tgt,
    not_kept: &NotKept,
    tgt_path: &dyn Fn() -> PathBuf,
) -> Result<(), XErr> {
    for name in names.iter() {
        let b = name.to_bytes();
        let wanted = match step {
            Step::Plain => plain(b),
            Step::Acls => is_acl(b),
        };
        if !wanted {
            continue;
        }
        let Some(value) = sys::getxattr(src, name).map_err(XErr::Src)? else {
            continue;
        };
        match sys::setxattr(tgt.node(), name, &value) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                not_kept.add(kind(b), "the destination does not support them", tgt_path());
            }
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES))
                    && !b.starts_with(b"user.")
                    && !is_acl(b) =>
            {
                not_kept.add(kind(b), "not permitted", tgt_path());
            }
            Err(e) => {
                return Err(XErr::Tgt(io::Error::new(
                    e.kind(),
                    format!("cannot set {}: {e}", name.to_string_lossy()),
                )))
            }
        }
    }
    Ok(())
}

/// Hard-link groups of the tree: (st_dev, st_ino) of sources with more
/// than one link, to the target path of their first complete copy. Files
/// with one link never get here, so the common case costs nothing.
#[derive(Default)]
pub(crate) struct Links {
    /// `None` while the first name is being copied.
    map: Mutex<HashMap<(u64, u64), Option<CString>>>,
    cv: Condvar,
}

pub(crate) enum Claim<'a> {
    /// Copy it, then `done`; dropping the guard without `done` (the copy
    /// failed) lets the next name of the group try a copy of its own.
    First(LinkGuard<'a>),
    /// Already copied here: link to it.
    LinkTo(CString),
}

pub(crate) struct LinkGuard<'a> {
    links: &'a Links,
    key: (u64, u64),
    target: Option<CString>,
}

impl LinkGuard<'_> {
    pub fn done(mut self, target: &Path) {
        self.target = sys::cstring(target).ok();
    }
}

impl Drop for LinkGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.links.map.lock().unwrap();
        match self.target.take() {
            Some(t) => {
                map.insert(self.key, Some(t));
            }
            None => {
                map.remove(&self.key);
            }
        }
        drop(map);
        self.links.cv.notify_all();
    }
}

impl Links {
    /// The first name to arrive copies; the others wait for it (one file's
    /// copy: the copier holds no other claim meanwhile, so this cannot
    /// deadlock), then link to its result.
    pub fn claim(&self, st: &libc::stat) -> Claim<'_> {
        let key = (st.st_dev, st.st_ino);
        let mut map = self.map.lock().unwrap();
        loop {
            match map.get(&key) {
                None => {
                    map.insert(key, None);
                    return Claim::First(LinkGuard {
                        links: self,
                        key,
                        target: None,
                    });
                }
                Some(Some(target)) => return Claim::LinkTo(target.clone()),
                Some(None) => map = self.cv.wait(map).unwrap(),
            }
        }
    }
}
