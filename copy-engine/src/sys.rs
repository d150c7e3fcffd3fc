//! Thin wrappers over the `*at` syscalls the engine needs.
//!
//! std offers no `openat`/`mkdirat`/`getdents`, and going through full paths
//! would make the kernel re-walk every path component per file.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

pub fn openat(dir: RawFd, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `name` is a valid NUL-terminated string; the kernel validates `dir`.
        let fd = unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        match cvt(fd) {
            // SAFETY: the kernel just handed us this descriptor and nobody else owns it.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

pub fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a writable buffer of the right size for `fstat`.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled the whole struct.
    Ok(unsafe { st.assume_init() })
}

pub fn fstatat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid C string and a writable buffer of the right size.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it filled the whole struct.
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string; the kernel validates `dir`.
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid C string; the kernel validates `dir`.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both are valid C strings; the kernel validates `dir`.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

pub fn readlinkat(dir: RawFd, name: &CStr) -> io::Result<CString> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let n = cvt_size(unsafe {
            libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        })?;
        // A full buffer may mean truncation: grow and retry.
        if n < buf.len() {
            buf.truncate(n);
            return CString::new(buf)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "NUL in symlink"));
        }
        let len = buf.len() * 2;
        buf.resize(len, 0);
    }
}

pub fn fchmod(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

pub fn times_of(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

pub fn futimens(fd: &OwnedFd, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: `times` points to two valid timespecs.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

pub fn utimensat_nofollow(dir: RawFd, name: &CStr, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: valid C string and two valid timespecs.
    cvt(unsafe {
        libc::utimensat(
            dir,
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn ftruncate(fd: &OwnedFd, len: i64) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// `Ok(None)` means ENXIO: no data (or hole) at or after `off`.
pub fn lseek(fd: &OwnedFd, off: i64, whence: libc::c_int) -> io::Result<Option<i64>> {
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r))
}

/// With offsets given, the descriptors' file positions are left alone.
pub fn copy_file_range(
    fd_in: &OwnedFd,
    off_in: Option<&mut i64>,
    fd_out: &OwnedFd,
    off_out: Option<&mut i64>,
    len: usize,
) -> io::Result<usize> {
    let pin = off_in.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    let pout = off_out.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    loop {
        // SAFETY: the offset pointers are null or point to live i64s; the
        // descriptors are owned by the caller for the duration of the call.
        let r = unsafe {
            libc::copy_file_range(fd_in.as_raw_fd(), pin, fd_out.as_raw_fd(), pout, len, 0)
        };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn pread(fd: &OwnedFd, buf: &mut [u8], off: i64) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is writable for its length.
        let r = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn pwrite_all(fd: &OwnedFd, mut buf: &[u8], mut off: i64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is readable for its length.
        let r = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) };
        match cvt_size(r) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                off += n as i64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One directory entry as returned by `getdents64`.
pub struct Dirent<'a> {
    pub name: &'a CStr,
    pub d_type: u8,
}

/// Reads the next batch of entries into `buf`; 0 means the end.
pub fn getdents(fd: &OwnedFd, buf: &mut [u64]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is writable for its length in bytes; u64 storage gives
        // the 8-byte alignment linux_dirent64 records need.
        let r = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                std::mem::size_of_val(buf),
            )
        };
        match cvt_size(r as libc::ssize_t) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Iterates over the `len` bytes of records `getdents` wrote, skipping `.` and `..`.
pub fn parse_dirents(buf: &[u64], len: usize) -> impl Iterator<Item = Dirent<'_>> {
    // SAFETY: reinterpreting initialised u64 storage as bytes is always valid.
    let bytes: &[u8] =
        unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len.min(buf.len() * 8)) };
    let mut pos = 0usize;
    std::iter::from_fn(move || loop {
        // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name[].
        if pos + 19 > bytes.len() {
            return None;
        }
        let reclen = u16::from_ne_bytes([bytes[pos + 16], bytes[pos + 17]]) as usize;
        let d_type = bytes[pos + 18];
        let rec = bytes.get(pos + 19..pos + reclen)?;
        pos += reclen;
        let name = CStr::from_bytes_until_nul(rec).ok()?;
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        return Some(Dirent { name, d_type });
    })
}

/// The process umask, read without changing it (umask(2) can only set it,
/// which would race with other threads creating files).
pub fn current_umask() -> u32 {
    if let Ok(s) = std::fs::read_to_string("/proc/self/status") {
        for line in s.lines() {
            if let Some(v) = line.strip_prefix("Umask:") {
                if let Ok(m) = u32::from_str_radix(v.trim(), 8) {
                    return m;
                }
            }
        }
    }
    0o022
}

/// Where an xattr call acts: an open descriptor (the cheap, race-free case
/// for files and directories) or a path, not followed (symlinks and special
/// files, which cannot be opened for this without side effects).
#[derive(Clone, Copy)]
pub enum Node<'a> {
    Fd(&'a OwnedFd),
    Path(&'a CStr),
}

/// The NUL-separated xattr names of `node`; empty (one syscall) in the
/// common case of none, and also when the file system has no xattrs.
pub fn listxattr(node: Node) -> io::Result<Vec<u8>> {
    let call = |buf: &mut [u8]| {
        let (ptr, len) = if buf.is_empty() {
            (std::ptr::null_mut(), 0)
        } else {
            (buf.as_mut_ptr().cast::<libc::c_char>(), buf.len())
        };
        // SAFETY: `ptr` is null with length 0 or writable for `len` bytes.
        cvt_size(unsafe {
            match node {
                Node::Fd(fd) => libc::flistxattr(fd.as_raw_fd(), ptr, len),
                Node::Path(p) => libc::llistxattr(p.as_ptr(), ptr, len),
            }
        })
    };
    loop {
        let size = match call(&mut []) {
            Ok(0) => return Ok(Vec::new()),
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // Grew between the two calls: ask again.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The value of xattr `name`; `Ok(None)` if it vanished meanwhile.
pub fn getxattr(node: Node, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let call = |buf: &mut [u8]| {
        let (ptr, len) = if buf.is_empty() {
            (std::ptr::null_mut(), 0)
        } else {
            (buf.as_mut_ptr().cast::<libc::c_void>(), buf.len())
        };
        // SAFETY: valid C string; `ptr` is null with length 0 or writable for `len` bytes.
        cvt_size(unsafe {
            match node {
                Node::Fd(fd) => libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), ptr, len),
                Node::Path(p) => libc::lgetxattr(p.as_ptr(), name.as_ptr(), ptr, len),
            }
        })
    };
    loop {
        let size = match call(&mut []) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; size];
        if size == 0 {
            return Ok(Some(buf));
        }
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

pub fn setxattr(node: Node, name: &CStr, value: &[u8]) -> io::Result<()> {
    let (ptr, len) = (value.as_ptr().cast::<libc::c_void>(), value.len());
    // SAFETY: valid C string; `value` is readable for its length.
    cvt(unsafe {
        match node {
            Node::Fd(fd) => libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), ptr, len, 0),
            Node::Path(p) => libc::lsetxattr(p.as_ptr(), name.as_ptr(), ptr, len, 0),
        }
    })
    .map(drop)
}

/// `u32::MAX` leaves that id as it is (the `-1` of chown(2)).
pub fn fchown(fd: &OwnedFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub fn lchownat(dir: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid C string; the kernel validates `dir`.
    cvt(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

pub fn fchmodat(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string; the kernel validates `dir`.
    cvt(unsafe { libc::fchmodat(dir, name.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
    // SAFETY: valid C string; the kernel validates `dir`.
    cvt(unsafe { libc::mknodat(dir, name.as_ptr(), mode as libc::mode_t, dev) }).map(drop)
}

pub fn linkat(old: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both are valid C strings; the kernel validates `dir`.
    cvt(unsafe { libc::linkat(libc::AT_FDCWD, old.as_ptr(), dir, name.as_ptr(), 0) }).map(drop)
}

pub fn geteuid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::geteuid() }
}

pub fn getegid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::getegid() }
}

/// Whether `node` has xattr `name` (one call, no value copied).
pub fn has_xattr(node: Node, name: &CStr) -> bool {
    // SAFETY: valid C string; a null buffer with size 0 only asks for the size.
    let r = unsafe {
        match node {
            Node::Fd(fd) => libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), std::ptr::null_mut(), 0),
            Node::Path(p) => libc::lgetxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0),
        }
    };
    r >= 0
}

pub fn removexattr(node: Node, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe {
        match node {
            Node::Fd(fd) => libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()),
            Node::Path(p) => libc::lremovexattr(p.as_ptr(), name.as_ptr()),
        }
    })
    .map(drop)
}
