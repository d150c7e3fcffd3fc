//! Entries other than directories: dispatch, symlinks, special files, and
//! the helpers that replace what an earlier run left behind.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;

use super::file::copy_file;
use super::{join, DirNode, Entry, Shared, Side};
use crate::attrs::{self, Names, Step, Tgt};
use crate::journal;
use crate::sys::{self, Node};

pub(super) fn copy_entry(
    shared: &Shared,
    dir: &DirNode,
    name: &CStr,
    d_type: u8,
    buf: &mut Vec<u8>,
) {
    let src_path = || join(&dir.src_path, name);
    let tgt_path = || join(&dir.tgt_path, name);
    let entry = Entry {
        src_dir: dir.src.as_raw_fd(),
        tgt_dir: dir.tgt.as_raw_fd(),
        name,
        tgt_name: name,
        src_path: &src_path,
        tgt_path: &tgt_path,
        fresh: dir.fresh,
        gives_acls: dir.gives_acls,
        in_tree: true,
        key: journal::child_key(dir.key, name.to_bytes()),
    };
    let res = match d_type {
        libc::DT_REG => copy_file(shared, buf, &entry).map(|copied| {
            if copied {
                shared.progress.add_file();
            }
        }),
        libc::DT_LNK => copy_symlink(shared, &entry).map(|()| shared.progress.add_link()),
        libc::DT_FIFO | libc::DT_SOCK | libc::DT_CHR | libc::DT_BLK => {
            copy_special(shared, &entry).map(drop)
        }
        _ => {
            shared.note(format!("skipped special file: {}", src_path().display()));
            Ok(())
        }
    };
    match res {
        Ok(()) => {}
        Err(Side::Src(e)) => shared.fail(&src_path(), &e),
        Err(Side::Tgt(e)) => shared.fail(&tgt_path(), &e),
    }
}

/// Runs `make` for a new entry; a re-run first removes what the previous
/// run left there.
fn create_replacing(e: &Entry, make: impl Fn() -> io::Result<()>) -> Result<(), Side> {
    match make() {
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
            sys::unlinkat(e.tgt_dir, e.tgt_name, 0).map_err(Side::Tgt)?;
            make().map_err(Side::Tgt)
        }
        other => other.map_err(Side::Tgt),
    }
}

/// Owner and xattrs of an entry that cannot be opened (a symlink or special
/// file): by name, with full paths for the xattr calls. Returns the names
/// so the caller can set its ACLs after the mode.
fn by_name_meta(
    shared: &Shared,
    e: &Entry,
    st: &libc::stat,
    paths: &(CString, CString),
) -> Result<Names, Side> {
    let tgt = Tgt::At {
        dir: e.tgt_dir,
        name: e.tgt_name,
        path: &paths.1,
    };
    shared.id.set_owner(tgt, st, e.fresh).map_err(Side::Tgt)?;
    let names = Names::of(Node::Path(&paths.0)).map_err(Side::Src)?;
    if !names.is_empty() {
        attrs::copy_xattrs(
            &names,
            Step::Plain,
            Node::Path(&paths.0),
            tgt,
            &shared.not_kept,
            e.tgt_path,
        )?;
    }
    Ok(names)
}

fn full_paths(e: &Entry) -> Result<(CString, CString), Side> {
    Ok((
        sys::cstring(&(e.src_path)()).map_err(Side::Src)?,
        sys::cstring(&(e.tgt_path)()).map_err(Side::Tgt)?,
    ))
}

pub(super) fn copy_symlink(shared: &Shared, e: &Entry) -> Result<(), Side> {
    let st = sys::fstatat(e.src_dir, e.name, libc::AT_SYMLINK_NOFOLLOW).map_err(Side::Src)?;
    let link = sys::readlinkat(e.src_dir, e.name).map_err(Side::Src)?;
    create_replacing(e, || sys::symlinkat(&link, e.tgt_dir, e.tgt_name))?;
    // Symlinks have no mode and no ACLs; Linux allows them no user.*
    // xattrs either, so this is about root's trusted.*/security.*.
    let paths = full_paths(e)?;
    by_name_meta(shared, e, &st, &paths)?;
    sys::utimensat_nofollow(e.tgt_dir, e.tgt_name, &sys::times_of(&st)).map_err(Side::Tgt)
}

/// FIFOs and sockets are recreated, device nodes too where the kernel
/// lets us (CAP_MKNOD); otherwise they are skipped with a note, where
/// `cp -a` fails. Returns whether the entry was created.
pub(super) fn copy_special(shared: &Shared, e: &Entry) -> Result<bool, Side> {
    let st = sys::fstatat(e.src_dir, e.name, libc::AT_SYMLINK_NOFOLLOW).map_err(Side::Src)?;
    let fmt = st.st_mode & libc::S_IFMT;
    let mode = st.st_mode & 0o7777;
    let device = fmt == libc::S_IFCHR || fmt == libc::S_IFBLK;
    let rdev = if device { st.st_rdev } else { 0 };
    match create_replacing(e, || {
        sys::mknodat(e.tgt_dir, e.tgt_name, fmt | (mode & 0o777), rdev)
    }) {
        Err(Side::Tgt(err)) if device && err.raw_os_error() == Some(libc::EPERM) => {
            shared.note(format!(
                "skipped device node (creating one needs privileges): {}",
                (e.src_path)().display()
            ));
            return Ok(false);
        }
        other => other?,
    }
    let paths = full_paths(e)?;
    let names = by_name_meta(shared, e, &st, &paths)?;
    if e.gives_acls {
        let tgt = Tgt::At {
            dir: e.tgt_dir,
            name: e.tgt_name,
            path: &paths.1,
        };
        attrs::drop_inherited(&names, tgt, false).map_err(Side::Tgt)?;
    }
    // mknod applied the umask and cannot set setuid/setgid/sticky.
    sys::fchmodat(e.tgt_dir, e.tgt_name, mode).map_err(Side::Tgt)?;
    if !names.is_empty() {
        let tgt = Tgt::At {
            dir: e.tgt_dir,
            name: e.tgt_name,
            path: &paths.1,
        };
        attrs::copy_xattrs(
            &names,
            Step::Acls,
            Node::Path(&paths.0),
            tgt,
            &shared.not_kept,
            e.tgt_path,
        )?;
    }
    sys::utimensat_nofollow(e.tgt_dir, e.tgt_name, &sys::times_of(&st)).map_err(Side::Tgt)?;
    Ok(true)
}

/// Links `e` to `first`, the finished copy of another name of the same
/// source inode; replaces what a previous run left.
pub(super) fn link_to(e: &Entry, first: &CStr) -> Result<(), Side> {
    create_replacing(e, || sys::linkat(first, e.tgt_dir, e.tgt_name))
}
