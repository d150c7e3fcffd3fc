//! Regular files: resume check, data (holes kept), metadata, journal.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use super::entry::link_to;
use super::{set_mode, Entry, Shared, Side, BUF_SIZE, CHUNK};
use crate::attrs::{self, Claim, Names, Step, Tgt};
use crate::sys::{self, Node};

/// Copies one regular file; `Ok(false)` when an earlier run of the same
/// operation had completed it (see `journal` for when that is trusted).
pub(super) fn copy_file(shared: &Shared, buf: &mut Vec<u8>, e: &Entry) -> Result<bool, Side> {
    // The resume scan's fast path: a listed file with a single name is
    // checked by name, without opening it. Hard links go the long way,
    // through the link claim below.
    if let Some(j) = shared.journal.filter(|j| j.lists(e.key)) {
        if let Ok(st) = sys::fstatat(e.src_dir, e.name, libc::AT_SYMLINK_NOFOLLOW) {
            if st.st_mode & libc::S_IFMT == libc::S_IFREG
                && (st.st_nlink == 1 || !e.in_tree)
                && j.is_complete(e.key, &st, || {
                    sys::fstatat(e.tgt_dir, e.tgt_name, libc::AT_SYMLINK_NOFOLLOW)
                })
            {
                shared.progress.add_resumed(st.st_size.max(0) as u64);
                return Ok(false);
            }
        }
    }
    let src =
        sys::openat(e.src_dir, e.name, libc::O_RDONLY | libc::O_NOFOLLOW, 0).map_err(Side::Src)?;
    let st = sys::fstat(&src).map_err(Side::Src)?;
    let mut guard = None;
    if e.in_tree && st.st_nlink > 1 {
        match shared.links.claim(&st) {
            Claim::First(g) => guard = Some(g),
            Claim::LinkTo(first) => match link_to(e, &first) {
                Ok(()) => {
                    shared.progress.add_bytes(st.st_size as u64);
                    return Ok(true);
                }
                // No link possible here (EMLINK, a file system without
                // hard links): the data is still worth a copy of its own.
                Err(_) => {
                    shared.not_kept.add(
                        "hard links".to_string(),
                        "the destination refused the link; copied instead",
                        (e.tgt_path)(),
                    );
                }
            },
        }
    }
    // After the link claim: the other names of a resumed first name are
    // linked to it as usual (cheap, and right whatever the earlier run did).
    if let Some(j) = shared.journal {
        if j.is_complete(e.key, &st, || {
            sys::fstatat(e.tgt_dir, e.tgt_name, libc::AT_SYMLINK_NOFOLLOW)
        }) {
            shared.progress.add_resumed(st.st_size.max(0) as u64);
            if let Some(g) = guard {
                g.done(&(e.tgt_path)());
            }
            return Ok(false);
        }
    }
    let names = Names::of(Node::Fd(&src)).map_err(Side::Src)?;
    let mode = st.st_mode & 0o7777;
    // The kernel wants write permission for user.* xattrs even from the
    // owner, so a read-only file is created writable until its xattrs are
    // in (cp -a's chmod u+rw in copy_reg does the same).
    let create_mode = if !shared.id.root && mode & 0o200 == 0 && names.has_plain() {
        mode | 0o200
    } else {
        mode
    };
    let wr = libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW;
    // O_EXCL first: a fresh file gets its final mode from open itself and
    // needs no fchmod; only a re-run pays for the second open.
    let (tgt, existed) = match sys::openat(e.tgt_dir, e.tgt_name, wr | libc::O_EXCL, create_mode) {
        Ok(fd) => (fd, false),
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
            match sys::openat(e.tgt_dir, e.tgt_name, wr | libc::O_TRUNC, create_mode) {
                Ok(fd) => (fd, true),
                Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                    // A symlink left where a file now is: replace it rather
                    // than write through it.
                    sys::unlinkat(e.tgt_dir, e.tgt_name, 0).map_err(Side::Tgt)?;
                    (
                        sys::openat(e.tgt_dir, e.tgt_name, wr | libc::O_EXCL, create_mode)
                            .map_err(Side::Tgt)?,
                        false,
                    )
                }
                Err(err) => return Err(Side::Tgt(err)),
            }
        }
        Err(err) => return Err(Side::Tgt(err)),
    };
    copy_data(shared, buf, &src, &tgt, &st)?;
    // cp -a's order: owner, xattrs, mode, ACLs, times. chown clears
    // setuid/setgid and security.capability, so it goes first; writing
    // clears setuid/setgid for unprivileged writers, so those bits are set
    // after the data; the umask may also have stripped bits.
    let have = if existed {
        let t = sys::fstat(&tgt).map_err(Side::Tgt)?;
        (t.st_uid, t.st_gid)
    } else {
        e.fresh
    };
    shared
        .id
        .set_owner(Tgt::Fd(&tgt), &st, have)
        .map_err(Side::Tgt)?;
    if !names.is_empty() {
        attrs::copy_xattrs(
            &names,
            Step::Plain,
            Node::Fd(&src),
            Tgt::Fd(&tgt),
            &shared.not_kept,
            e.tgt_path,
        )?;
    }
    if e.gives_acls {
        attrs::drop_inherited(&names, Tgt::Fd(&tgt), false).map_err(Side::Tgt)?;
    }
    // Under a default ACL the umask is not applied, the ACL is.
    if existed
        || mode & 0o7000 != 0
        || mode & shared.umask != 0
        || create_mode != mode
        || e.gives_acls
    {
        set_mode(&tgt, mode).map_err(Side::Tgt)?;
    }
    if !names.is_empty() {
        attrs::copy_xattrs(
            &names,
            Step::Acls,
            Node::Fd(&src),
            Tgt::Fd(&tgt),
            &shared.not_kept,
            e.tgt_path,
        )?;
    }
    sys::futimens(&tgt, &sys::times_of(&st)).map_err(Side::Tgt)?;
    // Times are the last step: only now is the file complete. A cancelled
    // copy may have stopped inside the data, so it records nothing.
    if let Some(j) = shared.journal {
        if !shared.cancel.load(Ordering::Relaxed) {
            if let Ok(t) = sys::fstat(&tgt) {
                j.record(e.key, &st, &t);
            }
        }
    }
    if let Some(g) = guard {
        g.done(&(e.tgt_path)());
    }
    Ok(true)
}

