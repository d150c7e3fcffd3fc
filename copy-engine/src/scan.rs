//! The pre-scan: totals for percent progress, walked in parallel.

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{pool, sys, Error, ScanTotals};

pub(crate) fn prescan(
    source: &Path,
    workers: usize,
    cancel: &AtomicBool,
) -> Result<ScanTotals, Error> {
    let src_err = |e| Error::Source {
        path: source.to_path_buf(),
        error: e,
    };
    let meta = std::fs::symlink_metadata(source).map_err(src_err)?;
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(ScanTotals {
            total_bytes: meta.len(),
            total_items: 1,
        });
    }
    if ft.is_symlink() {
        return Ok(ScanTotals {
            total_bytes: 0,
            total_items: 1,
        });
    }
    if !ft.is_dir() {
        return Ok(ScanTotals::default());
    }
    // An unreadable root is fatal; unreadable subdirectories are left for
    // the copy to report per path.
    let c = sys::cstring(source).map_err(src_err)?;
    drop(
        sys::openat(
            libc::AT_FDCWD,
            &c,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(src_err)?,
    );
    let bytes = AtomicU64::new(0);
    let items = AtomicU64::new(1);
    pool::run(
        workers,
        vec![source.to_path_buf()],
        cancel,
        || vec![0u64; 4096],
        |dir: PathBuf, dents, pool| {
            let Ok(c) = sys::cstring(&dir) else { return };
            let Ok(fd) = sys::openat(
                libc::AT_FDCWD,
                &c,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            ) else {
                return;
            };
            let (mut b, mut n_items) = (0u64, 0u64);
            let mut subdirs = Vec::new();
            while let Ok(n) = sys::getdents(&fd, dents) {
                if n == 0 {
                    break;
                }
                for ent in sys::parse_dirents(dents, n) {
                    let mut t = ent.d_type;
                    let mut size = None;
                    if t == libc::DT_REG || t == libc::DT_UNKNOWN {
                        if let Ok(st) =
                            sys::fstatat(fd.as_raw_fd(), ent.name, libc::AT_SYMLINK_NOFOLLOW)
                        {
                            t = match st.st_mode & libc::S_IFMT {
                                libc::S_IFREG => libc::DT_REG,
                                libc::S_IFDIR => libc::DT_DIR,
                                libc::S_IFLNK => libc::DT_LNK,
                                _ => libc::DT_UNKNOWN,
                            };
                            size = Some(st.st_size as u64);
                        }
                    }
                    match t {
                        libc::DT_DIR => {
                            n_items += 1;
                            subdirs.push(dir.join(OsStr::from_bytes(ent.name.to_bytes())));
                        }
                        libc::DT_REG => {
                            n_items += 1;
                            b += size.unwrap_or(0);
                        }
                        libc::DT_LNK => n_items += 1,
                        _ => {}
                    }
                }
            }
            bytes.fetch_add(b, Ordering::Relaxed);
            items.fetch_add(n_items, Ordering::Relaxed);
            pool.push_all(subdirs);
        },
    );
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    Ok(ScanTotals {
        total_bytes: bytes.into_inner(),
        total_items: items.into_inner(),
    })
}