fn copy_data(
    shared: &Shared,
    buf: &mut Vec<u8>,
    src: &OwnedFd,
    tgt: &OwnedFd,
    st: &libc::stat,
) -> Result<(), Side> {
    let size = st.st_size;
    if size <= 0 {
        return Ok(());
    }
    let sparse = (st.st_blocks as i128) * 512 < size as i128;
    if !sparse {
        // No SEEK_DATA probing for the common dense file: copy up to the
        // size seen by fstat (one call for a small file; a file growing
        // while being copied has no consistent content to preserve anyway).
        return copy_range(shared, buf, src, tgt, 0, size);
    }
    let mut off = 0i64;
    while off < size {
        let data = match sys::lseek(src, off, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            // No SEEK_DATA support: treat the rest as data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => off,
            Err(e) => return Err(Side::Src(e)),
        };
        if data >= size {
            break;
        }
        let hole = match sys::lseek(src, data, libc::SEEK_HOLE) {
            Ok(Some(h)) => h.min(size),
            Ok(None) => size,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => size,
            Err(e) => return Err(Side::Src(e)),
        };
        shared.progress.add_bytes((data - off) as u64);
        copy_range(shared, buf, src, tgt, data, hole)?;
        off = hole;
        if shared.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
    if off < size {
        shared.progress.add_bytes((size - off) as u64);
    }
    // Extends the file over a trailing hole.
    sys::ftruncate(tgt, size).map_err(Side::Tgt)
}

/// Copies bytes [start, end) at the same offsets; stops early at EOF.
fn copy_range(
    shared: &Shared,
    buf: &mut Vec<u8>,
    src: &OwnedFd,
    tgt: &OwnedFd,
    start: i64,
    end: i64,
) -> Result<(), Side> {
    let mut off = start;
    if !shared.no_cfr.load(Ordering::Relaxed) {
        while off < end {
            let (mut oi, mut oo) = (off, off);
            let len = ((end - off) as usize).min(CHUNK);
            match sys::copy_file_range(src, Some(&mut oi), tgt, Some(&mut oo), len) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    off += n as i64;
                    shared.progress.add_bytes(n as u64);
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::ENOSYS) => {
                        shared.no_cfr.store(true, Ordering::Relaxed);
                        break;
                    }
                    Some(libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL) => break,
                    // Which side failed is not knowable from the error:
                    // out-of-space and quota are the likely ones, both target.
                    _ => return Err(Side::Tgt(e)),
                },
            }
            if shared.cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
        if off >= end {
            return Ok(());
        }
    }
    if buf.is_empty() {
        buf.resize(BUF_SIZE, 0);
    }
    while off < end {
        let len = ((end - off) as usize).min(buf.len());
        let n = sys::pread(src, &mut buf[..len], off).map_err(Side::Src)?;
        if n == 0 {
            return Ok(());
        }
        sys::pwrite_all(tgt, &buf[..n], off).map_err(Side::Tgt)?;
        off += n as i64;
        shared.progress.add_bytes(n as u64);
        if shared.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
    Ok(())
}
